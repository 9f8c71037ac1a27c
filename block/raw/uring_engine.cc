// The io_uring engine: one ring shared by every submitting thread (SQ side under a mutex) and one
// reaper thread that owns the CQ side, finishing or resubmitting each operation. Operations
// beyond the queue depth wait in a FIFO and enter the ring as earlier ones complete, so neither
// a submitter nor the reaper (which submits from completions) ever blocks on a full ring.
#include <liburing.h>
#include <limits.h>
#include <sched.h>

#include <algorithm>
#include <cerrno>
#include <deque>
#include <mutex>
#include <thread>

#include "block/raw/io_engine.h"

namespace kiln::block::raw_internal {
namespace {

class UringEngine final : public IoEngine {
 public:
  UringEngine() = default;

  // Returns 0 or a positive errno; on failure the object must be discarded.
  int init(uint32_t queue_depth) {
    // One spare entry for the stop signal.
    const int ret = io_uring_queue_init(queue_depth + 1, &ring_, 0);
    if (ret < 0) return -ret;
    ring_ready_ = true;
    if (!supports_needed_opcodes()) return EOPNOTSUPP;
    capacity_ = queue_depth;
    reaper_ = std::thread([this] { reap(); });
    return 0;
  }

  ~UringEngine() override {
    if (reaper_.joinable()) {
      {
        std::lock_guard lock(mutex_);
        stopping_ = true;
        push_to_ring(nullptr);  // wakes the reaper
      }
      reaper_.join();
    }
    helper_.reset();
    if (ring_ready_) io_uring_queue_exit(&ring_);
  }

  AioEngine kind() const override { return AioEngine::kIoUring; }

  void submit(std::unique_ptr<IoOp> op) override {
    std::lock_guard lock(mutex_);
    if (op->kind == IoKind::kDiscardIoctl) {
      // io_uring has no ioctl: the rare block-device discard goes to one helper thread.
      if (!helper_) helper_ = make_thread_engine(1);
      helper_->submit(std::move(op));
      return;
    }
    if (in_ring_ < capacity_) {
      ++in_ring_;
      push_to_ring(op.release());
    } else {
      waiting_.push_back(std::move(op));
    }
  }

 private:
  bool supports_needed_opcodes() {
    io_uring_probe* probe = io_uring_get_probe_ring(&ring_);
    if (probe == nullptr) return false;
    bool ok = true;
    for (int opcode :
         {IORING_OP_NOP, IORING_OP_READV, IORING_OP_WRITEV, IORING_OP_FSYNC, IORING_OP_FALLOCATE}) {
      ok = ok && io_uring_opcode_supported(probe, opcode);
    }
    io_uring_free_probe(probe);
    return ok;
  }

  // Called with mutex_ held. A null op is the reaper's stop signal.
  void push_to_ring(IoOp* op) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    while (sqe == nullptr) {
      // Cannot happen while in_ring_ <= capacity_ and every SQE is submitted at once; but if
      // the kernel ever leaves entries behind, push them and try again rather than lose `op`.
      io_uring_submit(&ring_);
      sched_yield();
      sqe = io_uring_get_sqe(&ring_);
    }
    prepare(sqe, op);
    io_uring_sqe_set_data(sqe, op);
    for (int attempt = 0; attempt < 1000; ++attempt) {
      const int ret = io_uring_submit(&ring_);
      if (ret >= 0 || (ret != -EAGAIN && ret != -EBUSY && ret != -EINTR)) break;
      // Transient shortage: the SQE stays in the ring; the next io_uring_submit carries it.
      sched_yield();
    }
  }

  static void prepare(io_uring_sqe* sqe, const IoOp* op) {
    if (op == nullptr) {
      io_uring_prep_nop(sqe);
      return;
    }
    const auto iov_count =
        static_cast<unsigned>(std::min<size_t>(op->remaining_iov_count(), IOV_MAX));
    switch (op->kind) {
      case IoKind::kNop:
      case IoKind::kDiscardIoctl:  // never reaches the ring
        io_uring_prep_nop(sqe);
        break;
      case IoKind::kRead:
        io_uring_prep_readv(sqe, op->fd, op->remaining_iov(), iov_count, op->offset);
        break;
      case IoKind::kWrite:
        io_uring_prep_writev(sqe, op->fd, op->remaining_iov(), iov_count, op->offset);
        break;
      case IoKind::kDataSync:
        io_uring_prep_fsync(sqe, op->fd, IORING_FSYNC_DATASYNC);
        break;
      case IoKind::kFallocate:
        io_uring_prep_fallocate(sqe, op->fd, op->fallocate_mode, static_cast<off_t>(op->offset),
                                static_cast<off_t>(op->length));
        break;
    }
  }

  void reap() {
    for (;;) {
      io_uring_cqe* cqe = nullptr;
      const int ret = io_uring_wait_cqe(&ring_, &cqe);
      if (ret < 0) {
        if (ret != -EINTR && ret != -EAGAIN) sched_yield();
        continue;
      }
      auto* op = static_cast<IoOp*>(io_uring_cqe_get_data(cqe));
      const int result = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);
      if (op == nullptr) {
        std::lock_guard lock(mutex_);
        if (in_ring_ == 0 && waiting_.empty()) return;
        continue;  // stop requested with work left: finish it first
      }
      complete_or_resubmit(op, result);
      std::lock_guard lock(mutex_);
      if (stopping_ && in_ring_ == 0 && waiting_.empty()) return;
    }
  }

  void complete_or_resubmit(IoOp* op, int result) {
    const Outcome outcome = account_result(*op, result);
    std::unique_ptr<IoOp> finished;
    {
      std::lock_guard lock(mutex_);
      if (!outcome.finished) {
        push_to_ring(op);  // keeps its slot
        return;
      }
      finished.reset(op);
      --in_ring_;
      while (!waiting_.empty() && in_ring_ < capacity_) {
        ++in_ring_;
        push_to_ring(waiting_.front().release());
        waiting_.pop_front();
      }
    }
    // Outside the lock: the completion may submit more work.
    finished->done(outcome.result);
  }

  io_uring ring_{};
  bool ring_ready_ = false;
  uint32_t capacity_ = 0;
  std::mutex mutex_;
  uint32_t in_ring_ = 0;
  std::deque<std::unique_ptr<IoOp>> waiting_;
  bool stopping_ = false;
  std::unique_ptr<IoEngine> helper_;
  std::thread reaper_;
};

}  // namespace

std::unique_ptr<IoEngine> make_uring_engine(uint32_t queue_depth, int inject_init_error,
                                            int* error) {
  if (inject_init_error != 0) {
    *error = inject_init_error;
    return nullptr;
  }
  auto engine = std::make_unique<UringEngine>();
  const int ret = engine->init(queue_depth);
  if (ret != 0) {
    *error = ret;
    return nullptr;
  }
  return engine;
}

}  // namespace kiln::block::raw_internal
