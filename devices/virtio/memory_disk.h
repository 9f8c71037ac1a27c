// An in-memory block::BlockDevice for tests and the fuzzer. In async mode every request
// completes on a worker thread, as a real back-end's would.
#pragma once

#include <sys/uio.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "block/block_device.h"

namespace kiln::devices::virtio::testing {

class MemoryDisk : public block::BlockDevice {
 public:
  MemoryDisk(uint64_t size, bool read_only = false, bool async = false)
      : data(size, 0), read_only_(read_only), async_(async) {
    if (async_) worker_ = std::thread([this] { work(); });
  }
  ~MemoryDisk() override {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (worker_.joinable()) worker_.join();
  }

  uint64_t size() const override { return data.size(); }
  bool read_only() const override { return read_only_; }

  void read(uint64_t offset, std::span<const iovec> iov, block::Completion done) override {
    std::vector<iovec> copy(iov.begin(), iov.end());
    run([this, offset, copy, done] {
      uint64_t at = offset;
      for (const iovec& v : copy) {
        if (at + v.iov_len > data.size()) return done(-EIO);
        std::memcpy(v.iov_base, data.data() + at, v.iov_len);
        at += v.iov_len;
      }
      done(0);
    });
  }
  void write(uint64_t offset, std::span<const iovec> iov, block::Completion done) override {
    std::vector<iovec> copy(iov.begin(), iov.end());
    run([this, offset, copy, done] {
      if (read_only_) return done(-EROFS);
      uint64_t at = offset;
      for (const iovec& v : copy) {
        if (at + v.iov_len > data.size()) return done(-EIO);
        std::memcpy(data.data() + at, v.iov_base, v.iov_len);
        at += v.iov_len;
      }
      done(0);
    });
  }
  void flush(block::Completion done) override {
    run([this, done] {
      flushes++;
      done(fail_flush ? -EIO : 0);
    });
  }
  void discard(uint64_t offset, uint64_t length, block::Completion done) override {
    run([this, offset, length, done] {
      if (offset + length > data.size()) return done(-EIO);
      std::memset(data.data() + offset, 0, length);
      discards++;
      done(0);
    });
  }
  void write_zeroes(uint64_t offset, uint64_t length, bool, block::Completion done) override {
    run([this, offset, length, done] {
      if (offset + length > data.size()) return done(-EIO);
      std::memset(data.data() + offset, 0, length);
      done(0);
    });
  }
  void drain() override {
    std::unique_lock lock(mutex_);
    idle_cv_.wait(lock, [this] { return pending_.empty() && !busy_; });
  }

  std::vector<uint8_t> data;
  int flushes = 0;
  int discards = 0;
  bool fail_flush = false;

 private:
  void run(std::function<void()> op) {
    if (!async_) return op();
    {
      std::lock_guard lock(mutex_);
      pending_.push_back(std::move(op));
    }
    cv_.notify_all();
  }
  void work() {
    std::unique_lock lock(mutex_);
    for (;;) {
      cv_.wait(lock, [this] { return stopping_ || !pending_.empty(); });
      if (pending_.empty()) return;
      auto op = std::move(pending_.front());
      pending_.pop_front();
      busy_ = true;
      lock.unlock();
      op();
      lock.lock();
      busy_ = false;
      idle_cv_.notify_all();
    }
  }

  bool read_only_;
  bool async_;
  std::mutex mutex_;
  std::condition_variable cv_, idle_cv_;
  std::deque<std::function<void()>> pending_;
  bool busy_ = false;
  bool stopping_ = false;
  std::thread worker_;
};

}  // namespace kiln::devices::virtio::testing
