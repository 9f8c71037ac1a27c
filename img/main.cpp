// kiln-img: the image tool (qemu-img's job, same subcommands, options, output and exit codes).
#include <fmt/format.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <system_error>

#include "img/common.h"

namespace kiln::img {

std::map<std::string, std::string> parse_options(const std::string& text) {
  std::map<std::string, std::string> out;
  std::string item;
  auto finish = [&] {
    if (item.empty()) return;
    const auto eq = item.find('=');
    if (eq == std::string::npos) {
      out[item] = "on";
    } else {
      out[item.substr(0, eq)] = item.substr(eq + 1);
    }
    item.clear();
  };
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == ',') {
      if (i + 1 < text.size() && text[i + 1] == ',') {
        item += ',';
        ++i;
        continue;
      }
      finish();
      continue;
    }
    item += text[i];
  }
  finish();
  return out;
}

std::string human_size(uint64_t val) {
  static const char* kSuffixes[] = {"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"};
  int exp = 0;
  std::frexp(double(val) / (1000.0 / 1024.0), &exp);
  int i = (exp - 1) / 10;
  if (i < 0) i = 0;
  if (i > 6) i = 6;
  const uint64_t div = 1ull << (i * 10);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%0.3g %sB", double(val) / double(div), kSuffixes[i]);
  return buf;
}

block::qcow2::OpenOptions read_options(const std::string& fmt, bool force_share) {
  block::qcow2::OpenOptions o;
  o.read_only = true;
  o.force_share = force_share;
  o.format = fmt;
  return o;
}

bool valid_cache_mode(const std::string& mode) {
  for (const char* m : {"none", "off", "writeback", "unsafe", "directsync", "writethrough"}) {
    if (mode == m) return true;
  }
  return false;
}

block::CacheMode page_cache_mode(const std::string& mode) {
  const bool direct = mode == "none" || mode == "off" || mode == "directsync";
  return direct ? block::CacheMode::kNone : block::CacheMode::kWriteback;
}

void print_usage() {
  std::puts(
      "kiln-img: image tool compatible with qemu-img\n"
      "usage: kiln-img [standard options] command [command options]\n\n"
      "Command syntax:\n"
      "  check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename\n"
      "  create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-o options] filename [size]\n"
      "  convert [-c] [-n] [-p] [-q] [-U] [-W] [-m num_coroutines] [-S sparse_size] [-t cache] [-T "
      "src_cache] [-f fmt] "
      "[-O output_fmt] "
      "[-B backing_file [-F backing_fmt]] [-o options] filename output_filename\n"
      "  info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename\n"
      "  map [-f fmt] [--output=ofmt] [-U] filename\n"
      "  resize [-f fmt] [--shrink] [-q] filename [+ | -]size\n"
      "  compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2\n"
      "  measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [-f fmt] [-U] "
      "filename]\n"
      "  dd [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] "
      "if=input of=output\n"
      "  commit [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename\n"
      "  rebase [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file "
      "[-F backing_fmt] filename\n"
      "  snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename\n"
      "  bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] "
      "[--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] "
      "[-t cache] [-w] [-U] filename\n"
      "  amend [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename");
}

}  // namespace kiln::img

int main(int argc, char** argv) {
  using namespace kiln::img;
  if (argc < 2) {
    std::fputs("kiln-img: Not enough arguments\nTry 'kiln-img --help' for more information\n",
               stderr);
    return 1;
  }
  const std::string cmd = argv[1];
  if (cmd == "-h" || cmd == "--help" || cmd == "help") {
    print_usage();
    return 0;
  }
  try {
    if (cmd == "create") return cmd_create(argc - 1, argv + 1);
    if (cmd == "info") return cmd_info(argc - 1, argv + 1);
    if (cmd == "check") return cmd_check(argc - 1, argv + 1);
    if (cmd == "convert") return cmd_convert(argc - 1, argv + 1);
    if (cmd == "map") return cmd_map(argc - 1, argv + 1);
    if (cmd == "resize") return cmd_resize(argc - 1, argv + 1);
    if (cmd == "compare") return cmd_compare(argc - 1, argv + 1);
    if (cmd == "measure") return cmd_measure(argc - 1, argv + 1);
    if (cmd == "dd") return cmd_dd(argc - 1, argv + 1);
    if (cmd == "commit") return cmd_commit(argc - 1, argv + 1);
    if (cmd == "rebase") return cmd_rebase(argc - 1, argv + 1);
    if (cmd == "snapshot") return cmd_snapshot(argc - 1, argv + 1);
    if (cmd == "bench") return cmd_bench(argc - 1, argv + 1);
    if (cmd == "amend") return cmd_amend(argc - 1, argv + 1);
    fmt::print(stderr, "kiln-img: Command not found: {}\n", cmd);
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "kiln-img: {}\n", e.what());
    return 1;
  }
}
