#include "devices/virtio/virtio_net.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <climits>
#include <cstring>
#include <stdexcept>
#include <system_error>

#include "devices/virtio/chain_buffers.h"

namespace kiln::devices::virtio {
namespace {

// Frames moved per wake-up before the loop gets a chance to serve the other queues.
constexpr int kReceiveBudget = 256;

// What virtio-net itself offers whichever data path runs the rings. Transmit offloads are
// always safe to offer: the tap (IFF_VNET_HDR) takes partial checksums and GSO frames and
// finishes them in software if the host's path needs it. Receive offloads are given to the tap
// only once the guest accepts them (activate()).
constexpr uint64_t kNetDeviceFeatures =
    kNetFeatureMac | kNetFeatureStatus | kNetFeatureCsum | kNetFeatureHostTso4 |
    kNetFeatureHostTso6 | kNetFeatureHostEcn | kNetFeatureGuestCsum | kNetFeatureGuestTso4 |
    kNetFeatureGuestTso6 | kNetFeatureGuestEcn;
// Ring features of the userspace data path.
constexpr uint64_t kUserspaceRingFeatures =
    kFeatureVersion1 | kFeatureRingIndirectDesc | kFeatureRingEventIdx;
// What the kernel data path may add: it merges receive buffers, so one 64 KiB GSO frame no
// longer needs a 64 KiB buffer per receive descriptor.
constexpr uint64_t kKernelRingFeatures = kUserspaceRingFeatures | kNetFeatureMrgRxbuf;

bool acked(const VirtioActivation& activation, uint64_t feature) {
  return activation.acked_features & feature;
}

UniqueFd make_eventfd() {
  UniqueFd fd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!fd) throw std::system_error(errno, std::generic_category(), "eventfd for virtio-net");
  return fd;
}

void signal_eventfd(int fd) {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(fd, &one, sizeof(one));
}

}  // namespace

MacAddress default_mac(const std::string& tap) {
  // FNV-1a: stable across builds and hosts, unlike std::hash.
  uint32_t hash = 2166136261u;
  for (unsigned char c : tap) hash = (hash ^ c) * 16777619u;
  return {0x52, 0x54, 0x00, uint8_t(hash >> 16), uint8_t(hash >> 8), uint8_t(hash)};
}

std::string format_mac(const MacAddress& mac) {
  return fmt::format("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", mac[0], mac[1], mac[2], mac[3],
                     mac[4], mac[5]);
}

std::optional<MacAddress> parse_mac(const std::string& text) {
  MacAddress mac;
  if (text.size() != 17) return std::nullopt;
  for (size_t i = 0; i < mac.size(); ++i) {
    if (i > 0 && text[3 * i - 1] != ':') return std::nullopt;
    unsigned value = 0;
    for (char c : text.substr(3 * i, 2)) {
      int digit = std::isdigit(static_cast<unsigned char>(c)) ? c - '0'
                  : std::isxdigit(static_cast<unsigned char>(c))
                      ? std::tolower(static_cast<unsigned char>(c)) - 'a' + 10
                      : -1;
      if (digit < 0) return std::nullopt;
      value = value * 16 + unsigned(digit);
    }
    mac[i] = uint8_t(value);
  }
  return mac;
}

VirtioNet::VirtioNet(std::unique_ptr<NetBackend> backend, const MacAddress& mac, EventLoop& loop,
                     std::unique_ptr<NetKernelDatapath> kernel)
    : backend_(std::move(backend)), mac_(mac), loop_(loop), kernel_(std::move(kernel)) {
  if (!kernel_) return;
  kernel_features_ = kernel_->features();
  if (!(kernel_features_ & kFeatureVersion1))
    throw std::invalid_argument("virtio-net: the kernel data path cannot do VIRTIO_F_VERSION_1");
  for (int i = 0; i < 2; ++i) {
    kick_[i] = make_eventfd();
    call_[i] = make_eventfd();
  }
}

VirtioNet::~VirtioNet() {
  // The loop must stop calling us before the backend's fd is closed with the members.
  if (watching_) loop_.remove(backend_->fd());
  {
    // The transport may be half gone: no interrupts, no write-back into its queues.
    std::lock_guard lock(mutex_);
    activation_ = {};
    stop_kernel_locked();
  }
  const NetMetrics& m = metrics_;
  spdlog::debug(
      "virtio-net {}: tx {} frames {} bytes {} dropped, {} kicks {} interrupts; rx {} frames {} "
      "bytes, {} tap wake-ups {} kicks {} interrupts, {} pauses, {} bad buffers; {} kernel "
      "data path starts ({} rings with direct kicks, {} with direct interrupts)",
      format_mac(mac_), m.tx_packets.load(), m.tx_bytes.load(), m.tx_dropped.load(),
      m.tx_kicks.load(), m.tx_interrupts.load(), m.rx_packets.load(), m.rx_bytes.load(),
      m.rx_wakeups.load(), m.rx_kicks.load(), m.rx_interrupts.load(), m.rx_pauses.load(),
      m.rx_bad_buffers.load(), m.kernel_starts.load(), m.kernel_direct_kicks.load(),
      m.kernel_direct_calls.load());
}

uint64_t VirtioNet::device_features() const {
  if (kernel_) return kNetDeviceFeatures | (kernel_features_ & kKernelRingFeatures);
  return kNetDeviceFeatures | kUserspaceRingFeatures;
}

void VirtioNet::read_config(uint64_t offset, std::span<uint8_t> data) {
  uint8_t image[kNetConfigSize] = {};
  std::memcpy(image, mac_.data(), mac_.size());
  image[6] = kNetStatusLinkUp;  // status (little-endian u16)
  image[8] = 1;                 // max_virtqueue_pairs
  for (size_t i = 0; i < data.size(); ++i)
    data[i] = offset + i < kNetConfigSize ? image[offset + i] : 0;
}

bool VirtioNet::activate(const VirtioActivation& activation) {
  std::lock_guard lock(mutex_);
  if (activation.queues.size() != 2) return false;
  uint32_t offloads = 0;
  if (acked(activation, kNetFeatureGuestCsum)) {
    offloads |= kTunOffloadCsum;
    if (acked(activation, kNetFeatureGuestTso4)) offloads |= kTunOffloadTso4;
    if (acked(activation, kNetFeatureGuestTso6)) offloads |= kTunOffloadTso6;
    if (acked(activation, kNetFeatureGuestEcn) && (offloads & (kTunOffloadTso4 | kTunOffloadTso6)))
      offloads |= kTunOffloadTsoEcn;
  }
  if (!backend_->set_offloads(offloads)) {
    log_.warn(fmt::format("virtio-net: the tap refused offloads {:#x}", offloads));
    return false;
  }
  offloads_ = offloads;
  activation_ = activation;
  active_ = true;
  if (kernel_) {
    paused_ = false;
    if (start_kernel_locked()) return true;
    active_ = false;
    activation_ = {};
    return false;
  }
  // Frames the tap queued before the driver came up are read as soon as there are buffers.
  watch_backend_locked();
  return true;
}

void VirtioNet::reset() {
  bool was_watching;
  {
    std::lock_guard lock(mutex_);
    stop_kernel_locked();
    paused_ = false;
    active_ = false;
    was_watching = watching_;
    watching_ = false;
    activation_ = {};
  }
  // Outside our lock: remove() waits for a running callback, which may be waiting for it.
  if (was_watching) loop_.remove(backend_->fd());
  backend_->set_offloads(0);
  offloads_ = 0;
}

bool VirtioNet::start_kernel_locked() {
  const memory::GuestMemory& memory = *activation_.memory;
  NetKernelStart start;
  start.features = activation_.acked_features & kernel_features_;
  start.memory = &memory;
  start.tap_fd = backend_->fd();
  VirtioInterrupt* interrupt = activation_.interrupt;
  int kicks[2], calls[2];
  for (uint16_t q : {kNetReceiveQueue, kNetTransmitQueue}) {
    const Queue& queue = activation_.queues[q];
    if (!queue.ready()) {
      log_.warn("virtio-net: the driver did not enable the receive and transmit queues");
      return false;
    }
    // The kernel waits on the eventfd the guest's notify write signals (a KVM ioeventfd) and
    // raises the interrupt with the vector's irqfd: neither goes through kiln. Without them
    // (tests, or a vector not deliverable right now) kiln relays.
    kicks[q] =
        q < activation_.notify_eventfds.size() ? activation_.notify_eventfds[q] : kick_[q].get();
    int irqfd = interrupt->queue_irqfd(q);
    calls[q] = irqfd >= 0 ? irqfd : call_[q].get();
    auto ring = describe_kernel_ring(queue, q, memory, kicks[q], calls[q]);
    if (!ring) return false;
    start.rings.push_back(*ring);
  }
  // The kernel's "call" on a relayed ring means used buffers: raise the queue's interrupt. The
  // callbacks take no device lock, so stop_kernel_locked() may remove them while holding it.
  for (uint16_t q : {kNetReceiveQueue, kNetTransmitQueue}) {
    kick_target_[q] = kicks[q];
    if (kicks[q] != kick_[q].get()) metrics_.kernel_direct_kicks++;
    if (calls[q] != call_[q].get()) {
      metrics_.kernel_direct_calls++;
      continue;
    }
    relaying_call_[q] = true;
    int fd = call_[q].get();
    loop_.add(fd, [this, fd, q, interrupt](uint32_t) {
      uint64_t count;
      if (::read(fd, &count, sizeof(count)) != sizeof(count)) return;
      (q == kNetReceiveQueue ? metrics_.rx_interrupts : metrics_.tx_interrupts)++;
      interrupt->signal_queue(q);
    });
  }
  kernel_running_ = true;
  try {
    kernel_->start(start);
  } catch (const std::exception& e) {
    log_.warn(std::string("virtio-net: cannot start the kernel data path: ") + e.what());
    stop_kernel_locked();
    return false;
  }
  metrics_.kernel_starts++;
  // Buffers the driver made available before the kernel ran are seen on this first kick.
  for (int fd : kicks) signal_eventfd(fd);
  return true;
}

void VirtioNet::stop_kernel_locked() {
  if (!kernel_running_) return;
  kernel_running_ = false;
  std::vector<uint16_t> next_avail;
  try {
    next_avail = kernel_->stop();
  } catch (const std::exception& e) {
    log_.warn(std::string("virtio-net: stopping the kernel data path: ") + e.what());
  }
  // Interrupts the kernel raised just before it stopped are delivered, not lost.
  for (uint16_t q : {kNetReceiveQueue, kNetTransmitQueue}) {
    if (!relaying_call_[q]) continue;
    relaying_call_[q] = false;
    loop_.remove(call_[q].get());
    uint64_t count;
    if (::read(call_[q].get(), &count, sizeof(count)) == sizeof(count) && activation_.interrupt)
      activation_.interrupt->signal_queue(q);
  }
  // The queues learn where the kernel got to: the avail index from the kernel, the used index
  // from the ring it wrote.
  const memory::GuestMemory* memory = activation_.memory;
  for (size_t i = 0; memory && i < next_avail.size() && i < 2; ++i) {
    Queue& queue = activation_.queues[i];
    QueueState state = queue.save();
    auto used_idx = memory->read_obj<uint16_t>(queue.used_ring() + 2);
    if (!used_idx) continue;
    state.next_avail = next_avail[i];
    state.next_used = *used_idx;
    state.signalled_used_valid = false;  // the kernel decided; the next interrupt is not skipped
    try {
      queue.restore(state, *memory);
    } catch (const std::exception& e) {
      log_.warn(std::string("virtio-net: taking the rings back: ") + e.what());
    }
  }
}

void VirtioNet::pause() {
  std::lock_guard lock(mutex_);
  if (!kernel_ || !active_ || paused_) return;
  stop_kernel_locked();
  paused_ = true;
}

void VirtioNet::resume() {
  std::lock_guard lock(mutex_);
  if (!kernel_ || !active_ || !paused_) return;
  paused_ = false;
  if (!start_kernel_locked())
    activation_.interrupt->needs_reset("virtio-net: the kernel data path did not restart");
}

void VirtioNet::watch_backend_locked() {
  if (watching_) return;
  watching_ = true;
  loop_.add(backend_->fd(), [this](uint32_t) {
    std::lock_guard lock(mutex_);
    metrics_.rx_wakeups++;
    if (active_) receive_locked();
  });
}

void VirtioNet::unwatch_backend_locked() {
  if (!watching_) return;
  watching_ = false;
  loop_.remove(backend_->fd());  // on the loop thread: does not wait
}

void VirtioNet::process_queue(uint16_t queue) {
  if (kernel_) {
    // Relay the driver's notification; no lock, as pause() and reset() wait for the loop while
    // holding it. A kick while the kernel is stopped is kept by the eventfd.
    if (queue > kNetTransmitQueue) return;
    (queue == kNetReceiveQueue ? metrics_.rx_kicks : metrics_.tx_kicks)++;
    int fd = kick_target_[queue].load();
    signal_eventfd(fd >= 0 ? fd : kick_[queue].get());
    return;
  }
  std::lock_guard lock(mutex_);
  if (!active_) return;
  if (queue == kNetTransmitQueue) {
    metrics_.tx_kicks++;
    transmit_locked();
  }
  if (queue == kNetReceiveQueue) {
    metrics_.rx_kicks++;
    // New receive buffers: take the tap back if we had let go of it, and fill them now.
    watch_backend_locked();
    receive_locked();
  }
}

void VirtioNet::transmit_locked() {
  Queue& queue = activation_.queues[kNetTransmitQueue];
  if (!queue.ready()) return;
  const memory::GuestMemory& memory = *activation_.memory;
  bool used = false;
  do {
    DescriptorChain chain;
    Queue::PopStatus status;
    while ((status = queue.pop(memory, chain)) == Queue::PopStatus::kChain) {
      ChainBuffers frame(chain, false);
      if (frame.size() < kNetHeaderSize || frame.size() > kNetHeaderSize + kNetMaxFrame) {
        log_.warn(fmt::format("virtio-net: dropping a transmit buffer of {} bytes", frame.size()));
        metrics_.tx_dropped++;
      } else {
        auto iov = frame.iovecs(0, frame.size());
        ssize_t sent = iov.size() <= IOV_MAX ? ::writev(backend_->fd(), iov.data(), int(iov.size()))
                                             : (errno = EMSGSIZE, -1);
        if (sent < 0) {
          // Like a NIC with a full or downed link: the frame is lost, the guest's TCP resends.
          metrics_.tx_dropped++;
          if (errno != EAGAIN && errno != EIO)
            log_.warn(fmt::format("virtio-net: tap write failed: {}", std::strerror(errno)));
        } else {
          metrics_.tx_packets++;
          metrics_.tx_bytes += frame.size() - kNetHeaderSize;
        }
      }
      if (!queue.add_used(memory, chain.head, 0)) {
        activation_.interrupt->needs_reset("virtio-net: transmit used ring unwritable");
        return;
      }
      used = true;
    }
    if (status == Queue::PopStatus::kError) {
      activation_.interrupt->needs_reset("virtio-net transmitq: " + queue.error());
      return;
    }
  } while (queue.enable_notification());
  if (used && queue.needs_notification()) {
    metrics_.tx_interrupts++;
    activation_.interrupt->signal_queue(kNetTransmitQueue);
  }
}

void VirtioNet::receive_locked() {
  Queue& queue = activation_.queues[kNetReceiveQueue];
  if (!queue.ready()) {
    unwatch_backend_locked();
    return;
  }
  const memory::GuestMemory& memory = *activation_.memory;
  bool used = false;
  for (int budget = kReceiveBudget; budget > 0; --budget) {
    DescriptorChain chain;
    Queue::PopStatus status = queue.pop(memory, chain);
    if (status == Queue::PopStatus::kError) {
      unwatch_backend_locked();
      activation_.interrupt->needs_reset("virtio-net receiveq: " + queue.error());
      return;
    }
    if (status == Queue::PopStatus::kEmpty) {
      // Re-arm the guest's kick and look once more: buffers posted in between must not wait.
      if (queue.enable_notification()) continue;
      // Nowhere to put frames: stop watching the tap until the guest posts buffers.
      metrics_.rx_pauses++;
      unwatch_backend_locked();
      break;
    }
    ChainBuffers buffers(chain, true);
    auto iov = buffers.iovecs(0, buffers.size());
    if (buffers.size() < kNetHeaderSize || iov.size() > IOV_MAX) {
      log_.warn(fmt::format("virtio-net: unusable receive buffer ({} bytes in {} pieces)",
                            buffers.size(), iov.size()));
      metrics_.rx_bad_buffers++;
      if (!queue.add_used(memory, chain.head, 0)) break;
      used = true;
      continue;
    }
    ssize_t got = ::readv(backend_->fd(), iov.data(), int(iov.size()));
    if (got < ssize_t(kNetHeaderSize)) {
      queue.undo_pop();  // the buffer stays the guest's for the next frame
      if (got < 0 && errno != EAGAIN && errno != EINTR) {
        log_.warn(fmt::format("virtio-net: tap read failed: {}", std::strerror(errno)));
        unwatch_backend_locked();
      }
      break;
    }
    // The tap leaves num_buffers alone; without VIRTIO_NET_F_MRG_RXBUF it is 1 (spec 5.1.6.3).
    const uint8_t one[2] = {1, 0};
    buffers.write(memory, kNetNumBuffersOffset, one);
    buffers.mark_dirty(memory, 0, uint64_t(got));
    metrics_.rx_packets++;
    metrics_.rx_bytes += uint64_t(got) - kNetHeaderSize;
    if (!queue.add_used(memory, chain.head, uint32_t(got))) {
      unwatch_backend_locked();
      activation_.interrupt->needs_reset("virtio-net: receive used ring unwritable");
      return;
    }
    used = true;
  }
  if (used && queue.needs_notification()) {
    metrics_.rx_interrupts++;
    activation_.interrupt->signal_queue(kNetReceiveQueue);
  }
}

}  // namespace kiln::devices::virtio
