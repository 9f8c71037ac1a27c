// virtio-blk (virtio 1.2 section 5.2) over a block::BlockDevice. Requests are parsed on the
// event-loop thread and submitted asynchronously; completions (from any thread) write the
// status byte, return the chain to the used ring and interrupt the driver.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "block/block_device.h"
#include "devices/virtio/chain_buffers.h"
#include "devices/virtio/rate_limited_log.h"
#include "devices/virtio/virtio_device.h"

namespace kiln::devices::virtio {

inline constexpr uint64_t kBlkFeatureSizeMax = 1ull << 1;
inline constexpr uint64_t kBlkFeatureSegMax = 1ull << 2;
inline constexpr uint64_t kBlkFeatureRo = 1ull << 5;
inline constexpr uint64_t kBlkFeatureBlkSize = 1ull << 6;
inline constexpr uint64_t kBlkFeatureFlush = 1ull << 9;
inline constexpr uint64_t kBlkFeatureMq = 1ull << 12;
inline constexpr uint64_t kBlkFeatureDiscard = 1ull << 13;
inline constexpr uint64_t kBlkFeatureWriteZeroes = 1ull << 14;

inline constexpr uint32_t kBlkTypeIn = 0;
inline constexpr uint32_t kBlkTypeOut = 1;
inline constexpr uint32_t kBlkTypeFlush = 4;
inline constexpr uint32_t kBlkTypeGetId = 8;
inline constexpr uint32_t kBlkTypeDiscard = 11;
inline constexpr uint32_t kBlkTypeWriteZeroes = 13;

inline constexpr uint8_t kBlkStatusOk = 0;
inline constexpr uint8_t kBlkStatusIoErr = 1;
inline constexpr uint8_t kBlkStatusUnsupported = 2;

inline constexpr uint32_t kBlkSectorSize = 512;
inline constexpr uint32_t kBlkIdBytes = 20;
inline constexpr uint32_t kBlkRequestHeaderSize = 16;
inline constexpr uint32_t kBlkDiscardSegmentSize = 16;
inline constexpr uint32_t kBlkWriteZeroesUnmap = 1;

// Offsets in struct virtio_blk_config.
inline constexpr uint32_t kBlkConfigCapacity = 0;
inline constexpr uint32_t kBlkConfigSizeMax = 8;
inline constexpr uint32_t kBlkConfigSegMax = 12;
inline constexpr uint32_t kBlkConfigBlkSize = 20;
inline constexpr uint32_t kBlkConfigNumQueues = 34;
inline constexpr uint32_t kBlkConfigMaxDiscardSectors = 36;
inline constexpr uint32_t kBlkConfigMaxDiscardSeg = 40;
inline constexpr uint32_t kBlkConfigDiscardSectorAlignment = 44;
inline constexpr uint32_t kBlkConfigMaxWriteZeroesSectors = 48;
inline constexpr uint32_t kBlkConfigMaxWriteZeroesSeg = 52;
inline constexpr uint32_t kBlkConfigWriteZeroesMayUnmap = 56;
inline constexpr uint32_t kBlkConfigSize = 60;

struct BlockConfig {
  std::string serial;  // GET_ID answer, at most 20 bytes used
  uint16_t num_queues = 1;
  uint16_t queue_size = 256;
  bool read_only = false;  // forced read-only even if the back-end is writable
  uint32_t size_max = 1u << 20;
  uint32_t max_discard_sectors = 1u << 22;
};

// Accounting of one kind of request as QEMU keeps it for query-blockstats: requests that completed
// (with their bytes and time), that the back-end failed, and that were rejected before reaching it
// (out of range, misaligned, too many segments).
struct BlockOpStats {
  std::atomic<uint64_t> operations{0};
  std::atomic<uint64_t> bytes{0};
  std::atomic<uint64_t> total_time_ns{0};
  std::atomic<uint64_t> failed{0};
  std::atomic<uint64_t> invalid{0};
};

struct BlockMetrics {
  std::atomic<uint64_t> reads{0};
  std::atomic<uint64_t> writes{0};
  std::atomic<uint64_t> flushes{0};
  std::atomic<uint64_t> discards{0};
  std::atomic<uint64_t> write_zeroes{0};
  std::atomic<uint64_t> get_ids{0};
  std::atomic<uint64_t> read_bytes{0};
  std::atomic<uint64_t> write_bytes{0};
  std::atomic<uint64_t> io_errors{0};
  std::atomic<uint64_t> unsupported{0};
  std::atomic<uint64_t> malformed{0};
  // QEMU's classes: write-zeroes counts as a write and discard as an unmap, as QEMU's virtio-blk
  // does.
  BlockOpStats read_acct, write_acct, flush_acct, unmap_acct;
  std::atomic<uint64_t> wr_highest_offset{0};  // the offset after the last byte ever written
};

class VirtioBlock : public VirtioDevice {
 public:
  VirtioBlock(std::shared_ptr<block::BlockDevice> disk, BlockConfig config);

  uint32_t device_type() const override { return kDeviceIdBlock; }
  uint32_t pci_class_code() const override { return 0x018000; }  // mass storage, other
  uint64_t device_features() const override;
  uint16_t num_queues() const override { return config_.num_queues; }
  uint16_t queue_max_size(uint16_t) const override { return config_.queue_size; }
  uint32_t config_size() const override { return kBlkConfigSize; }
  void read_config(uint64_t offset, std::span<uint8_t> data) override;

  bool activate(const VirtioActivation& activation) override;
  void process_queue(uint16_t queue) override;
  void reset() override;

  const BlockMetrics& metrics() const { return metrics_; }
  bool read_only() const { return read_only_; }

 private:
  struct Request;
  void handle_chain(uint16_t queue, DescriptorChain chain, uint64_t generation);
  void submit_read(const std::shared_ptr<Request>& request, uint64_t sector);
  void submit_write(const std::shared_ptr<Request>& request, uint64_t sector);
  void submit_range(const std::shared_ptr<Request>& request, uint32_t type);
  bool in_capacity(uint64_t sector, uint64_t bytes) const;
  // Writes the status byte and hands the chain back to the driver. Any thread.
  void finish(const std::shared_ptr<Request>& request, uint8_t status, uint32_t data_written);
  block::Completion completion_for(const std::shared_ptr<Request>& request, uint32_t written);
  // Starts timing a request that goes to the back-end; completion_for() books its outcome.
  void start_accounting(Request& request, BlockOpStats& kind, uint64_t offset, uint64_t bytes);
  void account_completion(const Request& request, bool ok);

  std::shared_ptr<block::BlockDevice> disk_;
  BlockConfig config_;
  bool read_only_;
  uint32_t block_size_;
  uint64_t capacity_sectors_;

  std::mutex mutex_;  // guards the activation and the queues while active
  bool active_ = false;
  uint64_t generation_ = 0;
  VirtioActivation activation_;

  BlockMetrics metrics_;
  RateLimitedLog log_;
};

}  // namespace kiln::devices::virtio
