#include "devices/pci/pci_root.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <stdexcept>

namespace kiln::devices::pci {
namespace {

// Forwards a BAR's bus accesses to its device. Holding the device keeps it alive for accesses
// that raced with unplugging.
class BarBusDevice : public BusDevice {
 public:
  BarBusDevice(std::shared_ptr<PciDevice> device, int bar)
      : device_(std::move(device)), bar_(bar) {}
  void read(uint64_t offset, std::span<uint8_t> data) override {
    device_->bar_read(bar_, offset, data);
  }
  void write(uint64_t offset, std::span<const uint8_t> data) override {
    device_->bar_write(bar_, offset, data);
  }

 private:
  std::shared_ptr<PciDevice> device_;
  int bar_;
};

}  // namespace

void BusBarMapper::bar_mapped(const PciBarRegion& region, std::shared_ptr<BusDevice> device) {
  try {
    (region.io ? pio_ : mmio_).insert(std::move(device), region.base, region.size);
  } catch (const std::invalid_argument& error) {
    spdlog::warn("pci: guest placed a BAR at {:#x}+{:#x} where it cannot be decoded: {}",
                 region.base, region.size, error.what());
  }
}

void BusBarMapper::bar_unmapped(const PciBarRegion& region) {
  (region.io ? pio_ : mmio_).remove(region.base);
}

uint64_t BarAllocator::take(uint64_t& next, uint64_t window_end, uint64_t size) {
  uint64_t base = (next + size - 1) & ~(size - 1);
  if (base < next || base > window_end || size > window_end - base)
    throw std::runtime_error("PCI BAR window exhausted");
  next = base + size;
  return base;
}

uint64_t BarAllocator::allocate(const BarInfo& bar) {
  switch (bar.type) {
    case BarType::kIo:
      return take(next_io_, kIoWindowBase + kIoWindowSize, bar.size);
    case BarType::kMemory32:
      return take(next_mmio32_, kMmio32WindowBase + kMmio32WindowSize, bar.size);
    case BarType::kMemory64:
      return take(next_mmio64_, kMmio64WindowBase + kMmio64WindowSize, bar.size);
  }
  throw std::invalid_argument("unknown BAR type");
}

PciHostBridge::PciHostBridge()
    : PciDevice(PciIdentity{.vendor_id = 0x1B36,  // Red Hat / QEMU's generic PCIe host bridge
                            .device_id = 0x0008,
                            .revision = 0,
                            .class_code = 0x060000,
                            .subsystem_vendor_id = 0x1B36,
                            .subsystem_id = 0x0008}) {}

void PciHostBridge::bar_read(int, uint64_t, std::span<uint8_t> data) {
  std::fill(data.begin(), data.end(), 0xFF);
}

PciRoot::PciRoot(PciBarListener& listener) : listener_(listener) {
  slots_[0] = std::make_shared<PciHostBridge>();
}

uint8_t PciRoot::add(std::shared_ptr<PciDevice> device, std::optional<uint8_t> slot) {
  if (!device) throw std::invalid_argument("null PCI device");
  std::lock_guard lock(mutex_);
  uint8_t chosen = 0;
  if (slot) {
    if (*slot >= kNumSlots || slots_[*slot]) throw std::invalid_argument("PCI slot unavailable");
    chosen = *slot;
  } else {
    auto free = std::find(slots_.begin() + 1, slots_.end(), nullptr);
    if (free == slots_.end()) throw std::runtime_error("no free PCI slot");
    chosen = uint8_t(free - slots_.begin());
  }
  for (int bar = 0; bar < kNumBars; ++bar) {
    if (const auto& info = device->bars()[bar])
      device->set_bar_address(bar, allocator_.allocate(*info));
  }
  slots_[chosen] = std::move(device);
  return chosen;
}

std::shared_ptr<PciDevice> PciRoot::device(uint8_t slot) const {
  std::lock_guard lock(mutex_);
  return slot < kNumSlots ? slots_[slot] : nullptr;
}

std::shared_ptr<PciDevice> PciRoot::lookup(uint8_t bus, uint8_t slot, uint8_t function) const {
  // Every device here is single-function on the root bus.
  if (bus != 0 || function != 0 || slot >= kNumSlots) return nullptr;
  return slots_[slot];
}

void PciRoot::config_read(uint8_t bus, uint8_t slot, uint8_t function, uint32_t reg,
                          std::span<uint8_t> data) {
  std::lock_guard lock(mutex_);
  auto device = lookup(bus, slot, function);
  if (!device) {
    std::fill(data.begin(), data.end(), 0xFF);
    return;
  }
  device->config_read(reg, data);
}

void PciRoot::config_write(uint8_t bus, uint8_t slot, uint8_t function, uint32_t reg,
                           std::span<const uint8_t> data) {
  std::lock_guard lock(mutex_);
  auto device = lookup(bus, slot, function);
  if (!device) return;
  apply_bar_changes(device, device->config_write(reg, data));
}

void PciRoot::apply_bar_changes(const std::shared_ptr<PciDevice>& device,
                                const std::vector<BarChange>& changes) {
  for (const BarChange& change : changes) {
    bool io = change.info.type == BarType::kIo;
    if (change.old_base) listener_.bar_unmapped({*change.old_base, change.info.size, io});
    if (change.new_base) {
      listener_.bar_mapped({*change.new_base, change.info.size, io},
                           std::make_shared<BarBusDevice>(device, change.index));
    }
  }
}

void PciConfigIo::read(uint64_t offset, std::span<uint8_t> data) {
  uint32_t address;
  {
    std::lock_guard lock(mutex_);
    address = address_;
  }
  if (offset < 4) {
    for (size_t i = 0; i < data.size(); ++i)
      data[i] = offset + i < 4 ? uint8_t(address >> (8 * (offset + i))) : 0xFF;
    return;
  }
  if (!(address & 0x8000'0000u)) {
    std::fill(data.begin(), data.end(), 0xFF);
    return;
  }
  uint32_t reg = (address & 0xFC) + uint32_t(offset - 4);
  root_.config_read(uint8_t(address >> 16), (address >> 11) & 0x1F, (address >> 8) & 0x7, reg,
                    data);
}

void PciConfigIo::write(uint64_t offset, std::span<const uint8_t> data) {
  if (offset < 4) {
    // Only a full dword write to 0xCF8 latches the address, as on real chipsets; narrower
    // accesses there are ordinary I/O to something else.
    if (offset == 0 && data.size() == 4) {
      std::lock_guard lock(mutex_);
      address_ = uint32_t(load_le(data));
    }
    return;
  }
  uint32_t address;
  {
    std::lock_guard lock(mutex_);
    address = address_;
  }
  if (!(address & 0x8000'0000u)) return;
  uint32_t reg = (address & 0xFC) + uint32_t(offset - 4);
  root_.config_write(uint8_t(address >> 16), (address >> 11) & 0x1F, (address >> 8) & 0x7, reg,
                     data);
}

void PciConfigMmio::read(uint64_t offset, std::span<uint8_t> data) {
  root_.config_read(uint8_t(offset >> 20), (offset >> 15) & 0x1F, (offset >> 12) & 0x7,
                    uint32_t(offset & 0xFFF), data);
}

void PciConfigMmio::write(uint64_t offset, std::span<const uint8_t> data) {
  root_.config_write(uint8_t(offset >> 20), (offset >> 15) & 0x1F, (offset >> 12) & 0x7,
                     uint32_t(offset & 0xFFF), data);
}

}  // namespace kiln::devices::pci
