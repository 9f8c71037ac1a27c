// The block layer's one interface: what virtio-blk and kiln-img see of a disk, whatever its
// format (raw file, block device, qcow2 with a backing chain). Asynchronous so a device can keep
// many requests in flight; completions may run on any thread.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

namespace kiln::block {

// Result of a request: 0 on success, a negative errno value on failure.
using Completion = std::function<void(int result)>;

enum class CacheMode { kWriteback, kNone /* O_DIRECT */ };

class BlockDevice {
 public:
  virtual ~BlockDevice() = default;

  virtual uint64_t size() const = 0;
  virtual bool read_only() const = 0;
  // Alignment (bytes) that buffers, offsets and lengths must respect (512 or 4096 under O_DIRECT).
  virtual uint32_t alignment() const { return 1; }

  virtual void read(uint64_t offset, std::span<const iovec> iov, Completion done) = 0;
  virtual void write(uint64_t offset, std::span<const iovec> iov, Completion done) = 0;
  // Completes once every write completed before the call is on stable storage.
  virtual void flush(Completion done) = 0;
  virtual void discard(uint64_t offset, uint64_t length, Completion done) = 0;
  virtual void write_zeroes(uint64_t offset, uint64_t length, bool may_unmap, Completion done) = 0;
  // Waits until every submitted request has completed.
  virtual void drain() = 0;
};

}  // namespace kiln::block
