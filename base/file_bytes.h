// A file's bytes, read-only: mapped from the page cache (no copy) or, when built in memory, owned.
// Kernel and initramfs images are read this way: mapping a 35 MB vmlinux costs a few hundred
// page-cache faults, where read() into a buffer first zero-fills and faults in the whole buffer
// and then copies into it — a visible part of startup on slow (nested, emulated) hosts.
// A mapped file must not shrink while mapped (touching a page past its new end is SIGBUS): the
// VMM maps only files it reads once while starting, as QEMU and Firecracker read them.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstdint>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "base/unique_fd.h"

namespace kiln {

class FileBytes {
 public:
  FileBytes() = default;
  explicit FileBytes(std::vector<uint8_t> owned) : owned_(std::move(owned)) {}
  FileBytes(FileBytes&& other) noexcept { *this = std::move(other); }
  FileBytes& operator=(FileBytes&& other) noexcept {
    if (this != &other) {
      unmap();
      owned_ = std::move(other.owned_);
      map_ = std::exchange(other.map_, nullptr);
      map_size_ = std::exchange(other.map_size_, 0);
    }
    return *this;
  }
  FileBytes(const FileBytes&) = delete;
  FileBytes& operator=(const FileBytes&) = delete;
  ~FileBytes() { unmap(); }

  // Maps the regular file at `path` privately and read-only. Throws std::system_error (with the
  // errno of the failing call) when it cannot be opened, is not a regular file, or cannot be
  // mapped.
  static FileBytes map(const std::string& path) {
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) throw std::system_error(errno, std::generic_category(), "cannot open " + path);
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0)
      throw std::system_error(errno, std::generic_category(), "cannot stat " + path);
    if (!S_ISREG(st.st_mode))
      throw std::system_error(EINVAL, std::generic_category(), path + " is not a regular file");
    FileBytes out;
    if (st.st_size == 0) return out;  // mmap refuses empty lengths
    void* p = ::mmap(nullptr, size_t(st.st_size), PROT_READ, MAP_PRIVATE, fd.get(), 0);
    if (p == MAP_FAILED)
      throw std::system_error(errno, std::generic_category(), "cannot map " + path);
    out.map_ = p;
    out.map_size_ = size_t(st.st_size);
    return out;
  }

  std::span<const uint8_t> bytes() const {
    if (map_) return {static_cast<const uint8_t*>(map_), map_size_};
    return owned_;
  }
  size_t size() const { return bytes().size(); }

 private:
  void unmap() {
    if (map_) ::munmap(map_, map_size_);
    map_ = nullptr;
    map_size_ = 0;
  }

  std::vector<uint8_t> owned_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
};

}  // namespace kiln
