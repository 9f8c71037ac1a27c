// libFuzzer target: arbitrary bytes opened as a qcow2 image, then read, mapped, its snapshot
// table listed and checked.
// Any crash, sanitizer report or uncaught exception other than the documented error types is
// a bug: malformed images must only ever produce Qcow2Error / std::system_error.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <string>
#include <system_error>
#include <vector>

#include "block/qcow2/qcow2.h"

using kiln::block::qcow2::Image;
using kiln::block::qcow2::OpenOptions;
using kiln::block::qcow2::Qcow2Error;
using kiln::block::qcow2::RepairMode;

namespace {

void exercise(const std::string& path) {
  OpenOptions opts;
  opts.format = "qcow2";
  opts.force_share = true;
  auto image = Image::open(path, opts);
  const uint64_t size = image->size();
  std::vector<uint8_t> buf(64 << 10);
  // The start, the end and a few spots in between: enough to reach every table type without
  // spending the fuzzer's time on multi-terabyte virtual disks.
  for (uint64_t off :
       {uint64_t{0}, size / 3, size / 2, size > buf.size() ? size - buf.size() : 0}) {
    try {
      image->read(off,
                  std::span(buf).first(std::min<uint64_t>(buf.size(), size - std::min(size, off))));
    } catch (const Qcow2Error&) {
    }
  }
  uint64_t pos = 0;
  for (int i = 0; i < 64 && pos < size; ++i) {
    try {
      auto e = image->block_status(pos, size - pos);
      if (e.length == 0) break;
      pos += e.length;
    } catch (const Qcow2Error&) {
      break;
    }
  }
  try {
    image->snapshots();
  } catch (const Qcow2Error&) {
  }
  image->check(RepairMode::kNone);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const int fd = ::memfd_create("qcow2-fuzz", MFD_CLOEXEC);
  if (fd < 0) return 0;
  if (::write(fd, data, size) != ssize_t(size)) {
    ::close(fd);
    return 0;
  }
  try {
    exercise("/proc/self/fd/" + std::to_string(fd));
  } catch (const Qcow2Error&) {
  } catch (const std::system_error&) {
  }
  ::close(fd);
  return 0;
}
