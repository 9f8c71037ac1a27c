// Shared pieces of the kiln-img subcommands (qemu-img compatible command line and output).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "block/qcow2/qcow2.h"

namespace kiln::img {

// A usage or argument error: printed as "kiln-img: <message>", exit status 1.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Parses "-o a=b,c=d" (values may contain ",," for a literal comma, as in qemu-img).
std::map<std::string, std::string> parse_options(const std::string& text);
// "-o help" / "-o ?": print the options the format takes (qemu-img's layout) and exit 0.
bool wants_option_help(const std::string& options);
void print_create_option_help(const std::string& format);  // UsageError for an unknown format
void print_amend_option_help();                            // qcow2's; no other format amends
// qemu's size_to_str(): "388 KiB", "1 GiB".
std::string human_size(uint64_t bytes);

// Applies qcow2 "-o" options (create and convert share them).
void apply_qcow2_options(const std::map<std::string, std::string>& opts,
                         block::qcow2::CreateOptions& o, bool& compat_given);

// Where a chain position comes from, as qemu-img map reports it.
struct ChainStatus {
  uint64_t start = 0, length = 0;
  int depth = 0;
  bool present = false, zero = true, data = false;
  bool has_offset = false;
  uint64_t offset = 0;
  std::string file;
};
ChainStatus chain_status(block::qcow2::SyncImage& top, uint64_t offset, uint64_t length);
// Looks through a qcow2 data extent at the host file, as QEMU's block status does: true when
// [host, host + length) starts in a hole or past the file's end (it reads as zeros); `length`
// shrinks to the run of hole or data that starts at `host`.
bool host_file_hole(const std::string& path, uint64_t host, uint64_t& length);

// A whole chain's block status as QEMU's bdrv_block_status_above() reports it (flag values are
// QEMU's BDRV_BLOCK_*): compare -s compares these words.
struct QemuStatus {
  static constexpr int kData = 0x01, kZero = 0x02, kOffsetValid = 0x04, kAllocated = 0x10,
                       kEof = 0x20;
  uint64_t length = 0;
  int flags = 0;
};
QemuStatus qemu_block_status(block::qcow2::SyncImage& top, uint64_t offset, uint64_t bytes);
// Size as QEMU sees it: rounded up to whole sectors.
uint64_t image_length(block::qcow2::SyncImage& img);

block::qcow2::OpenOptions read_options(const std::string& fmt, bool force_share);

// qemu-img's cache modes for -t and -T: none (alias off), writeback, writethrough, directsync,
// unsafe.
bool valid_cache_mode(const std::string& mode);
// none/off and directsync bypass the host page cache (O_DIRECT); the others go through it.
block::CacheMode page_cache_mode(const std::string& mode);

int cmd_create(int argc, char** argv);
int cmd_info(int argc, char** argv);
int cmd_check(int argc, char** argv);
int cmd_convert(int argc, char** argv);
int cmd_map(int argc, char** argv);
int cmd_resize(int argc, char** argv);
// The command summary `kiln-img --help` prints.
void print_usage();

int cmd_compare(int argc, char** argv);
int cmd_measure(int argc, char** argv);
int cmd_dd(int argc, char** argv);
int cmd_commit(int argc, char** argv);
int cmd_rebase(int argc, char** argv);
int cmd_snapshot(int argc, char** argv);
int cmd_bench(int argc, char** argv);
int cmd_amend(int argc, char** argv);
// qemu's "Snapshot list:" table (snapshot -l and info); prints nothing for no snapshots.
void print_snapshot_list(const std::vector<block::qcow2::SnapshotInfo>& list);

}  // namespace kiln::img
