// "-o help" (or "-o ?"): the -o options a format takes, printed as qemu-img prints its lists.
// Only options kiln implements are listed (no encryption, no external data file).
#include <fmt/format.h>

#include <vector>

#include "img/common.h"

namespace kiln::img {
namespace {

struct OptionDoc {
  const char* name;
  const char* type;  // as qemu shows it: str, size, num, bool (on/off)
  const char* text;
};

// qcow2's creation options, with qemu's descriptions.
const std::vector<OptionDoc> kQcow2CreateOptions = {
    {"backing_file", "str", "File name of a base image"},
    {"backing_fmt", "str", "Image format of the base image"},
    {"cluster_size", "size", "qcow2 cluster size"},
    {"compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"},
    {"compression_type", "str", "Compression method used for image cluster compression"},
    {"extended_l2", "bool (on/off)", "Extended L2 tables"},
    {"lazy_refcounts", "bool (on/off)", "Postpone refcount updates"},
    {"preallocation", "str", "Preallocation mode (allowed values: off, metadata, falloc, full)"},
    {"refcount_bits", "num", "Width of a reference count entry in bits"},
    {"size", "size", "Virtual disk size"},
};

const std::vector<OptionDoc> kQcow2AmendOptions = {
    {"backing_file", "str", "File name of a base image"},
    {"backing_fmt", "str", "Image format of the base image"},
    {"compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"},
    {"lazy_refcounts", "bool (on/off)", "Postpone refcount updates"},
    {"refcount_bits", "num", "Width of a reference count entry in bits"},
    {"size", "size", "Virtual disk size"},
};

const std::vector<OptionDoc> kRawCreateOptions = {
    {"preallocation", "str", "Preallocation mode (allowed values: off, falloc, full)"},
    {"size", "size", "Virtual disk size"},
};

void print_list(const std::vector<OptionDoc>& options) {
  for (const OptionDoc& o : options) {
    fmt::print("  {:<22} - {}\n", fmt::format("{}=<{}>", o.name, o.type), o.text);
  }
}

}  // namespace

bool wants_option_help(const std::string& options) {
  const auto parsed = parse_options(options);
  return parsed.count("help") != 0 || parsed.count("?") != 0;
}

void print_create_option_help(const std::string& format) {
  if (format != "qcow2" && format != "raw") {
    throw UsageError(fmt::format("Unknown file format '{}'", format));
  }
  fmt::print("Supported {} options:\n", format);
  print_list(format == "qcow2" ? kQcow2CreateOptions : kRawCreateOptions);
}

void print_amend_option_help() {
  fmt::print("Amend options for 'qcow2':\n");
  print_list(kQcow2AmendOptions);
}

}  // namespace kiln::img
