// kiln-img map, and the chain walk convert shares with it.
#include <fmt/format.h>
#include <getopt.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <mutex>

#include "img/common.h"

namespace kiln::img {

using block::qcow2::ExtentKind;
using block::qcow2::Image;
using block::qcow2::SyncImage;

bool host_file_hole(const std::string& path, uint64_t host, uint64_t& length) {
  // One read-only handle per host file for the whole command (map and compare walk many extents;
  // convert's reader threads come here too, through chain_status).
  static std::mutex mu;
  static std::map<std::string, std::unique_ptr<block::qcow2::RawImage>> files;
  block::qcow2::RawImage* file;
  {
    std::lock_guard lock(mu);
    auto& slot = files[path];
    if (!slot) slot = block::qcow2::RawImage::open(path, true, true);
    file = slot.get();
  }
  if (host >= file->size()) return true;
  const auto e = file->block_status(host, length);
  length = std::min(length, e.length);
  return e.kind == ExtentKind::kZero;
}

ChainStatus chain_status(SyncImage& top, uint64_t offset, uint64_t length) {
  ChainStatus s;
  s.start = offset;
  SyncImage* layer = &top;
  for (int depth = 0;; ++depth) {
    const auto e = layer->block_status(offset, length);
    length = e.length;
    s.depth = depth;
    s.length = length;
    const bool raw = layer->format() == "raw";
    switch (e.kind) {
      case ExtentKind::kData:
        s.present = s.data = true;
        s.zero = false;
        s.has_offset = true;
        s.offset = e.host_offset;
        s.file = layer->path();
        if (auto* q = dynamic_cast<Image*>(layer); q && q->looks_metadata_preallocated()) {
          s.zero = host_file_hole(s.file, s.offset, s.length);
        }
        return s;
      case ExtentKind::kCompressed:
        s.present = s.data = true;
        s.zero = false;
        s.file = layer->path();
        return s;
      case ExtentKind::kZero:
        s.present = offset < layer->size() || !raw;
        s.zero = true;
        if (raw && offset < layer->size()) {
          s.has_offset = true;
          s.offset = offset;
          s.file = layer->path();
        } else if (e.host_offset) {  // qcow2 zero range with a preallocated host cluster
          s.has_offset = true;
          s.offset = e.host_offset;
          s.file = layer->path();
        }
        return s;
      case ExtentKind::kUnallocated:
        // No layer below, or past its end: reads as zeros, and QEMU reports it at this depth
        // (it marks the range zero before looking further). It still names the host cluster
        // holding the range (unallocated subclusters, preallocated metadata).
        if (!layer->backing() || offset >= layer->backing()->size()) {
          if (e.host_offset) {
            s.has_offset = true;
            s.offset = e.host_offset;
            s.file = layer->path();
          }
          return s;
        }
        layer = layer->backing();
        length = std::min(length, layer->size() - offset);
        break;
    }
  }
}

int cmd_map(int argc, char** argv) {
  std::string fmt, output = "human";
  bool force_share = false;
  optind = 1;
  static const option kLong[] = {{"output", required_argument, nullptr, 'O'},
                                 {"force-share", no_argument, nullptr, 'U'},
                                 {"help", no_argument, nullptr, 'h'},
                                 {nullptr, 0, nullptr, 0}};
  for (int c; (c = getopt_long(argc, argv, ":f:hU", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'f':
        fmt = optarg;
        break;
      case 'O':
        output = optarg;
        break;
      case 'U':
        force_share = true;
        break;
      default:
        throw UsageError("Invalid option or missing argument for map");
    }
  }
  if (output != "human" && output != "json") {
    throw UsageError("--output must be used with human or json as argument.");
  }
  if (optind != argc - 1) throw UsageError("Expecting one image file name");
  auto img = block::qcow2::open_image(argv[optind], read_options(fmt, force_share));

  std::vector<ChainStatus> entries;
  const uint64_t size = img->size();
  for (uint64_t pos = 0; pos < size;) {
    ChainStatus s = chain_status(*img, pos, size - pos);
    if (s.length == 0) break;
    pos += s.length;
    if (!entries.empty()) {
      ChainStatus& prev = entries.back();
      const bool same = prev.depth == s.depth && prev.present == s.present && prev.zero == s.zero &&
                        prev.data == s.data && prev.has_offset == s.has_offset &&
                        prev.file == s.file &&
                        (!s.has_offset || prev.offset + prev.length == s.offset);
      if (same) {
        prev.length += s.length;
        continue;
      }
    }
    entries.push_back(s);
  }
  if (output == "json") {
    for (size_t i = 0; i < entries.size(); ++i) {
      const auto& e = entries[i];
      std::string line = fmt::format(
          "{}{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, "
          "\"data\": {}",
          i == 0 ? "[" : "", e.start, e.length, e.depth, e.present, e.zero, e.data);
      if (e.has_offset) line += fmt::format(", \"offset\": {}", e.offset);
      line += i + 1 == entries.size() ? "}]" : "},";
      fmt::print("{}\n", line);
    }
    if (entries.empty()) fmt::print("[]\n");
    return 0;
  }
  fmt::print("{:<16}{:<16}{:<16}{}\n", "Offset", "Length", "Mapped to", "File");
  std::fflush(stdout);
  for (const auto& e : entries) {
    if (e.data && !e.has_offset) {
      fmt::print(stderr, "kiln-img: File contains external, encrypted or compressed clusters.\n");
      return 1;
    }
  }
  auto hex = [](uint64_t v) { return v ? fmt::format("{:#x}", v) : std::string("0"); };
  for (const auto& e : entries) {
    if (!e.data || e.zero || !e.has_offset)
      continue;  // as qemu-img: data that reads as zeros is left out
    fmt::print("{:<16}{:<16}{:<16}{}\n", hex(e.start), hex(e.length), hex(e.offset), e.file);
  }
  return 0;
}

}  // namespace kiln::img
