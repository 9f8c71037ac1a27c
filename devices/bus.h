// The address-range bus that vCPU exits are dispatched on (one for port I/O, one for MMIO).
// Devices implement BusDevice and never see KVM: the VMM turns exits into Bus::read/write.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <shared_mutex>
#include <span>

namespace kiln::devices {

class BusDevice {
 public:
  virtual ~BusDevice() = default;
  // `offset` is relative to the base the device was inserted at; data.size() is 1, 2, 4 or 8.
  // Called from vCPU threads: devices do their own locking.
  virtual void read(uint64_t offset, std::span<uint8_t> data) = 0;
  virtual void write(uint64_t offset, std::span<const uint8_t> data) = 0;
};

class Bus {
 public:
  // Throws std::invalid_argument if [base, base+len) is empty, wraps or overlaps another device.
  void insert(std::shared_ptr<BusDevice> device, uint64_t base, uint64_t len);
  // Removes the device inserted at exactly `base`; returns whether there was one.
  bool remove(uint64_t base);
  // Drops every device (teardown: devices must go while what they use still exists).
  void clear();

  // Dispatches to the device covering the whole access. Returns false when none does:
  // reads then return all ones, as on real hardware, and writes are dropped.
  bool read(uint64_t addr, std::span<uint8_t> data) const;
  bool write(uint64_t addr, std::span<const uint8_t> data) const;

 private:
  struct Entry {
    uint64_t len;
    std::shared_ptr<BusDevice> device;
  };
  // Returns the device and offset covering [addr, addr+size), or null.
  std::shared_ptr<BusDevice> lookup(uint64_t addr, uint64_t size, uint64_t& offset) const;

  mutable std::shared_mutex mutex_;
  std::map<uint64_t, Entry> ranges_;  // keyed by base
};

// Little-endian helpers for devices decoding bus accesses.
inline uint64_t load_le(std::span<const uint8_t> data) {
  uint64_t value = 0;
  for (size_t i = 0; i < data.size() && i < 8; ++i) value |= uint64_t(data[i]) << (8 * i);
  return value;
}
inline void store_le(std::span<uint8_t> data, uint64_t value) {
  for (size_t i = 0; i < data.size(); ++i) data[i] = i < 8 ? uint8_t(value >> (8 * i)) : 0;
}

}  // namespace kiln::devices
