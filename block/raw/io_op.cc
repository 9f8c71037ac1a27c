// The engine-independent half of an operation: the system call for one attempt and the rules
// for what a result means (continue a short transfer, retry, zero-fill past the end of file).
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "block/raw/io_engine.h"

namespace kiln::block::raw_internal {
namespace {

// Enough for a storm of signals or a congested device; a result that stays -EAGAIN after this
// many immediate retries is reported rather than spun on.
constexpr int kMaxRetries = 10000;

std::unique_ptr<IoOp> make(IoKind kind, int fd, std::function<void(int)> done) {
  auto op = std::make_unique<IoOp>();
  op->kind = kind;
  op->fd = fd;
  op->done = std::move(done);
  return op;
}

void advance(IoOp& op, uint64_t bytes) {
  op.offset += bytes;
  while (bytes > 0 && op.iov_index < op.iov.size()) {
    iovec& current = op.iov[op.iov_index];
    const uint64_t step = std::min<uint64_t>(bytes, current.iov_len);
    current.iov_base = static_cast<char*>(current.iov_base) + step;
    current.iov_len -= step;
    bytes -= step;
    if (current.iov_len == 0) ++op.iov_index;
  }
  // Zero-length entries left at the front would make the next attempt transfer nothing.
  while (op.iov_index < op.iov.size() && op.iov[op.iov_index].iov_len == 0) ++op.iov_index;
}

// A disk has no end of file: what lies beyond the file's end reads as zeros.
void zero_fill_rest(IoOp& op) {
  for (size_t i = op.iov_index; i < op.iov.size(); ++i) {
    if (op.iov[i].iov_len > 0) std::memset(op.iov[i].iov_base, 0, op.iov[i].iov_len);
  }
  op.iov_index = op.iov.size();
}

bool is_transfer(IoKind kind) { return kind == IoKind::kRead || kind == IoKind::kWrite; }

int negative_errno(int64_t syscall_result) {
  return syscall_result < 0 ? -errno : static_cast<int>(syscall_result);
}

}  // namespace

std::unique_ptr<IoOp> IoOp::nop(int result, std::function<void(int)> done) {
  auto op = make(IoKind::kNop, -1, std::move(done));
  op->preset_result = result;
  return op;
}

std::unique_ptr<IoOp> IoOp::read(int fd, uint64_t offset, std::vector<iovec> iov,
                                 uint32_t direct_alignment, std::function<void(int)> done) {
  auto op = make(IoKind::kRead, fd, std::move(done));
  op->offset = offset;
  op->iov = std::move(iov);
  op->direct_alignment = direct_alignment;
  advance(*op, 0);
  return op;
}

std::unique_ptr<IoOp> IoOp::write(int fd, uint64_t offset, std::vector<iovec> iov,
                                  std::function<void(int)> done) {
  auto op = make(IoKind::kWrite, fd, std::move(done));
  op->offset = offset;
  op->iov = std::move(iov);
  advance(*op, 0);
  return op;
}

std::unique_ptr<IoOp> IoOp::data_sync(int fd, std::function<void(int)> done) {
  return make(IoKind::kDataSync, fd, std::move(done));
}

std::unique_ptr<IoOp> IoOp::fallocate(int fd, int mode, uint64_t offset, uint64_t length,
                                      std::function<void(int)> done) {
  auto op = make(IoKind::kFallocate, fd, std::move(done));
  op->fallocate_mode = mode;
  op->offset = offset;
  op->length = length;
  return op;
}

std::unique_ptr<IoOp> IoOp::discard_ioctl(int fd, uint64_t offset, uint64_t length,
                                          std::function<void(int)> done) {
  auto op = make(IoKind::kDiscardIoctl, fd, std::move(done));
  op->offset = offset;
  op->length = length;
  return op;
}

uint64_t IoOp::remaining() const {
  uint64_t total = 0;
  for (size_t i = iov_index; i < iov.size(); ++i) total += iov[i].iov_len;
  return total;
}

Outcome account_result(IoOp& op, int64_t attempt_result) {
  if (op.kind == IoKind::kNop) return {true, op.preset_result};
  if (attempt_result == -EAGAIN || attempt_result == -EINTR) {
    if (++op.retries > kMaxRetries) return {true, static_cast<int>(attempt_result)};
    return {false, 0};
  }
  if (attempt_result < 0) return {true, static_cast<int>(attempt_result)};
  op.retries = 0;
  if (!is_transfer(op.kind)) return {true, 0};

  if (attempt_result == 0) {
    if (op.kind == IoKind::kWrite) return {true, -EIO};  // no progress and no error: give up
    zero_fill_rest(op);
    return {true, 0};
  }
  advance(op, static_cast<uint64_t>(attempt_result));
  if (op.remaining() == 0) return {true, 0};
  if (op.kind == IoKind::kRead && op.direct_alignment > 1 && op.offset % op.direct_alignment) {
    zero_fill_rest(op);
    return {true, 0};
  }
  return {false, 0};
}

int64_t attempt_sync(const IoOp& op) {
  const int iov_count = static_cast<int>(std::min<size_t>(op.remaining_iov_count(), IOV_MAX));
  const auto offset = static_cast<off_t>(op.offset);
  switch (op.kind) {
    case IoKind::kNop:
      return 0;
    case IoKind::kRead:
      return negative_errno(::preadv(op.fd, op.remaining_iov(), iov_count, offset));
    case IoKind::kWrite:
      return negative_errno(::pwritev(op.fd, op.remaining_iov(), iov_count, offset));
    case IoKind::kDataSync:
      return negative_errno(::fdatasync(op.fd));
    case IoKind::kFallocate:
      return negative_errno(
          ::fallocate(op.fd, op.fallocate_mode, offset, static_cast<off_t>(op.length)));
    case IoKind::kDiscardIoctl: {
      uint64_t range[2] = {op.offset, op.length};
      return negative_errno(::ioctl(op.fd, BLKDISCARD, range));
    }
  }
  return -EINVAL;
}

int run_sync(IoOp& op) {
  for (;;) {
    const Outcome outcome = account_result(op, attempt_sync(op));
    if (outcome.finished) return outcome.result;
  }
}

}  // namespace kiln::block::raw_internal
