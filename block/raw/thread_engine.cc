// The fallback engine: a fixed pool of threads, each running one operation at a time with plain
// system calls. Works wherever preadv works (no io_uring, seccomp filters, old kernels).
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "block/raw/io_engine.h"

namespace kiln::block::raw_internal {
namespace {

class ThreadEngine final : public IoEngine {
 public:
  explicit ThreadEngine(uint32_t threads) {
    for (uint32_t i = 0; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }

  ~ThreadEngine() override {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& worker : workers_) worker.join();
  }

  AioEngine kind() const override { return AioEngine::kThreads; }

  void submit(std::unique_ptr<IoOp> op) override {
    {
      std::lock_guard lock(mutex_);
      queue_.push_back(std::move(op));
    }
    wake_.notify_one();
  }

 private:
  void work() {
    for (;;) {
      std::unique_ptr<IoOp> op;
      {
        std::unique_lock lock(mutex_);
        // Finish what was queued even when stopping: every op must see its completion.
        wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        op = std::move(queue_.front());
        queue_.pop_front();
      }
      const int result = run_sync(*op);
      op->done(result);
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::unique_ptr<IoOp>> queue_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace

std::unique_ptr<IoEngine> make_thread_engine(uint32_t threads) {
  return std::make_unique<ThreadEngine>(threads == 0 ? 1 : threads);
}

}  // namespace kiln::block::raw_internal
