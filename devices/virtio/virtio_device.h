// What a virtio device model implements and what it sees of its transport. Devices never know
// about PCI, KVM or threads other than: activate/reset come from a vCPU thread, process_queue
// from the event-loop thread, and back-end completions from wherever the back-end runs.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "devices/virtio/queue.h"
#include "memory/guest_memory.h"

namespace kiln::devices::virtio {

// Feature bits shared by every device (spec 6).
inline constexpr uint64_t kFeatureRingIndirectDesc = 1ull << 28;
inline constexpr uint64_t kFeatureRingEventIdx = 1ull << 29;
inline constexpr uint64_t kFeatureVersion1 = 1ull << 32;

// Device status bits (spec 2.1).
inline constexpr uint8_t kStatusAcknowledge = 1;
inline constexpr uint8_t kStatusDriver = 2;
inline constexpr uint8_t kStatusDriverOk = 4;
inline constexpr uint8_t kStatusFeaturesOk = 8;
inline constexpr uint8_t kStatusNeedsReset = 0x40;
inline constexpr uint8_t kStatusFailed = 0x80;

inline constexpr uint32_t kDeviceIdConsole = 3;
inline constexpr uint32_t kDeviceIdBlock = 2;
inline constexpr uint32_t kDeviceIdRng = 4;

// How a device reaches the driver; implemented by the transport. Thread-safe.
class VirtioInterrupt {
 public:
  virtual ~VirtioInterrupt() = default;
  // Used buffers were added to `queue` (call only when Queue::needs_notification() said so).
  virtual void signal_queue(uint16_t queue) = 0;
  // The device configuration space changed.
  virtual void signal_config_change() = 0;
  // The driver broke the protocol in a way the device cannot recover from: sets
  // DEVICE_NEEDS_RESET and sends a configuration-change interrupt (spec 2.1.2).
  virtual void needs_reset(const std::string& why) = 0;
  // An eventfd that raises `queue`'s interrupt inside the host kernel (an irqfd on its MSI-X
  // vector), for a device whose rings a kernel back-end runs; -1 when there is none or the
  // vector is not deliverable now (then relay through signal_queue). Valid until reset().
  virtual int queue_irqfd(uint16_t /*queue*/) { return -1; }
};

struct VirtioActivation {
  const memory::GuestMemory* memory = nullptr;
  // Indexed by queue number; the ones with ready() are active and validated. Owned by the
  // transport, used only by the device until reset() returns.
  std::span<Queue> queues;
  VirtioInterrupt* interrupt = nullptr;
  uint64_t acked_features = 0;
  // Per queue, the eventfd the driver's notifications signal (a KVM ioeventfd under KVM), for a
  // device that hands a queue to a kernel back-end (see handles_notifications).
  std::span<const int> notify_eventfds;
};

class VirtioDevice {
 public:
  virtual ~VirtioDevice() = default;

  virtual uint32_t device_type() const = 0;
  // PCI class code to advertise (class << 16 | subclass << 8 | prog-if).
  virtual uint32_t pci_class_code() const = 0;
  // Everything the device offers, including VIRTIO_F_VERSION_1 and ring features.
  virtual uint64_t device_features() const = 0;
  virtual uint16_t num_queues() const = 0;
  virtual uint16_t queue_max_size(uint16_t /*queue*/) const { return 256; }

  // Device-specific configuration space (little-endian); out-of-range bytes read as zero.
  virtual uint32_t config_size() const = 0;
  virtual void read_config(uint64_t offset, std::span<uint8_t> data) = 0;
  virtual void write_config(uint64_t /*offset*/, std::span<const uint8_t> /*data*/) {}

  // The driver set DRIVER_OK. Returns false if the device cannot run with this
  // configuration (the transport then reports NEEDS_RESET).
  virtual bool activate(const VirtioActivation& activation) = 0;
  // A queue was notified. Runs on the event-loop thread.
  virtual void process_queue(uint16_t queue) = 0;
  // True if the device takes `queue`'s notifications itself from
  // VirtioActivation::notify_eventfds (a kernel back-end waits on it): the transport then does
  // not watch it and process_queue is not called for it.
  virtual bool handles_notifications(uint16_t /*queue*/) const { return false; }
  // Stops all work (waiting for in-flight back-end requests) and forgets the activation. Not
  // called concurrently with process_queue.
  virtual void reset() = 0;
};

}  // namespace kiln::devices::virtio
