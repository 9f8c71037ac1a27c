#include "devices/virtio/virtio_pci.h"

#include <sys/eventfd.h>

#include <algorithm>
#include <stdexcept>

#include "base/errors.h"
#include "devices/bus.h"

namespace kiln::devices::virtio {
namespace {

constexpr uint16_t kVirtioPciVendor = 0x1AF4;
constexpr uint16_t kVirtioPciModernDeviceBase = 0x1040;
constexpr uint32_t kMaxQueues = (kMsixPbaOffset - kMsixTableOffset) / pci::kMsixEntrySize - 1;

pci::PciIdentity identity_for(const VirtioDevice& device) {
  return pci::PciIdentity{
      .vendor_id = kVirtioPciVendor,
      .device_id = uint16_t(kVirtioPciModernDeviceBase + device.device_type()),
      .revision = 1,  // modern-only device (spec 4.1.2.1)
      .class_code = device.pci_class_code(),
      .subsystem_vendor_id = kVirtioPciVendor,
      .subsystem_id = 0x40,
  };
}

// struct virtio_pci_cap after cap_vndr/cap_next (spec 4.1.4).
std::vector<uint8_t> virtio_cap_body(uint8_t cfg_type, uint32_t offset, uint32_t length,
                                     std::optional<uint32_t> notify_multiplier = std::nullopt) {
  uint8_t cap_len = notify_multiplier ? 20 : 16;
  std::vector<uint8_t> body = {cap_len, cfg_type, uint8_t(kVirtioBar), 0, 0, 0};
  for (uint32_t value : {offset, length})
    for (int i = 0; i < 4; ++i) body.push_back(uint8_t(value >> (8 * i)));
  if (notify_multiplier)
    for (int i = 0; i < 4; ++i) body.push_back(uint8_t(*notify_multiplier >> (8 * i)));
  return body;
}

UniqueFd make_eventfd() {
  UniqueFd fd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!fd) throw_errno("eventfd for virtqueue notification");
  return fd;
}

void drain_eventfd(int fd) {
  uint64_t count;
  [[maybe_unused]] ssize_t ignored = ::read(fd, &count, sizeof(count));
}

bool in_region(uint64_t offset, uint64_t size, uint64_t base) {
  return offset >= base && offset - base < kRegionSize && size <= kRegionSize - (offset - base);
}

}  // namespace

VirtioPciDevice::VirtioPciDevice(std::shared_ptr<VirtioDevice> device,
                                 const memory::GuestMemory& memory, MsiAllocator& msi,
                                 EventLoop& loop, NotifyRegistrar* notify)
    : PciDevice(identity_for(*device)),
      device_(std::move(device)),
      memory_(memory),
      loop_(loop),
      notify_(notify),
      msix_(uint16_t(std::min<uint32_t>(device_->num_queues(), kMaxQueues) + 1), msi) {
  uint16_t count = device_->num_queues();
  if (count == 0 || count > kMaxQueues) throw std::invalid_argument("bad virtio queue count");
  for (uint16_t q = 0; q < count; ++q) {
    queues_.emplace_back(device_->queue_max_size(q));
    queue_eventfds_.push_back(make_eventfd());
    notify_fds_.push_back(queue_eventfds_.back().get());
  }
  watched_.assign(count, false);
  queue_vectors_ = std::make_unique<std::atomic<uint16_t>[]>(count);
  for (uint16_t q = 0; q < count; ++q) queue_vectors_[q] = kNoVector;
  add_bar(kVirtioBar, pci::BarInfo{pci::BarType::kMemory64, kVirtioBarSize, false});
  add_virtio_capabilities();
}

VirtioPciDevice::~VirtioPciDevice() {
  std::lock_guard lock(mutex_);
  deactivate_locked();
  if (auto base = bar_mapping(kVirtioBar)) register_notifiers(*base, false);
}

void VirtioPciDevice::add_virtio_capabilities() {
  auto cap = [this](const std::vector<uint8_t>& body) { add_capability(kCapVendorSpecific, body); };
  cap(virtio_cap_body(kCapCommonCfg, kCommonCfgOffset, kCommonCfgSize));
  cap(virtio_cap_body(kCapNotifyCfg, kNotifyCfgOffset,
                      uint32_t(queues_.size()) * kNotifyOffMultiplier, kNotifyOffMultiplier));
  cap(virtio_cap_body(kCapIsrCfg, kIsrCfgOffset, 1));
  cap(virtio_cap_body(kCapDeviceCfg, kDeviceCfgOffset,
                      std::max<uint32_t>(device_->config_size(), 1)));
  // Access to the BAR through config space (spec 4.1.4.9): bar, offset, length and the data
  // window are the driver's to write.
  std::vector<uint8_t> pci_cfg = virtio_cap_body(kCapPciCfg, 0, 0);
  pci_cfg[0] = 20;
  pci_cfg.insert(pci_cfg.end(), 4, 0);
  std::vector<uint8_t> writable(pci_cfg.size(), 0);
  writable[kPciCfgBar - 2] = 0xFF;
  std::fill(writable.begin() + (kPciCfgOffset - 2), writable.end(), 0xFF);
  pci_cfg_capability_ = add_capability(kCapVendorSpecific, pci_cfg, writable);
  msix_capability_ = add_capability(
      pci::kMsixCapabilityId,
      msix_.capability_body(kVirtioBar, kMsixTableOffset, kVirtioBar, kMsixPbaOffset),
      pci::Msix::capability_writable_mask());
}

bool VirtioPciDevice::pci_cfg_window(uint64_t& offset, uint32_t& length) {
  uint8_t raw[12];
  read_config_bytes(pci_cfg_capability_ + kPciCfgBar, raw);
  uint8_t bar = raw[0];
  offset = load_le(std::span<const uint8_t>(raw + 4, 4));
  length = uint32_t(load_le(std::span<const uint8_t>(raw + 8, 4)));
  // Only naturally aligned 1, 2 and 4 byte accesses of our BAR are defined.
  return bar == kVirtioBar && (length == 1 || length == 2 || length == 4) && offset % length == 0 &&
         offset < kVirtioBarSize;
}

static bool overlaps(uint32_t offset, size_t size, uint32_t start, uint32_t length) {
  return offset < start + length && offset + size > start;
}

void VirtioPciDevice::config_before_read(uint32_t offset, size_t size) {
  if (!overlaps(offset, size, pci_cfg_capability_ + kPciCfgData, 4)) return;
  uint64_t bar_offset;
  uint32_t length;
  uint8_t data[4] = {};
  if (pci_cfg_window(bar_offset, length)) bar_read(kVirtioBar, bar_offset, {data, length});
  write_config_bytes(pci_cfg_capability_ + kPciCfgData, data);
}

void VirtioPciDevice::config_written(uint32_t offset, size_t size) {
  if (overlaps(offset, uint32_t(size), pci_cfg_capability_ + kPciCfgData, 4)) {
    uint64_t bar_offset;
    uint32_t length;
    uint8_t data[4];
    read_config_bytes(pci_cfg_capability_ + kPciCfgData, data);
    if (pci_cfg_window(bar_offset, length)) bar_write(kVirtioBar, bar_offset, {data, length});
  }
  uint32_t control = msix_capability_ + 2;
  if (offset + size <= control || offset >= control + 2) return;
  uint8_t bytes[2];
  read_config_bytes(control, bytes);
  msix_.set_control(uint16_t(bytes[0] | bytes[1] << 8));
}

void VirtioPciDevice::bars_changed(const std::vector<pci::BarChange>& changes) {
  for (const auto& change : changes) {
    if (change.index != kVirtioBar) continue;
    if (change.old_base) register_notifiers(*change.old_base, false);
    if (change.new_base) register_notifiers(*change.new_base, true);
  }
}

void VirtioPciDevice::register_notifiers(uint64_t bar_base, bool add) {
  if (!notify_) return;
  for (uint16_t q = 0; q < queues_.size(); ++q) {
    uint64_t gpa = bar_base + kNotifyCfgOffset + uint64_t(q) * kNotifyOffMultiplier;
    if (add) {
      notify_->add(gpa, kNotifyAccessLength, queue_eventfds_[q].get());
    } else {
      notify_->remove(gpa, kNotifyAccessLength, queue_eventfds_[q].get());
    }
  }
}

void VirtioPciDevice::bar_read(int bar, uint64_t offset, std::span<uint8_t> data) {
  std::fill(data.begin(), data.end(), 0);
  if (bar != kVirtioBar) return;
  if (in_region(offset, data.size(), kCommonCfgOffset)) {
    common_read(offset - kCommonCfgOffset, data);
  } else if (in_region(offset, data.size(), kIsrCfgOffset)) {
    // Reading the ISR status acknowledges it (spec 4.1.4.5).
    if (offset == kIsrCfgOffset) data[0] = isr_.exchange(0);
  } else if (in_region(offset, data.size(), kDeviceCfgOffset)) {
    device_->read_config(offset - kDeviceCfgOffset, data);
  } else if (offset >= kMsixTableOffset && offset < kMsixPbaOffset) {
    msix_.table_read(offset - kMsixTableOffset, data);
  } else if (in_region(offset, data.size(), kMsixPbaOffset)) {
    msix_.pba_read(offset - kMsixPbaOffset, data);
  }
}

void VirtioPciDevice::bar_write(int bar, uint64_t offset, std::span<const uint8_t> data) {
  if (bar != kVirtioBar) return;
  if (in_region(offset, data.size(), kCommonCfgOffset)) {
    common_write(offset - kCommonCfgOffset, data);
  } else if (in_region(offset, data.size(), kDeviceCfgOffset)) {
    device_->write_config(offset - kDeviceCfgOffset, data);
  } else if (in_region(offset, data.size(), kNotifyCfgOffset)) {
    uint64_t relative = offset - kNotifyCfgOffset;
    if (relative % kNotifyOffMultiplier == 0)
      notify_queue(uint16_t(relative / kNotifyOffMultiplier));
  } else if (offset >= kMsixTableOffset && offset < kMsixPbaOffset) {
    msix_.table_write(offset - kMsixTableOffset, data);
  }
}

void VirtioPciDevice::notify_queue(uint16_t queue) {
  if (queue >= queue_eventfds_.size()) return;
  // Same path as a KVM ioeventfd: the event loop picks it up.
  uint64_t one = 1;
  [[maybe_unused]] ssize_t ignored = ::write(queue_eventfds_[queue].get(), &one, sizeof(one));
  metrics_.notifications++;
}

uint16_t VirtioPciDevice::checked_vector(uint16_t vector) const {
  // An unmappable vector reads back as NO_VECTOR, which is how the driver learns of it.
  return vector < msix_.num_vectors() ? vector : kNoVector;
}

void VirtioPciDevice::common_read(uint64_t offset, std::span<uint8_t> data) {
  std::lock_guard lock(mutex_);
  // Assemble the structure as the guest sees it, then copy the bytes asked for: that serves
  // any access width the driver uses (Linux reads 64-bit fields as two dwords).
  uint8_t image[kCommonCfgSize] = {};
  auto put = [&image](uint32_t at, uint64_t value, int bytes) {
    for (int i = 0; i < bytes; ++i) image[at + i] = uint8_t(value >> (8 * i));
  };
  uint64_t features = device_->device_features();
  put(kCommonDeviceFeatureSelect, device_feature_select_, 4);
  put(kCommonDeviceFeature,
      device_feature_select_ < 2 ? uint32_t(features >> (32 * device_feature_select_)) : 0, 4);
  put(kCommonDriverFeatureSelect, driver_feature_select_, 4);
  put(kCommonDriverFeature,
      driver_feature_select_ < 2 ? uint32_t(driver_features_ >> (32 * driver_feature_select_)) : 0,
      4);
  put(kCommonConfigMsixVector, config_vector_.load(), 2);
  put(kCommonNumQueues, queues_.size(), 2);
  put(kCommonDeviceStatus, status_.load(), 1);
  put(kCommonConfigGeneration, config_generation_.load(), 1);
  put(kCommonQueueSelect, queue_select_, 2);
  if (queue_select_ < queues_.size()) {
    const Queue& queue = queues_[queue_select_];
    put(kCommonQueueSize, queue.size(), 2);
    put(kCommonQueueMsixVector, queue_vectors_[queue_select_].load(), 2);
    put(kCommonQueueEnable, queue.ready() ? 1 : 0, 2);
    put(kCommonQueueNotifyOff, queue_select_, 2);
    put(kCommonQueueDesc, queue.desc_table(), 8);
    put(kCommonQueueDriver, queue.avail_ring(), 8);
    put(kCommonQueueDevice, queue.used_ring(), 8);
  }
  for (size_t i = 0; i < data.size(); ++i)
    data[i] = offset + i < kCommonCfgSize ? image[offset + i] : 0;
}

void VirtioPciDevice::common_write(uint64_t offset, std::span<const uint8_t> data) {
  std::lock_guard lock(mutex_);
  uint64_t value = load_le(data);
  size_t size = data.size();
  uint8_t status = status_.load();
  Queue* queue = queue_select_ < queues_.size() ? &queues_[queue_select_] : nullptr;
  // Queue registers are frozen once the queue is enabled or the device runs (spec 4.1.4.3.2).
  bool queue_writable = queue && !queue->ready() && !(status & kStatusDriverOk);
  // 64-bit registers may be written whole or as two dword halves.
  auto write64 = [&](uint32_t field, uint64_t current, auto setter) {
    if (offset == field && size == 8) setter(value);
    if (offset == field && size == 4) setter((current & ~0xFFFFFFFFull) | value);
    if (offset == field + 4 && size == 4) setter((current & 0xFFFFFFFFull) | value << 32);
  };
  switch (offset) {
    case kCommonDeviceFeatureSelect:
      if (size == 4) device_feature_select_ = uint32_t(value);
      return;
    case kCommonDriverFeatureSelect:
      if (size == 4) driver_feature_select_ = uint32_t(value);
      return;
    case kCommonDriverFeature:
      // Features are fixed once FEATURES_OK was set.
      if (size == 4 && driver_feature_select_ < 2 && !(status & kStatusFeaturesOk)) {
        uint32_t shift = 32 * driver_feature_select_;
        driver_features_ = (driver_features_ & ~(0xFFFFFFFFull << shift)) | (value << shift);
      }
      return;
    case kCommonConfigMsixVector:
      if (size == 2) config_vector_ = checked_vector(uint16_t(value));
      return;
    case kCommonDeviceStatus:
      if (size == 1) write_status_locked(uint8_t(value));
      return;
    case kCommonQueueSelect:
      if (size == 2) queue_select_ = uint16_t(value);
      return;
    case kCommonQueueSize:
      if (size == 2 && queue_writable) queue->set_size(uint16_t(value));
      return;
    case kCommonQueueMsixVector:
      if (size == 2 && queue) queue_vectors_[queue_select_] = checked_vector(uint16_t(value));
      return;
    case kCommonQueueEnable:
      // Writing 0 is forbidden to the driver; only reset disables a queue.
      if (size == 2 && queue_writable && value == 1) queue->set_ready(true);
      return;
    default:
      break;
  }
  if (!queue_writable) return;
  write64(kCommonQueueDesc, queue->desc_table(), [&](uint64_t v) { queue->set_desc_table(v); });
  write64(kCommonQueueDriver, queue->avail_ring(), [&](uint64_t v) { queue->set_avail_ring(v); });
  write64(kCommonQueueDevice, queue->used_ring(), [&](uint64_t v) { queue->set_used_ring(v); });
}

bool VirtioPciDevice::features_acceptable_locked() const {
  // The driver may only accept what was offered, and a modern transport requires VERSION_1.
  uint64_t offered = device_->device_features();
  return (driver_features_ & ~offered) == 0 && (driver_features_ & kFeatureVersion1);
}

void VirtioPciDevice::write_status_locked(uint8_t value) {
  if (value == 0) {
    reset_locked();
    return;
  }
  uint8_t old = status_.load();
  // Only reset clears bits; NEEDS_RESET is the device's to set and the driver can't clear it.
  if (old & ~value & ~kStatusNeedsReset) {
    log_.warn(fmt::format("virtio: driver tried to clear status bits {:#x} -> {:#x}", old, value));
    return;
  }
  uint8_t added = value & ~old;
  if (added & kStatusFeaturesOk) {
    if (!(value & kStatusDriver) || !features_acceptable_locked()) {
      // Leaving FEATURES_OK clear is how the device refuses (the driver re-reads it).
      log_.warn(fmt::format("virtio: refusing driver features {:#x} (offered {:#x})",
                            driver_features_, device_->device_features()));
      value &= ~kStatusFeaturesOk;
    }
  }
  if ((added & kStatusDriverOk) && !(value & kStatusFeaturesOk)) value &= ~kStatusDriverOk;
  // fetch_or, not store: NEEDS_RESET may be raised concurrently by the device, and value
  // already holds every bit of `old` but that one.
  status_.fetch_or(value);
  if ((added & kStatusDriverOk) && (value & kStatusDriverOk)) activate_locked();
}

void VirtioPciDevice::activate_locked() {
  uint64_t acked = driver_features_;
  for (uint16_t q = 0; q < queues_.size(); ++q) {
    Queue& queue = queues_[q];
    if (!queue.ready()) continue;
    queue.set_features(acked & kFeatureRingIndirectDesc, acked & kFeatureRingEventIdx);
    if (auto error = queue.activate(memory_)) {
      needs_reset("queue " + std::to_string(q) + ": " + *error);
      return;
    }
  }
  VirtioActivation activation{&memory_, queues_, this, acked, notify_fds_};
  if (!device_->activate(activation)) {
    needs_reset("device refused activation");
    return;
  }
  watch_queues_locked();
}

void VirtioPciDevice::watch_queues_locked() {
  activated_ = true;
  for (uint16_t q = 0; q < queues_.size(); ++q) {
    if (!queues_[q].ready() || device_->handles_notifications(q)) continue;
    watched_[q] = true;
    int fd = queue_eventfds_[q].get();
    // A notification that arrived before DRIVER_OK is not lost: the fd is still signalled.
    loop_.add(fd, [device = device_.get(), fd, q](uint32_t) {
      drain_eventfd(fd);
      device->process_queue(q);
    });
  }
}

void VirtioPciDevice::deactivate_locked() {
  if (!activated_) return;
  for (uint16_t q = 0; q < queues_.size(); ++q) {
    if (watched_[q]) loop_.remove(queue_eventfds_[q].get());
    watched_[q] = false;
  }
  device_->reset();
  activated_ = false;
}

void VirtioPciDevice::reset_locked() {
  deactivate_locked();
  for (auto& queue : queues_) queue.reset();
  for (uint16_t q = 0; q < queues_.size(); ++q) queue_vectors_[q] = kNoVector;
  device_feature_select_ = driver_feature_select_ = 0;
  driver_features_ = 0;
  queue_select_ = 0;
  config_vector_ = kNoVector;
  isr_ = 0;
  status_ = 0;
  metrics_.resets++;
}

uint64_t VirtioPciDevice::acked_features() const {
  std::lock_guard lock(mutex_);
  return (status_.load() & kStatusFeaturesOk) ? driver_features_ : 0;
}

void VirtioPciDevice::signal_queue(uint16_t queue) {
  if (queue >= queues_.size()) return;
  isr_.fetch_or(1);
  metrics_.queue_interrupts++;
  uint16_t vector = queue_vectors_[queue].load();
  if (vector != kNoVector) msix_.trigger(vector);
}

int VirtioPciDevice::queue_irqfd(uint16_t queue) {
  if (queue >= queues_.size()) return -1;
  uint16_t vector = queue_vectors_[queue].load();
  return vector == kNoVector ? -1 : msix_.direct_eventfd(vector);
}

void VirtioPciDevice::signal_config_change() {
  config_generation_.fetch_add(1);
  isr_.fetch_or(2);
  metrics_.config_interrupts++;
  uint16_t vector = config_vector_.load();
  if (vector != kNoVector) msix_.trigger(vector);
}

void VirtioPciDevice::needs_reset(const std::string& why) {
  metrics_.needs_reset++;
  log_.warn("virtio: device needs reset: " + why);
  // Only a device the driver has started can need a reset; before that there is no driver to
  // tell, and a later reset clears the bit anyway.
  if (!(status_.load() & kStatusDriver)) return;
  status_.fetch_or(kStatusNeedsReset);
  isr_.fetch_or(2);
  metrics_.config_interrupts++;
  uint16_t vector = config_vector_.load();
  if (vector != kNoVector) msix_.trigger(vector);
}

VirtioPciState VirtioPciDevice::save() const {
  std::lock_guard lock(mutex_);
  VirtioPciState state;
  state.config = save_config();
  state.msix = msix_.save();
  state.status = status_.load();
  state.config_generation = config_generation_.load();
  state.isr = isr_.load();
  state.device_feature_select = device_feature_select_;
  state.driver_feature_select = driver_feature_select_;
  state.driver_features = driver_features_;
  state.queue_select = queue_select_;
  state.config_vector = config_vector_.load();
  for (uint16_t q = 0; q < queues_.size(); ++q) {
    state.queue_vectors.push_back(queue_vectors_[q].load());
    state.queues.push_back(queues_[q].save());
  }
  return state;
}

std::vector<pci::BarChange> VirtioPciDevice::restore(const VirtioPciState& state) {
  if (state.version != VirtioPciState::kVersion || state.queues.size() != queues_.size() ||
      state.queue_vectors.size() != queues_.size())
    throw std::invalid_argument("virtio-pci state does not match this device");
  auto changes = restore_config(state.config);
  msix_.restore(state.msix);
  std::lock_guard lock(mutex_);
  reset_locked();
  device_feature_select_ = state.device_feature_select;
  driver_feature_select_ = state.driver_feature_select;
  driver_features_ = state.driver_features;
  queue_select_ = state.queue_select;
  config_vector_ = state.config_vector;
  config_generation_ = state.config_generation;
  isr_ = state.isr;
  for (uint16_t q = 0; q < queues_.size(); ++q) {
    queue_vectors_[q] = state.queue_vectors[q];
    queues_[q].restore(state.queues[q], memory_);
  }
  status_ = state.status;
  if ((state.status & kStatusDriverOk) && !(state.status & kStatusNeedsReset)) {
    // Re-attach the device to the restored rings; ring positions come from the snapshot.
    VirtioActivation activation{&memory_, queues_, this, driver_features_, notify_fds_};
    if (!device_->activate(activation)) throw std::runtime_error("device refused restored state");
    watch_queues_locked();
  }
  return changes;
}

}  // namespace kiln::devices::virtio
