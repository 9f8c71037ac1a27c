#include "block/qcow2/file_io.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <system_error>

#include "base/errors.h"
#include "block/qcow2/qcow2_format.h"

namespace kiln::block::qcow2 {

void pread_zero_fill(int fd, std::span<uint8_t> buf, uint64_t offset) {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n = ::pread(fd, buf.data() + done, buf.size() - done, off_t(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("pread");
    }
    if (n == 0) {
      std::memset(buf.data() + done, 0, buf.size() - done);
      return;
    }
    done += size_t(n);
  }
}

void pread_exact(int fd, std::span<uint8_t> buf, uint64_t offset, const char* what) {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n = ::pread(fd, buf.data() + done, buf.size() - done, off_t(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("pread");
    }
    if (n == 0) {
      throw Qcow2Error(
          fmt::format("{} at offset 0x{:x} lies past the end of the file", what, offset));
    }
    done += size_t(n);
  }
}

void pwrite_all(int fd, std::span<const uint8_t> buf, uint64_t offset) {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n = ::pwrite(fd, buf.data() + done, buf.size() - done, off_t(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("pwrite");
    }
    done += size_t(n);
  }
}

uint64_t fd_size(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw_errno("fstat");
  return uint64_t(st.st_size);
}

namespace {

// QEMU's permission bits and the byte ranges file-posix locks for them.
constexpr int kPermConsistentRead = 0;
constexpr int kPermWrite = 1;
constexpr int kPermResize = 3;
constexpr off_t kPermLockBase = 100;
constexpr off_t kSharedLockBase = 200;
const char* perm_name(int bit) {
  switch (bit) {
    case kPermConsistentRead:
      return "consistent read";
    case kPermWrite:
      return "write";
    case kPermResize:
      return "resize";
  }
  return "?";
}

bool locked_by_other(int fd, off_t byte) {
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  if (::fcntl(fd, F_OFD_GETLK, &fl) != 0) throw_errno("fcntl(F_OFD_GETLK)");
  return fl.l_type != F_UNLCK;
}

void take_shared(int fd, off_t byte) {
  struct flock fl {};
  fl.l_type = F_RDLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  if (::fcntl(fd, F_OFD_SETLK, &fl) != 0) throw_errno("fcntl(F_OFD_SETLK)");
}

}  // namespace

void lock_image(int fd, const std::string& path, bool read_only, bool force_share) {
  if (force_share) return;
  std::vector<int> perms = {kPermConsistentRead};
  std::vector<int> unshared = {kPermWrite};
  if (!read_only) {
    perms = {kPermConsistentRead, kPermWrite, kPermResize};
    unshared = {kPermWrite, kPermResize};
  }
  for (int p : perms) {
    if (locked_by_other(fd, kSharedLockBase + p)) {
      throw std::system_error(EAGAIN, std::generic_category(),
                              fmt::format("Failed to get \"{}\" lock\nIs another process using the "
                                          "image [{}]?",
                                          perm_name(p), path));
    }
  }
  for (int p : unshared) {
    if (locked_by_other(fd, kPermLockBase + p)) {
      throw std::system_error(EAGAIN, std::generic_category(),
                              fmt::format("Failed to get shared \"{}\" lock\nIs another process "
                                          "using the image [{}]?",
                                          perm_name(p), path));
    }
  }
  for (int p : perms) take_shared(fd, kPermLockBase + p);
  for (int p : unshared) take_shared(fd, kSharedLockBase + p);
}

}  // namespace kiln::block::qcow2
