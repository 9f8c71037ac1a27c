// kiln-img commit: write what an image (and any image between it and the base) holds into its
// backing file, then empty the image unless -d (or -b, which implies -d), as qemu-img commit.
#include <fmt/format.h>
#include <getopt.h>
#include <limits.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "base/errors.h"
#include "img/common.h"

namespace kiln::img {

using block::qcow2::ExtentKind;
using block::qcow2::Image;
using block::qcow2::RawImage;
using block::qcow2::SyncImage;

namespace {

constexpr uint64_t kChunk = 2ull << 20;

std::string real_path(const std::string& p) {
  char buf[PATH_MAX];
  return ::realpath(p.c_str(), buf) ? std::string(buf) : std::string();
}

// Is [offset, offset+len) allocated in the layers from `top` down to, not including, `base`?
// Returns the answer and the length of the run it holds for.
std::pair<bool, uint64_t> allocated_above(SyncImage& top, SyncImage* base, uint64_t offset,
                                          uint64_t len) {
  for (SyncImage* layer = &top; layer && layer != base; layer = layer->backing()) {
    if (offset >= layer->size()) return {layer != &top, len};  // a short layer reads as zeros
    len = std::min(len, layer->size() - offset);
    const auto e = layer->block_status(offset, len);
    len = std::min(len, e.length);
    if (e.kind != ExtentKind::kUnallocated) return {true, len};
  }
  return {false, len};
}

bool all_zero(std::span<const uint8_t> b) {
  return std::all_of(b.begin(), b.end(), [](uint8_t v) { return v == 0; });
}

}  // namespace

int cmd_commit(int argc, char** argv) {
  std::string fmt, cache = "writeback", base_name;
  bool keep = false, progress = false, quiet = false, have_base = false;
  optind = 1;
  static const option kLong[] = {{"help", no_argument, nullptr, 'h'}, {nullptr, 0, nullptr, 0}};
  for (int c; (c = getopt_long(argc, argv, ":f:ht:b:dpqr:", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'f':
        fmt = optarg;
        break;
      case 't':
        cache = optarg;
        break;
      case 'b':
        base_name = optarg;
        have_base = true;
        keep = true;  // -b implies -d
        break;
      case 'd':
        keep = true;
        break;
      case 'p':
        progress = true;
        break;
      case 'q':
        quiet = true;
        break;
      case 'r':
        try {
          block::qcow2::parse_size(optarg);
        } catch (const std::exception&) {
          throw UsageError(
              "Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for\n"
              "kiln-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
        }
        break;  // accepted: the copy is not rate limited
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
  const std::string file = argv[optind];
  if (!valid_cache_mode(cache)) throw UsageError(fmt::format("Invalid cache option: {}", cache));

  // The image itself, read-write and alone: holds its write lock and is emptied at the end.
  auto rw_opts = read_options(fmt, false);
  rw_opts.read_only = false;
  rw_opts.no_backing = true;
  rw_opts.cache = page_cache_mode(cache);
  std::unique_ptr<SyncImage> top_rw;
  try {
    top_rw = block::qcow2::open_image(file, rw_opts);
  } catch (const std::exception& e) {
    throw UsageError(fmt::format("Could not open '{}': {}", file, e.what()));
  }
  auto* top_q = dynamic_cast<Image*>(top_rw.get());
  if (!top_q || top_q->header().backing_file.empty()) {
    throw UsageError("Image does not have a backing file");
  }
  // The guest's view through the whole chain (our own write lock already guards the top).
  std::unique_ptr<SyncImage> view;
  try {
    view = block::qcow2::open_image(file, read_options(top_q->format(), true));
  } catch (const std::exception& e) {
    throw UsageError(fmt::format("Could not open '{}': {}", file, e.what()));
  }
  SyncImage* base = view->backing();
  if (have_base) {
    base = nullptr;
    // As QEMU: the name as written in the chain, or a path relative to the image's directory.
    const std::string top_dir = std::filesystem::path(file).parent_path().string();
    const std::string want =
        real_path(base_name[0] == '/' || top_dir.empty() ? base_name : top_dir + "/" + base_name);
    SyncImage* parent = view.get();
    for (SyncImage* layer = view->backing(); layer; parent = layer, layer = layer->backing()) {
      auto* pq = dynamic_cast<Image*>(parent);
      const std::string real = real_path(layer->path());
      if ((pq && pq->header().backing_file == base_name) || (!real.empty() && real == want)) {
        base = layer;
        break;
      }
    }
    if (!base) {
      throw UsageError(
          fmt::format("Did not find '{}' in the backing chain of '{}'", base_name, file));
    }
  }
  auto base_opts = read_options(base->format(), false);
  base_opts.read_only = false;
  base_opts.no_backing = true;
  base_opts.cache = page_cache_mode(cache);
  std::unique_ptr<SyncImage> base_rw;
  try {
    base_rw = block::qcow2::open_image(base->path(), base_opts);
  } catch (const std::exception& e) {
    throw UsageError(fmt::format("Could not open '{}': {}", base->path(), e.what()));
  }
  auto* base_q = dynamic_cast<Image*>(base_rw.get());
  auto* base_raw = dynamic_cast<RawImage*>(base_rw.get());

  if (progress) {
    std::printf("    (0.00/100%%)\r");
    std::fflush(stdout);
  }
  const uint64_t size = view->size();
  if (base_rw->size() < size) {
    if (base_q) {
      base_q->resize(size);
    } else if (::ftruncate(base_raw->fd(), off_t(size)) != 0) {
      throw_errno("ftruncate");
    }
  }
  std::vector<uint8_t> buf(kChunk);
  for (uint64_t offset = 0; offset < size;) {
    auto [allocated, n] = allocated_above(*view, base, offset, std::min(kChunk, size - offset));
    if (n == 0) throw std::runtime_error("block status made no progress");
    if (allocated) {
      auto data = std::span(buf).first(n);
      view->read(offset, data);
      if (base_q) {
        if (all_zero(data)) {
          base_q->write_zeroes(offset, n, false);
        } else {
          base_q->write(offset, data);
        }
      } else {
        base_raw->write(offset, data);
      }
    }
    offset += n;
  }
  if (base_q) {
    base_q->flush();
  } else {
    base_raw->flush();
  }
  base_rw.reset();
  view.reset();
  if (!keep) top_q->make_empty();
  if (progress) std::printf("    (100.00/100%%)\r\n");
  if (!quiet) std::printf("Image committed.\n");
  return 0;
}

}  // namespace kiln::img
