#include "devices/pci/pci_device.h"

#include <algorithm>
#include <stdexcept>

namespace kiln::devices::pci {
namespace {

void put16(std::array<uint8_t, kConfigSpaceSize>& space, uint32_t offset, uint16_t value) {
  space[offset] = uint8_t(value);
  space[offset + 1] = uint8_t(value >> 8);
}

void put32(std::array<uint8_t, kConfigSpaceSize>& space, uint32_t offset, uint32_t value) {
  for (int i = 0; i < 4; ++i) space[offset + i] = uint8_t(value >> (8 * i));
}

uint32_t get32(const std::array<uint8_t, kConfigSpaceSize>& space, uint32_t offset) {
  uint32_t value = 0;
  for (int i = 0; i < 4; ++i) value |= uint32_t(space[offset + i]) << (8 * i);
  return value;
}

bool is_power_of_two(uint64_t value) { return value && !(value & (value - 1)); }

}  // namespace

PciDevice::PciDevice(const PciIdentity& identity) {
  put16(config_, kVendorId, identity.vendor_id);
  put16(config_, kDeviceId, identity.device_id);
  config_[kRevisionId] = identity.revision;
  config_[kClassProgIf] = uint8_t(identity.class_code);
  config_[kClassProgIf + 1] = uint8_t(identity.class_code >> 8);
  config_[kClassProgIf + 2] = uint8_t(identity.class_code >> 16);
  config_[kHeaderType] = 0x00;  // type 0, single function
  put16(config_, kSubsystemVendorId, identity.subsystem_vendor_id);
  put16(config_, kSubsystemId, identity.subsystem_id);
  // The guest owns these bits of the command register; everything else is read-only.
  put16(writable_, kCommand,
        kCommandIoEnable | kCommandMemoryEnable | kCommandBusMaster | kCommandIntxDisable);
  writable_[0x0C] = 0xFF;  // cache line size
  writable_[0x0D] = 0xFF;  // latency timer
  writable_[kInterruptLine] = 0xFF;
}

void PciDevice::add_bar(int index, const BarInfo& info) {
  bool is_io = info.type == BarType::kIo;
  bool is_64 = info.type == BarType::kMemory64;
  if (index < 0 || index >= kNumBars || (is_64 && index == kNumBars - 1) || bars_[index] ||
      (is_64 && index > 0 && bars_[index - 1] && bars_[index - 1]->type == BarType::kMemory64))
    throw std::invalid_argument("invalid PCI BAR index");
  if (!is_power_of_two(info.size) || info.size < (is_io ? 4u : 16u) ||
      (!is_64 && info.size > (1ull << 31)))
    throw std::invalid_argument("invalid PCI BAR size");
  if (is_64 && index + 1 < kNumBars && bars_[index + 1])
    throw std::invalid_argument("64-bit BAR overlaps the next BAR");
  bars_[index] = info;
  uint32_t offset = kBar0 + 4 * index;
  // Low flag bits are read-only; the address bits below the size read back as zero, which is
  // what makes "write all ones, read back" reveal the size.
  uint32_t flags = is_io ? 0x1 : (is_64 ? 0x4 : 0x0) | (info.prefetchable ? 0x8 : 0x0);
  uint64_t address_mask = ~(info.size - 1);
  put32(config_, offset, flags);
  put32(writable_, offset, uint32_t(address_mask) & (is_io ? ~0x3u : ~0xFu));
  if (is_64) put32(writable_, offset + 4, uint32_t(address_mask >> 32));
}

void PciDevice::set_interrupt_pin(uint8_t pin) { config_[kInterruptPin] = pin; }

uint32_t PciDevice::add_capability(uint8_t id, std::span<const uint8_t> body,
                                   std::span<const uint8_t> writable) {
  uint32_t length = uint32_t(body.size()) + 2;
  uint32_t offset = (next_capability_ + 3) & ~3u;  // capabilities are dword aligned
  if (offset + length > kStandardConfigEnd) throw std::length_error("PCI capability space full");
  if (!writable.empty() && writable.size() != body.size())
    throw std::invalid_argument("capability writable mask size mismatch");
  config_[offset] = id;
  config_[offset + 1] = 0;
  std::copy(body.begin(), body.end(), config_.begin() + offset + 2);
  std::copy(writable.begin(), writable.end(), writable_.begin() + offset + 2);
  if (last_capability_ == 0) {
    config_[kCapabilitiesPointer] = uint8_t(offset);
    put16(config_, kStatus, kStatusCapabilitiesList);
  } else {
    config_[last_capability_ + 1] = uint8_t(offset);
  }
  last_capability_ = offset;
  next_capability_ = offset + length;
  return offset;
}

void PciDevice::config_read(uint32_t offset, std::span<uint8_t> data) {
  config_before_read(offset, data.size());
  std::lock_guard lock(mutex_);
  for (size_t i = 0; i < data.size(); ++i)
    data[i] = offset + i < kConfigSpaceSize ? config_[offset + i] : 0xFF;
}

std::vector<BarChange> PciDevice::config_write(uint32_t offset, std::span<const uint8_t> data) {
  std::vector<BarChange> changes;
  {
    std::lock_guard lock(mutex_);
    for (size_t i = 0; i < data.size() && offset + i < kConfigSpaceSize; ++i) {
      uint8_t mask = writable_[offset + i];
      config_[offset + i] = uint8_t((config_[offset + i] & ~mask) | (data[i] & mask));
    }
    changes = update_mappings_locked();
  }
  config_written(offset, data.size());
  if (!changes.empty()) bars_changed(changes);
  return changes;
}

void PciDevice::read_config_bytes(uint32_t offset, std::span<uint8_t> out) const {
  std::lock_guard lock(mutex_);
  for (size_t i = 0; i < out.size(); ++i)
    out[i] = offset + i < kConfigSpaceSize ? config_[offset + i] : 0;
}

void PciDevice::write_config_bytes(uint32_t offset, std::span<const uint8_t> in) {
  std::lock_guard lock(mutex_);
  for (size_t i = 0; i < in.size() && offset + i < kConfigSpaceSize; ++i)
    config_[offset + i] = in[i];
}

uint16_t PciDevice::command_locked() const {
  return uint16_t(config_[kCommand] | config_[kCommand + 1] << 8);
}

uint64_t PciDevice::bar_address_locked(int bar) const {
  if (bar < 0 || bar >= kNumBars || !bars_[bar]) return 0;
  uint32_t offset = kBar0 + 4 * bar;
  uint32_t low = get32(config_, offset);
  switch (bars_[bar]->type) {
    case BarType::kIo:
      return low & ~0x3u;
    case BarType::kMemory32:
      return low & ~0xFu;
    case BarType::kMemory64:
      return (uint64_t(get32(config_, offset + 4)) << 32) | (low & ~0xFu);
  }
  return 0;
}

std::optional<uint64_t> PciDevice::decoded_base_locked(int bar) const {
  if (!bars_[bar]) return std::nullopt;
  uint16_t enable = bars_[bar]->type == BarType::kIo ? kCommandIoEnable : kCommandMemoryEnable;
  uint64_t address = bar_address_locked(bar);
  // Address 0 means "not assigned": decoding there would shadow RAM or legacy ports.
  if (!(command_locked() & enable) || address == 0) return std::nullopt;
  return address;
}

std::vector<BarChange> PciDevice::update_mappings_locked() {
  std::vector<BarChange> changes;
  for (int bar = 0; bar < kNumBars; ++bar) {
    if (!bars_[bar]) continue;
    std::optional<uint64_t> now = decoded_base_locked(bar);
    if (now == mappings_[bar]) continue;
    changes.push_back({bar, *bars_[bar], mappings_[bar], now});
    mappings_[bar] = now;
  }
  return changes;
}

void PciDevice::set_bar_address(int bar, uint64_t address) {
  std::vector<BarChange> changes;
  {
    std::lock_guard lock(mutex_);
    if (bar < 0 || bar >= kNumBars || !bars_[bar]) throw std::invalid_argument("no such BAR");
    if (address & (bars_[bar]->size - 1)) throw std::invalid_argument("BAR address misaligned");
    uint32_t offset = kBar0 + 4 * bar;
    uint32_t flags = get32(config_, offset) & (bars_[bar]->type == BarType::kIo ? 0x3u : 0xFu);
    put32(config_, offset, uint32_t(address) | flags);
    if (bars_[bar]->type == BarType::kMemory64) put32(config_, offset + 4, uint32_t(address >> 32));
    changes = update_mappings_locked();
  }
  if (!changes.empty()) bars_changed(changes);
}

uint64_t PciDevice::bar_address(int bar) const {
  std::lock_guard lock(mutex_);
  return bar_address_locked(bar);
}

std::optional<uint64_t> PciDevice::bar_mapping(int bar) const {
  std::lock_guard lock(mutex_);
  return bar >= 0 && bar < kNumBars ? mappings_[bar] : std::nullopt;
}

PciConfigState PciDevice::save_config() const {
  std::lock_guard lock(mutex_);
  PciConfigState state;
  state.bytes = config_;
  return state;
}

std::vector<BarChange> PciDevice::restore_config(const PciConfigState& state) {
  if (state.version != PciConfigState::kVersion)
    throw std::invalid_argument("unsupported PCI config state version");
  std::vector<BarChange> changes;
  {
    std::lock_guard lock(mutex_);
    // Only guest-writable bits come from the snapshot: identity and layout are the device's.
    for (uint32_t i = 0; i < kConfigSpaceSize; ++i)
      config_[i] = uint8_t((config_[i] & ~writable_[i]) | (state.bytes[i] & writable_[i]));
    changes = update_mappings_locked();
  }
  if (!changes.empty()) bars_changed(changes);
  return changes;
}

}  // namespace kiln::devices::pci
