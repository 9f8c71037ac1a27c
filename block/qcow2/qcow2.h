// qcow2 images: a synchronous, thread-safe Image (one mutex) plus the chain it reads through.
// The asynchronous BlockDevice adapter lives in qcow2_device.h.
//
// Crash consistency: data clusters and metadata are kept in write-back caches and written in
// dependency order by flush() (and on L2 cache eviction): data + refcount blocks, fdatasync,
// refcount table, fdatasync, L2 tables, fdatasync, L1 table, fdatasync. A crash therefore leaves
// at worst leaked clusters (refcount > references), never a reference to an unrefcounted cluster.
// Clusters are freed only after the tables that stopped referencing them are on disk.
#pragma once

#include <sys/types.h>

#include <condition_variable>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "base/unique_fd.h"
#include "block/block_device.h"
#include "block/qcow2/qcow2_format.h"

namespace kiln::block::qcow2 {

struct OpenOptions {
  bool read_only = true;
  CacheMode cache = CacheMode::kWriteback;
  // Bytes of L2 tables kept in memory; 0 = enough to map the whole image, capped at 32 MiB.
  uint64_t l2_cache_bytes = 0;
  // qemu-img -U: take no locks, so an image another process writes can still be inspected.
  bool force_share = false;
  // Format of the top image: "" probes (qcow2 magic, else raw), "qcow2" or "raw".
  std::string format;
  // cache=unsafe (qemu-img convert's default): flush() still writes metadata in order but skips
  // fdatasync, so nothing is durable until the OS writes it back.
  bool unsafe = false;
  // Worker threads of the BlockDevice adapter.
  unsigned workers = 2;
  // Open the image alone, without its backing chain: unallocated clusters read as zeros
  // (qemu-img rebase -u, and images whose backing file is gone).
  bool no_backing = false;
};

enum class DataPreallocation { kNone, kFalloc, kFull };

// Makes [offset, offset+length) of `fd` allocated: fallocate, or zeros written (kFull).
void preallocate_range(int fd, uint64_t offset, uint64_t length, DataPreallocation mode);

struct CreateOptions {
  uint64_t size = 0;
  uint32_t cluster_size = 65536;
  uint32_t version = 3;  // 2 = compat 0.10, 3 = compat 1.1
  uint32_t refcount_bits = 16;
  std::string backing_file;
  std::string backing_format;
  CompressionType compression_type = CompressionType::kZlib;
  bool preallocate_metadata = false;
  // With preallocate_metadata: also reserve the data clusters (fallocate) or write them as
  // zeros (full), as qemu-img create -o preallocation=falloc|full does.
  DataPreallocation data_preallocation = DataPreallocation::kNone;
  bool lazy_refcounts = false;
  // Extended L2 entries (32 subclusters per cluster); needs compat 1.1 and 16 KiB clusters.
  bool extended_l2 = false;
};

// qemu-img amend: only what is given changes.
struct AmendOptions {
  std::optional<uint32_t> version;  // 2 = compat 0.10, 3 = compat 1.1
  std::optional<uint32_t> refcount_bits;
  std::optional<bool> lazy_refcounts;
  std::optional<uint64_t> size;
};

// What one guest range of one layer maps to.
enum class ExtentKind { kUnallocated, kZero, kData, kCompressed };
struct Extent {
  uint64_t start = 0;
  uint64_t length = 0;
  ExtentKind kind = ExtentKind::kUnallocated;
  // kData: where the data is. kZero and kUnallocated: the preallocated host cluster, if any
  // (QEMU's map reports its offset too); 0 otherwise.
  uint64_t host_offset = 0;
};

// A synchronous image of any format, as the chain sees it.
class SyncImage {
 public:
  virtual ~SyncImage() = default;
  virtual std::string format() const = 0;
  virtual std::string path() const = 0;
  virtual uint64_t size() const = 0;
  // Bytes past size() read as zeros.
  virtual void read(uint64_t offset, std::span<uint8_t> buf) = 0;
  // Mapping of [offset, offset+length) in this layer only, starting at `offset`; returns one
  // extent (possibly shorter than asked).
  virtual Extent block_status(uint64_t offset, uint64_t length) = 0;
  virtual SyncImage* backing() const { return nullptr; }
  // Bytes the file occupies on disk (st_blocks * 512).
  virtual uint64_t actual_size() const = 0;
};

// A raw file opened synchronously (used for raw backing files and as a kiln-img endpoint).
class RawImage : public SyncImage {
 public:
  static std::unique_ptr<RawImage> open(const std::string& path, bool read_only, bool force_share,
                                        CacheMode cache = CacheMode::kWriteback);
  static void create(const std::string& path, uint64_t size,
                     DataPreallocation prealloc = DataPreallocation::kNone);
  std::string format() const override { return "raw"; }
  std::string path() const override { return path_; }
  uint64_t size() const override { return size_; }
  void read(uint64_t offset, std::span<uint8_t> buf) override;
  void write(uint64_t offset, std::span<const uint8_t> buf);
  Extent block_status(uint64_t offset, uint64_t length) override;
  uint64_t actual_size() const override;
  void flush();
  int fd() const { return fd_.get(); }

 private:
  // The run of data or hole around [offset, ...) as SEEK_DATA/SEEK_HOLE report it, whole.
  Extent find_run(uint64_t offset) const;

  UniqueFd fd_;
  std::string path_;
  uint64_t size_ = 0;
  // Read-only, and our shared lock keeps writers out: nothing changes the file's runs.
  bool runs_are_stable_ = false;
  // The last run found, when the runs are stable: convert asks chunk by chunk, and one or two
  // lseeks then answer for every chunk of a long run. Readers share it.
  std::mutex run_mutex_;
  Extent last_run_{0, 0, ExtentKind::kZero, 0};
};

struct CheckResult {
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  uint64_t check_errors = 0;
  uint64_t corruptions_fixed = 0;
  uint64_t leaks_fixed = 0;
  uint64_t allocated_clusters = 0;
  uint64_t total_clusters = 0;
  uint64_t fragmented_clusters = 0;
  uint64_t compressed_clusters = 0;
  uint64_t image_end_offset = 0;
  std::vector<std::string> messages;  // one line per problem, qemu-img style
};
enum class RepairMode { kNone, kLeaks, kAll };

// One internal snapshot's table entry (docs/interop/qcow2.txt, "Snapshot table").
struct SnapshotInfo {
  std::string id, name;
  uint64_t l1_table_offset = 0;
  uint32_t l1_size = 0;
  uint32_t date_sec = 0, date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  uint64_t vm_state_size = 0;
  uint64_t disk_size = 0;
  int64_t icount = -1;  // -1: not recorded
};

class Image : public SyncImage {
 public:
  // Opens `path` and its whole backing chain. Throws Qcow2Error for malformed images and
  // std::system_error for I/O and locking failures.
  static std::unique_ptr<Image> open(const std::string& path, const OpenOptions& opts);
  static void create(const std::string& path, const CreateOptions& opts);
  ~Image() override;

  std::string format() const override { return "qcow2"; }
  std::string path() const override { return path_; }
  uint64_t size() const override { return header_.size; }
  uint64_t actual_size() const override;
  void read(uint64_t offset, std::span<uint8_t> buf) override;
  // read(), but only if it needs no metadata from the file and its data is in the page cache:
  // false (buf then holds anything) where it would block, or where read() has more to do
  // (zeros, backing file, compressed clusters, errors), so that an asynchronous caller can
  // answer cached reads on its own thread and hand only the rest to a worker. Never under
  // cache=none.
  bool try_read_cached(uint64_t offset, std::span<uint8_t> buf);
  Extent block_status(uint64_t offset, uint64_t length) override;
  SyncImage* backing() const override { return backing_.get(); }
  // QEMU's test for an image made with preallocation=metadata: more clusters in use than the
  // file has blocks, by a margin. Its data clusters may then be holes in the host file, which
  // QEMU's block status (map) reports as zero. Decided once per open, as QEMU does.
  bool looks_metadata_preallocated();

  void write(uint64_t offset, std::span<const uint8_t> buf);
  // Whole, unallocated guest cluster written compressed (qemu-img convert -c); falls back to a
  // normal write when the data does not shrink. The image's last cluster may be short.
  void write_compressed(uint64_t offset, std::span<const uint8_t> cluster);
  // The same with the cluster already compressed by compress(), so that callers can compress
  // on many threads; an empty `compressed` writes the cluster uncompressed.
  void write_compressed(uint64_t offset, std::span<const uint8_t> cluster,
                        std::span<const uint8_t> compressed);
  // The cluster in this image's compression type; empty when compression would not save space.
  // Thread-safe: needs no image state that changes.
  std::vector<uint8_t> compress(std::span<const uint8_t> cluster) const;
  // Extends the file to a whole number of 512-byte sectors, as qemu-img convert -c leaves it
  // after its last compressed cluster (their descriptors count whole sectors).
  void align_file_end_to_sector();
  void write_zeroes(uint64_t offset, uint64_t length, bool may_unmap);
  void discard(uint64_t offset, uint64_t length);
  void flush();
  // Changes the virtual size. Growing relocates the L1 table when it must grow; shrinking
  // (qcow2_shrink.cpp) drops every cluster past the new end, as qemu-img resize --shrink does.
  void resize(uint64_t new_size);
  CheckResult check(RepairMode mode);
  // The internal snapshot table, validated (Qcow2Error for entries past the file's end).
  std::vector<SnapshotInfo> snapshots();
  // Internal snapshots as qemu-img snapshot -c/-d/-a make them: refcounts of everything the L1
  // table reaches change by one and the COPIED flags of the active tables follow. As in QEMU,
  // apply finds the snapshot by ID first, then by name, and delete by name only (the first one);
  // std::system_error(ENOENT) when there is none.
  void create_snapshot(const std::string& name);
  void delete_snapshot(const std::string& name);
  void apply_snapshot(const std::string& id_or_name);
  // Drops every cluster the active L1 table maps (qemu's make_empty after commit), so the image
  // reads through to its backing file again; freed clusters lose their references on flush.
  void make_empty();
  // Rewrites the header to name another backing file ("" removes it) with its format. Only the
  // header changes: the chain this Image has open stays as it was.
  void set_backing_file(const std::string& file, const std::string& format);
  // Changes compat level, refcount width, lazy refcounts and (growing) size in place
  // (qcow2_amend.cpp). Throws Qcow2Error with qemu-img's message for what cannot be done.
  void amend(const AmendOptions& opts);

  bool read_only() const { return read_only_; }
  const Header& header() const { return header_; }
  uint64_t cluster_size() const { return cluster_size_; }
  uint32_t refcount_bits() const { return 1u << header_.refcount_order; }
  std::string backing_format() const { return backing_format_of(header_); }
  bool extended_l2() const { return header_.incompatible_features & kIncompatExtendedL2; }
  // Guest bytes one L2 table maps.
  uint64_t l2_span() const { return cluster_size_ * l2_entries(); }

 private:
  struct L2Table {
    uint64_t offset = 0;
    std::vector<L2Entry> entries;
    bool dirty = false;
  };
  struct RefBlock {
    std::vector<uint8_t> raw;
    bool dirty = false;
  };
  struct Exclusion {
    uint64_t begin, end;  // cluster indexes being allocated but not yet refcounted
  };

  Image() = default;
  void load(const OpenOptions& opts, std::vector<std::pair<dev_t, ino_t>>& chain);
  std::vector<uint8_t> read_first_cluster(uint64_t fsize) const;
  void validate_tables();
  void open_backing(const OpenOptions& opts, std::vector<std::pair<dev_t, ino_t>>& chain);
  void write_header();
  uint64_t file_size() const;

  // Mapping.
  uint64_t l2_entries() const { return cluster_size_ / l2_entry_bytes(); }
  uint64_t l2_entry_bytes() const { return extended_l2() ? 16 : 8; }
  // Subclusters: 32 per cluster with extended L2 entries, else the cluster is the only one.
  uint32_t subclusters() const { return extended_l2() ? kSubclustersPerCluster : 1; }
  uint64_t subcluster_size() const { return cluster_size_ / subclusters(); }
  // What subcluster `sc` of a cluster with this entry reads as. Throws Qcow2Error for entries
  // whose subcluster bitmap is invalid (QEMU refuses those with EIO too).
  ExtentKind subcluster_kind(const L2Entry& e, uint32_t sc, uint64_t guest_offset) const;
  L2Table* get_l2(uint64_t l1_index, bool allocate);
  L2Table* load_l2(uint64_t offset);
  void evict_l2_if_needed();
  void write_l2(L2Table& t);
  L2Entry l2_entry(uint64_t guest_cluster);
  // The entry if its L2 table is in the cache (nullptr otherwise); never reads the file.
  const L2Entry* cached_l2_entry(uint64_t guest_cluster);
  void set_l2_entry(uint64_t guest_cluster, const L2Entry& entry);
  bool valid_data_offset(uint64_t host) const;
  void check_data_offset(uint64_t host, uint64_t guest_offset) const;
  // Header, L1, refcount table or a refcount block; with_l2 adds the active L2 tables.
  bool is_metadata(uint64_t host_cluster_offset, bool with_l2 = true) const;

  // Reads/writes within one guest cluster.
  bool plain_data(const L2Entry& entry, uint64_t in_cluster, uint64_t n) const;
  void read_cluster_part(uint64_t offset, std::span<uint8_t> buf);
  void read_subclusters(const L2Entry& entry, uint64_t offset, std::span<uint8_t> buf);
  void read_compressed(uint64_t entry, std::vector<uint8_t>& out);
  void read_from_backing(uint64_t offset, std::span<uint8_t> buf);
  uint64_t plain_run(uint64_t offset, uint64_t host, uint64_t n, uint64_t max, bool cached_only);
  uint64_t write_new_run(uint64_t offset, std::span<const uint8_t> buf);
  void write_cluster_part(uint64_t offset, std::span<const uint8_t> buf);
  void write_subclusters(uint64_t offset, std::span<const uint8_t> buf);
  // True when the guest cluster currently reads as all zeros without looking at data.
  bool cow_source_is_zero(uint64_t entry, uint64_t guest_cluster) const;
  // Makes a host cluster read as zeros with fallocate; false when the file system cannot.
  bool zero_host_cluster(uint64_t host);
  void zero_cluster(uint64_t guest_cluster, bool unmap);
  void zero_subclusters(uint64_t offset, uint64_t length);
  void discard_cluster(uint64_t guest_cluster);
  void release_entry_later(uint64_t entry);

  // Refcounts.
  uint64_t refcount_block_entries() const { return cluster_size_ * 8 / refcount_bits(); }
  uint64_t max_refcount() const;
  RefBlock* refblock(uint64_t block_index, bool create);
  uint64_t get_refcount(uint64_t cluster);
  void set_refcount(uint64_t cluster, uint64_t value);
  void ensure_refcount_block(uint64_t block_index);
  void grow_refcount_table(uint64_t block_index);
  bool excluded(uint64_t cluster) const;
  uint64_t find_free_run(uint64_t count);
  uint64_t alloc_clusters(uint64_t count);
  uint64_t place_compressed(uint64_t length);  // host offset for a compressed blob
  void flush_refcounts();
  void flush_locked();
  void resize_locked(uint64_t new_size);
  void write_zeroes_locked(uint64_t offset, uint64_t length, bool may_unmap);
  void grow_l1_locked(uint64_t entries);
  void shrink_locked(uint64_t new_size);
  void drop_l2_table_locked(uint64_t l1_index);
  void drop_empty_refcount_blocks_locked();
  void truncate_after_last_cluster_locked();
  void apply_deferred_frees();
  void sync_file();

  mutable std::mutex mu_;
  // Data reads in progress without mu_ held (read()); frees wait for them to finish.
  uint64_t unlocked_reads_ = 0;
  std::condition_variable_any unlocked_reads_done_;
  UniqueFd fd_;
  std::string path_;
  bool read_only_ = true;
  bool unsafe_ = false;
  bool page_cache_ = true;  // opened without O_DIRECT
  Header header_;
  uint64_t cluster_size_ = 0;
  std::unique_ptr<SyncImage> backing_;
  std::optional<bool> metadata_preallocated_;

  std::vector<uint64_t> l1_;
  uint64_t l1_dirty_begin_ = UINT64_MAX, l1_dirty_end_ = 0;
  std::list<L2Table> l2_lru_;  // front = most recently used
  std::unordered_map<uint64_t, std::list<L2Table>::iterator> l2_index_;
  size_t l2_capacity_ = 16;

  // Host offsets of refcount blocks and L2 tables: data must never be read from or written to
  // them, whatever an untrusted L2 entry says.
  std::unordered_set<uint64_t> refblock_clusters_, l2_clusters_;
  void rebuild_metadata_set();
  // Amend (qcow2_amend.cpp): expands zero clusters so the image can become version 2, and
  // rebuilds the refcount table and blocks at another width.
  void downgrade_to_v2();
  void rewrite_refcounts(uint32_t new_order);

  // Snapshots (qcow2_snapshot.cpp).
  struct RawSnapshot {
    SnapshotInfo info;
    std::vector<uint8_t> bytes;  // the whole entry, padded to 8 bytes
  };
  std::vector<RawSnapshot> read_snapshots_locked();
  void write_snapshot_table(const std::vector<RawSnapshot>& list);
  size_t find_snapshot(const std::vector<RawSnapshot>& list, const std::string& id_or_name,
                       bool by_id) const;
  std::vector<uint64_t> read_l1(uint64_t offset, uint32_t size);
  // Adds `addend` (+1, -1 or 0) to the refcount of every L2 table and cluster `l1` reaches and
  // sets the COPIED flags from the new refcounts; `active` marks changed l1_ entries dirty.
  void update_snapshot_refcounts(std::vector<uint64_t>& l1, int addend, bool active);
  uint64_t adjust_refcount(uint64_t cluster, int addend);

  std::vector<uint64_t> refcount_table_;
  bool refcount_table_dirty_ = false;
  std::unordered_map<uint64_t, RefBlock> refblocks_;
  uint64_t free_hint_ = 1;
  std::vector<Exclusion> exclusions_;
  std::vector<uint64_t>* check_in_use_ = nullptr;  // repair: references found by check
  uint64_t compressed_cursor_ = 0;                 // next free byte in a compressed cluster
  std::vector<uint64_t> deferred_frees_;           // L2 entries dropped, freed after flush
  bool data_dirty_ = false;

  uint64_t last_compressed_entry_ = 0;
  std::vector<uint8_t> last_compressed_;

  // Check (qcow2_check.cpp).
  struct L2Ref {
    uint64_t table_offset;  // 0 for the L1 entry itself
    uint64_t index;
    uint64_t entry;
  };
  void check_l2_entry(const L2Entry& e, uint32_t x, bool active, uint64_t& last_host,
                      std::vector<uint64_t>& refs, CheckResult& r);
  CheckResult check_locked(std::vector<uint64_t>& refs, std::vector<L2Ref>& copied_errors);
  void walk_l1(uint64_t l1_offset, uint64_t l1_size, bool active, std::vector<uint64_t>& refs,
               CheckResult& r);
  void add_refs(uint64_t offset, uint64_t length, std::vector<uint64_t>& refs, CheckResult& r,
                const char* what);
  void note_allocation(uint64_t cluster);
  void repair(RepairMode mode, std::vector<uint64_t>& refs, const std::vector<L2Ref>& copied);
};

// Opens any supported image: qcow2 (with chain) or raw. `format` as in OpenOptions.
std::unique_ptr<SyncImage> open_image(const std::string& path, const OpenOptions& opts);
// "qcow2" if the file starts with the qcow2 magic, else "raw".
std::string probe_format(const std::string& path);

// Size given as a qemu-img size string ("1G", "512K", "10M", "1T", "4096", "1.5G").
uint64_t parse_size(const std::string& text);

}  // namespace kiln::block::qcow2
