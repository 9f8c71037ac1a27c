// kiln-img snapshot: internal qcow2 snapshots, listed (-l), created (-c), applied (-a) and
// deleted (-d) as qemu-img does.
#include <fmt/format.h>
#include <getopt.h>

#include <cstdio>
#include <ctime>
#include <system_error>

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
  opts.read_only = action == kNone || action == kList;
  std::unique_ptr<block::qcow2::SyncImage> img;
  try {
    img = block::qcow2::open_image(file, opts);
  } catch (const std::exception& e) {
    throw UsageError(fmt::format("Could not open '{}': {}", file, e.what()));
  }
  auto* q = dynamic_cast<block::qcow2::Image*>(img.get());
  auto failure = [&](const char* what, const std::string& why) {
    return UsageError(fmt::format("Could not {} snapshot '{}': {}", what, name, why));
  };
  switch (action) {
    case kNone:
      return 0;
    case kList:
      if (q) print_snapshot_list(q->snapshots());
      return 0;
    case kCreate:
      if (!q) throw failure("create", "-95 (Operation not supported)");
      try {
        q->create_snapshot(name);
      } catch (const std::exception& e) {
        throw failure("create", e.what());
      }
      return 0;
    case kApply:
      if (!q) throw failure("apply", "Operation not supported");
      try {
        q->apply_snapshot(name);
      } catch (const std::system_error& e) {
        if (e.code().value() != ENOENT) throw failure("apply", e.what());
        throw failure("apply", "Failed to load snapshot: No such file or directory");
      } catch (const std::exception& e) {
        throw failure("apply", e.what());
      }
      return 0;
    case kDelete:
      if (!q) throw failure("delete", "Operation not supported");
      try {
        q->delete_snapshot(name);
      } catch (const std::system_error& e) {
        throw failure("delete", e.code().value() == ENOENT ? "snapshot not found" : e.what());
      } catch (const std::exception& e) {
        throw failure("delete", e.what());
      }
      return 0;
  }
  return 0;
}

}  // namespace kiln::img
