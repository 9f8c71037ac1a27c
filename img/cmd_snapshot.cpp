// kiln-img snapshot: internal qcow2 snapshots. -l lists them as qemu-img does.
#include <fmt/format.h>
#include <getopt.h>

#include <cstdio>
#include <ctime>

#include "img/common.h"

namespace kiln::img {

void print_snapshot_list(const std::vector<block::qcow2::SnapshotInfo>& list) {
  if (list.empty()) return;
  std::printf("Snapshot list:\n");
  std::printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
  for (const auto& sn : list) {
    char date[128];
    std::tm tm{};
    const std::time_t t = sn.date_sec;
    ::localtime_r(&t, &tm);
    std::strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S", &tm);
    const uint64_t secs = sn.vm_clock_nsec / 1000000000;
    const std::string clock =
        fmt::format("{:02}:{:02}:{:02}.{:03}", int(secs / 3600), int((secs / 60) % 60),
                    int(secs % 60), int((sn.vm_clock_nsec / 1000000) % 1000));
    const std::string icount = sn.icount == -1 ? "" : std::to_string(sn.icount);
    std::printf("%-9s %-16s %8s%20s%13s%11s\n", sn.id.c_str(), sn.name.c_str(),
                human_size(sn.vm_state_size).c_str(), date, clock.c_str(), icount.c_str());
  }
}

int cmd_snapshot(int argc, char** argv) {
  enum Action { kNone, kList, kApply, kCreate, kDelete } action = kNone;
  std::string name;
  bool force_share = false;
  optind = 1;
  static const option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                 {"force-share", no_argument, nullptr, 'U'},
                                 {nullptr, 0, nullptr, 0}};
  auto set_action = [&](Action a) {
    if (action != kNone) {
      throw UsageError(
          "Cannot mix '-l', '-a', '-c', '-d'\nTry 'kiln-img --help' for more information");
    }
    action = a;
  };
  for (int c; (c = getopt_long(argc, argv, ":la:c:d:hqU", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'l':
        set_action(kList);
        break;
      case 'a':
        set_action(kApply);
        name = optarg;
        break;
      case 'c':
        set_action(kCreate);
        name = optarg;
        break;
      case 'd':
        set_action(kDelete);
        name = optarg;
        break;
      case 'q':
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
  if (optind != argc - 1) {
    throw UsageError("Expecting one image file name\nTry 'kiln-img --help' for more information");
  }
  const std::string file = argv[optind];
  auto opts = read_options("", force_share);
  opts.no_backing = true;
  std::unique_ptr<block::qcow2::SyncImage> img;
  try {
    img = block::qcow2::open_image(file, opts);
  } catch (const std::exception& e) {
    throw UsageError(fmt::format("Could not open '{}': {}", file, e.what()));
  }
  auto* q = dynamic_cast<block::qcow2::Image*>(img.get());
  switch (action) {
    case kNone:
      return 0;
    case kList:
      if (q) print_snapshot_list(q->snapshots());
      return 0;
    case kCreate:
      throw UsageError(
          fmt::format("Could not create snapshot '{}': Operation not supported", name));
    case kApply:
      throw UsageError(fmt::format("Could not apply snapshot '{}': Operation not supported", name));
    case kDelete:
      throw UsageError(
          fmt::format("Could not delete snapshot '{}': Operation not supported", name));
  }
  return 0;
}

}  // namespace kiln::img
