// kiln-img create
#include <fmt/format.h>
#include <getopt.h>

#include "img/common.h"

namespace kiln::img {
namespace {

using block::qcow2::CompressionType;
using block::qcow2::CreateOptions;

uint32_t parse_version(const std::string& compat) {
  if (compat == "0.10" || compat == "v2") return 2;
  if (compat == "1.1" || compat == "v3") return 3;
  throw UsageError(fmt::format("Invalid parameter '{}'", compat));
}

bool parse_on_off(const std::string& key, const std::string& v) {
  if (v == "on") return true;
  if (v == "off") return false;
  throw UsageError(fmt::format("Parameter '{}' expects 'on' or 'off'", key));
}

}  // namespace

void apply_qcow2_options(const std::map<std::string, std::string>& opts, CreateOptions& o,
                         bool& compat_given) {
  for (const auto& [key, value] : opts) {
    if (key == "cluster_size") {
      o.cluster_size = uint32_t(block::qcow2::parse_size(value));
    } else if (key == "compat") {
      o.version = parse_version(value);
      compat_given = true;
    } else if (key == "refcount_bits") {
      o.refcount_bits = uint32_t(std::stoul(value));
    } else if (key == "backing_file") {
      o.backing_file = value;
    } else if (key == "backing_fmt") {
      o.backing_format = value;
    } else if (key == "compression_type") {
      if (value == "zlib") {
        o.compression_type = CompressionType::kZlib;
      } else if (value == "zstd") {
        o.compression_type = CompressionType::kZstd;
      } else {
        throw UsageError(fmt::format("Invalid parameter '{}'", value));
      }
    } else if (key == "preallocation") {
      if (value != "off" && value != "metadata" && value != "falloc" && value != "full") {
        throw UsageError(
            fmt::format("Parameter 'preallocation' does not accept value '{}'", value));
      }
      o.preallocate_metadata = value != "off";
      o.data_preallocation = value == "falloc" ? block::qcow2::DataPreallocation::kFalloc
                             : value == "full" ? block::qcow2::DataPreallocation::kFull
                                               : block::qcow2::DataPreallocation::kNone;
    } else if (key == "lazy_refcounts") {
      o.lazy_refcounts = parse_on_off(key, value);
    } else if (key == "extended_l2") {
      o.extended_l2 = parse_on_off(key, value);
    } else if (key == "size") {
      o.size = block::qcow2::parse_size(value);
    } else {
      throw UsageError(fmt::format("Invalid parameter '{}'", key));
    }
  }
}

int cmd_create(int argc, char** argv) {
  std::string fmt = "raw", backing, backing_fmt, options;
  bool quiet = false;
  optind = 1;
  static const option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                 {"object", required_argument, nullptr, 'j'},
                                 {nullptr, 0, nullptr, 0}};
  for (int c; (c = getopt_long(argc, argv, ":F:b:f:ho:qu", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'f':
        fmt = optarg;
        break;
      case 'b':
        backing = optarg;
        break;
      case 'F':
        backing_fmt = optarg;
        break;
      case 'o':
        options += (options.empty() ? "" : ",") + std::string(optarg);
        break;
      case 'q':
        quiet = true;
        break;
      case 'u':
        break;  // we never open the backing file beyond probing its size
      default:
        throw UsageError("Invalid option or missing argument for create");
    }
  }
  if (wants_option_help(options)) {
    print_create_option_help(fmt);
    return 0;
  }
  if (optind >= argc) throw UsageError("Expecting image file name");
  const std::string file = argv[optind++];
  CreateOptions o;
  bool size_given = false, compat_given = false;
  if (optind < argc) {
    try {
      o.size = block::qcow2::parse_size(argv[optind++]);
    } catch (const std::exception&) {
      throw UsageError(
          "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
          "kiln-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
    }
    size_given = true;
  }
  if (optind < argc) throw UsageError(fmt::format("Unexpected argument: {}", argv[optind]));
  const auto opts = parse_options(options);
  if (fmt == "raw") {
    std::string prealloc;
    for (const auto& [k, v] : opts) {
      if (k == "size") {
        o.size = block::qcow2::parse_size(v);
        size_given = true;
      } else if (k == "preallocation") {
        prealloc = v;
      } else {
        throw UsageError(fmt::format("Invalid parameter '{}'", k));
      }
    }
    if (!backing.empty()) throw UsageError("'raw' does not support backing files");
    if (!size_given) throw UsageError("Image creation needs a size parameter");
    if (!quiet) {
      std::printf("Formatting '%s', fmt=raw size=%llu%s\n", file.c_str(),
                  (unsigned long long)o.size,
                  prealloc.empty() ? "" : (" preallocation=" + prealloc).c_str());
      std::fflush(stdout);
    }
    auto mode = block::qcow2::DataPreallocation::kNone;
    if (prealloc == "falloc") {
      mode = block::qcow2::DataPreallocation::kFalloc;
    } else if (prealloc == "full") {
      mode = block::qcow2::DataPreallocation::kFull;
    } else if (prealloc == "metadata") {
      throw UsageError(fmt::format("{}: Unsupported preallocation mode: metadata", file));
    } else if (!prealloc.empty() && prealloc != "off") {
      throw UsageError(fmt::format("{}: invalid parameter value: {}", file, prealloc));
    }
    block::qcow2::RawImage::create(file, o.size, mode);
    return 0;
  }
  if (fmt != "qcow2") throw UsageError(fmt::format("Unknown file format '{}'", fmt));
  if (opts.count("size")) size_given = true;
  apply_qcow2_options(opts, o, compat_given);
  if (!backing.empty()) o.backing_file = backing;
  if (!backing_fmt.empty()) o.backing_format = backing_fmt;
  if (!o.backing_file.empty()) {
    // Same rule as qemu-img 7.x: the backing format must be explicit, never probed.
    if (o.backing_format.empty()) {
      throw UsageError(fmt::format(
          "{}: Backing file specified without backing format\nDetected format of {}.", file,
          block::qcow2::probe_format(o.backing_file[0] == '/' || file.find('/') == std::string::npos
                                         ? o.backing_file
                                         : file.substr(0, file.rfind('/') + 1) + o.backing_file)));
    }
    if (!size_given) {
      std::string bpath = o.backing_file;
      if (bpath[0] != '/' && file.find('/') != std::string::npos) {
        bpath = file.substr(0, file.rfind('/') + 1) + bpath;
      }
      o.size = block::qcow2::open_image(bpath, read_options(o.backing_format, true))->size();
      size_given = true;
    }
  }
  if (!size_given) throw UsageError("Image creation needs a size parameter");
  if (!quiet) {
    std::string line = fmt::format("Formatting '{}', fmt=qcow2 cluster_size={} extended_l2={}",
                                   file, o.cluster_size, o.extended_l2 ? "on" : "off");
    if (opts.count("preallocation")) line += " preallocation=" + opts.at("preallocation");
    line += fmt::format(" compression_type={} size={}",
                        o.compression_type == CompressionType::kZstd ? "zstd" : "zlib", o.size);
    if (!o.backing_file.empty()) line += fmt::format(" backing_file={}", o.backing_file);
    if (!o.backing_format.empty()) line += fmt::format(" backing_fmt={}", o.backing_format);
    if (compat_given) line += fmt::format(" compat={}", opts.at("compat"));
    line += fmt::format(" lazy_refcounts={} refcount_bits={}", o.lazy_refcounts ? "on" : "off",
                        o.refcount_bits);
    std::puts(line.c_str());
  }
  block::qcow2::Image::create(file, o);
  return 0;
}

}  // namespace kiln::img
