// The engines under the raw driver: they run one system-level operation (a vectored read or
// write, fdatasync, fallocate, a discard ioctl) to completion, continuing short transfers and
// retrying -EAGAIN/-EINTR, and report 0 or -errno. Internal to block/raw.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "block/raw/raw.h"

namespace kiln::block::raw_internal {

enum class IoKind {
  kNop,           // completes with `preset_result`: lets errors found at submission arrive async
  kRead,          // preadv of `iov` at `offset`
  kWrite,         // pwritev of `iov` at `offset`
  kDataSync,      // fdatasync
  kFallocate,     // fallocate(`fallocate_mode`, `offset`, `length`)
  kDiscardIoctl,  // BLKDISCARD of [`offset`, `offset` + `length`) on a block device
};

struct IoOp {
  IoKind kind = IoKind::kNop;
  int fd = -1;
  uint64_t offset = 0;
  uint64_t length = 0;
  int fallocate_mode = 0;
  int preset_result = 0;
  // Under O_DIRECT: a read that comes up short at an offset that is not a multiple of this
  // stopped at the end of the file (the kernel would refuse to continue from there).
  uint32_t direct_alignment = 1;
  // The part of the transfer still to do: entries before `iov_index` are finished, the entry at
  // `iov_index` may be partly done (its base and length already advanced).
  std::vector<iovec> iov;
  size_t iov_index = 0;
  // Consecutive -EAGAIN/-EINTR results; bounded so a broken device cannot spin forever.
  int retries = 0;
  std::function<void(int result)> done;

  static std::unique_ptr<IoOp> nop(int result, std::function<void(int)> done);
  static std::unique_ptr<IoOp> read(int fd, uint64_t offset, std::vector<iovec> iov,
                                    uint32_t direct_alignment, std::function<void(int)> done);
  static std::unique_ptr<IoOp> write(int fd, uint64_t offset, std::vector<iovec> iov,
                                     std::function<void(int)> done);
  static std::unique_ptr<IoOp> data_sync(int fd, std::function<void(int)> done);
  static std::unique_ptr<IoOp> fallocate(int fd, int mode, uint64_t offset, uint64_t length,
                                         std::function<void(int)> done);
  static std::unique_ptr<IoOp> discard_ioctl(int fd, uint64_t offset, uint64_t length,
                                             std::function<void(int)> done);

  uint64_t remaining() const;
  const iovec* remaining_iov() const { return iov.data() + iov_index; }
  size_t remaining_iov_count() const { return iov.size() - iov_index; }
};

// What to do with the result of one attempt (bytes transferred or -errno).
struct Outcome {
  bool finished;
  int result;  // valid when finished: 0 or -errno
};
Outcome account_result(IoOp& op, int64_t attempt_result);

// One synchronous attempt (the system call itself); returns bytes or 0 on success, -errno.
int64_t attempt_sync(const IoOp& op);

// Runs `op` to its end on the calling thread and returns 0 or -errno.
int run_sync(IoOp& op);

class IoEngine {
 public:
  virtual ~IoEngine() = default;
  virtual AioEngine kind() const = 0;
  // Takes `op` and calls op->done exactly once, on an engine thread, never within this call.
  // Never blocks: beyond the queue depth, operations wait inside the engine.
  virtual void submit(std::unique_ptr<IoOp> op) = 0;
};

std::unique_ptr<IoEngine> make_thread_engine(uint32_t threads);

// Returns nullptr and sets *error (a positive errno) when io_uring cannot be used here.
std::unique_ptr<IoEngine> make_uring_engine(uint32_t queue_depth, int inject_init_error,
                                            int* error);

}  // namespace kiln::block::raw_internal
