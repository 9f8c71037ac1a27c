// The raw-format block driver: a disk image that is a plain file or a host block device, byte
// for byte. Requests go to the kernel through io_uring (one ring, one reaper thread) or, where
// io_uring is unavailable or not wanted, through a pool of threads doing preadv/pwritev.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "block/block_device.h"

namespace kiln::block {

enum class AioEngine { kIoUring, kThreads };

struct RawOptions {
  bool read_only = false;
  CacheMode cache = CacheMode::kWriteback;
  AioEngine aio = AioEngine::kIoUring;
  // Requests the kernel sees at once; more are queued inside the engine, never refused.
  uint32_t queue_depth = 128;
  // Test hook: pretend io_uring_queue_init failed with this errno (0: do not inject), to exercise
  // the fallback to the thread engine on kernels or sandboxes without io_uring.
  int inject_uring_init_error = 0;
};

// What a range of the image holds, as SEEK_DATA/SEEK_HOLE see it.
struct BlockStatus {
  // False: the run reads as zeros without occupying space (a hole, or past the end of the file).
  bool data = true;
  // Length of the run starting at the queried offset (> 0, at most the queried length).
  uint64_t length = 0;
};

// Status of the run starting at `offset` in `fd`, at most `length` (> 0) bytes long. File
// systems without SEEK_DATA, and block devices, report everything as data.
BlockStatus block_status(int fd, uint64_t offset, uint64_t length);

// A raw image with the extras that only this driver can offer.
class RawBlockDevice : public BlockDevice {
 public:
  // The engine actually in use: kThreads when io_uring was asked for but could not start.
  virtual AioEngine engine() const = 0;
  virtual bool is_block_device() const = 0;
  // block_status() over the image, with `length` clamped to the end of the disk.
  virtual BlockStatus block_status(uint64_t offset, uint64_t length) const = 0;
};

// Opens `path` (a regular file or a block device). Throws std::system_error with a message naming
// the path and the cause (missing file, permission, directory, O_DIRECT unsupported, ...).
//
// Requests may be submitted from several threads at once. Completions run on the engine's
// threads, never inside the submitting call. Under CacheMode::kNone every request is accepted:
// those not meeting alignment() go through a bounce buffer (read-modify-write for writes, kept
// in order with overlapping writes). Requests beyond size() complete with -EINVAL; writes to a
// read-only device with -EROFS. drain() must not be called from a completion. Under O_DIRECT a
// file whose size is not a multiple of alignment() may grow (with zeros) to the next multiple
// when its last block is written; size() does not change.
std::unique_ptr<BlockDevice> open_raw(const std::string& path, const RawOptions& options = {});
std::unique_ptr<RawBlockDevice> open_raw_device(const std::string& path,
                                                const RawOptions& options = {});

}  // namespace kiln::block
