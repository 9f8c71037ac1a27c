// kiln-img convert: copies the guest-visible contents of any image (whole chain) into a new raw
// or qcow2 image, skipping zero ranges so the target stays sparse.
#include <fmt/format.h>
#include <getopt.h>

#include <algorithm>
#include <cstdio>

#include "img/common.h"

namespace kiln::img {
namespace {

using block::qcow2::Image;
using block::qcow2::RawImage;
using block::qcow2::SyncImage;

bool all_zero(std::span<const uint8_t> b) {
  return std::all_of(b.begin(), b.end(), [](uint8_t v) { return v == 0; });
}

// True when the whole range reads as zeros without reading it.
bool known_zero(SyncImage& src, uint64_t offset, uint64_t length) {
  while (length > 0) {
    const ChainStatus s = chain_status(src, offset, length);
    if (s.data || s.length == 0) return false;
    offset += s.length;
    length -= std::min(length, s.length);
  }
  return true;
}

struct Target {
  std::unique_ptr<Image> qcow2;
  std::unique_ptr<RawImage> raw;
  bool compress = false;
  bool sync = false;

  uint64_t granularity() const { return qcow2 ? qcow2->cluster_size() : 4096; }
  void write(uint64_t offset, std::span<const uint8_t> data) {
    if (!qcow2) {
      raw->write(offset, data);
    } else if (compress && data.size() == qcow2->cluster_size()) {
      qcow2->write_compressed(offset, data);
    } else {
      qcow2->write(offset, data);
    }
  }
  void flush() {
    if (qcow2) {
      qcow2->flush();
    } else if (sync) {
      raw->flush();
    }
  }
};

}  // namespace

int cmd_convert(int argc, char** argv) {
  std::string src_fmt, out_fmt = "raw", options;
  bool compress = false, progress = false, force_share = false;
  std::string cache = "unsafe";  // qemu-img convert's default for the target
  optind = 1;
  static const option kLong[] = {{"force-share", no_argument, nullptr, 'U'},
                                 {"help", no_argument, nullptr, 'h'},
                                 {nullptr, 0, nullptr, 0}};
  for (int c; (c = getopt_long(argc, argv, ":hf:O:o:cpqUWt:T:m:", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'f':
        src_fmt = optarg;
        break;
      case 'O':
        out_fmt = optarg;
        break;
      case 'o':
        options += (options.empty() ? "" : ",") + std::string(optarg);
        break;
      case 'c':
        compress = true;
        break;
      case 'p':
        progress = true;
        break;
      case 'U':
        force_share = true;
        break;
      case 'q':
        progress = false;
        break;
      case 't':
        cache = optarg;
        break;
      case 'W':
      case 'T':
      case 'm':
        break;  // accepted for compatibility: requests are synchronous here
      default:
        throw UsageError("Invalid option or missing argument for convert");
    }
  }
  if (argc - optind != 2) throw UsageError("Expecting a source and a target file name");
  const std::string src_path = argv[optind], dst_path = argv[optind + 1];
  if (compress && out_fmt != "qcow2")
    throw UsageError("Compression not supported for this file format");
  auto src = block::qcow2::open_image(src_path, read_options(src_fmt, force_share));
  const uint64_t size = src->size();

  Target dst;
  dst.compress = compress;
  dst.sync = cache != "unsafe";
  const auto opts = parse_options(options);
  if (out_fmt == "qcow2") {
    block::qcow2::CreateOptions co;
    bool compat_given = false;
    apply_qcow2_options(opts, co, compat_given);
    if (!co.backing_file.empty()) throw UsageError("convert with a backing file is not supported");
    co.size = size;
    Image::create(dst_path, co);
    block::qcow2::OpenOptions oo;
    oo.read_only = false;
    oo.format = "qcow2";
    oo.unsafe = !dst.sync;
    dst.qcow2 = Image::open(dst_path, oo);
  } else if (out_fmt == "raw") {
    if (!opts.empty()) throw UsageError(fmt::format("Invalid parameter '{}'", opts.begin()->first));
    RawImage::create(dst_path, size);
    dst.raw = RawImage::open(dst_path, false, false);
  } else {
    throw UsageError(fmt::format("Unknown file format '{}'", out_fmt));
  }

  const uint64_t gran = dst.granularity();
  const uint64_t chunk = std::max<uint64_t>(gran, 2ull << 20);
  std::vector<uint8_t> buf(chunk);
  int last_percent = -1;
  for (uint64_t pos = 0; pos < size; pos += chunk) {
    const uint64_t n = std::min(chunk, size - pos);
    if (!known_zero(*src, pos, n)) {
      auto data = std::span(buf).first(n);
      src->read(pos, data);
      // Consecutive non-zero pieces go out as one write (compressed ones stay per cluster).
      uint64_t run_start = 0, run_len = 0;
      auto flush_run = [&] {
        if (run_len) dst.write(pos + run_start, data.subspan(run_start, run_len));
        run_len = 0;
      };
      for (uint64_t off = 0; off < n; off += gran) {
        auto piece = data.subspan(off, std::min(gran, n - off));
        if (all_zero(piece)) {
          flush_run();
          continue;
        }
        if (run_len == 0) run_start = off;
        run_len += piece.size();
        if (compress) flush_run();
      }
      flush_run();
    }
    if (progress) {
      const int percent = int((pos + n) * 10000 / size);
      if (percent != last_percent) {
        std::printf("    (%.2f/100%%)\r", percent / 100.0);
        std::fflush(stdout);
        last_percent = percent;
      }
    }
  }
  dst.flush();
  if (progress) std::printf("    (100.00/100%%)\n");
  return 0;
}

}  // namespace kiln::img
