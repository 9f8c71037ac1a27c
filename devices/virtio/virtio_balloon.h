// virtio-balloon (virtio 1.2 section 5.5): the host sets a target (num_pages) and the guest
// inflates the balloon by handing 4 KiB page frames to the device, which gives them back to
// the host (MADV_DONTNEED through GuestMemory::discard); deflated pages are simply reused by
// the guest and fault back in zeroed. The optional statistics queue reports the guest's memory
// figures when the host asks for them.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>

#include "devices/virtio/rate_limited_log.h"
#include "devices/virtio/virtio_device.h"

namespace kiln::devices::virtio {

inline constexpr uint32_t kDeviceIdBalloon = 5;
inline constexpr uint16_t kBalloonInflateQueue = 0;
inline constexpr uint16_t kBalloonDeflateQueue = 1;
inline constexpr uint16_t kBalloonStatsQueue = 2;
inline constexpr uint64_t kBalloonFeatureMustTellHost = 1ull << 0;
inline constexpr uint64_t kBalloonFeatureStatsVq = 1ull << 1;
inline constexpr uint64_t kBalloonFeatureDeflateOnOom = 1ull << 2;
inline constexpr uint32_t kBalloonPageShift = 12;  // the balloon's page size is always 4 KiB
inline constexpr uint32_t kBalloonConfigSize = 8;  // le32 num_pages, le32 actual
inline constexpr uint32_t kBalloonStatSize = 10;   // le16 tag, le64 value (packed)

// Statistics tags (VIRTIO_BALLOON_S_*).
enum class BalloonStat : uint16_t {
  kSwapIn = 0,
  kSwapOut = 1,
  kMajorFaults = 2,
  kMinorFaults = 3,
  kFreeMemory = 4,
  kTotalMemory = 5,
  kAvailableMemory = 6,
  kDiskCaches = 7,
  kHugetlbAllocations = 8,
  kHugetlbFailures = 9,
};

struct BalloonMetrics {
  std::atomic<uint64_t> inflated_pages{0};   // page frames the guest gave us
  std::atomic<uint64_t> discarded_pages{0};  // of those, released to the host
  std::atomic<uint64_t> deflated_pages{0};
  std::atomic<uint64_t> bad_pages{0};  // outside guest RAM or not releasable
  std::atomic<uint64_t> stats_updates{0};
};

// What the guest last reported on the statistics queue.
struct BalloonStatsReport {
  int64_t updated_at = 0;               // host wall-clock seconds of the report; 0: none yet
  std::map<uint16_t, uint64_t> values;  // by BalloonStat tag; tags the guest did not send absent
};

struct BalloonState {
  static constexpr uint32_t kVersion = 1;
  uint32_t version = kVersion;
  uint32_t num_pages = 0;
  uint32_t actual = 0;
};

class VirtioBalloon : public VirtioDevice {
 public:
  // deflate_on_oom: let the guest take pages back when it runs out of memory (a Linux guest
  // then keeps its MemTotal while inflated, so the balloon is invisible there).
  explicit VirtioBalloon(uint64_t ram_bytes, bool deflate_on_oom = false)
      : ram_bytes_(ram_bytes), deflate_on_oom_(deflate_on_oom) {}

  uint32_t device_type() const override { return kDeviceIdBalloon; }
  uint32_t pci_class_code() const override { return 0x05FF00; }  // memory controller, other
  uint64_t device_features() const override {
    return kFeatureVersion1 | kFeatureRingIndirectDesc | kFeatureRingEventIdx |
           kBalloonFeatureStatsVq | (deflate_on_oom_ ? kBalloonFeatureDeflateOnOom : 0);
  }
  uint16_t num_queues() const override { return 3; }
  uint32_t config_size() const override { return kBalloonConfigSize; }
  void read_config(uint64_t offset, std::span<uint8_t> data) override;
  void write_config(uint64_t offset, std::span<const uint8_t> data) override;

  bool activate(const VirtioActivation& activation) override;
  void process_queue(uint16_t queue) override;
  void reset() override;

  // Asks the guest to shrink to `guest_bytes` (QMP "balloon"); more than the RAM means all of
  // it. Any thread.
  void set_target(uint64_t guest_bytes);
  // What the guest has now: RAM minus the pages in the balloon (QMP "query-balloon").
  uint64_t actual_bytes() const;
  uint32_t target_pages() const { return num_pages_.load(); }
  // Called (on the vCPU thread that wrote the config) with actual_bytes() whenever the driver
  // reports a new balloon size: QMP's BALLOON_CHANGE. Set before the guest runs.
  void set_actual_listener(std::function<void(uint64_t)> listener) {
    actual_listener_ = std::move(listener);
  }
  uint32_t actual_pages() const { return actual_.load(); }

  // Gives the guest's statistics buffer back so that it refills it; false when the driver has
  // none outstanding (no STATS_VQ, or not up yet). The new figures arrive asynchronously.
  bool request_stats();
  // The last statistics the guest reported. A statistic keeps its last value when a later
  // report leaves it out.
  BalloonStatsReport stats() const;

  const BalloonMetrics& metrics() const { return metrics_; }
  BalloonState save() const;
  void restore(const BalloonState& state);

 private:
  void inflate_locked(Queue& queue);
  void deflate_locked(Queue& queue);
  void stats_locked(Queue& queue);
  // Keeps one report's buffer; false when the queue broke.
  bool take_stats_locked(Queue& queue, const DescriptorChain& chain);
  void release_pages_locked(const std::vector<uint32_t>& pfns);
  void discard_run_locked(uint64_t gpa, uint64_t pages);

  const uint64_t ram_bytes_;
  const bool deflate_on_oom_;
  std::atomic<uint32_t> num_pages_{0};
  std::atomic<uint32_t> actual_{0};
  std::function<void(uint64_t)> actual_listener_;
  mutable std::mutex mutex_;
  bool active_ = false;
  VirtioActivation activation_;
  std::optional<uint16_t> stats_head_;  // the driver's stats buffer we hold
  BalloonStatsReport stats_;
  BalloonMetrics metrics_;
  RateLimitedLog log_;
};

}  // namespace kiln::devices::virtio
