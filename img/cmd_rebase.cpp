// kiln-img rebase: point an image at another backing file. Safe mode (the default) first copies
// into the image every sector where the old and new backing files differ and the image itself
// has nothing, so what the guest sees does not change; -u only rewrites the header.
#include <fmt/format.h>
#include <getopt.h>

#include <cstdio>
#include <cstring>
#include <filesystem>

#include "img/common.h"

namespace kiln::img {

using block::qcow2::ExtentKind;
using block::qcow2::Image;
using block::qcow2::SyncImage;

int cmd_rebase(int argc, char** argv) {
  std::string fmt, backing_fmt, backing, cache = "writeback", src_cache = "writeback";
  bool unsafe = false, progress = false, quiet = false, force_share = false, have_b = false;
  optind = 1;
  static const option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                 {"force-share", no_argument, nullptr, 'U'},
                                 {nullptr, 0, nullptr, 0}};
  for (int c; (c = getopt_long(argc, argv, ":hf:F:b:upt:T:qU", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'f':
        fmt = optarg;
        break;
      case 'F':
        backing_fmt = optarg;
        break;
      case 'b':
        backing = optarg;
        have_b = true;
        break;
      case 'u':
        unsafe = true;
        break;
      case 'p':
        progress = true;
        break;
      case 't':
        cache = optarg;
        break;
      case 'T':
        src_cache = optarg;
        break;
      case 'q':
        quiet = true;
        break;
      case 'U':
        force_share = true;
        break;
      case 'h':
        print_usage();
        return 0;
      case ':':
        throw UsageError(
            fmt::format("option '{}' requires an argument\n"
                        "Try 'kiln-img --help' for more information",
                        argv[optind - 1]));
      default:
        throw UsageError(
            fmt::format("unrecognized option '{}'\n"
                        "Try 'kiln-img --help' for more information",
                        argv[optind - 1]));
    }
  }
  if (quiet) progress = false;
  if (optind != argc - 1) {
    throw UsageError("Expecting one image file name\nTry 'kiln-img --help' for more information");
  }
  if (!unsafe && !have_b) {
    throw UsageError(
        "Must specify backing file (-b) or use unsafe mode (-u)\n"
        "Try 'kiln-img --help' for more information");
  }
  const std::string file = argv[optind];
  if (!valid_cache_mode(cache)) throw UsageError(fmt::format("Invalid cache option: {}", cache));
  if (!valid_cache_mode(src_cache)) {
    throw UsageError(fmt::format("Invalid source cache option: {}", src_cache));
  }

  auto opts = read_options(fmt, false);
  opts.read_only = false;
  opts.no_backing = unsafe;
  opts.cache = page_cache_mode(cache);  // the old backing chain opens with the image's mode
  std::unique_ptr<SyncImage> img;
  try {
    img = block::qcow2::open_image(file, opts);
  } catch (const std::exception& e) {
    throw UsageError(fmt::format("Could not open '{}': {}", file, e.what()));
  }
  auto* top = dynamic_cast<Image*>(img.get());
  if (!top) {
    throw UsageError(
        fmt::format("Could not change the backing file to '{}': Operation not supported", backing));
  }
  if (progress) {
    std::printf("    (0.00/100%%)\r");
    std::fflush(stdout);
  }

  if (!unsafe) {
    // Without an old backing file the image's unallocated parts read as zeros.
    SyncImage* old_backing = top->backing();
    std::unique_ptr<SyncImage> new_backing;
    if (!backing.empty()) {
      // A relative name is relative to the image's directory, as in the header.
      std::string bpath = backing;
      const auto dir = std::filesystem::path(file).parent_path();
      if (bpath[0] != '/' && !dir.empty()) bpath = (dir / bpath).string();
      try {
        auto backing_opts = read_options(backing_fmt, force_share);
        backing_opts.cache = page_cache_mode(src_cache);
        new_backing = block::qcow2::open_image(bpath, backing_opts);
      } catch (const std::exception& e) {
        throw UsageError(
            fmt::format("Could not open new backing file '{}': {}", backing, e.what()));
      }
    }
    const uint64_t size = image_length(*top);
    const uint64_t old_size = old_backing ? image_length(*old_backing) : 0;
    const uint64_t new_size = new_backing ? image_length(*new_backing) : 0;
    constexpr uint64_t kChunk = 2ull << 20, kSector = 512;
    std::vector<uint8_t> buf_old(kChunk), buf_new(kChunk);
    for (uint64_t offset = 0, n = 0; offset < size; offset += n) {
      n = std::min(kChunk, size - offset);
      // What the image holds itself is unaffected by its backing file.
      const auto e = top->block_status(offset, n);
      n = std::min(n, e.length);
      if (n == 0) throw std::runtime_error("block status made no progress");
      if (e.kind != ExtentKind::kUnallocated) continue;
      bool old_is_zero = false;
      if (offset >= old_size) {
        std::memset(buf_old.data(), 0, n);
        old_is_zero = true;
      } else {
        n = std::min(n, old_size - offset);
        old_backing->read(offset, std::span(buf_old).first(n));
      }
      if (!new_backing || offset >= new_size) {
        std::memset(buf_new.data(), 0, n);
      } else {
        n = std::min(n, new_size - offset);
        new_backing->read(offset, std::span(buf_new).first(n));
      }
      // Runs of differing sectors go into the image.
      for (uint64_t pos = 0; pos < n;) {
        auto differs = [&](uint64_t p) {
          return std::memcmp(&buf_old[p], &buf_new[p], std::min(kSector, n - p)) != 0;
        };
        const bool diff = differs(pos);
        uint64_t end = pos + std::min(kSector, n - pos);
        while (end < n && differs(end) == diff) end += std::min(kSector, n - end);
        if (diff) {
          if (old_is_zero) {
            top->write_zeroes(offset + pos, end - pos, false);
          } else {
            top->write(offset + pos, std::span(buf_old).subspan(pos, end - pos));
          }
        }
        pos = end;
      }
    }
  }
  if (!backing.empty() && backing_fmt.empty()) {
    throw UsageError(fmt::format(
        "Could not change the backing file to '{}': backing format must be specified", backing));
  }
  try {
    top->set_backing_file(backing, backing_fmt);
  } catch (const std::system_error& e) {
    throw UsageError(
        fmt::format("Could not change the backing file to '{}': {}", backing,
                    e.code().value() == ENOSPC ? "No space left in the file header" : e.what()));
  }
  top->flush();
  if (progress) std::printf("    (100.00/100%%)\r\n");
  return 0;
}

}  // namespace kiln::img
