// kiln-img measure: how big a new image would be, for a virtual size (--size) or for the contents
// of an existing image, computed exactly as QEMU's raw_measure()/qcow2_measure() do.
#include <fmt/format.h>
#include <getopt.h>

#include <cstdio>

#include "base/math.h"
#include "img/common.h"

namespace kiln::img {
namespace {

// qcow2_refcount_metadata_size(): the fixed point where refcount blocks and table cover every
// cluster, themselves included.
uint64_t refcount_metadata_size(uint64_t clusters, uint64_t cluster_size, int refcount_order) {
  const uint64_t per_table_cluster = cluster_size / 8;
  const uint64_t per_block = cluster_size * 8 / (1u << refcount_order);
  uint64_t table = 0, blocks = 0, n = 0, last;
  do {
    last = n;
    blocks = div_round_up(clusters + table + blocks, per_block);
    table = div_round_up(blocks, per_table_cluster);
    n = clusters + blocks + table;
  } while (n != last);
  return (blocks + table) * cluster_size;
}

// qcow2_calc_prealloc_size(): header, L1, L2, refcounts and every data cluster.
uint64_t prealloc_size(uint64_t total, uint64_t cluster_size, int refcount_order, bool ext_l2) {
  uint64_t meta = cluster_size;
  const uint64_t aligned = round_up(total, cluster_size);
  const uint64_t l2e = ext_l2 ? 16 : 8;
  uint64_t nl2e = round_up(aligned / cluster_size, cluster_size / l2e);
  meta += nl2e * l2e;
  uint64_t nl1e = round_up(nl2e * l2e / cluster_size, cluster_size / 8);
  meta += nl1e * 8;
  meta += refcount_metadata_size((meta + aligned) / cluster_size, cluster_size, refcount_order);
  return meta + aligned;
}

// An option error, reported like qemu_opts_do_parse() does.
[[noreturn]] void bad_option(const std::string& msg, const std::string& fmt) {
  throw UsageError(fmt::format("{}\nkiln-img: Invalid options for file format '{}'", msg, fmt));
}

bool parse_bool(const std::string& key, const std::string& v, const std::string& fmt) {
  if (v == "on" || v == "yes" || v == "true" || v == "y") return true;
  if (v == "off" || v == "no" || v == "false" || v == "n") return false;
  bad_option(fmt::format("Parameter '{}' expects 'on' or 'off'", key), fmt);
}

uint64_t parse_opt_size(const std::string& key, const std::string& v, const std::string& fmt) {
  try {
    return block::qcow2::parse_size(v);
  } catch (const std::exception&) {
    bad_option(fmt::format("Parameter '{}' expects a non-negative number below 2^64\n"
                           "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
                           "peta-\nand exabytes, respectively.",
                           key),
               fmt);
  }
}

struct MeasureInfo {
  uint64_t required = 0, fully_allocated = 0;
  bool has_bitmaps = false;
};

}  // namespace

int cmd_measure(int argc, char** argv) {
  std::string fmt, out_fmt = "raw", options, output = "human", snapshot;
  bool force_share = false, size_given = false;
  uint64_t img_size = 0;
  optind = 1;
  static const option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                 {"output", required_argument, nullptr, 'P'},
                                 {"size", required_argument, nullptr, 'S'},
                                 {"force-share", no_argument, nullptr, 'U'},
                                 {nullptr, 0, nullptr, 0}};
  for (int c; (c = getopt_long(argc, argv, ":hf:O:o:l:U", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'f':
        fmt = optarg;
        break;
      case 'O':
        out_fmt = optarg;
        break;
      case 'o':
        options += (options.empty() ? "" : ",") + std::string(optarg);
        break;
      case 'l':
        snapshot = optarg;
        break;
      case 'U':
        force_share = true;
        break;
      case 'P':
        output = optarg;
        break;
      case 'S':
        try {
          img_size = block::qcow2::parse_size(optarg);
        } catch (const std::exception&) {
          throw UsageError(
              "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
              "kiln-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
        }
        if (img_size > uint64_t(INT64_MAX)) {
          throw UsageError(
              "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
              "kiln-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
        }
        size_given = true;
        break;
      default:
        // qemu-img measure answers a bad or incomplete option with its help text and status 0.
        print_usage();
        return 0;
    }
  }
  if (output != "human" && output != "json") {
    throw UsageError("--output must be used with human or json as argument.");
  }
  std::string filename;
  if (argc - optind > 1) throw UsageError("At most one filename argument is allowed.");
  if (argc - optind == 1) filename = argv[optind];
  if (filename.empty() && (!fmt.empty() || !snapshot.empty())) {
    throw UsageError("--image-opts, -f, and -l require a filename argument.");
  }
  if (!filename.empty() && size_given) {
    throw UsageError("--size N cannot be used together with a filename.");
  }
  if (filename.empty() && !size_given) {
    throw UsageError("Either --size N or one filename must be specified.");
  }
  std::unique_ptr<block::qcow2::SyncImage> in;
  if (!filename.empty()) {
    try {
      in = block::qcow2::open_image(filename, read_options(fmt, force_share));
    } catch (const std::exception& e) {
      throw UsageError(fmt::format("Could not open '{}': {}", filename, e.what()));
    }
    if (!snapshot.empty()) throw UsageError("Measuring an internal snapshot is not supported");
  }
  if (out_fmt != "raw" && out_fmt != "qcow2") {
    static const char* kNoMeasure[] = {"vmdk", "vdi",   "vhdx",  "vpc",  "qed",
                                       "file", "cloop", "bochs", "vvfat"};
    for (const char* f : kNoMeasure) {
      if (out_fmt == f) {
        throw UsageError(
            fmt::format("Block driver '{}' does not support size measurement", out_fmt));
      }
    }
    throw UsageError(fmt::format("Unknown file format '{}'", out_fmt));
  }
  // The creation options the format (plus the protocol layer) knows, by value type.
  enum class Kind { kSize, kNumber, kBool, kString };
  std::map<std::string, Kind> known = {{"size", Kind::kSize},
                                       {"preallocation", Kind::kString},
                                       {"nocow", Kind::kBool},
                                       {"extent_size_hint", Kind::kSize}};
  if (out_fmt == "qcow2") {
    known.insert({{"compat", Kind::kString},
                  {"backing_file", Kind::kString},
                  {"backing_fmt", Kind::kString},
                  {"encryption", Kind::kBool},
                  {"encrypt.format", Kind::kString},
                  {"cluster_size", Kind::kSize},
                  {"lazy_refcounts", Kind::kBool},
                  {"refcount_bits", Kind::kNumber},
                  {"compression_type", Kind::kString},
                  {"extended_l2", Kind::kBool},
                  {"data_file", Kind::kString},
                  {"data_file_raw", Kind::kBool}});
  }
  const auto opts = parse_options(options);
  for (const auto& [key, value] : opts) {
    auto it = known.find(key);
    if (it == known.end()) bad_option(fmt::format("Invalid parameter '{}'", key), out_fmt);
    if (it->second == Kind::kSize) parse_opt_size(key, value, out_fmt);
    if (it->second == Kind::kBool) parse_bool(key, value, out_fmt);
    if (it->second == Kind::kNumber &&
        (value.empty() || value.find_first_not_of("0123456789") != std::string::npos)) {
      bad_option(fmt::format("Parameter '{}' expects a number", key), out_fmt);
    }
  }
  auto get = [&](const std::string& key) -> const std::string* {
    auto it = opts.find(key);
    return it == opts.end() ? nullptr : &it->second;
  };
  uint64_t size = 0;
  if (const auto* v = get("size")) size = parse_opt_size("size", *v, out_fmt);
  if (size_given) size = img_size;

  MeasureInfo info;
  if (out_fmt == "raw") {
    info.required = in ? image_length(*in) : round_up(size, 512);
    info.fully_allocated = info.required;
  } else {
    const bool ext_l2 = get("extended_l2") && parse_bool("extended_l2", *get("extended_l2"), "");
    uint64_t cluster_size = 65536;
    if (const auto* v = get("cluster_size")) cluster_size = parse_opt_size("cluster_size", *v, "");
    const int cluster_bits = cluster_size ? __builtin_ctzll(cluster_size) : 64;
    if (cluster_bits < 9 || cluster_bits > 21 || (1ull << cluster_bits) != cluster_size) {
      throw UsageError("Cluster size must be a power of two between 512 and 2048k");
    }
    if (ext_l2 && cluster_size < 16384) {
      throw UsageError(
          "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
    }
    int version = 3;
    if (const auto* v = get("compat")) {
      if (*v == "0.10" || *v == "v2") {
        version = 2;
      } else if (*v == "1.1" || *v == "v3") {
        version = 3;
      } else {
        throw UsageError(fmt::format("Invalid compatibility level: '{}'", *v));
      }
    }
    uint64_t refcount_bits = 16;
    if (const auto* v = get("refcount_bits")) refcount_bits = std::stoull(*v);
    if (refcount_bits > 64 || refcount_bits == 0 || (refcount_bits & (refcount_bits - 1))) {
      throw UsageError("Refcount width must be a power of two and may not exceed 64 bits");
    }
    if (version < 3 && refcount_bits != 16) {
      throw UsageError(
          "Different refcount widths than 16 bits require compatibility level 1.1 or above (use "
          "compat=1.1 or greater)");
    }
    std::string prealloc = "off";
    if (const auto* v = get("preallocation")) prealloc = *v;
    if (prealloc != "off" && prealloc != "metadata" && prealloc != "falloc" && prealloc != "full") {
      throw UsageError(fmt::format("invalid parameter value: {}", prealloc));
    }
    const bool has_backing = get("backing_file") != nullptr;
    uint64_t virtual_size = round_up(size, cluster_size);
    const uint64_t l2e = ext_l2 ? 16 : 8;
    const uint64_t l2_tables = div_round_up(virtual_size / cluster_size, cluster_size / l2e);
    if (l2_tables * 8 > (32ull << 20)) {
      throw UsageError("The image size is too large (try using a larger cluster size)");
    }
    uint64_t required = 0;
    if (in) {
      const uint64_t ssize = image_length(*in);
      virtual_size = round_up(ssize, cluster_size);
      if (has_backing) {
        required = virtual_size;
      } else {
        for (uint64_t offset = 0, pnum = 0; offset < ssize; offset += pnum) {
          const QemuStatus s = qemu_block_status(*in, offset, ssize - offset);
          pnum = s.length;
          if (pnum == 0) throw std::runtime_error("block status made no progress");
          if (s.flags & QemuStatus::kZero) continue;
          const int both = QemuStatus::kData | QemuStatus::kAllocated;
          if ((s.flags & both) == both) {
            pnum = round_up(offset + pnum, cluster_size) - offset;
            required += offset % cluster_size + pnum;
          }
        }
      }
    }
    if (prealloc == "full" || prealloc == "falloc") required = virtual_size;
    info.fully_allocated =
        prealloc_size(virtual_size, cluster_size, __builtin_ctzll(refcount_bits), ext_l2);
    info.required = info.fully_allocated - virtual_size + required;
    // Bitmaps are reported only when both images could hold persistent bitmaps (qcow2 v3).
    auto* in_qcow2 = dynamic_cast<block::qcow2::Image*>(in.get());
    info.has_bitmaps = version >= 3 && in_qcow2 && in_qcow2->header().version >= 3;
  }
  if (output == "human") {
    fmt::print("required size: {}\nfully allocated size: {}\n", info.required,
               info.fully_allocated);
    if (info.has_bitmaps) fmt::print("bitmaps size: 0\n");
  } else {
    fmt::print("{{\n");
    if (info.has_bitmaps) fmt::print("    \"bitmaps\": 0,\n");
    fmt::print("    \"required\": {},\n    \"fully-allocated\": {}\n}}\n", info.required,
               info.fully_allocated);
  }
  return 0;
}

}  // namespace kiln::img
