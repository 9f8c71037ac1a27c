// A guest driver for tests that talks to a VirtioPciDevice the way Linux's virtio_pci_modern
// does: through ECAM config cycles and MMIO on the buses, never by calling the device directly.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <map>
#include <thread>

#include "devices/bus.h"
#include "devices/pci/pci_root.h"
#include "devices/virtio/test_support.h"
#include "devices/virtio/virtio_pci.h"

namespace kiln::devices::virtio::testing {

class FakeNotifyRegistrar : public NotifyRegistrar {
 public:
  void add(uint64_t gpa, uint32_t len, int fd) override {
    std::lock_guard lock(mutex);
    registered[gpa] = {len, fd};
  }
  void remove(uint64_t gpa, uint32_t len, int fd) override {
    std::lock_guard lock(mutex);
    auto it = registered.find(gpa);
    if (it != registered.end() && it->second == std::make_pair(len, fd)) registered.erase(it);
  }
  std::mutex mutex;
  std::map<uint64_t, std::pair<uint32_t, int>> registered;
};

// One machine's worth of PCI plumbing with an event loop thread.
struct TestMachine {
  explicit TestMachine(uint64_t ram = 16 << 20)
      : memory(memory::GuestMemory::create_ram(ram)),
        mapper(mmio, pio),
        root(mapper),
        ecam(std::make_shared<pci::PciConfigMmio>(root)) {
    mmio.insert(ecam, pci::kEcamBase, pci::kEcamSize);
    loop.start_thread();
  }
  ~TestMachine() { loop.join_thread(); }

  // Declared before the buses and the root, which own the devices: devices go first.
  memory::GuestMemory memory;
  FakeMsiAllocator msi;
  FakeNotifyRegistrar notify;
  EventLoop loop;
  Bus mmio, pio;
  pci::BusBarMapper mapper;
  pci::PciRoot root;
  std::shared_ptr<pci::PciConfigMmio> ecam;
};

class VirtioPciTestDriver {
 public:
  VirtioPciTestDriver(TestMachine& machine, uint8_t slot) : m_(machine), slot_(slot) {}

  // --- PCI ---
  uint32_t config_read(uint32_t reg, size_t size = 4) {
    uint8_t data[4] = {};
    m_.mmio.read(ecam(reg), std::span<uint8_t>(data, size));
    return uint32_t(load_le(std::span<const uint8_t>(data, size)));
  }
  void config_write(uint32_t reg, uint32_t value, size_t size = 4) {
    uint8_t data[4];
    store_le(std::span<uint8_t>(data, size), value);
    m_.mmio.write(ecam(reg), std::span<const uint8_t>(data, size));
  }
  uint64_t bar0() { return (uint64_t(config_read(0x14)) << 32) | (config_read(0x10) & ~0xFull); }

  // Enables decoding, finds the virtio structures by walking the capability list and turns
  // MSI-X on with vector i programmed to data 0x100 + i.
  void probe() {
    config_write(pci::kCommand, pci::kCommandMemoryEnable | pci::kCommandBusMaster, 2);
    base_ = bar0();
    for (uint32_t cap = config_read(pci::kCapabilitiesPointer, 1); cap;
         cap = config_read(cap + 1, 1)) {
      uint8_t id = uint8_t(config_read(cap, 1));
      if (id == pci::kMsixCapabilityId) {
        msix_cap_ = cap;
        msix_vectors_ = (config_read(cap + 2, 2) & 0x7FF) + 1;
        msix_table_ = base_ + (config_read(cap + 4) & ~7u);
        continue;
      }
      if (id != kCapVendorSpecific) continue;
      uint8_t type = uint8_t(config_read(cap + 3, 1));
      uint64_t offset = base_ + config_read(cap + 8);
      if (type == kCapCommonCfg) common_ = offset;
      if (type == kCapIsrCfg) isr_ = offset;
      if (type == kCapDeviceCfg) device_cfg_ = offset;
      if (type == kCapNotifyCfg) {
        notify_ = offset;
        notify_multiplier_ = config_read(cap + 16);
      }
    }
    ASSERT_NE(common_, 0u);
    ASSERT_NE(notify_, 0u);
    ASSERT_NE(msix_cap_, 0u);
    config_write(msix_cap_ + 2, pci::kMsixControlEnable, 2);
    for (uint32_t v = 0; v < msix_vectors_; ++v) {
      uint64_t entry = msix_table_ + 16 * v;
      write(entry, 0xFEE0'0000u, 4);
      write(entry + 8, 0x100 + v, 4);
      write(entry + 12, 0, 4);
    }
  }

  // Sets or clears the Mask bit of MSI-X table entry `vector`.
  void mask_vector(uint32_t vector, bool masked) {
    write(msix_table_ + 16 * vector + 12, masked ? 1 : 0, 4);
  }

  // --- MMIO helpers ---
  uint64_t read(uint64_t gpa, size_t size) {
    uint8_t data[8] = {};
    m_.mmio.read(gpa, std::span<uint8_t>(data, size));
    return load_le(std::span<const uint8_t>(data, size));
  }
  void write(uint64_t gpa, uint64_t value, size_t size) {
    uint8_t data[8];
    store_le(std::span<uint8_t>(data, size), value);
    m_.mmio.write(gpa, std::span<const uint8_t>(data, size));
  }
  uint8_t status() { return uint8_t(read(common_ + kCommonDeviceStatus, 1)); }
  void set_status(uint8_t status) { write(common_ + kCommonDeviceStatus, status, 1); }
  uint64_t device_features() {
    write(common_ + kCommonDeviceFeatureSelect, 0, 4);
    uint64_t low = read(common_ + kCommonDeviceFeature, 4);
    write(common_ + kCommonDeviceFeatureSelect, 1, 4);
    return low | read(common_ + kCommonDeviceFeature, 4) << 32;
  }
  void write_driver_features(uint64_t features) {
    for (uint32_t select = 0; select < 2; ++select) {
      write(common_ + kCommonDriverFeatureSelect, select, 4);
      write(common_ + kCommonDriverFeature, uint32_t(features >> (32 * select)), 4);
    }
  }
  uint64_t device_config(uint32_t offset, size_t size) { return read(device_cfg_ + offset, size); }

  // Linux's order: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK and re-read it.
  bool negotiate(uint64_t features) {
    set_status(0);
    EXPECT_EQ(status(), 0);
    set_status(kStatusAcknowledge);
    set_status(kStatusAcknowledge | kStatusDriver);
    write_driver_features(features);
    set_status(kStatusAcknowledge | kStatusDriver | kStatusFeaturesOk);
    return status() & kStatusFeaturesOk;
  }

  // Programs queue `index` (size `size`) at the driver queue's addresses with MSI-X vector
  // 1 + index; the config vector is 0.
  void setup_queue(uint16_t index, const DriverQueue& queue) {
    write(common_ + kCommonConfigMsixVector, 0, 2);
    write(common_ + kCommonQueueSelect, index, 2);
    write(common_ + kCommonQueueSize, queue.size(), 2);
    write(common_ + kCommonQueueMsixVector, 1 + index, 2);
    // Two 32-bit halves, as Linux's vp_iowrite64_twopart does.
    for (auto [field, value] :
         {std::pair{kCommonQueueDesc, queue.desc()}, std::pair{kCommonQueueDriver, queue.avail()},
          std::pair{kCommonQueueDevice, queue.used()}}) {
      write(common_ + field, uint32_t(value), 4);
      write(common_ + field + 4, uint32_t(value >> 32), 4);
    }
    write(common_ + kCommonQueueEnable, 1, 2);
  }
  void driver_ok() {
    set_status(kStatusAcknowledge | kStatusDriver | kStatusFeaturesOk | kStatusDriverOk);
  }
  uint16_t queue_notify_off(uint16_t index) {
    write(common_ + kCommonQueueSelect, index, 2);
    return uint16_t(read(common_ + kCommonQueueNotifyOff, 2));
  }
  uint64_t notify_address(uint16_t index) {
    return notify_ + uint64_t(queue_notify_off(index)) * notify_multiplier_;
  }
  // A trapped MMIO notification (no ioeventfd involved).
  void notify(uint16_t index) { write(notify_address(index), index, 2); }

  // Polls the used ring like an interrupt-less driver would.
  static bool wait_used(const DriverQueue& queue, uint16_t idx,
                        std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (uint16_t(queue.used_idx() - idx) < 0x8000) return true;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    return false;
  }

  FakeMsiVector& vector(uint16_t index) { return *m_.msi.vectors.at(first_vector_ + index); }
  void set_first_vector(size_t first) { first_vector_ = first; }
  uint64_t base() const { return base_; }
  uint32_t notify_multiplier() const { return notify_multiplier_; }
  uint64_t isr() const { return isr_; }

 private:
  uint64_t ecam(uint32_t reg) { return pci::kEcamBase + (uint64_t(slot_) << 15) + reg; }

  TestMachine& m_;
  uint8_t slot_;
  uint64_t base_ = 0, common_ = 0, isr_ = 0, device_cfg_ = 0, notify_ = 0, msix_table_ = 0;
  uint32_t notify_multiplier_ = 0, msix_cap_ = 0, msix_vectors_ = 0;
  size_t first_vector_ = 0;
};

}  // namespace kiln::devices::virtio::testing
