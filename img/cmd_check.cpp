// kiln-img check: exit 0 clean, 1 check not completed, 2 corruptions, 3 leaks, 63 unsupported.
#include <fmt/format.h>
#include <getopt.h>

#include <nlohmann/json.hpp>

#include "img/common.h"

namespace kiln::img {
namespace {

using block::qcow2::CheckResult;
using block::qcow2::RepairMode;

void print_human(const CheckResult& r) {
  if (r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0) {
    fmt::print("No errors were found on the image.\n");
  } else {
    if (r.corruptions) {
      fmt::print(
          "\n{} errors were found on the image.\n"
          "Data may be corrupted, or further writes to the image may corrupt it.\n",
          r.corruptions);
    }
    if (r.leaks) {
      fmt::print(
          "\n{} leaked clusters were found on the image.\n"
          "This means waste of disk space, but no harm to data.\n",
          r.leaks);
    }
    if (r.check_errors) {
      fmt::print("\n{} internal errors have occurred during the check.\n", r.check_errors);
    }
  }
  if (r.total_clusters) {
    const double alloc = r.allocated_clusters;
    fmt::print("{}/{} = {:.2f}% allocated, {:.2f}% fragmented, {:.2f}% compressed clusters\n",
               r.allocated_clusters, r.total_clusters, alloc * 100 / double(r.total_clusters),
               alloc ? double(r.fragmented_clusters) * 100 / alloc : 0.0,
               alloc ? double(r.compressed_clusters) * 100 / alloc : 0.0);
  }
  if (r.image_end_offset) fmt::print("Image end offset: {}\n", r.image_end_offset);
}

void print_json(const CheckResult& r, const std::string& file) {
  nlohmann::ordered_json j;
  j["image-end-offset"] = r.image_end_offset;
  j["total-clusters"] = r.total_clusters;
  if (r.corruptions) j["corruptions"] = r.corruptions;
  j["check-errors"] = r.check_errors;
  if (r.leaks) j["leaks"] = r.leaks;
  if (r.corruptions_fixed) j["corruptions-fixed"] = r.corruptions_fixed;
  if (r.leaks_fixed) j["leaks-fixed"] = r.leaks_fixed;
  j["allocated-clusters"] = r.allocated_clusters;
  j["filename"] = file;
  j["format"] = "qcow2";
  if (r.fragmented_clusters) j["fragmented-clusters"] = r.fragmented_clusters;
  if (r.compressed_clusters) j["compressed-clusters"] = r.compressed_clusters;
  fmt::print("{}\n", j.dump(4));
}

}  // namespace

int cmd_check(int argc, char** argv) {
  std::string fmt, output = "human", cache = "writeback";
  bool force_share = false, quiet = false;
  RepairMode mode = RepairMode::kNone;
  optind = 1;
  static const option kLong[] = {{"output", required_argument, nullptr, 'O'},
                                 {"repair", required_argument, nullptr, 'r'},
                                 {"force-share", no_argument, nullptr, 'U'},
                                 {"help", no_argument, nullptr, 'h'},
                                 {nullptr, 0, nullptr, 0}};
  for (int c; (c = getopt_long(argc, argv, ":f:hr:qT:U", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'f':
        fmt = optarg;
        break;
      case 'O':
        output = optarg;
        break;
      case 'r':
        if (std::string(optarg) == "leaks") {
          mode = RepairMode::kLeaks;
        } else if (std::string(optarg) == "all") {
          mode = RepairMode::kAll;
        } else {
          throw UsageError("Invalid option for -r");
        }
        break;
      case 'q':
        quiet = true;
        break;
      case 'T':
        cache = optarg;
        break;
      case 'U':
        force_share = true;
        break;
      default:
        throw UsageError("Invalid option or missing argument for check");
    }
  }
  if (output != "human" && output != "json") {
    throw UsageError("--output must be used with human or json as argument.");
  }
  if (optind != argc - 1) throw UsageError("Expecting one image file name");
  if (!valid_cache_mode(cache)) throw UsageError("Invalid source cache option: " + cache);
  if (mode != RepairMode::kNone && force_share) {
    throw UsageError("--force-share/-U is not supported with -r");
  }
  const std::string file = argv[optind];
  if (fmt.empty()) fmt = block::qcow2::probe_format(file);
  if (fmt != "qcow2") {
    fmt::print(stderr, "kiln-img: This image format does not support checks\n");
    return 63;
  }
  auto opts = read_options(fmt, force_share);
  opts.read_only = mode == RepairMode::kNone;
  opts.cache = page_cache_mode(cache);
  auto img = block::qcow2::Image::open(file, opts);
  CheckResult r = img->check(mode);
  for (const auto& m : r.messages) fmt::print(stderr, "{}\n", m);
  if (output == "json") {
    print_json(r, file);
  } else if (!quiet) {
    if (r.leaks_fixed || r.corruptions_fixed) {
      fmt::print(
          "The following inconsistencies were found and repaired:\n\n"
          "    {} leaked clusters\n    {} corruptions\n\n"
          "Double checking the fixed image now...\n",
          r.leaks_fixed, r.corruptions_fixed);
    }
    print_human(r);
  }
  if (r.check_errors) return 1;
  if (r.corruptions) return 2;
  if (r.leaks) return 3;
  return 0;
}

}  // namespace kiln::img
