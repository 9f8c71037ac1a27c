// virtio-rng (virtio 1.2 section 5.4): fills every device-writable buffer from getrandom(2).
#pragma once

#include <atomic>
#include <mutex>

#include "devices/virtio/rate_limited_log.h"
#include "devices/virtio/virtio_device.h"

namespace kiln::devices::virtio {

struct RngMetrics {
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> bytes{0};
  std::atomic<uint64_t> errors{0};
};

class VirtioRng : public VirtioDevice {
 public:
  uint32_t device_type() const override { return kDeviceIdRng; }
  uint32_t pci_class_code() const override { return 0x00FF00; }  // unclassified
  uint64_t device_features() const override {
    return kFeatureVersion1 | kFeatureRingIndirectDesc | kFeatureRingEventIdx;
  }
  uint16_t num_queues() const override { return 1; }
  uint32_t config_size() const override { return 0; }
  void read_config(uint64_t, std::span<uint8_t> data) override {
    std::fill(data.begin(), data.end(), 0);
  }

  bool activate(const VirtioActivation& activation) override;
  void process_queue(uint16_t queue) override;
  void reset() override;

  const RngMetrics& metrics() const { return metrics_; }

 private:
  std::mutex mutex_;
  bool active_ = false;
  VirtioActivation activation_;
  RngMetrics metrics_;
  RateLimitedLog log_;
};

}  // namespace kiln::devices::virtio
