// kiln-img dd: copy a range of an image into a new image, with qemu-img dd's operands
// (if= of= bs= count= skip=) and its quirks: count limits the input measured from its start
// (skip is taken off that), and a skip past the end gives an empty image and a warning.
#include <fmt/format.h>
#include <getopt.h>

#include <cstdio>
#include <cstring>

#include "img/common.h"

namespace kiln::img {
namespace {

// qemu-img's cvtnum_full(): a size with an optional suffix, within [min, max].
uint64_t dd_number(const std::string& name, const std::string& value, uint64_t min, uint64_t max) {
  uint64_t v = 0;
  bool range = false;
  try {
    v = block::qcow2::parse_size(value);
  } catch (const std::invalid_argument& e) {
    if (std::strstr(e.what(), "too large") == nullptr) {
      throw UsageError(
          fmt::format("Invalid {} specified. You may use k, M, G, T, P or E suffixes for\n"
                      "kiln-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and "
                      "exabytes.",
                      name));
    }
    range = true;
  }
  if (range || v < min || v > max) {
    throw UsageError(
        fmt::format("Invalid {} specified. Must be between {} and {}.", name, min, max));
  }
  return v;
}

}  // namespace

int cmd_dd(int argc, char** argv) {
  std::string fmt, out_fmt = "raw", in_file, out_file;
  bool force_share = false, have_if = false, have_of = false, have_count = false, have_skip = false;
  uint64_t bs = 512, count = 0, skip = 0;
  optind = 1;
  static const option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                 {"force-share", no_argument, nullptr, 'U'},
                                 {nullptr, 0, nullptr, 0}};
  for (int c; (c = getopt_long(argc, argv, ":hf:O:U", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'f':
        fmt = optarg;
        break;
      case 'O':
        out_fmt = optarg;
        break;
      case 'U':
        force_share = true;
        break;
      case 'h':
        print_usage();
        return 0;
      case ':':
        throw UsageError(fmt::format("option '{}' requires an argument", argv[optind - 1]));
      default:
        throw UsageError(fmt::format("unrecognized option '{}'", argv[optind - 1]));
    }
  }
  for (int i = optind; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto eq = arg.find('=');
    if (eq == std::string::npos) throw UsageError(fmt::format("unrecognized operand {}", arg));
    const std::string key = arg.substr(0, eq), value = arg.substr(eq + 1);
    if (key == "bs") {
      bs = dd_number("bs", value, 1, INT32_MAX);
    } else if (key == "count") {
      count = dd_number("count", value, 0, INT64_MAX);
      have_count = true;
    } else if (key == "skip") {
      skip = dd_number("skip", value, 0, INT64_MAX);
      have_skip = true;
    } else if (key == "if") {
      in_file = value;
      have_if = true;
    } else if (key == "of") {
      out_file = value;
      have_of = true;
    } else {
      throw UsageError(fmt::format("unrecognized operand {}", key));
    }
  }
  if (!have_if || !have_of) throw UsageError("Must specify both input and output files");

  std::unique_ptr<block::qcow2::SyncImage> in;
  try {
    in = block::qcow2::open_image(in_file, read_options(fmt, force_share));
  } catch (const std::exception& e) {
    throw UsageError(fmt::format("Could not open '{}': {}", in_file, e.what()));
  }
  if (out_fmt != "raw" && out_fmt != "qcow2") throw UsageError("Unknown file format");

  uint64_t size = image_length(*in);
  if (have_count && count <= uint64_t(INT64_MAX) / bs && count * bs < size) size = count * bs;
  const bool skip_past_end = have_skip && (skip > uint64_t(INT64_MAX) / bs || size < bs * skip);
  const uint64_t out_size = skip_past_end ? 0 : size - bs * skip;
  const uint64_t created_size = (out_size + 511) / 512 * 512;  // both formats round to sectors

  std::unique_ptr<block::qcow2::Image> out_qcow2;
  std::unique_ptr<block::qcow2::RawImage> out_raw;
  try {
    if (out_fmt == "qcow2") {
      block::qcow2::CreateOptions co;
      co.size = created_size;
      block::qcow2::Image::create(out_file, co);
      block::qcow2::OpenOptions oo;
      oo.read_only = false;
      oo.format = "qcow2";
      out_qcow2 = block::qcow2::Image::open(out_file, oo);
    } else {
      block::qcow2::RawImage::create(out_file, created_size);
      out_raw = block::qcow2::RawImage::open(out_file, false, false);
    }
  } catch (const std::exception& e) {
    throw UsageError(fmt::format("{}: error while creating output image: {}", out_file, e.what()));
  }

  uint64_t in_pos = bs * skip;
  if (skip_past_end) {
    fmt::print(stderr, "kiln-img: {}: cannot skip to specified offset\n", in_file);
    in_pos = size;
  }
  std::vector<uint8_t> buf(bs);
  for (uint64_t out_pos = 0; in_pos < size;) {
    const uint64_t n = std::min(bs, size - in_pos);
    auto chunk = std::span(buf).first(n);
    try {
      in->read(in_pos, chunk);
    } catch (const std::exception& e) {
      throw UsageError(fmt::format("error while reading from input image file: {}", e.what()));
    }
    try {
      if (out_qcow2) {
        out_qcow2->write(out_pos, chunk);
      } else {
        out_raw->write(out_pos, chunk);
      }
    } catch (const std::exception& e) {
      throw UsageError(fmt::format("error while writing to output image file: {}", e.what()));
    }
    in_pos += n;
    out_pos += n;
  }
  if (out_qcow2) out_qcow2->flush();
  return 0;
}

}  // namespace kiln::img
