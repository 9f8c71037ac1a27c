// A PCI function as the guest's configuration accesses see it: a type 0 header, a capability
// list and up to six BARs. Concrete devices (virtio-pci, ...) derive from PciDevice and serve
// their BAR contents through bar_read/bar_write; the root bus maps BARs on the MMIO/PIO buses.
#pragma once

#include <array>
#include <cstdint>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

namespace kiln::devices::pci {

inline constexpr uint32_t kConfigSpaceSize = 4096;  // PCIe extended configuration space
inline constexpr int kNumBars = 6;

// Type 0 header offsets and bits the rest of the code refers to.
inline constexpr uint32_t kVendorId = 0x00;
inline constexpr uint32_t kDeviceId = 0x02;
inline constexpr uint32_t kCommand = 0x04;
inline constexpr uint32_t kStatus = 0x06;
inline constexpr uint32_t kRevisionId = 0x08;
inline constexpr uint32_t kClassProgIf = 0x09;
inline constexpr uint32_t kHeaderType = 0x0E;
inline constexpr uint32_t kBar0 = 0x10;
inline constexpr uint32_t kSubsystemVendorId = 0x2C;
inline constexpr uint32_t kSubsystemId = 0x2E;
inline constexpr uint32_t kCapabilitiesPointer = 0x34;
inline constexpr uint32_t kInterruptLine = 0x3C;
inline constexpr uint32_t kInterruptPin = 0x3D;
inline constexpr uint16_t kCommandIoEnable = 1 << 0;
inline constexpr uint16_t kCommandMemoryEnable = 1 << 1;
inline constexpr uint16_t kCommandBusMaster = 1 << 2;
inline constexpr uint16_t kCommandIntxDisable = 1 << 10;
inline constexpr uint16_t kStatusCapabilitiesList = 1 << 4;
inline constexpr uint32_t kFirstCapabilityOffset = 0x40;
inline constexpr uint32_t kStandardConfigEnd = 0x100;  // capabilities live below this

struct PciIdentity {
  uint16_t vendor_id = 0;
  uint16_t device_id = 0;
  uint8_t revision = 0;
  uint32_t class_code = 0;  // class << 16 | subclass << 8 | prog-if
  uint16_t subsystem_vendor_id = 0;
  uint16_t subsystem_id = 0;
};

enum class BarType { kMemory32, kMemory64, kIo };

struct BarInfo {
  BarType type = BarType::kMemory32;
  uint64_t size = 0;  // power of two; >= 16 for memory, >= 4 for I/O
  bool prefetchable = false;
};

// Where a BAR is decoded now (nullopt: not decoded, because the command register disables it
// or no address was programmed).
struct BarChange {
  int index = 0;
  BarInfo info;
  std::optional<uint64_t> old_base;
  std::optional<uint64_t> new_base;
};

// Snapshot of everything the guest can observe through configuration space.
struct PciConfigState {
  static constexpr uint32_t kVersion = 1;
  uint32_t version = kVersion;
  std::array<uint8_t, kConfigSpaceSize> bytes{};
};

class PciDevice {
 public:
  virtual ~PciDevice() = default;
  PciDevice(const PciDevice&) = delete;
  PciDevice& operator=(const PciDevice&) = delete;

  // Configuration space access; `offset` + data.size() must stay inside kConfigSpaceSize
  // (out-of-range bytes read as ones and are not written). Returns the BARs whose decoding
  // changed, which the root bus applies to the buses.
  void config_read(uint32_t offset, std::span<uint8_t> data);
  std::vector<BarChange> config_write(uint32_t offset, std::span<const uint8_t> data);

  // Accesses to a mapped BAR; `offset` is relative to the BAR's base.
  virtual void bar_read(int bar, uint64_t offset, std::span<uint8_t> data) = 0;
  virtual void bar_write(int bar, uint64_t offset, std::span<const uint8_t> data) = 0;

  const std::array<std::optional<BarInfo>, kNumBars>& bars() const { return bars_; }
  // Programs a BAR's address as firmware would (the allocator at plug time).
  void set_bar_address(int bar, uint64_t address);
  // The address programmed into a BAR (regardless of decoding).
  uint64_t bar_address(int bar) const;
  // Where a BAR is decoded now.
  std::optional<uint64_t> bar_mapping(int bar) const;

  PciConfigState save_config() const;
  // Restores config space; returns the BAR decoding changes to apply on the buses.
  std::vector<BarChange> restore_config(const PciConfigState& state);

 protected:
  explicit PciDevice(const PciIdentity& identity);

  // Appends a capability; `body` is everything after the ID and next-pointer bytes and
  // `writable` (same length, or empty for read-only) the bits the guest may change.
  // Returns the capability's offset. Only during construction.
  uint32_t add_capability(uint8_t id, std::span<const uint8_t> body,
                          std::span<const uint8_t> writable = {});
  void add_bar(int index, const BarInfo& info);
  void set_interrupt_pin(uint8_t pin);

  // Called after a guest write to config space landed (config lock released), so a device can
  // react to writes to its capabilities.
  virtual void config_written(uint32_t /*offset*/, size_t /*size*/) {}
  // Called before a guest read of config space (config lock not held), so a device can
  // refresh bytes whose value is computed on access.
  virtual void config_before_read(uint32_t /*offset*/, size_t /*size*/) {}
  // Called after BAR decoding changed, before the root bus remaps it (config lock released).
  virtual void bars_changed(const std::vector<BarChange>& /*changes*/) {}

  // Raw config space access for derived classes (takes the config lock).
  void read_config_bytes(uint32_t offset, std::span<uint8_t> out) const;
  void write_config_bytes(uint32_t offset, std::span<const uint8_t> in);

 private:
  std::vector<BarChange> update_mappings_locked();
  uint64_t bar_address_locked(int bar) const;
  std::optional<uint64_t> decoded_base_locked(int bar) const;
  uint16_t command_locked() const;

  mutable std::mutex mutex_;
  std::array<uint8_t, kConfigSpaceSize> config_{};
  std::array<uint8_t, kConfigSpaceSize> writable_{};
  std::array<std::optional<BarInfo>, kNumBars> bars_{};
  std::array<std::optional<uint64_t>, kNumBars> mappings_{};
  uint32_t next_capability_ = kFirstCapabilityOffset;
  uint32_t last_capability_ = 0;
};

}  // namespace kiln::devices::pci
