// The io_uring engine: one ring, owned by one thread that does every submission and reaps every
// completion. Other threads only queue operations and poke the owner through an eventfd that the
// owner keeps a read armed on inside the ring.
//
// Why not let each caller submit to the ring itself: io_uring ties a request to the task that
// submitted it and cancels it (-ECANCELED) when that thread exits, which a short-lived thread
// or a vCPU thread going away would do to a guest's write. The owner thread lives as long as
// the ring.
//
// Operations beyond the queue depth wait in a FIFO inside the engine and enter the ring as
// earlier ones complete; nobody ever blocks on a full ring.
#include <liburing.h>
#include <limits.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "base/unique_fd.h"
#include "block/raw/io_engine.h"

// An op travels from a submitting thread to the owner through the kernel, a path that
// ThreadSanitizer cannot see; tell it about the hand-over so it checks everything else.
#if defined(__SANITIZE_THREAD__)
extern "C" void __tsan_acquire(void* address);
extern "C" void __tsan_release(void* address);
#define KILN_HAND_OVER(op) __tsan_release(op)
#define KILN_TAKE_OVER(op) __tsan_acquire(op)
#else
#define KILN_HAND_OVER(op) ((void)(op))
#define KILN_TAKE_OVER(op) ((void)(op))
#endif

namespace kiln::block::raw_internal {
namespace {

// user_data of the eventfd read; never a valid IoOp address.
constexpr uint64_t kWakeTag = 1;

class UringEngine final : public IoEngine {
 public:
  UringEngine() = default;

  // Returns 0 or a positive errno; on failure the object must be discarded.
  int init(uint32_t queue_depth) {
    wake_fd_ = UniqueFd(::eventfd(0, EFD_CLOEXEC));
    if (!wake_fd_) return errno;
    // One spare entry for the eventfd read.
    const int ret = io_uring_queue_init(queue_depth + 1, &ring_, 0);
    if (ret < 0) return -ret;
    ring_ready_ = true;
    if (!supports_needed_opcodes()) return EOPNOTSUPP;
    capacity_ = queue_depth;
    owner_ = std::thread([this] { run(); });
    return 0;
  }

  ~UringEngine() override {
    if (owner_.joinable()) {
      {
        std::lock_guard lock(mutex_);
        stopping_ = true;
      }
      wake_owner();
      owner_.join();
    }
    helper_.reset();
    if (ring_ready_) io_uring_queue_exit(&ring_);
  }

  AioEngine kind() const override { return AioEngine::kIoUring; }

  void submit(std::unique_ptr<IoOp> op) override {
    bool poke;
    {
      std::lock_guard lock(mutex_);
      if (op->kind == IoKind::kDiscardIoctl) {
        // io_uring has no ioctl: the rare block-device discard goes to one helper thread.
        if (!helper_) helper_ = make_thread_engine(1);
        helper_->submit(std::move(op));
        return;
      }
      incoming_.push_back(std::move(op));
      // The owner looks at incoming_ before it sleeps again: no need to wake it from itself,
      // nor twice before it has looked.
      poke = !wake_pending_ && std::this_thread::get_id() != owner_id_;
      wake_pending_ = wake_pending_ || poke;
    }
    if (poke) wake_owner();
  }

 private:
  bool supports_needed_opcodes() {
    io_uring_probe* probe = io_uring_get_probe_ring(&ring_);
    if (probe == nullptr) return false;
    bool ok = true;
    for (int opcode : {IORING_OP_NOP, IORING_OP_READV, IORING_OP_WRITEV, IORING_OP_FSYNC,
                       IORING_OP_FALLOCATE, IORING_OP_READ}) {
      ok = ok && io_uring_opcode_supported(probe, opcode);
    }
    io_uring_free_probe(probe);
    return ok;
  }

  void wake_owner() {
    const uint64_t one = 1;
    while (::write(wake_fd_.get(), &one, sizeof one) < 0 && errno == EINTR) {
    }
  }

  // --- Everything below runs on the owner thread only. ---

  void run() {
    {
      std::lock_guard lock(mutex_);
      owner_id_ = std::this_thread::get_id();
    }
    arm_wake();
    for (;;) {
      admit_incoming();
      if (stopping_and_idle()) {
        if (!wake_armed_) return;
        wake_owner();  // completes the armed read, so no read into wake_value_ outlives us
      }
      // One system call submits everything prepared and sleeps until something completes.
      io_uring_submit_and_wait(&ring_, 1);
      reap_available();
    }
  }

  void reap_available() {
    io_uring_cqe* cqe = nullptr;
    while (io_uring_peek_cqe(&ring_, &cqe) == 0) {
      const uint64_t tag = io_uring_cqe_get_data64(cqe);
      const int result = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);
      if (tag == kWakeTag) {
        wake_armed_ = false;
        if (!stopping_and_idle()) arm_wake();
      } else {
        handle(reinterpret_cast<IoOp*>(tag), result);
      }
    }
  }

  io_uring_sqe* next_sqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    while (sqe == nullptr) {
      // Cannot happen while at most capacity_ ops and the wake read are in the ring; but if the
      // kernel ever holds entries back, push them and try again rather than lose an op.
      io_uring_submit(&ring_);
      sched_yield();
      sqe = io_uring_get_sqe(&ring_);
    }
    return sqe;
  }

  void arm_wake() {
    io_uring_sqe* sqe = next_sqe();
    io_uring_prep_read(sqe, wake_fd_.get(), &wake_value_, sizeof wake_value_, 0);
    io_uring_sqe_set_data64(sqe, kWakeTag);
    wake_armed_ = true;
  }

  bool stopping_and_idle() {
    std::lock_guard lock(mutex_);
    return stopping_ && incoming_.empty() && waiting_.empty() && in_ring_ == 0;
  }

  void admit_incoming() {
    {
      std::lock_guard lock(mutex_);
      for (auto& op : incoming_) waiting_.push_back(std::move(op));
      incoming_.clear();
      wake_pending_ = false;
    }
    while (!waiting_.empty() && in_ring_ < capacity_) {
      ++in_ring_;
      push(waiting_.front().release());
      waiting_.pop_front();
    }
  }

  void push(IoOp* op) {
    io_uring_sqe* sqe = next_sqe();
    prepare(sqe, *op);
    io_uring_sqe_set_data(sqe, op);
    KILN_HAND_OVER(op);
  }

  static void prepare(io_uring_sqe* sqe, const IoOp& op) {
    const auto iov_count =
        static_cast<unsigned>(std::min<size_t>(op.remaining_iov_count(), IOV_MAX));
    switch (op.kind) {
      case IoKind::kNop:
      case IoKind::kDiscardIoctl:  // never reaches the ring
        io_uring_prep_nop(sqe);
        break;
      case IoKind::kRead:
        io_uring_prep_readv(sqe, op.fd, op.remaining_iov(), iov_count, op.offset);
        break;
      case IoKind::kWrite:
        io_uring_prep_writev(sqe, op.fd, op.remaining_iov(), iov_count, op.offset);
        break;
      case IoKind::kDataSync:
        io_uring_prep_fsync(sqe, op.fd, IORING_FSYNC_DATASYNC);
        break;
      case IoKind::kFallocate:
        io_uring_prep_fallocate(sqe, op.fd, op.fallocate_mode, static_cast<off_t>(op.offset),
                                static_cast<off_t>(op.length));
        break;
    }
  }

  void handle(IoOp* op, int result) {
    KILN_TAKE_OVER(op);
    const Outcome outcome = account_result(*op, result);
    if (!outcome.finished) {
      push(op);  // keeps its slot
      return;
    }
    std::unique_ptr<IoOp> finished(op);
    --in_ring_;
    // The completion may submit more work: it lands in incoming_, admitted on the next turn.
    finished->done(outcome.result);
  }

  io_uring ring_{};
  bool ring_ready_ = false;
  UniqueFd wake_fd_;
  uint32_t capacity_ = 0;
  std::thread owner_;

  std::mutex mutex_;  // guards the members up to the next blank line
  std::thread::id owner_id_;
  std::vector<std::unique_ptr<IoOp>> incoming_;
  bool wake_pending_ = false;
  bool stopping_ = false;
  std::unique_ptr<IoEngine> helper_;

  // Owner thread only.
  uint64_t wake_value_ = 0;
  bool wake_armed_ = false;
  uint32_t in_ring_ = 0;
  std::deque<std::unique_ptr<IoOp>> waiting_;
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
