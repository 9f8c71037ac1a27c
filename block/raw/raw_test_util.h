// Helpers shared by the raw driver's tests: scratch files on a disk-backed file system and a way
// to wait for an asynchronous completion.
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <future>
#include <string>
#include <vector>

#include "block/block_device.h"

namespace kiln::block::testing {

inline std::string scratch_dir() {
  std::filesystem::create_directories(KILN_RAW_TEST_DIR);
  return KILN_RAW_TEST_DIR;
}

// A file of `size` bytes filled by `pattern(offset)`, removed at the end of the test.
class ScratchFile {
 public:
  explicit ScratchFile(uint64_t size, const std::function<uint8_t(uint64_t)>& pattern = {}) {
    static std::atomic<int> counter{0};
    path_ = scratch_dir() + "/img-" + std::to_string(getpid()) + "-" + std::to_string(counter++);
    const int fd = ::open(path_.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) throw std::runtime_error("cannot create " + path_);
    if (pattern) {
      std::vector<uint8_t> bytes(size);
      for (uint64_t i = 0; i < size; ++i) bytes[i] = pattern(i);
      if (::pwrite(fd, bytes.data(), size, 0) != static_cast<ssize_t>(size)) std::abort();
    } else if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
      std::abort();
    }
    ::close(fd);
  }
  ~ScratchFile() { ::unlink(path_.c_str()); }
  ScratchFile(const ScratchFile&) = delete;
  ScratchFile& operator=(const ScratchFile&) = delete;

  const std::string& path() const { return path_; }

  // The file's bytes as another process would read them (page cache, not the device).
  std::vector<uint8_t> contents(uint64_t offset, uint64_t length) const {
    std::vector<uint8_t> bytes(length);
    const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    const ssize_t got = ::pread(fd, bytes.data(), length, static_cast<off_t>(offset));
    ::close(fd);
    bytes.resize(got < 0 ? 0 : static_cast<size_t>(got));
    return bytes;
  }

  struct stat stat() const {
    struct stat info {};
    ::stat(path_.c_str(), &info);
    return info;
  }

 private:
  std::string path_;
};

// Submits through `submit` and waits (bounded) for the completion's result.
inline int wait_for(const std::function<void(Completion)>& submit) {
  auto promise = std::make_shared<std::promise<int>>();
  auto future = promise->get_future();
  submit([promise](int result) { promise->set_value(result); });
  if (future.wait_for(std::chrono::seconds(30)) != std::future_status::ready) {
    ADD_FAILURE() << "completion never arrived";
    return -ETIMEDOUT;
  }
  return future.get();
}

inline int read_sync(BlockDevice& device, uint64_t offset, std::vector<iovec> iov) {
  return wait_for([&](Completion done) { device.read(offset, iov, std::move(done)); });
}
inline int write_sync(BlockDevice& device, uint64_t offset, std::vector<iovec> iov) {
  return wait_for([&](Completion done) { device.write(offset, iov, std::move(done)); });
}
inline int read_sync(BlockDevice& device, uint64_t offset, void* data, size_t length) {
  return read_sync(device, offset, std::vector<iovec>{{data, length}});
}
inline int write_sync(BlockDevice& device, uint64_t offset, const void* data, size_t length) {
  return write_sync(device, offset, std::vector<iovec>{{const_cast<void*>(data), length}});
}

// Heap bytes aligned for O_DIRECT.
class AlignedBytes {
 public:
  explicit AlignedBytes(size_t size, uint8_t fill = 0) : size_(size) {
    data_ = static_cast<uint8_t*>(std::aligned_alloc(4096, (size + 4095) / 4096 * 4096 + 4096));
    std::fill(data_, data_ + size_ + 4096, fill);
  }
  ~AlignedBytes() { std::free(data_); }
  AlignedBytes(const AlignedBytes&) = delete;
  AlignedBytes& operator=(const AlignedBytes&) = delete;

  uint8_t* data() { return data_; }
  size_t size() const { return size_; }
  std::vector<uint8_t> bytes(size_t from, size_t length) const {
    return {data_ + from, data_ + from + length};
  }

 private:
  uint8_t* data_;
  size_t size_;
};

}  // namespace kiln::block::testing
