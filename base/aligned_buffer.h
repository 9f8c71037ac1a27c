// A heap buffer whose start is aligned, as O_DIRECT I/O needs. The one such buffer of the project.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <span>
#include <utility>

namespace kiln {

// Offset, length and memory alignment that O_DIRECT accepts on every logical block size up to
// a page. Used where the device's exact figure is not worth a probe.
constexpr size_t kDirectIoAlignment = 4096;

class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  // Throws std::bad_alloc when the memory cannot be had. Contents are uninitialized.
  AlignedBuffer(size_t size, size_t alignment) : AlignedBuffer(size, alignment, std::nothrow) {
    if (data_ == nullptr) throw std::bad_alloc();
  }
  // For I/O paths that report -ENOMEM instead: data() is null when the memory cannot be had.
  AlignedBuffer(size_t size, size_t alignment, const std::nothrow_t&) {
    void* memory = nullptr;
    const size_t align = std::max(alignment, alignof(std::max_align_t));
    if (posix_memalign(&memory, align, std::max<size_t>(size, 1)) != 0) return;
    data_ = static_cast<uint8_t*>(memory);
    size_ = size;
  }
  AlignedBuffer(AlignedBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    return *this;
  }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { std::free(data_); }

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  std::span<uint8_t> span() const { return {data_, size_}; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace kiln
