#include "block/qcow2/file_io.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <system_error>

#include "base/aligned_buffer.h"
#include "base/errors.h"
#include "base/math.h"
#include "block/qcow2/qcow2_format.h"

namespace kiln::block::qcow2 {

namespace {

// Under O_DIRECT (cache=none) the kernel refuses, with EINVAL, I/O whose offset, length or memory
// is not aligned to the device's logical block. Metadata here is written in small pieces (an L1
// entry, a header field, a compressed cluster at a byte offset), so such requests go through an
// aligned bounce buffer instead.
constexpr uint64_t kDirectAlignment = kDirectIoAlignment;
constexpr uint64_t kBounceLimit = 1 << 20;  // bytes bounced per step

bool opened_direct(int fd) {
  const int flags = ::fcntl(fd, F_GETFL);
  return flags >= 0 && (flags & O_DIRECT) != 0;
}

// One aligned pread into `buf`, retried on EINTR. Returns the bytes read; short only at EOF.
size_t pread_aligned(int fd, std::span<uint8_t> buf, uint64_t offset) {
  for (;;) {
    const ssize_t n = ::pread(fd, buf.data(), buf.size(), off_t(offset));
    if (n >= 0) return size_t(n);
    if (errno != EINTR) throw_errno("pread");
  }
}

// The aligned span [begin, end) around [offset, offset + length), at most kBounceLimit long.
struct BounceSpan {
  uint64_t begin, end;
  BounceSpan(uint64_t offset, uint64_t length)
      : begin(round_down(offset, kDirectAlignment)),
        end(std::min(round_up(offset + length, kDirectAlignment), begin + kBounceLimit)) {}
  uint64_t size() const { return end - begin; }
};

size_t bounce_read(int fd, std::span<uint8_t> buf, uint64_t offset) {
  const BounceSpan span(offset, buf.size());
  AlignedBuffer bounce(span.size(), kDirectAlignment);
  const size_t got = pread_aligned(fd, bounce.span(), span.begin);
  const uint64_t skip = offset - span.begin;
  if (got <= skip) return 0;
  const size_t n = std::min<uint64_t>({got - skip, buf.size(), span.end - offset});
  std::memcpy(buf.data(), bounce.data() + skip, n);
  return n;
}

// Fills one aligned block of `bounce` from the file; what lies past EOF reads as zeros.
// Returns the bytes the file held.
size_t fill_block(int fd, uint8_t* block, uint64_t file_offset) {
  const size_t got = pread_aligned(fd, {block, kDirectAlignment}, file_offset);
  std::memset(block + got, 0, kDirectAlignment - got);
  return got;
}

// Read-modify-write of the aligned span around the request. Callers serialize writes to one file
// (the Image mutex; convert's writers own disjoint aligned chunks), so no other write can land
// between the read and the write. Padding written past EOF is cut off again, so the file ends
// where a buffered write would have left it.
size_t bounce_write(int fd, std::span<const uint8_t> buf, uint64_t offset) {
  const BounceSpan span(offset, buf.size());
  const size_t n = std::min<uint64_t>(buf.size(), span.end - offset);
  AlignedBuffer bounce(span.size(), kDirectAlignment);
  const uint64_t last_block = span.end - kDirectAlignment;
  bool past_eof = false;
  if (offset != span.begin) {
    past_eof |= fill_block(fd, bounce.data(), span.begin) < kDirectAlignment;
  }
  if (offset + n != span.end && (last_block != span.begin || offset == span.begin)) {
    past_eof |=
        fill_block(fd, bounce.data() + (last_block - span.begin), last_block) < kDirectAlignment;
  }
  const uint64_t keep_size = past_eof ? std::max(fd_size(fd), offset + n) : 0;
  std::memcpy(bounce.data() + (offset - span.begin), buf.data(), n);
  for (size_t done = 0; done < span.size();) {
    const ssize_t w =
        ::pwrite(fd, bounce.data() + done, span.size() - done, off_t(span.begin + done));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) throw_errno("pwrite");
    done += size_t(w);
  }
  if (past_eof && span.end > keep_size && ::ftruncate(fd, off_t(keep_size)) != 0) {
    throw_errno("ftruncate");
  }
  return n;
}

// One pread or pwrite, retried on EINTR; an unaligned request under O_DIRECT is bounced.
size_t read_some(int fd, std::span<uint8_t> buf, uint64_t offset) {
  for (;;) {
    const ssize_t n = ::pread(fd, buf.data(), buf.size(), off_t(offset));
    if (n >= 0) return size_t(n);
    if (errno == EINTR) continue;
    if (errno == EINVAL && opened_direct(fd)) return bounce_read(fd, buf, offset);
    throw_errno("pread");
  }
}

size_t write_some(int fd, std::span<const uint8_t> buf, uint64_t offset) {
  for (;;) {
    const ssize_t n = ::pwrite(fd, buf.data(), buf.size(), off_t(offset));
    if (n >= 0) return size_t(n);
    if (errno == EINTR) continue;
    if (errno == EINVAL && opened_direct(fd)) return bounce_write(fd, buf, offset);
    throw_errno("pwrite");
  }
}

}  // namespace

void pread_zero_fill(int fd, std::span<uint8_t> buf, uint64_t offset) {
  size_t done = 0;
  while (done < buf.size()) {
    const size_t n = read_some(fd, buf.subspan(done), offset + done);
    if (n == 0) {
      std::memset(buf.data() + done, 0, buf.size() - done);
      return;
    }
    done += n;
  }
}

void pread_exact(int fd, std::span<uint8_t> buf, uint64_t offset, const char* what) {
  size_t done = 0;
  while (done < buf.size()) {
    const size_t n = read_some(fd, buf.subspan(done), offset + done);
    if (n == 0) {
      throw Qcow2Error(
          fmt::format("{} at offset 0x{:x} lies past the end of the file", what, offset));
    }
    done += n;
  }
}

void pwrite_all(int fd, std::span<const uint8_t> buf, uint64_t offset) {
  size_t done = 0;
  while (done < buf.size()) done += write_some(fd, buf.subspan(done), offset + done);
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
