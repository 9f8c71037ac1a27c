// kiln-img compare: are two images' guest-visible contents the same? qemu-img's algorithm: walk
// both images' block status (whole chain), compare allocated data, require the side allocated on
// only one image to read as zeros, and past the shorter image's end require zeros (unless -s).
// Exit codes as qemu-img: 0 identical, 1 different, 2 open error, 3 status error, 4 read error.
#include <fmt/format.h>
#include <getopt.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "img/common.h"

namespace kiln::img {

using block::qcow2::ExtentKind;
using block::qcow2::Image;
using block::qcow2::SyncImage;

namespace {

constexpr uint64_t kIoBufSize = 2ull << 20;  // qemu-img's IO_BUF_SIZE
constexpr uint64_t kSector = 512;

// qemu's progress meter (util/qemu-progress.c, "simple" flavour).
struct Progress {
  bool enabled = false;
  float current = 0, last_print = 0, min_skip = 0;
  void print(float delta, int max) {
    float cur = max == 0 ? delta : current + delta / 100 * float(max);
    if (cur > 100) cur = 100;
    current = cur;
    if (cur > last_print + min_skip || cur < last_print - min_skip || cur == 0 || cur == 100) {
      last_print = current;
      if (enabled) {
        std::printf("    (%3.2f/100%%)\r", double(current));
        std::fflush(stdout);
      }
    }
  }
  void end() {
    if (enabled) std::printf("\n");
  }
};

// First differing 512-byte sector of two buffers, relative to their start, or -1.
int64_t first_diff_sector(const uint8_t* a, const uint8_t* b, uint64_t n) {
  for (uint64_t i = 0; i < n; i += kSector) {
    const uint64_t len = std::min(kSector, n - i);
    if (std::memcmp(a + i, b + i, len) != 0) return int64_t(i);
  }
  return -1;
}

int64_t first_nonzero_sector(const uint8_t* a, uint64_t n) {
  for (uint64_t i = 0; i < n; i += kSector) {
    const uint64_t len = std::min(kSector, n - i);
    for (uint64_t j = 0; j < len; ++j) {
      if (a[i + j]) return int64_t(i);
    }
  }
  return -1;
}

}  // namespace

// Block status flags as QEMU's bdrv_block_status_above() reports them for the whole chain; the
// strict mode compares them as words, so they follow QEMU's rules for raw and qcow2 layers.
uint64_t image_length(SyncImage& img) {
  // QEMU measures every image in whole sectors.
  return (img.size() + kSector - 1) / kSector * kSector;
}

QemuStatus qemu_block_status(SyncImage& top, uint64_t offset, uint64_t bytes) {
  QemuStatus st;
  const uint64_t top_size = image_length(top);
  auto layer_status = [](SyncImage& layer, uint64_t off, uint64_t len, QemuStatus& s) {
    const uint64_t size = image_length(layer);
    if (off >= size) {
      s.length = 0;
      s.flags = QemuStatus::kEof;
      return;
    }
    len = std::min(len, size - off);
    if (auto* q = dynamic_cast<Image*>(&layer)) {
      // qcow2 reports at most up to the end of the current L2 table.
      len = std::min(len, q->l2_span() - off % q->l2_span());
    }
    const auto e = layer.block_status(off, len);
    s.length = std::min(len, e.length);
    const bool raw = layer.format() == "raw";
    switch (e.kind) {
      case ExtentKind::kData:
        s.flags = QemuStatus::kData | QemuStatus::kOffsetValid | QemuStatus::kAllocated;
        if (!raw && host_file_hole(layer.path(), e.host_offset, s.length))
          s.flags |= QemuStatus::kZero;
        break;
      case ExtentKind::kCompressed:
        s.flags = QemuStatus::kData | QemuStatus::kAllocated;
        break;
      case ExtentKind::kZero:
        s.flags = QemuStatus::kZero | QemuStatus::kAllocated;
        if (raw || e.host_offset) s.flags |= QemuStatus::kOffsetValid;
        break;
      case ExtentKind::kUnallocated:
        s.flags = 0;
        if (!layer.backing()) {
          s.flags = QemuStatus::kZero;
        } else if (off >= image_length(*layer.backing())) {
          s.flags = QemuStatus::kZero;
        }
        // qcow2 names the host cluster of unallocated subclusters and preallocated metadata.
        if (e.host_offset) s.flags |= QemuStatus::kOffsetValid;
        break;
    }
    if (off + s.length == size) s.flags |= QemuStatus::kEof;
  };
  layer_status(top, offset, std::min(bytes, top_size - std::min(offset, top_size)), st);
  if (st.length == 0 || (st.flags & QemuStatus::kAllocated) || !top.backing()) return st;
  uint64_t eof = UINT64_MAX;
  if (st.flags & QemuStatus::kEof) eof = offset + st.length;
  bytes = st.length;
  for (SyncImage* p = top.backing(); p; p = p->backing()) {
    QemuStatus s;
    layer_status(*p, offset, bytes, s);
    if (s.length == 0) {
      st.length = bytes;
      st.flags = QemuStatus::kZero | QemuStatus::kAllocated;
      break;
    }
    st = s;
    if (s.flags & QemuStatus::kAllocated) {
      st.flags &= ~QemuStatus::kEof;
      break;
    }
    bytes = s.length;
  }
  if (offset + st.length == eof) st.flags |= QemuStatus::kEof;
  return st;
}

int cmd_compare(int argc, char** argv) {
  std::string fmt1, fmt2, cache = "writeback";
  bool strict = false, quiet = false, progress_on = false, force_share = false;
  optind = 1;
  static const option kLong[] = {{"force-share", no_argument, nullptr, 'U'},
                                 {"help", no_argument, nullptr, 'h'},
                                 {nullptr, 0, nullptr, 0}};
  for (int c; (c = getopt_long(argc, argv, ":hf:F:T:pqsU", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'f':
        fmt1 = optarg;
        break;
      case 'F':
        fmt2 = optarg;
        break;
      case 'T':
        cache = optarg;
        break;
      case 'p':
        progress_on = true;
        break;
      case 'q':
        quiet = true;
        break;
      case 's':
        strict = true;
        break;
      case 'U':
        force_share = true;
        break;
      case ':':
        throw UsageError(fmt::format("option '{}' requires an argument", argv[optind - 1]));
      default:
        throw UsageError(fmt::format("unrecognized option '{}'", argv[optind - 1]));
    }
  }
  if (quiet) progress_on = false;
  if (optind != argc - 2) throw UsageError("Expecting two image file names");
  const std::string file1 = argv[optind], file2 = argv[optind + 1];

  Progress progress{progress_on, 0, 0, 2.0f};
  auto say = [&](const std::string& text) {
    if (!quiet) std::fputs(text.c_str(), stdout);
  };
  auto fail = [&](int code, const std::string& msg) {
    std::fflush(stdout);
    fmt::print(stderr, "kiln-img: {}\n", msg);
    progress.end();
    return code;
  };
  if (!valid_cache_mode(cache)) {
    return fail(2, fmt::format("Invalid source cache option: {}", cache));
  }
  std::unique_ptr<SyncImage> img1, img2;
  try {
    auto opts1 = read_options(fmt1, force_share);
    opts1.cache = page_cache_mode(cache);
    img1 = block::qcow2::open_image(file1, opts1);
  } catch (const std::exception& e) {
    return fail(2, fmt::format("Could not open '{}': {}", file1, e.what()));
  }
  try {
    auto opts2 = read_options(fmt2, force_share);
    opts2.cache = page_cache_mode(cache);
    img2 = block::qcow2::open_image(file2, opts2);
  } catch (const std::exception& e) {
    return fail(2, fmt::format("Could not open '{}': {}", file2, e.what()));
  }

  const uint64_t size1 = image_length(*img1), size2 = image_length(*img2);
  const uint64_t total = std::min(size1, size2), base = std::max(size1, size2);
  std::vector<uint8_t> buf1(kIoBufSize), buf2(kIoBufSize);
  progress.print(0, 100);
  int ret = 0;
  auto finish = [&](int code) {
    progress.end();
    return code;
  };
  if (strict && size1 != size2) {
    say("Strict mode: Image size mismatch!\n");
    return finish(1);
  }
  // Reads [offset, offset+n) of `img` into buf and reports its first non-zero sector.
  auto check_empty = [&](SyncImage& img, uint64_t offset, uint64_t n) -> int {
    img.read(offset, std::span(buf1).first(n));
    const int64_t idx = first_nonzero_sector(buf1.data(), n);
    if (idx >= 0) {
      say(fmt::format("Content mismatch at offset {}!\n", offset + uint64_t(idx)));
      return 1;
    }
    return 0;
  };
  try {
    uint64_t offset = 0;
    while (offset < total) {
      const QemuStatus s1 = qemu_block_status(*img1, offset, size1 - offset);
      const QemuStatus s2 = qemu_block_status(*img2, offset, size2 - offset);
      const bool alloc1 = s1.flags & QemuStatus::kAllocated;
      const bool alloc2 = s2.flags & QemuStatus::kAllocated;
      uint64_t chunk = std::min(s1.length, s2.length);
      if (chunk == 0) throw std::runtime_error("block status made no progress");
      if (strict && s1.flags != s2.flags) {
        say(fmt::format("Strict mode: Offset {} block status mismatch!\n", offset));
        return finish(1);
      }
      if ((s1.flags & QemuStatus::kZero) && (s2.flags & QemuStatus::kZero)) {
        // both read as zeros
      } else if (alloc1 == alloc2) {
        if (alloc1) {
          chunk = std::min(chunk, kIoBufSize);
          img1->read(offset, std::span(buf1).first(chunk));
          img2->read(offset, std::span(buf2).first(chunk));
          const int64_t idx = first_diff_sector(buf1.data(), buf2.data(), chunk);
          if (idx >= 0) {
            say(fmt::format("Content mismatch at offset {}!\n", offset + uint64_t(idx)));
            return finish(1);
          }
        }
      } else {
        chunk = std::min(chunk, kIoBufSize);
        ret = check_empty(alloc1 ? *img1 : *img2, offset, chunk);
        if (ret) return finish(ret);
      }
      offset += chunk;
      progress.print(float(chunk) / float(base) * 100, 100);
    }
    if (size1 != size2) {
      say("Warning: Image size mismatch!\n");
      SyncImage& over = size1 > size2 ? *img1 : *img2;
      while (offset < base) {
        const QemuStatus s = qemu_block_status(over, offset, base - offset);
        uint64_t chunk = s.length;
        if (chunk == 0) throw std::runtime_error("block status made no progress");
        if ((s.flags & QemuStatus::kAllocated) && !(s.flags & QemuStatus::kZero)) {
          chunk = std::min(chunk, kIoBufSize);
          ret = check_empty(over, offset, chunk);
          if (ret) return finish(ret);
        }
        offset += chunk;
        progress.print(float(chunk) / float(base) * 100, 100);
      }
    }
  } catch (const std::exception& e) {
    return fail(4, fmt::format("Error while reading: {}", e.what()));
  }
  say("Images are identical.\n");
  return finish(0);
}

}  // namespace kiln::img
