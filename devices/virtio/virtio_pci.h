// Modern virtio-pci transport (virtio 1.2 section 4.1): common/notify/ISR/device configuration
// structures and the MSI-X table in one 64-bit memory BAR, device status and feature
// negotiation, one eventfd per queue that the event loop watches.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "base/event_loop.h"
#include "base/unique_fd.h"
#include "devices/irq.h"
#include "devices/pci/msix.h"
#include "devices/pci/pci_device.h"
#include "devices/virtio/rate_limited_log.h"
#include "devices/virtio/virtio_device.h"

namespace kiln::devices::virtio {

// Implemented by the VMM: register `eventfd` as a KVM ioeventfd for guest writes of `len`
// bytes at `gpa` (the queue's notification address), or take it away again. Called from the
// vCPU thread that moved the BAR.
class NotifyRegistrar {
 public:
  virtual ~NotifyRegistrar() = default;
  virtual void add(uint64_t gpa, uint32_t len, int eventfd) = 0;
  virtual void remove(uint64_t gpa, uint32_t len, int eventfd) = 0;
};

// BAR 0 layout (64-bit, prefetchable = no).
inline constexpr int kVirtioBar = 0;
inline constexpr uint64_t kVirtioBarSize = 0x8000;
inline constexpr uint64_t kCommonCfgOffset = 0x0000;
inline constexpr uint64_t kIsrCfgOffset = 0x1000;
inline constexpr uint64_t kDeviceCfgOffset = 0x2000;
inline constexpr uint64_t kNotifyCfgOffset = 0x3000;
inline constexpr uint64_t kMsixTableOffset = 0x4000;
inline constexpr uint64_t kMsixPbaOffset = 0x6000;
inline constexpr uint64_t kRegionSize = 0x1000;
inline constexpr uint32_t kNotifyOffMultiplier = 4;
inline constexpr uint32_t kNotifyAccessLength = 2;  // the driver writes a 16-bit queue index
inline constexpr uint16_t kNoVector = 0xFFFF;

// Common configuration structure offsets (spec 4.1.4.3).
inline constexpr uint32_t kCommonDeviceFeatureSelect = 0x00;
inline constexpr uint32_t kCommonDeviceFeature = 0x04;
inline constexpr uint32_t kCommonDriverFeatureSelect = 0x08;
inline constexpr uint32_t kCommonDriverFeature = 0x0C;
inline constexpr uint32_t kCommonConfigMsixVector = 0x10;
inline constexpr uint32_t kCommonNumQueues = 0x12;
inline constexpr uint32_t kCommonDeviceStatus = 0x14;
inline constexpr uint32_t kCommonConfigGeneration = 0x15;
inline constexpr uint32_t kCommonQueueSelect = 0x16;
inline constexpr uint32_t kCommonQueueSize = 0x18;
inline constexpr uint32_t kCommonQueueMsixVector = 0x1A;
inline constexpr uint32_t kCommonQueueEnable = 0x1C;
inline constexpr uint32_t kCommonQueueNotifyOff = 0x1E;
inline constexpr uint32_t kCommonQueueDesc = 0x20;
inline constexpr uint32_t kCommonQueueDriver = 0x28;
inline constexpr uint32_t kCommonQueueDevice = 0x30;
inline constexpr uint32_t kCommonCfgSize = 0x38;

// Virtio PCI capability types (spec 4.1.4).
inline constexpr uint8_t kCapCommonCfg = 1;
inline constexpr uint8_t kCapNotifyCfg = 2;
inline constexpr uint8_t kCapIsrCfg = 3;
inline constexpr uint8_t kCapDeviceCfg = 4;
inline constexpr uint8_t kCapPciCfg = 5;
// Offsets inside the VIRTIO_PCI_CAP_PCI_CFG capability (struct virtio_pci_cfg_cap).
inline constexpr uint32_t kPciCfgBar = 4;
inline constexpr uint32_t kPciCfgOffset = 8;
inline constexpr uint32_t kPciCfgLength = 12;
inline constexpr uint32_t kPciCfgData = 16;
inline constexpr uint8_t kCapVendorSpecific = 0x09;

struct VirtioPciState {
  static constexpr uint32_t kVersion = 1;
  uint32_t version = kVersion;
  pci::PciConfigState config;
  pci::MsixState msix;
  uint8_t status = 0;
  uint8_t config_generation = 0;
  uint8_t isr = 0;
  uint32_t device_feature_select = 0;
  uint32_t driver_feature_select = 0;
  uint64_t driver_features = 0;
  uint16_t queue_select = 0;
  uint16_t config_vector = kNoVector;
  std::vector<uint16_t> queue_vectors;
  std::vector<QueueState> queues;
};

struct VirtioPciMetrics {
  std::atomic<uint64_t> notifications{0};
  std::atomic<uint64_t> queue_interrupts{0};
  std::atomic<uint64_t> config_interrupts{0};
  std::atomic<uint64_t> needs_reset{0};
  std::atomic<uint64_t> resets{0};
};

class VirtioPciDevice : public pci::PciDevice, private VirtioInterrupt {
 public:
  // `notify` may be null (every notification then traps as an MMIO write). `memory`, `msi`,
  // `loop` and `notify` must outlive the device.
  VirtioPciDevice(std::shared_ptr<VirtioDevice> device, const memory::GuestMemory& memory,
                  MsiAllocator& msi, EventLoop& loop, NotifyRegistrar* notify = nullptr);
  ~VirtioPciDevice() override;

  void bar_read(int bar, uint64_t offset, std::span<uint8_t> data) override;
  void bar_write(int bar, uint64_t offset, std::span<const uint8_t> data) override;

  uint8_t device_status() const { return status_.load(); }
  uint64_t acked_features() const;
  int queue_eventfd(uint16_t queue) const { return queue_eventfds_.at(queue).get(); }
  const VirtioPciMetrics& metrics() const { return metrics_; }
  VirtioDevice& device() { return *device_; }

  // Snapshot with the VM paused (vCPUs stopped) so no register access races.
  VirtioPciState save() const;
  // Restores transport state and re-activates a running device. Returns the BAR decoding
  // changes for PciRoot::apply_bar_changes.
  std::vector<pci::BarChange> restore(const VirtioPciState& state);

 private:
  // VirtioInterrupt
  void signal_queue(uint16_t queue) override;
  void signal_config_change() override;
  void needs_reset(const std::string& why) override;
  int queue_irqfd(uint16_t queue) override;

  // PciDevice hooks
  void config_written(uint32_t offset, size_t size) override;
  void config_before_read(uint32_t offset, size_t size) override;
  // The VIRTIO_PCI_CAP_PCI_CFG window: where pci_cfg_data currently points, if valid.
  bool pci_cfg_window(uint64_t& offset, uint32_t& length);
  void bars_changed(const std::vector<pci::BarChange>& changes) override;

  void add_virtio_capabilities();
  void common_read(uint64_t offset, std::span<uint8_t> data);
  void common_write(uint64_t offset, std::span<const uint8_t> data);
  void write_status_locked(uint8_t value);
  bool features_acceptable_locked() const;
  void activate_locked();
  void watch_queues_locked();
  void deactivate_locked();
  void reset_locked();
  void notify_queue(uint16_t queue);
  void register_notifiers(uint64_t bar_base, bool add);
  uint16_t checked_vector(uint16_t vector) const;

  std::shared_ptr<VirtioDevice> device_;
  const memory::GuestMemory& memory_;
  EventLoop& loop_;
  NotifyRegistrar* notify_;
  pci::Msix msix_;
  uint32_t msix_capability_ = 0;
  uint32_t pci_cfg_capability_ = 0;
  std::vector<UniqueFd> queue_eventfds_;
  std::vector<int> notify_fds_;  // queue_eventfds_' numbers, for VirtioActivation

  // Guards the common configuration state below. Lock order: this, then the device's own
  // locks, then the MSI-X lock. Never taken from the device's callbacks.
  mutable std::mutex mutex_;
  std::vector<Queue> queues_;
  uint32_t device_feature_select_ = 0;
  uint32_t driver_feature_select_ = 0;
  uint64_t driver_features_ = 0;
  uint16_t queue_select_ = 0;
  bool activated_ = false;
  std::vector<bool> watched_;  // queues whose eventfd the loop watches while activated

  // Read by interrupt paths on other threads without the lock.
  std::atomic<uint8_t> status_{0};
  std::atomic<uint8_t> isr_{0};
  std::atomic<uint8_t> config_generation_{0};
  std::atomic<uint16_t> config_vector_{kNoVector};
  std::unique_ptr<std::atomic<uint16_t>[]> queue_vectors_;

  VirtioPciMetrics metrics_;
  RateLimitedLog log_;
};

}  // namespace kiln::devices::virtio
