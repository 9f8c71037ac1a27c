#include "devices/virtio/virtio_blk.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace kiln::devices::virtio {
namespace {

uint64_t get_le(std::span<const uint8_t> bytes, size_t offset, size_t size) {
  uint64_t value = 0;
  for (size_t i = 0; i < size; ++i) value |= uint64_t(bytes[offset + i]) << (8 * i);
  return value;
}

void put_le(std::span<uint8_t> bytes, size_t offset, uint64_t value, size_t size) {
  for (size_t i = 0; i < size; ++i) bytes[offset + i] = uint8_t(value >> (8 * i));
}

// An aligned host buffer for back-ends that need O_DIRECT alignment the guest's buffers lack.
struct BounceBuffer {
  explicit BounceBuffer(uint64_t size, uint32_t alignment)
      : data(static_cast<uint8_t*>(std::aligned_alloc(
            alignment,
            std::max<uint64_t>(alignment, (size + alignment - 1) / alignment * alignment)))),
        size(size) {
    if (!data) throw std::bad_alloc();
  }
  ~BounceBuffer() { std::free(data); }
  BounceBuffer(const BounceBuffer&) = delete;
  BounceBuffer& operator=(const BounceBuffer&) = delete;
  uint8_t* data;
  uint64_t size;
};

bool aligned(const std::vector<iovec>& iov, uint32_t alignment) {
  if (alignment <= 1) return true;
  return std::all_of(iov.begin(), iov.end(), [alignment](const iovec& v) {
    return reinterpret_cast<uintptr_t>(v.iov_base) % alignment == 0 && v.iov_len % alignment == 0;
  });
}

}  // namespace

// One request in flight; shared by the completion callback so it lives until completion.
struct VirtioBlock::Request {
  Request(const DescriptorChain& chain, const memory::GuestMemory& memory, uint16_t queue,
          uint64_t generation)
      : memory(memory),
        queue(queue),
        head(chain.head),
        generation(generation),
        in(chain, false),
        out(chain, true) {}
  const memory::GuestMemory& memory;
  uint16_t queue;
  uint16_t head;
  uint64_t generation;
  ChainBuffers in;   // driver -> device bytes: header, then OUT data / discard segments
  ChainBuffers out;  // device -> driver bytes: IN data / ID, then the status byte
  std::vector<iovec> iov;
  std::unique_ptr<BounceBuffer> bounce;
  // Accounting, set by start_accounting() for requests that reach the back-end.
  BlockOpStats* acct = nullptr;
  uint64_t acct_offset = 0;
  uint64_t acct_bytes = 0;
  std::chrono::steady_clock::time_point started;
};

VirtioBlock::VirtioBlock(std::shared_ptr<block::BlockDevice> disk, BlockConfig config)
    : disk_(std::move(disk)), config_(std::move(config)) {
  if (!disk_) throw std::invalid_argument("virtio-blk needs a disk");
  if (config_.num_queues == 0) throw std::invalid_argument("virtio-blk needs a queue");
  if (config_.queue_size < 4 || (config_.queue_size & (config_.queue_size - 1)))
    throw std::invalid_argument("virtio-blk queue size must be a power of two >= 4");
  read_only_ = config_.read_only || disk_->read_only();
  block_size_ = std::max<uint32_t>(kBlkSectorSize, disk_->alignment());
  capacity_sectors_ = disk_->size() / kBlkSectorSize;
}

uint64_t VirtioBlock::device_features() const {
  uint64_t features = kFeatureVersion1 | kFeatureRingIndirectDesc | kFeatureRingEventIdx |
                      kBlkFeatureSizeMax | kBlkFeatureSegMax | kBlkFeatureBlkSize |
                      kBlkFeatureFlush | kBlkFeatureDiscard | kBlkFeatureWriteZeroes;
  if (read_only_) features |= kBlkFeatureRo;
  if (config_.num_queues > 1) features |= kBlkFeatureMq;
  return features;
}

void VirtioBlock::read_config(uint64_t offset, std::span<uint8_t> data) {
  uint8_t image[kBlkConfigSize] = {};
  std::span<uint8_t> cfg(image);
  put_le(cfg, kBlkConfigCapacity, capacity_sectors_, 8);
  put_le(cfg, kBlkConfigSizeMax, config_.size_max, 4);
  // Two descriptors of every request carry the header and the status byte.
  put_le(cfg, kBlkConfigSegMax, config_.queue_size - 2u, 4);
  put_le(cfg, kBlkConfigBlkSize, block_size_, 4);
  put_le(cfg, kBlkConfigNumQueues, config_.num_queues, 2);
  put_le(cfg, kBlkConfigMaxDiscardSectors, config_.max_discard_sectors, 4);
  put_le(cfg, kBlkConfigMaxDiscardSeg, 1, 4);
  put_le(cfg, kBlkConfigDiscardSectorAlignment, block_size_ / kBlkSectorSize, 4);
  put_le(cfg, kBlkConfigMaxWriteZeroesSectors, config_.max_discard_sectors, 4);
  put_le(cfg, kBlkConfigMaxWriteZeroesSeg, 1, 4);
  cfg[kBlkConfigWriteZeroesMayUnmap] = 1;
  for (size_t i = 0; i < data.size(); ++i)
    data[i] = offset + i < kBlkConfigSize ? image[offset + i] : 0;
}

bool VirtioBlock::activate(const VirtioActivation& activation) {
  std::lock_guard lock(mutex_);
  if (activation.queues.size() != config_.num_queues) return false;
  activation_ = activation;
  active_ = true;
  return true;
}

void VirtioBlock::reset() {
  // Completions still in flight need the queues; let them land before forgetting them.
  disk_->drain();
  std::lock_guard lock(mutex_);
  active_ = false;
  ++generation_;
  activation_ = {};
}

void VirtioBlock::process_queue(uint16_t index) {
  std::vector<DescriptorChain> batch;
  uint64_t generation;
  {
    std::lock_guard lock(mutex_);
    if (!active_ || index >= activation_.queues.size()) return;
    Queue& queue = activation_.queues[index];
    if (!queue.ready()) return;
    do {
      DescriptorChain chain;
      Queue::PopStatus status;
      while ((status = queue.pop(*activation_.memory, chain)) == Queue::PopStatus::kChain)
        batch.push_back(std::move(chain));
      if (status == Queue::PopStatus::kError) {
        metrics_.malformed++;
        activation_.interrupt->needs_reset("virtio-blk queue " + std::to_string(index) + ": " +
                                           queue.error());
        break;
      }
    } while (queue.enable_notification());
    generation = generation_;
  }
  // Submitted without the lock: a back-end may complete synchronously, and finish() locks.
  for (auto& chain : batch) handle_chain(index, std::move(chain), generation);
}

bool VirtioBlock::in_capacity(uint64_t sector, uint64_t bytes) const {
  return sector <= capacity_sectors_ && bytes / kBlkSectorSize <= capacity_sectors_ - sector;
}

void VirtioBlock::handle_chain(uint16_t queue, DescriptorChain chain, uint64_t generation) {
  auto request = std::make_shared<Request>(chain, *activation_.memory, queue, generation);
  if (request->out.size() == 0) {
    // Nowhere to put a status byte: the chain goes back untouched.
    metrics_.malformed++;
    log_.warn("virtio-blk: request without a writable status byte");
    finish(request, kBlkStatusIoErr, 0);
    return;
  }
  uint8_t header[kBlkRequestHeaderSize];
  if (!request->in.read(0, header)) {
    metrics_.malformed++;
    log_.warn("virtio-blk: request header shorter than 16 bytes");
    finish(request, kBlkStatusIoErr, 0);
    return;
  }
  uint32_t type = uint32_t(get_le(header, 0, 4));
  uint64_t sector = get_le(header, 8, 8);
  switch (type) {
    case kBlkTypeIn:
      return submit_read(request, sector);
    case kBlkTypeOut:
      return submit_write(request, sector);
    case kBlkTypeFlush:
      metrics_.flushes++;
      start_accounting(*request, metrics_.flush_acct, 0, 0);
      return disk_->flush(completion_for(request, 0));
    case kBlkTypeGetId: {
      metrics_.get_ids++;
      uint8_t id[kBlkIdBytes] = {};
      std::memcpy(id, config_.serial.data(), std::min<size_t>(config_.serial.size(), kBlkIdBytes));
      uint32_t length = uint32_t(std::min<uint64_t>(kBlkIdBytes, request->out.size() - 1));
      request->out.write(request->memory, 0, std::span<const uint8_t>(id, length));
      return finish(request, kBlkStatusOk, length);
    }
    case kBlkTypeDiscard:
    case kBlkTypeWriteZeroes:
      return submit_range(request, type);
    default:
      metrics_.unsupported++;
      return finish(request, kBlkStatusUnsupported, 0);
  }
}

void VirtioBlock::submit_read(const std::shared_ptr<Request>& request, uint64_t sector) {
  metrics_.reads++;
  uint64_t length = request->out.size() - 1;
  request->iov = request->out.iovecs(0, length);
  if (length % kBlkSectorSize || !in_capacity(sector, length) ||
      request->iov.size() > config_.queue_size - 2u ||
      request->out.largest_segment() > std::max<uint64_t>(config_.size_max, 1)) {
    metrics_.io_errors++;
    metrics_.read_acct.invalid++;
    log_.warn(fmt::format("virtio-blk: bad read of {} bytes at sector {}", length, sector));
    return finish(request, kBlkStatusIoErr, 0);
  }
  metrics_.read_bytes += length;
  start_accounting(*request, metrics_.read_acct, sector * kBlkSectorSize, length);
  if (!aligned(request->iov, disk_->alignment())) {
    request->bounce = std::make_unique<BounceBuffer>(length, disk_->alignment());
    iovec bounce{request->bounce->data, length};
    disk_->read(sector * kBlkSectorSize, {&bounce, 1}, [this, request, length](int result) {
      if (result == 0)
        request->out.write(request->memory, 0, {request->bounce->data, size_t(length)});
      completion_for(request, uint32_t(length))(result);
    });
    return;
  }
  disk_->read(sector * kBlkSectorSize, request->iov, completion_for(request, uint32_t(length)));
}

void VirtioBlock::submit_write(const std::shared_ptr<Request>& request, uint64_t sector) {
  metrics_.writes++;
  uint64_t length = request->in.size() - kBlkRequestHeaderSize;
  if (read_only_) {
    metrics_.io_errors++;
    metrics_.write_acct.failed++;  // as QEMU: the back-end refuses it (EPERM)
    return finish(request, kBlkStatusIoErr, 0);
  }
  request->iov = request->in.iovecs(kBlkRequestHeaderSize, length);
  if (length % kBlkSectorSize || !in_capacity(sector, length) ||
      request->iov.size() > config_.queue_size - 2u ||
      request->in.largest_segment() > std::max<uint64_t>(config_.size_max, kBlkRequestHeaderSize)) {
    metrics_.io_errors++;
    metrics_.write_acct.invalid++;
    log_.warn(fmt::format("virtio-blk: bad write of {} bytes at sector {}", length, sector));
    return finish(request, kBlkStatusIoErr, 0);
  }
  metrics_.write_bytes += length;
  start_accounting(*request, metrics_.write_acct, sector * kBlkSectorSize, length);
  if (!aligned(request->iov, disk_->alignment())) {
    request->bounce = std::make_unique<BounceBuffer>(length, disk_->alignment());
    request->in.read(kBlkRequestHeaderSize, {request->bounce->data, size_t(length)});
    request->iov = {iovec{request->bounce->data, length}};
  }
  disk_->write(sector * kBlkSectorSize, request->iov, completion_for(request, 0));
}

void VirtioBlock::submit_range(const std::shared_ptr<Request>& request, uint32_t type) {
  bool discard = type == kBlkTypeDiscard;
  (discard ? metrics_.discards : metrics_.write_zeroes)++;
  BlockOpStats& kind = discard ? metrics_.unmap_acct : metrics_.write_acct;
  uint64_t acked = activation_.acked_features;
  if (!(acked & (discard ? kBlkFeatureDiscard : kBlkFeatureWriteZeroes))) {
    metrics_.unsupported++;
    return finish(request, kBlkStatusUnsupported, 0);
  }
  if (read_only_) {
    metrics_.io_errors++;
    kind.failed++;
    return finish(request, kBlkStatusIoErr, 0);
  }
  uint64_t payload = request->in.size() - kBlkRequestHeaderSize;
  uint8_t segment[kBlkDiscardSegmentSize];
  // We advertise max_discard_seg = max_write_zeroes_seg = 1.
  if (payload != kBlkDiscardSegmentSize || !request->in.read(kBlkRequestHeaderSize, segment)) {
    metrics_.io_errors++;
    kind.invalid++;
    log_.warn("virtio-blk: discard/write-zeroes payload is not exactly one segment");
    return finish(request, kBlkStatusIoErr, 0);
  }
  uint64_t sector = get_le(segment, 0, 8);
  uint32_t sectors = uint32_t(get_le(segment, 8, 4));
  uint32_t flags = uint32_t(get_le(segment, 12, 4));
  // Spec 5.2.6.2: unmap is meaningless for discard, and unknown flags are unsupported.
  if ((flags & ~kBlkWriteZeroesUnmap) || (discard && flags)) {
    metrics_.unsupported++;
    return finish(request, kBlkStatusUnsupported, 0);
  }
  uint64_t bytes = uint64_t(sectors) * kBlkSectorSize;
  if (sectors > config_.max_discard_sectors || !in_capacity(sector, bytes)) {
    metrics_.io_errors++;
    kind.invalid++;
    return finish(request, kBlkStatusIoErr, 0);
  }
  start_accounting(*request, kind, sector * kBlkSectorSize, bytes);
  if (discard) {
    disk_->discard(sector * kBlkSectorSize, bytes, completion_for(request, 0));
  } else {
    disk_->write_zeroes(sector * kBlkSectorSize, bytes, flags & kBlkWriteZeroesUnmap,
                        completion_for(request, 0));
  }
}

block::Completion VirtioBlock::completion_for(const std::shared_ptr<Request>& request,
                                              uint32_t written) {
  return [this, request, written](int result) {
    account_completion(*request, result >= 0);
    if (result < 0) {
      metrics_.io_errors++;
      log_.warn(fmt::format("virtio-blk: back-end error {}", result));
      finish(request, kBlkStatusIoErr, 0);
      return;
    }
    if (written) request->out.mark_dirty(request->memory, 0, written);
    finish(request, kBlkStatusOk, written);
  };
}

void VirtioBlock::start_accounting(Request& request, BlockOpStats& kind, uint64_t offset,
                                   uint64_t bytes) {
  request.acct = &kind;
  request.acct_offset = offset;
  request.acct_bytes = bytes;
  request.started = std::chrono::steady_clock::now();
}

void VirtioBlock::account_completion(const Request& request, bool ok) {
  if (!request.acct) return;
  BlockOpStats& kind = *request.acct;
  if (!ok) {
    kind.failed++;
    return;
  }
  auto elapsed = std::chrono::steady_clock::now() - request.started;
  kind.operations++;
  kind.bytes += request.acct_bytes;
  kind.total_time_ns +=
      uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(elapsed).count());
  if (&kind == &metrics_.write_acct) {
    uint64_t end = request.acct_offset + request.acct_bytes;
    uint64_t highest = metrics_.wr_highest_offset.load();
    while (end > highest && !metrics_.wr_highest_offset.compare_exchange_weak(highest, end)) {
    }
  }
}

void VirtioBlock::finish(const std::shared_ptr<Request>& request, uint8_t status,
                         uint32_t data_written) {
  std::lock_guard lock(mutex_);
  if (!active_ || request->generation != generation_) return;
  uint32_t used_length = 0;
  if (request->out.size() > 0) {
    uint8_t byte[1] = {status};
    request->out.write(request->memory, request->out.size() - 1, byte);
    used_length = data_written + 1;
  }
  Queue& queue = activation_.queues[request->queue];
  if (!queue.add_used(*activation_.memory, request->head, used_length)) {
    activation_.interrupt->needs_reset("virtio-blk: used ring unwritable");
    return;
  }
  if (queue.needs_notification()) activation_.interrupt->signal_queue(request->queue);
}

}  // namespace kiln::devices::virtio
