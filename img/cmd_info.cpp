// kiln-img info
#include <fmt/format.h>
#include <getopt.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "img/common.h"

namespace kiln::img {
namespace {

using block::qcow2::Image;
using block::qcow2::SyncImage;
using nlohmann::ordered_json;

ordered_json info_json(SyncImage& img, const std::string& filename) {
  ordered_json j;
  auto* q = dynamic_cast<Image*>(&img);
  if (q) {
    const auto list = q->snapshots();
    for (const auto& sn : list) {
      ordered_json e;
      if (sn.icount != -1) e["icount"] = sn.icount;
      e["vm-clock-nsec"] = sn.vm_clock_nsec % 1000000000;
      e["name"] = sn.name;
      e["date-sec"] = sn.date_sec;
      e["date-nsec"] = sn.date_nsec;
      e["vm-clock-sec"] = sn.vm_clock_nsec / 1000000000;
      e["id"] = sn.id;
      e["vm-state-size"] = sn.vm_state_size;
      j["snapshots"].push_back(e);
    }
  }
  const bool has_backing = q && !q->header().backing_file.empty();
  if (has_backing && !q->backing_format().empty()) {
    j["backing-filename-format"] = q->backing_format();
  }
  j["virtual-size"] = img.size();
  j["filename"] = filename;
  if (q) j["cluster-size"] = q->cluster_size();
  j["format"] = img.format();
  j["actual-size"] = img.actual_size();
  if (q) {
    const auto& h = q->header();
    ordered_json data;
    data["compat"] = h.version >= 3 ? "1.1" : "0.10";
    data["compression-type"] =
        h.compression_type == block::qcow2::CompressionType::kZstd ? "zstd" : "zlib";
    if (h.version >= 3) data["lazy-refcounts"] = bool(h.compatible_features & 1);
    data["refcount-bits"] = q->refcount_bits();
    if (h.version >= 3) {
      data["corrupt"] = bool(h.incompatible_features & block::qcow2::kIncompatCorrupt);
      data["extended-l2"] = bool(h.incompatible_features & block::qcow2::kIncompatExtendedL2);
    }
    j["format-specific"] = {{"type", "qcow2"}, {"data", data}};
  }
  if (has_backing) {
    j["full-backing-filename"] = q->backing() ? q->backing()->path() : q->header().backing_file;
    j["backing-filename"] = q->header().backing_file;
  }
  j["dirty-flag"] = q ? bool(q->header().incompatible_features & 1) : false;
  return j;
}

void print_human(const ordered_json& j) {
  fmt::print("image: {}\n", j["filename"].get<std::string>());
  fmt::print("file format: {}\n", j["format"].get<std::string>());
  const uint64_t vsize = j["virtual-size"];
  fmt::print("virtual size: {} ({} bytes)\n", human_size(vsize), vsize);
  fmt::print("disk size: {}\n", human_size(j["actual-size"].get<uint64_t>()));
  if (j.contains("cluster-size"))
    fmt::print("cluster_size: {}\n", j["cluster-size"].get<uint64_t>());
  if (j.contains("backing-filename")) {
    const std::string b = j["backing-filename"], full = j["full-backing-filename"];
    if (b == full) {
      fmt::print("backing file: {}\n", b);
    } else {
      fmt::print("backing file: {} (actual path: {})\n", b, full);
    }
  }
  if (j.contains("backing-filename-format")) {
    fmt::print("backing file format: {}\n", j["backing-filename-format"].get<std::string>());
  }
  if (j.contains("snapshots")) {
    std::vector<block::qcow2::SnapshotInfo> list;
    for (const auto& e : j["snapshots"]) {
      block::qcow2::SnapshotInfo sn;
      sn.id = e["id"];
      sn.name = e["name"];
      sn.date_sec = e["date-sec"];
      sn.date_nsec = e["date-nsec"];
      sn.vm_clock_nsec =
          e["vm-clock-sec"].get<uint64_t>() * 1000000000 + e["vm-clock-nsec"].get<uint64_t>();
      sn.vm_state_size = e["vm-state-size"];
      sn.icount = e.contains("icount") ? e["icount"].get<int64_t>() : -1;
      list.push_back(sn);
    }
    std::fflush(stdout);
    print_snapshot_list(list);
    std::fflush(stdout);
  }
  if (j.contains("format-specific")) {
    fmt::print("Format specific information:\n");
    for (const auto& [k, v] : j["format-specific"]["data"].items()) {
      std::string key = k;
      std::replace(key.begin(), key.end(), '-', ' ');
      fmt::print("    {}: {}\n", key, v.is_string() ? v.get<std::string>() : v.dump());
    }
  }
}

}  // namespace

int cmd_info(int argc, char** argv) {
  std::string fmt, output = "human";
  bool force_share = false, chain = false;
  optind = 1;
  static const option kLong[] = {{"output", required_argument, nullptr, 'O'},
                                 {"backing-chain", no_argument, nullptr, 'B'},
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
      case 'B':
        chain = true;
        break;
      case 'U':
        force_share = true;
        break;
      default:
        throw UsageError("Invalid option or missing argument for info");
    }
  }
  if (output != "human" && output != "json") {
    throw UsageError("--output must be used with human or json as argument.");
  }
  if (optind != argc - 1) throw UsageError("Expecting one image file name");
  const std::string file = argv[optind];
  auto img = block::qcow2::open_image(file, read_options(fmt, force_share));
  std::vector<ordered_json> infos;
  std::string name = file;
  for (SyncImage* layer = img.get(); layer; layer = layer->backing()) {
    infos.push_back(info_json(*layer, layer == img.get() ? file : layer->path()));
    if (!chain) break;
  }
  if (output == "json") {
    if (chain) {
      fmt::print("{}\n", ordered_json(infos).dump(4));
    } else {
      fmt::print("{}\n", infos[0].dump(4));
    }
    return 0;
  }
  for (size_t i = 0; i < infos.size(); ++i) {
    if (i) fmt::print("\n");
    print_human(infos[i]);
  }
  return 0;
}

}  // namespace kiln::img
