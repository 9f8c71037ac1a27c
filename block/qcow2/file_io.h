// Small helpers around pread/pwrite and QEMU-compatible advisory image locks.
#pragma once

#include <cstdint>
#include <span>
#include <string>

namespace kiln::block::qcow2 {

// Reads exactly buf.size() bytes; bytes past end of file read as zeros. Throws on I/O errors.
void pread_zero_fill(int fd, std::span<uint8_t> buf, uint64_t offset);
// Reads exactly buf.size() bytes; throws Qcow2Error if the file ends first (`what` names it).
void pread_exact(int fd, std::span<uint8_t> buf, uint64_t offset, const char* what);
void pwrite_all(int fd, std::span<const uint8_t> buf, uint64_t offset);
uint64_t fd_size(int fd);

// Takes the same OFD byte-range locks QEMU's file-posix driver takes, so kiln and QEMU processes
// see each other: a reader takes "consistent read" and refuses sharing "write"; a writer also
// takes "write" + "resize" and refuses sharing them. Throws std::system_error(EAGAIN) with a
// qemu-like message naming the permission on conflict. force_share (read-only) takes nothing.
void lock_image(int fd, const std::string& path, bool read_only, bool force_share);

}  // namespace kiln::block::qcow2
