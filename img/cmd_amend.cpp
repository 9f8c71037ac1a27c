// kiln-img amend: changes format options of an existing qcow2 image in place.
#include <fmt/format.h>
#include <getopt.h>

#include <cstdio>

#include "img/common.h"

namespace kiln::img {
namespace {

block::qcow2::AmendOptions parse_amend_options(const std::map<std::string, std::string>& opts) {
  block::qcow2::AmendOptions a;
  for (const auto& [key, value] : opts) {
    if (key == "compat") {
      if (value == "0.10" || value == "v2") {
        a.version = 2;
      } else if (value == "1.1" || value == "v3") {
        a.version = 3;
      } else {
        throw UsageError(fmt::format("Unknown compatibility level {}", value));
      }
    } else if (key == "lazy_refcounts") {
      if (value != "on" && value != "off") {
        throw UsageError("Parameter 'lazy_refcounts' expects 'on' or 'off'");
      }
      a.lazy_refcounts = value == "on";
    } else if (key == "refcount_bits") {
      char* end = nullptr;
      const unsigned long long v = std::strtoull(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || value[0] == '-') {
        throw UsageError(
            "Parameter 'refcount_bits' expects a non-negative number below 2^64\n"
            "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
            "and exabytes, respectively.");
      }
      if (v == 0 || v > 64 || (v & (v - 1)) != 0) {
        throw UsageError("Refcount width must be a power of two and may not exceed 64 bits");
      }
      a.refcount_bits = uint32_t(v);
    } else if (key == "size") {
      try {
        a.size = block::qcow2::parse_size(value);
      } catch (const std::exception&) {
        throw UsageError(
            fmt::format("Parameter 'size' expects a size\n"
                        "You may use k, M, G, T, P or E suffixes for kilobytes, "
                        "megabytes, gigabytes, terabytes, petabytes and exabytes."));
      }
    } else if (key == "backing_file" || key == "backing_fmt") {
      // qemu-img 7.2 refuses both; rebase is the tool for it.
      throw UsageError("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.");
    } else if (key == "data_file") {
      throw UsageError("data-file can only be set for images that use an external data file");
    } else if (key == "cluster_size" || key == "compression_type" || key == "preallocation" ||
               key == "extended_l2" || key == "encryption" || key == "data_file_raw" ||
               key.rfind("encrypt.", 0) == 0) {
      throw UsageError(fmt::format(
          "Invalid parameter '{}'\nThis option is only supported for image creation", key));
    } else {
      throw UsageError(fmt::format("Invalid parameter '{}'", key));
    }
  }
  return a;
}

}  // namespace

int cmd_amend(int argc, char** argv) {
  std::string fmt, cache, options;
  bool progress = false, quiet = false;
  optind = 1;
  enum { kForce = 256, kObject, kImageOpts };
  static const option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                 {"force", no_argument, nullptr, kForce},
                                 {"object", required_argument, nullptr, kObject},
                                 {"image-opts", no_argument, nullptr, kImageOpts},
                                 {nullptr, 0, nullptr, 0}};
  for (int c; (c = getopt_long(argc, argv, ":ho:f:t:pq", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'o':
        options += (options.empty() ? "" : ",") + std::string(optarg);
        break;
      case 'f':
        fmt = optarg;
        break;
      case 't':
        cache = optarg;
        if (!valid_cache_mode(cache)) {
          throw UsageError(fmt::format("Invalid cache option: {}", cache));
        }
        break;
      case 'p':
        progress = true;
        break;
      case 'q':
        quiet = true;
        break;
      case kForce:
        break;  // only matters for crypto and data-file changes, which kiln refuses anyway
      case 'h':
        print_usage();
        return 0;
      default:
        throw UsageError("Invalid option or missing argument for amend");
    }
  }
  if (quiet) progress = false;
  if (options.empty()) {
    throw UsageError("Must specify options (-o)\nTry 'kiln-img --help' for more information");
  }
  // With -f, the option list needs no image (as in qemu-img); without, the image's format.
  if (wants_option_help(options) && fmt == "qcow2" && argc == optind) {
    print_amend_option_help();
    return 0;
  }
  if (argc - optind != 1) throw UsageError("Expecting one image file name");
  const std::string file = argv[optind];

  std::string format = fmt;
  if (format.empty()) {
    try {
      format = block::qcow2::probe_format(file);
    } catch (const std::exception& e) {
      throw UsageError(fmt::format("Could not open '{}': {}", file, e.what()));
    }
  }
  if (format != "qcow2") {
    throw UsageError(fmt::format("Format driver '{}' does not support option amendment", format));
  }
  if (wants_option_help(options)) {
    print_amend_option_help();
    return 0;
  }
  const auto amend = parse_amend_options(parse_options(options));

  block::qcow2::OpenOptions oo;
  oo.read_only = false;
  oo.format = "qcow2";
  oo.cache = page_cache_mode(cache);
  std::unique_ptr<block::qcow2::Image> img;
  try {
    img = block::qcow2::Image::open(file, oo);
  } catch (const std::exception& e) {
    throw UsageError(fmt::format("Could not open '{}': {}", file, e.what()));
  }
  if (progress) {
    std::printf("    (0.00/100%%)\r");
    std::fflush(stdout);
  }
  img->amend(amend);
  img->flush();
  if (progress) std::printf("    (100.00/100%%)\r\n");
  return 0;
}

}  // namespace kiln::img
