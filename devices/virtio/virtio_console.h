// virtio-console (virtio 1.2 section 5.3) with a single port (hvc0 in a Linux guest): what
// the guest transmits goes to a host sink callback, host input is queued and delivered into
// the guest's receive buffers as they become available.
#pragma once

#include <atomic>
#include <deque>
#include <functional>
#include <mutex>
#include <vector>

#include "devices/virtio/rate_limited_log.h"
#include "devices/virtio/virtio_device.h"

namespace kiln::devices::virtio {

inline constexpr uint16_t kConsoleReceiveQueue = 0;   // host -> guest
inline constexpr uint16_t kConsoleTransmitQueue = 1;  // guest -> host
inline constexpr uint32_t kConsoleConfigSize = 12;    // cols, rows, max_nr_ports, emerg_wr

struct ConsoleMetrics {
  std::atomic<uint64_t> tx_bytes{0};
  std::atomic<uint64_t> rx_bytes{0};
  std::atomic<uint64_t> rx_dropped{0};
};

// Host input the guest has not consumed yet (the rings themselves are in VirtioPciState).
struct ConsoleState {
  static constexpr uint32_t kVersion = 1;
  uint32_t version = kVersion;
  std::vector<uint8_t> pending_input;
};

class VirtioConsole : public VirtioDevice {
 public:
  // Receives guest output; called on the event-loop thread, must not block for long.
  using Sink = std::function<void(std::span<const uint8_t>)>;
  // Input beyond this many buffered bytes is dropped (the guest isn't reading).
  static constexpr size_t kMaxPendingInput = 1 << 20;

  explicit VirtioConsole(Sink sink) : sink_(std::move(sink)) {}

  uint32_t device_type() const override { return kDeviceIdConsole; }
  uint32_t pci_class_code() const override { return 0x078000; }  // simple comms, other
  uint64_t device_features() const override {
    return kFeatureVersion1 | kFeatureRingIndirectDesc | kFeatureRingEventIdx;
  }
  uint16_t num_queues() const override { return 2; }
  uint32_t config_size() const override { return kConsoleConfigSize; }
  void read_config(uint64_t offset, std::span<uint8_t> data) override;

  bool activate(const VirtioActivation& activation) override;
  void process_queue(uint16_t queue) override;
  void reset() override;

  // Queues host input for the guest. Any thread.
  void enqueue_input(std::span<const uint8_t> bytes);

  const ConsoleMetrics& metrics() const { return metrics_; }
  ConsoleState save();
  void restore(const ConsoleState& state);

 private:
  void transmit_locked();
  void deliver_input_locked();

  Sink sink_;
  std::mutex mutex_;
  bool active_ = false;
  VirtioActivation activation_;
  std::deque<uint8_t> pending_input_;
  ConsoleMetrics metrics_;
  RateLimitedLog log_;
};

}  // namespace kiln::devices::virtio
