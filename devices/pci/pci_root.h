// The root PCI bus 0: a host bridge at 00:00.0, devices in slots 1..31, configuration access
// through mechanism #1 (ports 0xCF8-0xCFF) and ECAM (MMIO 0xE0000000), and BAR placement.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>

#include "devices/bus.h"
#include "devices/pci/pci_device.h"

namespace kiln::devices::pci {

// docs/MACHINE.md
inline constexpr uint64_t kConfigIoBase = 0xCF8;
inline constexpr uint64_t kConfigIoSize = 8;
inline constexpr uint64_t kEcamBase = 0xE000'0000;
inline constexpr uint64_t kEcamSize = 0x1000'0000;  // buses 0-255
inline constexpr uint64_t kMmio32WindowBase = 0xC000'0000;
inline constexpr uint64_t kMmio32WindowSize = 0x2000'0000;
inline constexpr uint64_t kMmio64WindowBase = 0x80'0000'0000;
inline constexpr uint64_t kMmio64WindowSize = 64ull << 30;
inline constexpr uint64_t kIoWindowBase = 0x1000;
inline constexpr uint64_t kIoWindowSize = 0xF000;
inline constexpr int kNumSlots = 32;

// Where one BAR is decoded on the guest's buses.
struct PciBarRegion {
  uint64_t base = 0;
  uint64_t size = 0;
  bool io = false;  // port I/O bus rather than MMIO
};

// Implemented by the VMM (or BusBarMapper below): the root bus calls it whenever the guest
// enables, disables or moves a BAR. `device` serves accesses at offsets from region.base.
class PciBarListener {
 public:
  virtual ~PciBarListener() = default;
  virtual void bar_mapped(const PciBarRegion& region, std::shared_ptr<BusDevice> device) = 0;
  virtual void bar_unmapped(const PciBarRegion& region) = 0;
};

// The straightforward listener: inserts into / removes from the MMIO and port I/O buses. A
// guest that moves a BAR on top of another device gets it not decoded (and a log line).
class BusBarMapper : public PciBarListener {
 public:
  BusBarMapper(Bus& mmio, Bus& pio) : mmio_(mmio), pio_(pio) {}
  void bar_mapped(const PciBarRegion& region, std::shared_ptr<BusDevice> device) override;
  void bar_unmapped(const PciBarRegion& region) override;

 private:
  Bus& mmio_;
  Bus& pio_;
};

// Bump allocator over the three windows, each BAR naturally aligned.
class BarAllocator {
 public:
  // Throws std::runtime_error when a window is exhausted.
  uint64_t allocate(const BarInfo& bar);

 private:
  static uint64_t take(uint64_t& next, uint64_t window_end, uint64_t size);
  uint64_t next_mmio32_ = kMmio32WindowBase;
  uint64_t next_mmio64_ = kMmio64WindowBase;
  uint64_t next_io_ = kIoWindowBase;
};

// 00:00.0: no BARs, nothing but identity.
class PciHostBridge : public PciDevice {
 public:
  PciHostBridge();
  void bar_read(int, uint64_t, std::span<uint8_t> data) override;
  void bar_write(int, uint64_t, std::span<const uint8_t>) override {}
};

class PciRoot {
 public:
  explicit PciRoot(PciBarListener& listener);

  // Plugs `device` into `slot` (or the first free slot >= 1), assigns its BARs from the
  // windows and returns the slot. BARs are decoded once the guest enables them in the
  // command register. Throws if the slot is taken or none is free.
  uint8_t add(std::shared_ptr<PciDevice> device, std::optional<uint8_t> slot = std::nullopt);
  std::shared_ptr<PciDevice> device(uint8_t slot) const;

  // Config access to bus/slot/function, register offset `reg` (< 4096). Absent functions
  // read all ones and ignore writes.
  void config_read(uint8_t bus, uint8_t slot, uint8_t function, uint32_t reg,
                   std::span<uint8_t> data);
  void config_write(uint8_t bus, uint8_t slot, uint8_t function, uint32_t reg,
                    std::span<const uint8_t> data);

  // Re-applies every device's current BAR decoding after a restore.
  void apply_bar_changes(const std::shared_ptr<PciDevice>& device,
                         const std::vector<BarChange>& changes);

 private:
  std::shared_ptr<PciDevice> lookup(uint8_t bus, uint8_t slot, uint8_t function) const;

  PciBarListener& listener_;
  BarAllocator allocator_;
  // Serializes configuration transactions so BAR remapping happens in guest order.
  mutable std::mutex mutex_;
  std::array<std::shared_ptr<PciDevice>, kNumSlots> slots_{};
};

// Configuration mechanism #1 at kConfigIoBase: dword address register at offset 0, data at
// offsets 4-7 (byte, word or dword).
class PciConfigIo : public BusDevice {
 public:
  explicit PciConfigIo(PciRoot& root) : root_(root) {}
  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t offset, std::span<const uint8_t> data) override;

 private:
  PciRoot& root_;
  std::mutex mutex_;
  uint32_t address_ = 0;
};

// PCIe enhanced configuration access (ECAM) at kEcamBase: bus << 20 | slot << 15 | fn << 12.
class PciConfigMmio : public BusDevice {
 public:
  explicit PciConfigMmio(PciRoot& root) : root_(root) {}
  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t offset, std::span<const uint8_t> data) override;

 private:
  PciRoot& root_;
};

}  // namespace kiln::devices::pci
