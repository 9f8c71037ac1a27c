#include "block/qcow2/qcow2_device.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "base/spin.h"

namespace kiln::block::qcow2 {
namespace {

// Maps an exception from the synchronous core to the negative errno the interface wants.
int error_code_of(const std::exception_ptr& ep) {
  try {
    std::rethrow_exception(ep);
  } catch (const std::system_error& e) {
    return -e.code().value();
  } catch (const std::bad_alloc&) {
    return -ENOMEM;
  } catch (...) {
    return -EIO;  // malformed metadata met during the request
  }
}

class Qcow2Device final : public BlockDevice {
 public:
  Qcow2Device(std::unique_ptr<Image> image, unsigned workers) : image_(std::move(image)) {
    for (unsigned i = 0; i < std::max(1u, workers); ++i) {
      threads_.emplace_back([this] { worker(); });
    }
  }
  ~Qcow2Device() override {
    drain();
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  uint64_t size() const override { return image_->size(); }
  bool read_only() const override { return image_->read_only(); }

  // A read whose data is in the page cache (and whose L2 table is in ours) completes right
  // here, on the caller's thread, as io_uring completes such a read inside the submitting
  // system call; only reads that would block go to a worker. A 4 KiB read costs about as much
  // as handing it to a worker and being woken by its completion, so workers used to double the
  // work, and many of them on few CPUs contended for the locks. Bounded so that a large read
  // does not hold up the caller (a virtio queue, say) for long. A read that needs the disk pays
  // for the attempt: the image lock and, if its table is cached, one preadv2 that returns EAGAIN.
  void read(uint64_t offset, std::span<const iovec> iov, Completion done) override {
    if (iov.size() == 1 && iov[0].iov_len <= kInlineReadMax &&
        image_->try_read_cached(offset, {static_cast<uint8_t*>(iov[0].iov_base), iov[0].iov_len})) {
      done(0);
      return;
    }
    std::vector<iovec> v(iov.begin(), iov.end());
    submit(std::move(done), [this, offset, v] {
      uint64_t pos = offset;
      for (const auto& e : v) {
        image_->read(pos, {static_cast<uint8_t*>(e.iov_base), e.iov_len});
        pos += e.iov_len;
      }
    });
  }
  void write(uint64_t offset, std::span<const iovec> iov, Completion done) override {
    std::vector<iovec> v(iov.begin(), iov.end());
    submit(std::move(done), [this, offset, v] {
      uint64_t pos = offset;
      for (const auto& e : v) {
        image_->write(pos, {static_cast<const uint8_t*>(e.iov_base), e.iov_len});
        pos += e.iov_len;
      }
    });
  }
  void flush(Completion done) override {
    // "Every write completed before the call": completed writes are already in the image's
    // caches, so flushing them now is enough even if other requests are still running.
    submit(std::move(done), [this] { image_->flush(); });
  }
  void discard(uint64_t offset, uint64_t length, Completion done) override {
    submit(std::move(done), [this, offset, length] { image_->discard(offset, length); });
  }
  void write_zeroes(uint64_t offset, uint64_t length, bool may_unmap, Completion done) override {
    submit(std::move(done),
           [this, offset, length, may_unmap] { image_->write_zeroes(offset, length, may_unmap); });
  }
  void drain() override {
    std::unique_lock lock(mu_);
    idle_cv_.wait(lock, [this] { return queue_.empty() && running_ == 0; });
  }

 private:
  struct Request {
    std::function<void()> work;
    Completion done;
  };

  void submit(Completion done, std::function<void()> work) {
    bool wake;
    {
      std::lock_guard lock(mu_);
      queue_.push_back({std::move(work), std::move(done)});
      queued_.store(queue_.size(), std::memory_order_release);
      // A polling worker takes it without a wake-up. It sets polling_ false before it takes
      // mu_ to check the queue and sleep, so the request cannot be missed.
      wake = sleeping_ > 0 && !polling_.load(std::memory_order_acquire);
    }
    if (wake) cv_.notify_one();
  }

  // A worker whose request ran alone (nothing else queued or running) polls briefly for the
  // next one before it sleeps: at low queue depth the next request follows within microseconds,
  // and a futex sleep and wake per request cost more than the request (an allocating 4 KiB
  // write is ~15 us). One worker polls at a time, and submit() does not wake another while it
  // does, so an idle device costs at most kPollTime of one CPU after its last request.
  void poll_for_work() {
    if (polling_.exchange(true, std::memory_order_acq_rel)) return;
    spin_until([this] { return queued_.load(std::memory_order_acquire) != 0; },
               std::chrono::steady_clock::now() + kPollTime);
    polling_.store(false, std::memory_order_release);
  }

  void worker() {
    for (bool ran_alone = false;;) {
      Request req;
      if (ran_alone) poll_for_work();
      {
        std::unique_lock lock(mu_);
        ++sleeping_;
        cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        --sleeping_;
        if (queue_.empty()) return;
        req = std::move(queue_.front());
        queue_.pop_front();
        queued_.store(queue_.size(), std::memory_order_release);
        ran_alone = running_++ == 0 && queue_.empty();
      }
      int result = 0;
      try {
        req.work();
      } catch (...) {
        result = error_code_of(std::current_exception());
      }
      if (req.done) req.done(result);
      bool idle;
      {
        std::lock_guard lock(mu_);
        idle = --running_ == 0 && queue_.empty();
      }
      if (idle) idle_cv_.notify_all();  // drain() waits for exactly this
    }
  }

  std::unique_ptr<Image> image_;
  std::mutex mu_;
  std::condition_variable cv_, idle_cv_;
  std::deque<Request> queue_;
  unsigned running_ = 0;
  unsigned sleeping_ = 0;             // workers waiting on cv_
  std::atomic<size_t> queued_{0};     // queue_.size(), for polling without the lock
  std::atomic<bool> polling_{false};  // a worker is in poll_for_work()
  bool stopping_ = false;
  static constexpr std::chrono::microseconds kPollTime{50};
  static constexpr size_t kInlineReadMax = 64 << 10;
  std::vector<std::thread> threads_;
};

}  // namespace

std::unique_ptr<BlockDevice> open_qcow2_device(const std::string& path, const OpenOptions& opts) {
  OpenOptions o = opts;
  o.format = "qcow2";
  return std::make_unique<Qcow2Device>(Image::open(path, o), opts.workers);
}

}  // namespace kiln::block::qcow2
