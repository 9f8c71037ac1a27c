#include "block/qcow2/qcow2.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "base/errors.h"
#include "base/math.h"
#include "block/qcow2/file_io.h"

namespace kiln::block::qcow2 {
namespace {

constexpr uint64_t kDefaultMaxL2Cache = 32ull << 20;
constexpr size_t kMaxChainDepth = 256;  // far beyond real use; bounds fds and recursion

// cache=none opens with O_DIRECT. Metadata I/O is small and unaligned (an L1 entry, a compressed
// cluster at a byte offset); file_io.cpp bounces such requests through aligned buffers.
UniqueFd open_file(const std::string& path, bool read_only, CacheMode cache) {
  int flags = (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  if (cache == CacheMode::kNone) flags |= O_DIRECT;
  UniqueFd fd(::open(path.c_str(), flags));
  if (fd) return fd;
  if (errno == EINVAL && cache == CacheMode::kNone) {
    throw std::system_error(
        errno, std::generic_category(),
        fmt::format("Could not open '{}': the file system does not support O_DIRECT "
                    "(cache=none); use cache=writeback",
                    path));
  }
  throw_errno(fmt::format("Could not open '{}'", path));
}

std::pair<dev_t, ino_t> file_id(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw_errno("fstat");
  return {st.st_dev, st.st_ino};
}

uint64_t allocated_bytes(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw_errno("fstat");
  return uint64_t(st.st_blocks) * 512;
}

// Backing file names are relative to the directory of the image that names them.
std::string resolve_backing_path(const std::string& image_path, const std::string& backing) {
  if (backing.empty() || backing[0] == '/') return backing;
  auto dir = std::filesystem::path(image_path).parent_path();
  return dir.empty() ? backing : (dir / backing).string();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Raw images

std::unique_ptr<RawImage> RawImage::open(const std::string& path, bool read_only, bool force_share,
                                         CacheMode cache) {
  auto img = std::unique_ptr<RawImage>(new RawImage());
  img->fd_ = open_file(path, read_only, cache);
  img->path_ = path;
  // Shared read-only opens let another process write meanwhile: ask the file every time.
  img->runs_are_stable_ = read_only && !force_share;
  lock_image(img->fd_.get(), path, read_only, force_share);
  img->size_ = fd_size(img->fd_.get());
  return img;
}

void preallocate_range(int fd, uint64_t offset, uint64_t length, DataPreallocation mode) {
  if (mode == DataPreallocation::kNone || length == 0) return;
  if (mode == DataPreallocation::kFalloc) {
    const int rc = ::posix_fallocate(fd, off_t(offset), off_t(length));
    if (rc != 0) throw std::system_error(rc, std::generic_category(), "Could not preallocate data");
    return;
  }
  const std::vector<uint8_t> zeros(std::min<uint64_t>(length, 4ull << 20), 0);
  for (uint64_t done = 0; done < length;) {
    const uint64_t n = std::min<uint64_t>(zeros.size(), length - done);
    pwrite_all(fd, std::span(zeros).first(n), offset + done);
    done += n;
  }
}

void RawImage::create(const std::string& path, uint64_t size, DataPreallocation prealloc) {
  // Truncate only once the write lock is ours: an image another process (or this one) has open
  // must not lose its contents to a failed create.
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!fd) throw_errno(fmt::format("Could not create '{}'", path));
  lock_image(fd.get(), path, false, false);
  if (::ftruncate(fd.get(), 0) != 0 || ::ftruncate(fd.get(), off_t(size)) != 0) {
    throw_errno("ftruncate");
  }
  preallocate_range(fd.get(), 0, size, prealloc);
}

void RawImage::read(uint64_t offset, std::span<uint8_t> buf) {
  pread_zero_fill(fd_.get(), buf, offset);
}

void RawImage::write(uint64_t offset, std::span<const uint8_t> buf) {
  pwrite_all(fd_.get(), buf, offset);
  // Only a write past the end changes the size: convert -W writes a full-size target from
  // several threads, which then only read size_.
  if (offset + buf.size() > size_) size_ = offset + buf.size();
}

void RawImage::flush() {
  if (::fdatasync(fd_.get()) != 0) throw_errno("fdatasync");
}

uint64_t RawImage::actual_size() const { return allocated_bytes(fd_.get()); }

Extent RawImage::find_run(uint64_t offset) const {
  const off_t data = ::lseek(fd_.get(), off_t(offset), SEEK_DATA);
  if (data < 0) return {offset, size_ - offset, ExtentKind::kZero, 0};  // ENXIO: hole up to EOF
  if (uint64_t(data) > offset) {
    return {offset, std::min<uint64_t>(size_, uint64_t(data)) - offset, ExtentKind::kZero, 0};
  }
  const off_t hole = ::lseek(fd_.get(), off_t(offset), SEEK_HOLE);
  const uint64_t end = hole > off_t(offset) ? std::min<uint64_t>(size_, uint64_t(hole)) : size_;
  return {offset, end - offset, ExtentKind::kData, offset};
}

Extent RawImage::block_status(uint64_t offset, uint64_t length) {
  if (offset >= size_) return {offset, length, ExtentKind::kZero, 0};
  length = std::min(length, size_ - offset);
  Extent run;
  {
    std::unique_lock lock(run_mutex_, std::defer_lock);
    if (runs_are_stable_) lock.lock();
    if (runs_are_stable_ && offset >= last_run_.start &&
        offset - last_run_.start < last_run_.length) {
      run = last_run_;
    } else {
      run = find_run(offset);
      if (runs_are_stable_) last_run_ = run;
    }
  }
  const uint64_t skip = offset - run.start;
  const uint64_t host = run.kind == ExtentKind::kData ? offset : 0;
  return {offset, std::min(length, run.length - skip), run.kind, host};
}

// ---------------------------------------------------------------------------------------------
// Opening and validation

std::string probe_format(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) throw_errno(fmt::format("Could not open '{}'", path));
  uint8_t magic[4] = {};
  pread_zero_fill(fd.get(), magic, 0);
  return load_be32(magic) == kMagic ? "qcow2" : "raw";
}

std::unique_ptr<SyncImage> open_image(const std::string& path, const OpenOptions& opts) {
  std::string fmt = opts.format.empty() ? probe_format(path) : opts.format;
  if (fmt == "raw") return RawImage::open(path, opts.read_only, opts.force_share, opts.cache);
  if (fmt != "qcow2") throw Qcow2Error(fmt::format("Unknown driver '{}'", fmt));
  return Image::open(path, opts);
}

std::unique_ptr<Image> Image::open(const std::string& path, const OpenOptions& opts) {
  std::vector<std::pair<dev_t, ino_t>> chain;
  auto img = std::unique_ptr<Image>(new Image());
  img->path_ = path;
  img->load(opts, chain);
  return img;
}

Image::~Image() {
  if (read_only_) return;
  try {
    flush();
  } catch (...) {
    // Destructors cannot report; callers that care call flush() themselves.
  }
}

void Image::load(const OpenOptions& opts, std::vector<std::pair<dev_t, ino_t>>& chain) {
  read_only_ = opts.read_only;
  unsafe_ = opts.unsafe;
  fd_ = open_file(path_, read_only_, opts.cache);
  page_cache_ = opts.cache == CacheMode::kWriteback;
  auto id = file_id(fd_.get());
  if (std::find(chain.begin(), chain.end(), id) != chain.end()) {
    throw Qcow2Error(fmt::format("backing chain loop: '{}' is its own backing file", path_));
  }
  if (chain.size() >= kMaxChainDepth) throw Qcow2Error("backing chain too deep");
  chain.push_back(id);

  const uint64_t fsize = fd_size(fd_.get());
  header_ = parse_header(read_first_cluster(fsize));
  cluster_size_ = 1ull << header_.cluster_bits;

  const uint64_t unknown = header_.incompatible_features & ~kIncompatSupported;
  if (extended_l2() && header_.cluster_bits < kMinExtendedL2ClusterBits) {
    // QEMU's wording: a subcluster must be at least 512 bytes.
    throw Qcow2Error(
        fmt::format("Unsupported subcluster size: {}", cluster_size_ / kSubclustersPerCluster));
  }
  if (header_.incompatible_features & kIncompatExternalData) {
    throw Qcow2Error("unsupported qcow2 feature: external data file");
  }
  if (unknown) throw Qcow2Error(fmt::format("Unsupported IMGFMT feature(s): 0x{:x}", unknown));
  if (header_.crypt_method != 0) throw Qcow2Error("encrypted qcow2 images are not supported");
  if (!read_only_ && (header_.incompatible_features & kIncompatCorrupt)) {
    throw Qcow2Error(
        fmt::format("qcow2: Image is corrupt; cannot be opened read/write ('{}')", path_));
  }
  lock_image(fd_.get(), path_, read_only_, opts.force_share);
  validate_tables();

  const uint64_t wanted = opts.l2_cache_bytes
                              ? opts.l2_cache_bytes
                              : std::min(kDefaultMaxL2Cache, l1_.size() * cluster_size_);
  l2_capacity_ = std::max<size_t>(4, wanted / cluster_size_);

  if (!read_only_ && (header_.incompatible_features & kIncompatDirty)) {
    // Left dirty by a lazy-refcounts writer that crashed: rebuild refcounts before writing.
    check(RepairMode::kAll);
    header_.incompatible_features &= ~kIncompatDirty;
    write_header();
    sync_file();
  }
  if (!opts.no_backing) open_backing(opts, chain);
}

// The header and its extensions lie in the first cluster, whose size the header gives. Reading
// the largest possible cluster (2 MiB) every time cost more than checking a small image, so the
// common 64 KiB come first and the rest only when the header asks for larger clusters.
std::vector<uint8_t> Image::read_first_cluster(uint64_t fsize) const {
  constexpr uint64_t kFirstRead = 64 * 1024;
  constexpr size_t kClusterBitsOffset = 20;
  std::vector<uint8_t> first(std::min(kFirstRead, fsize));
  pread_zero_fill(fd_.get(), first, 0);
  if (first.size() < kClusterBitsOffset + 4) return first;  // parse_header says what is wrong
  const uint32_t bits = load_be32(first.data() + kClusterBitsOffset);
  if (bits < kMinClusterBits || bits > kMaxClusterBits) return first;
  const uint64_t whole = std::min(uint64_t(1) << bits, fsize);
  if (whole > first.size()) {
    first.resize(whole);
    pread_zero_fill(fd_.get(), first, 0);
  }
  return first;
}

void Image::validate_tables() {
  const uint64_t fsize = fd_size(fd_.get());
  auto check_range = [&](uint64_t off, uint64_t len, const char* what) {
    if (off % cluster_size_ != 0) {
      throw Qcow2Error(fmt::format("{} offset 0x{:x} is not cluster aligned", what, off));
    }
    if (off < cluster_size_) throw Qcow2Error(fmt::format("{} overlaps the qcow2 header", what));
    if (off > fsize || len > fsize - off) {
      throw Qcow2Error(
          fmt::format("{} at 0x{:x} (+{} bytes) lies past the end of the file", what, off, len));
    }
  };
  if (header_.size > kMaxVirtualSize) throw Qcow2Error("virtual size too large");
  const uint64_t l1_needed = div_round_up(header_.size, cluster_size_ * l2_entries());
  if (uint64_t(header_.l1_size) * 8 > kMaxL1Bytes) throw Qcow2Error("L1 table is too large");
  if (header_.l1_size < l1_needed) throw Qcow2Error("L1 table is too small for the image size");
  if (header_.l1_size > 0) check_range(header_.l1_table_offset, header_.l1_size * 8ull, "L1 table");

  if (header_.refcount_table_clusters == 0) throw Qcow2Error("refcount table is empty");
  const uint64_t rt_bytes = uint64_t(header_.refcount_table_clusters) * cluster_size_;
  if (rt_bytes > kMaxRefcountTableBytes) throw Qcow2Error("refcount table is too large");
  check_range(header_.refcount_table_offset, rt_bytes, "refcount table");

  if (header_.nb_snapshots > kMaxSnapshots) throw Qcow2Error("too many snapshots");
  if (header_.nb_snapshots > 0) check_range(header_.snapshots_offset, 0, "snapshot table");

  std::vector<uint8_t> raw(header_.l1_size * 8ull);
  pread_exact(fd_.get(), raw, header_.l1_table_offset, "L1 table");
  l1_.resize(header_.l1_size);
  for (size_t i = 0; i < l1_.size(); ++i) l1_[i] = load_be64(&raw[i * 8]);

  raw.resize(rt_bytes);
  pread_exact(fd_.get(), raw, header_.refcount_table_offset, "refcount table");
  refcount_table_.resize(rt_bytes / 8);
  for (size_t i = 0; i < refcount_table_.size(); ++i) {
    refcount_table_[i] = load_be64(&raw[i * 8]);
  }
  free_hint_ = 1;
  rebuild_metadata_set();
}

void Image::rebuild_metadata_set() {
  refblock_clusters_.clear();
  l2_clusters_.clear();
  for (uint64_t e : refcount_table_) {
    if (e & kOffsetMask) refblock_clusters_.insert(e & kOffsetMask);
  }
  for (uint64_t e : l1_) {
    if (e & kOffsetMask) l2_clusters_.insert(e & kOffsetMask);
  }
}

void Image::open_backing(const OpenOptions& opts, std::vector<std::pair<dev_t, ino_t>>& chain) {
  if (header_.backing_file.empty()) return;
  const std::string bpath = resolve_backing_path(path_, header_.backing_file);
  OpenOptions bopts = opts;
  bopts.read_only = true;
  bopts.format = backing_format();
  if (bopts.format.empty()) bopts.format = probe_format(bpath);
  if (bopts.format == "raw") {
    backing_ = RawImage::open(bpath, true, opts.force_share, opts.cache);
    return;
  }
  if (bopts.format != "qcow2") {
    throw Qcow2Error(fmt::format("unsupported backing format '{}'", bopts.format));
  }
  auto img = std::unique_ptr<Image>(new Image());
  img->path_ = bpath;
  img->load(bopts, chain);
  backing_ = std::move(img);
}

uint64_t Image::file_size() const { return fd_size(fd_.get()); }
uint64_t Image::actual_size() const { return allocated_bytes(fd_.get()); }

void Image::write_header() {
  auto bytes = serialize_header(header_, cluster_size_);
  bytes.resize(std::min<uint64_t>(cluster_size_, std::max<size_t>(bytes.size(), 4096)));
  pwrite_all(fd_.get(), bytes, 0);
}

void Image::sync_file() {
  if (unsafe_) return;
  if (::fdatasync(fd_.get()) != 0) throw_errno("fdatasync");
}

// ---------------------------------------------------------------------------------------------
// L2 tables

bool Image::is_metadata(uint64_t host, bool with_l2) const {
  if (host < cluster_size_) return true;
  auto inside = [&](uint64_t off, uint64_t len) { return host >= off && host < off + len; };
  if (inside(header_.l1_table_offset, header_.l1_size * 8ull)) return true;
  if (inside(header_.refcount_table_offset,
             uint64_t(header_.refcount_table_clusters) * cluster_size_)) {
    return true;
  }
  const uint64_t cluster = host - host % cluster_size_;
  return refblock_clusters_.count(cluster) != 0 || (with_l2 && l2_clusters_.count(cluster) != 0);
}

Image::L2Table* Image::load_l2(uint64_t offset) {
  auto it = l2_index_.find(offset);
  if (it != l2_index_.end()) {
    l2_lru_.splice(l2_lru_.begin(), l2_lru_, it->second);
    return &*it->second;
  }
  evict_l2_if_needed();
  L2Table t;
  t.offset = offset;
  std::vector<uint8_t> raw(cluster_size_);
  pread_exact(fd_.get(), raw, offset, "L2 table");
  t.entries.resize(l2_entries());
  const uint64_t width = l2_entry_bytes();
  for (size_t i = 0; i < t.entries.size(); ++i) {
    t.entries[i] = load_l2_entry(&raw[i * width], extended_l2());
  }
  l2_lru_.push_front(std::move(t));
  l2_index_[offset] = l2_lru_.begin();
  return &l2_lru_.front();
}

void Image::evict_l2_if_needed() {
  while (l2_lru_.size() >= l2_capacity_) {
    L2Table& victim = l2_lru_.back();
    if (victim.dirty) {
      // The table may point at clusters whose refcounts are still only in memory.
      flush_refcounts();
      write_l2(victim);
    }
    l2_index_.erase(victim.offset);
    l2_lru_.pop_back();
  }
}

void Image::write_l2(L2Table& t) {
  std::vector<uint8_t> raw(cluster_size_);
  const uint64_t width = l2_entry_bytes();
  for (size_t i = 0; i < t.entries.size(); ++i) {
    store_l2_entry(&raw[i * width], t.entries[i], extended_l2());
  }
  pwrite_all(fd_.get(), raw, t.offset);
  t.dirty = false;
}

Image::L2Table* Image::get_l2(uint64_t l1_index, bool allocate) {
  if (l1_index >= l1_.size()) throw Qcow2Error("guest offset beyond the L1 table");
  const uint64_t l1e = l1_[l1_index];
  const uint64_t off = l1e & kOffsetMask;
  if (off != 0 && (allocate ? (l1e & kFlagCopied) : true)) {
    if (off % cluster_size_ != 0 || is_metadata(off, false)) {
      throw Qcow2Error(
          fmt::format("L1 entry {} has an invalid L2 table offset 0x{:x}", l1_index, off));
    }
    return load_l2(off);
  }
  if (!allocate) return nullptr;
  // New table, or copy-on-write of a table shared with a snapshot (L1 entry without COPIED).
  std::vector<L2Entry> entries(l2_entries());
  if (off != 0) entries = load_l2(off)->entries;
  const uint64_t new_off = alloc_clusters(1);
  l2_clusters_.insert(new_off);
  evict_l2_if_needed();
  l2_lru_.push_front(L2Table{new_off, std::move(entries), true});
  l2_index_[new_off] = l2_lru_.begin();
  if (off != 0) deferred_frees_.push_back(off);  // the old table stays in use by the snapshot
  l1_[l1_index] = new_off | kFlagCopied;
  l1_dirty_begin_ = std::min(l1_dirty_begin_, l1_index);
  l1_dirty_end_ = std::max(l1_dirty_end_, l1_index + 1);
  return &l2_lru_.front();
}

L2Entry Image::l2_entry(uint64_t guest_cluster) {
  L2Table* t = get_l2(guest_cluster / l2_entries(), false);
  return t ? t->entries[guest_cluster % l2_entries()] : L2Entry{};
}

const L2Entry* Image::cached_l2_entry(uint64_t guest_cluster) {
  const uint64_t l1_index = guest_cluster / l2_entries();
  if (l1_index >= l1_.size()) return nullptr;
  const auto it = l2_index_.find(l1_[l1_index] & kOffsetMask);
  if (it == l2_index_.end()) return nullptr;
  l2_lru_.splice(l2_lru_.begin(), l2_lru_, it->second);
  return &it->second->entries[guest_cluster % l2_entries()];
}

void Image::set_l2_entry(uint64_t guest_cluster, const L2Entry& entry) {
  L2Table* t = get_l2(guest_cluster / l2_entries(), true);
  t->entries[guest_cluster % l2_entries()] = entry;
  t->dirty = true;
}

ExtentKind Image::subcluster_kind(const L2Entry& e, uint32_t sc, uint64_t guest_offset) const {
  // Compressed clusters have no subclusters; QEMU reads them whatever their (reserved) bitmap.
  if (e.compressed()) return ExtentKind::kCompressed;
  if (!extended_l2()) {
    if ((e.word & kL2FlagZero) && header_.version >= 3) return ExtentKind::kZero;
    return e.host() ? ExtentKind::kData : ExtentKind::kUnallocated;
  }
  if (const char* why = e.bitmap_error(); *why) {
    throw Qcow2Error(fmt::format("Invalid L2 entry for guest offset 0x{:x}: {}",
                                 guest_offset - guest_offset % cluster_size_, why));
  }
  if (e.alloc_bits() >> sc & 1) return ExtentKind::kData;
  if (e.zero_bits() >> sc & 1) return ExtentKind::kZero;
  return ExtentKind::kUnallocated;
}

bool Image::valid_data_offset(uint64_t host) const {
  return host % cluster_size_ == 0 && !is_metadata(host);
}

void Image::check_data_offset(uint64_t host, uint64_t guest_offset) const {
  if (!valid_data_offset(host)) {
    throw Qcow2Error(
        fmt::format("L2 entry for guest offset 0x{:x} points at invalid host offset 0x{:x}",
                    guest_offset, host));
  }
}

// ---------------------------------------------------------------------------------------------
// Reading

// True when [in_cluster, in_cluster + n) of the entry's cluster is plain data in its host cluster,
// which read() then reads without the lock.
bool Image::plain_data(const L2Entry& entry, uint64_t in_cluster, uint64_t n) const {
  if (!entry.host() || entry.compressed()) return false;
  if (!extended_l2()) return !((entry.word & kL2FlagZero) && header_.version >= 3);
  const uint64_t sc_size = subcluster_size();
  const uint32_t first = uint32_t(in_cluster / sc_size);
  const uint32_t mask =
      subcluster_mask(first, uint32_t(div_round_up(in_cluster + n, sc_size)) - first);
  return !*entry.bitmap_error() && (entry.alloc_bits() & mask) == mask;
}

void Image::read(uint64_t offset, std::span<uint8_t> buf) {
  std::unique_lock lock(mu_);
  while (!buf.empty()) {
    if (offset >= header_.size) {
      std::memset(buf.data(), 0, buf.size());
      return;
    }
    const uint64_t in_cluster = offset % cluster_size_;
    uint64_t n =
        std::min<uint64_t>({buf.size(), cluster_size_ - in_cluster, header_.size - offset});
    const L2Entry entry = l2_entry(offset / cluster_size_);
    const uint64_t host = entry.host();
    if (plain_data(entry, in_cluster, n)) {
      // The data read itself runs without the lock so that requests in flight overlap in the
      // kernel. The host cluster cannot be freed meanwhile: frees wait for unlocked reads.
      check_data_offset(host, offset);
      const uint64_t len = plain_run(offset, host + in_cluster, n, buf.size(), false);
      ++unlocked_reads_;
      lock.unlock();
      std::exception_ptr failure;
      try {
        pread_zero_fill(fd_.get(), buf.first(len), host + in_cluster);
      } catch (...) {
        failure = std::current_exception();
      }
      lock.lock();
      if (--unlocked_reads_ == 0) unlocked_reads_done_.notify_all();
      if (failure) std::rethrow_exception(failure);
      n = len;
    } else {
      read_cluster_part(offset, buf.first(n));
    }
    offset += n;
    buf = buf.subspan(n);
  }
}

bool Image::try_read_cached(uint64_t offset, std::span<uint8_t> buf) {
  if (!page_cache_) return false;  // under O_DIRECT, RWF_NOWAIT still waits for the device
  std::unique_lock lock(mu_);
  if (offset > header_.size || buf.size() > header_.size - offset) return false;
  while (!buf.empty()) {
    const uint64_t in_cluster = offset % cluster_size_;
    const uint64_t n = std::min<uint64_t>(buf.size(), cluster_size_ - in_cluster);
    const L2Entry* entry = cached_l2_entry(offset / cluster_size_);
    // Zeros, backing file, compressed, suspect offsets: read() knows them all.
    if (!entry || !plain_data(*entry, in_cluster, n) || !valid_data_offset(entry->host())) {
      return false;
    }
    const uint64_t host = entry->host() + in_cluster;
    const uint64_t len = plain_run(offset, host, n, buf.size(), true);
    ++unlocked_reads_;  // the clusters cannot be freed until we are done (see read())
    lock.unlock();
    iovec iov{buf.data(), len};
    const ssize_t got = ::preadv2(fd_.get(), &iov, 1, off_t(host), RWF_NOWAIT);
    lock.lock();
    if (--unlocked_reads_ == 0) unlocked_reads_done_.notify_all();
    if (got != ssize_t(len)) return false;  // EAGAIN: not in the page cache; or short, or failed
    offset += len;
    buf = buf.subspan(len);
  }
  return true;
}

// Extends a plain-data read of `n` bytes at guest `offset` (host `host`) over the following
// clusters while they are plain data right after it in the file, so that a large read of a
// sequentially allocated image is one pread instead of one per cluster. With `cached_only`, stops
// at an L2 table not in the cache instead of loading it. A suspect host offset ends the run; the
// caller then meets that cluster on its own and reports it.
uint64_t Image::plain_run(uint64_t offset, uint64_t host, uint64_t n, uint64_t max,
                          bool cached_only) {
  while (n < max && offset + n < header_.size && (offset + n) % cluster_size_ == 0) {
    const uint64_t next = offset + n;
    const uint64_t m = std::min<uint64_t>({max - n, cluster_size_, header_.size - next});
    L2Entry entry;
    if (cached_only) {
      const L2Entry* cached = cached_l2_entry(next / cluster_size_);
      if (!cached) break;
      entry = *cached;
    } else {
      entry = l2_entry(next / cluster_size_);
    }
    if (!plain_data(entry, 0, m) || entry.host() != host + n) break;
    if (!valid_data_offset(entry.host())) break;
    n += m;
  }
  return n;
}

void Image::read_from_backing(uint64_t offset, std::span<uint8_t> buf) {
  if (!backing_ || offset >= backing_->size()) {
    std::memset(buf.data(), 0, buf.size());
    return;
  }
  backing_->read(offset, buf);  // past its end reads as zeros
}

void Image::read_cluster_part(uint64_t offset, std::span<uint8_t> buf) {
  const L2Entry entry = l2_entry(offset / cluster_size_);
  const uint64_t in_cluster = offset % cluster_size_;
  if (entry.compressed()) {
    if (entry.word != last_compressed_entry_ || last_compressed_.empty()) {
      read_compressed(entry.word, last_compressed_);
      last_compressed_entry_ = entry.word;
    }
    std::memcpy(buf.data(), last_compressed_.data() + in_cluster, buf.size());
    return;
  }
  read_subclusters(entry, offset, buf);
}

// Reads part of one (not compressed) cluster, one run of subclusters in the same state at a time.
void Image::read_subclusters(const L2Entry& entry, uint64_t offset, std::span<uint8_t> buf) {
  const uint64_t sc_size = subcluster_size();
  const uint64_t cluster_start = offset - offset % cluster_size_;
  while (!buf.empty()) {
    const uint64_t in_cluster = offset - cluster_start;
    const ExtentKind kind = subcluster_kind(entry, uint32_t(in_cluster / sc_size), offset);
    uint64_t n = std::min<uint64_t>(buf.size(), sc_size - in_cluster % sc_size);
    while (n < buf.size() &&
           subcluster_kind(entry, uint32_t((in_cluster + n) / sc_size), offset) == kind) {
      n = std::min<uint64_t>(buf.size(), n + sc_size);
    }
    const auto part = buf.first(n);
    if (kind == ExtentKind::kZero) {
      std::memset(part.data(), 0, part.size());
    } else if (kind == ExtentKind::kUnallocated) {
      read_from_backing(offset, part);
    } else {
      check_data_offset(entry.host(), offset);
      pread_zero_fill(fd_.get(), part, entry.host() + in_cluster);
    }
    offset += n;
    buf = buf.subspan(n);
  }
}

void Image::read_compressed(uint64_t entry, std::vector<uint8_t>& out) {
  const uint32_t x = 62 - (header_.cluster_bits - 8);
  const uint64_t coff = entry & ((1ull << x) - 1);
  const uint64_t sectors = ((entry & ~kFlagCopied & ~kFlagCompressed) >> x) + 1;
  const uint64_t end = (coff & ~511ull) + sectors * 512;
  if (coff < cluster_size_ || coff > kOffsetMask) {
    throw Qcow2Error(fmt::format("compressed cluster at invalid offset 0x{:x}", coff));
  }
  std::vector<uint8_t> in(end - coff);
  pread_zero_fill(fd_.get(), in, coff);
  out.assign(cluster_size_, 0);
  bool ok = false;
  if (header_.compression_type == CompressionType::kZlib) {
    z_stream zs{};
    if (inflateInit2(&zs, -15) != Z_OK) throw Qcow2Error("zlib init failed");
    zs.next_in = in.data();
    zs.avail_in = uInt(in.size());
    zs.next_out = out.data();
    zs.avail_out = uInt(out.size());
    int rc = inflate(&zs, Z_FINISH);
    // The stored size is rounded up to sectors, so trailing bytes after the stream are normal.
    ok = (rc == Z_STREAM_END || rc == Z_BUF_ERROR || rc == Z_OK) && zs.avail_out == 0;
    inflateEnd(&zs);
  } else {
    ZSTD_DCtx* dctx = ZSTD_createDCtx();
    ZSTD_inBuffer zin{in.data(), in.size(), 0};
    ZSTD_outBuffer zout{out.data(), out.size(), 0};
    // Compressed data may be followed by padding: decode until the cluster is full.
    while (zout.pos < zout.size) {
      size_t rc = ZSTD_decompressStream(dctx, &zout, &zin);
      if (ZSTD_isError(rc)) break;
      if (zin.pos == zin.size && zout.pos < zout.size && rc != 0) break;
      if (rc == 0 && zin.pos == zin.size) break;
    }
    ok = zout.pos == zout.size;
    ZSTD_freeDCtx(dctx);
  }
  if (!ok) {
    out.clear();
    throw Qcow2Error(fmt::format("could not decompress cluster at host offset 0x{:x}", coff));
  }
}

Extent Image::block_status(uint64_t offset, uint64_t length) {
  std::lock_guard lock(mu_);
  Extent e{offset, 0, ExtentKind::kUnallocated, 0};
  if (offset >= header_.size) return {offset, length, ExtentKind::kZero, 0};
  length = std::min(length, header_.size - offset);
  // One step per subcluster (per cluster in standard images); an extent ends where the state or,
  // for ranges backed by a host cluster, host contiguity ends.
  const uint64_t sc_size = subcluster_size();
  uint64_t pos = offset;
  uint64_t expected_host = 0;
  uint64_t entry_cluster = UINT64_MAX;
  L2Entry entry;
  while (pos < offset + length) {
    if (pos / cluster_size_ != entry_cluster) {
      entry_cluster = pos / cluster_size_;
      entry = l2_entry(entry_cluster);
    }
    const uint64_t in_cluster = pos % cluster_size_;
    const ExtentKind kind = subcluster_kind(entry, uint32_t(in_cluster / sc_size), pos);
    const uint64_t host =
        kind == ExtentKind::kCompressed || !entry.host() ? 0 : entry.host() + in_cluster;
    // A cluster whose subclusters all share one state is one step (unallocated tables of a
    // large sparse image would otherwise cost 32 steps per cluster).
    const bool uniform = entry.compressed() || entry.alloc_bits() == ~0u ||
                         entry.zero_bits() == ~0u || entry.bitmap == 0 || !extended_l2();
    const uint64_t step = uniform ? cluster_size_ - in_cluster : sc_size - in_cluster % sc_size;
    const uint64_t n = std::min(step, offset + length - pos);
    if (pos == offset) {
      e.kind = kind;
      e.host_offset = host;
    } else if (kind != e.kind || host != expected_host) {
      break;
    }
    expected_host = host ? host + n : 0;
    e.length += n;
    pos += n;
  }
  return e;
}

bool Image::looks_metadata_preallocated() {
  std::lock_guard lock(mu_);
  if (metadata_preallocated_) return *metadata_preallocated_;
  const uint64_t real_clusters = allocated_bytes(fd_.get()) / cluster_size_;
  const uint64_t threshold = std::max(real_clusters * 10 / 9, real_clusters + 2);
  const uint64_t end = div_round_up(file_size(), cluster_size_);
  uint64_t in_use = 0;
  bool preallocated = false;
  try {
    for (uint64_t c = 0; c < end && !preallocated; ++c) {
      if (get_refcount(c) > 0) preallocated = ++in_use > threshold;
    }
  } catch (const Qcow2Error&) {
    preallocated = false;  // unreadable refcounts: report what the L2 tables say
  }
  metadata_preallocated_ = preallocated;
  return preallocated;
}

// ---------------------------------------------------------------------------------------------
// Writing

void Image::write(uint64_t offset, std::span<const uint8_t> buf) {
  std::lock_guard lock(mu_);
  if (read_only_) throw std::system_error(EROFS, std::generic_category(), "image is read-only");
  if (offset > header_.size || buf.size() > header_.size - offset) {
    throw std::system_error(EINVAL, std::generic_category(), "write past the end of the image");
  }
  while (!buf.empty()) {
    uint64_t n = write_new_run(offset, buf);
    if (n == 0) {
      n = std::min<uint64_t>(buf.size(), cluster_size_ - offset % cluster_size_);
      write_cluster_part(offset, buf.first(n));
    }
    offset += n;
    buf = buf.subspan(n);
  }
  data_dirty_ = true;
}

// Whole clusters that have no host cluster yet (one L2 table's worth at most) get one run of
// contiguous host clusters and one pwrite: a sequential writer such as convert then costs one
// syscall per run, not per cluster. Returns the bytes written, 0 when the fast path does not
// apply. Ordering as everywhere: the data goes to the file now, while the refcounts and L2
// entries stay in the caches until flush() writes them after it.
uint64_t Image::write_new_run(uint64_t offset, std::span<const uint8_t> buf) {
  if (extended_l2() || offset % cluster_size_ != 0 || buf.size() < 2 * cluster_size_) return 0;
  const uint64_t first = offset / cluster_size_;
  const uint64_t table_left = l2_entries() - first % l2_entries();
  const uint64_t want = std::min(buf.size() / cluster_size_, table_left);
  uint64_t count = 0;
  while (count < want && (l2_entry(first + count).word & (kOffsetMask | kFlagCompressed)) == 0) {
    ++count;
  }
  if (count < 2) return 0;
  get_l2(first / l2_entries(), true);  // table first: keeps data clusters contiguous
  const uint64_t host = alloc_clusters(count);
  L2Table* table = get_l2(first / l2_entries(), true);  // the pointer, after any allocation
  pwrite_all(fd_.get(), buf.first(count * cluster_size_), host);
  for (uint64_t i = 0; i < count; ++i) {
    table->entries[(first + i) % l2_entries()] = {(host + i * cluster_size_) | kFlagCopied, 0};
  }
  table->dirty = true;
  return count * cluster_size_;
}

void Image::release_entry_later(uint64_t entry) {
  if (entry & kFlagCompressed) {
    deferred_frees_.push_back(entry);
  } else if (entry & kOffsetMask) {
    deferred_frees_.push_back(entry & kOffsetMask);
  }
}

void Image::write_cluster_part(uint64_t offset, std::span<const uint8_t> buf) {
  if (extended_l2()) {
    write_subclusters(offset, buf);
    return;
  }
  const uint64_t guest_cluster = offset / cluster_size_;
  const uint64_t in_cluster = offset % cluster_size_;
  const uint64_t entry = l2_entry(guest_cluster).word;
  const uint64_t host = entry & kOffsetMask;
  // In a compressed entry bit 0 belongs to the (byte-granular) host offset, not the zero flag.
  const bool zero_flag =
      !(entry & kFlagCompressed) && (entry & kL2FlagZero) && header_.version >= 3;
  const bool in_place = !(entry & kFlagCompressed) && host && (entry & kFlagCopied);
  if (in_place) check_data_offset(host, offset);
  if (in_place && !zero_flag) {
    pwrite_all(fd_.get(), buf, host + in_cluster);
    return;
  }
  // Partial write into a cluster that reads as zeros: zero the host cluster with one fallocate
  // and write only the new bytes, instead of writing a cluster of mostly zeros (an allocating
  // 4 KiB write then costs 4 KiB of page cache and disk bandwidth, not a whole cluster).
  if (buf.size() != cluster_size_ && cow_source_is_zero(entry, guest_cluster)) {
    uint64_t target = host;
    if (!in_place) {
      get_l2(guest_cluster / l2_entries(), true);  // table first: keeps data clusters contiguous
      target = alloc_clusters(1);
    }
    if (zero_host_cluster(target)) {
      pwrite_all(fd_.get(), buf, target + in_cluster);
      set_l2_entry(guest_cluster, {target | kFlagCopied, 0});
      if (!in_place) release_entry_later(entry);
      return;
    }
    if (!in_place) {
      // No fallocate here: fall through to a whole-cluster write into the cluster just taken.
      std::vector<uint8_t> whole(cluster_size_, 0);
      std::memcpy(whole.data() + in_cluster, buf.data(), buf.size());
      pwrite_all(fd_.get(), whole, target);
      set_l2_entry(guest_cluster, {target | kFlagCopied, 0});
      release_entry_later(entry);
      return;
    }
  }
  // Copy-on-write: assemble the whole cluster unless the write covers it.
  std::vector<uint8_t> whole;
  std::span<const uint8_t> data = buf;
  if (buf.size() != cluster_size_) {
    whole.resize(cluster_size_);
    const uint64_t cluster_start = guest_cluster * cluster_size_;
    if (!zero_flag) read_cluster_part(cluster_start, whole);
    std::memcpy(whole.data() + in_cluster, buf.data(), buf.size());
    data = whole;
  }
  if (in_place) {  // preallocated zero cluster: reuse its host cluster
    pwrite_all(fd_.get(), data, host);
    set_l2_entry(guest_cluster, {host | kFlagCopied, 0});
    return;
  }
  get_l2(guest_cluster / l2_entries(), true);  // table first: keeps data clusters contiguous
  const uint64_t new_host = alloc_clusters(1);
  pwrite_all(fd_.get(), data, new_host);
  set_l2_entry(guest_cluster, {new_host | kFlagCopied, 0});
  release_entry_later(entry);
}

// Extended L2 entries: only the subclusters a write touches become allocated, so a small write
// into a new cluster writes one subcluster instead of copying a whole cluster; the others stay
// unallocated (reading through to the backing file) or zero. Partly covered subclusters are
// completed with what they read as now.
void Image::write_subclusters(uint64_t offset, std::span<const uint8_t> buf) {
  const uint64_t guest_cluster = offset / cluster_size_;
  const uint64_t cluster_start = guest_cluster * cluster_size_;
  const uint64_t in_cluster = offset - cluster_start;
  const uint64_t sc_size = subcluster_size();
  const uint32_t first_sc = uint32_t(in_cluster / sc_size);
  const uint32_t end_sc = uint32_t(div_round_up(in_cluster + buf.size(), sc_size));
  const uint32_t touched = subcluster_mask(first_sc, end_sc - first_sc);
  const L2Entry entry = l2_entry(guest_cluster);
  subcluster_kind(entry, first_sc, offset);  // refuses an invalid bitmap before changing anything
  const bool in_place = !entry.compressed() && entry.host() && entry.copied();
  if (in_place) {
    check_data_offset(entry.host(), offset);
    if ((touched & ~entry.alloc_bits()) == 0) {  // the common case: rewriting allocated data
      pwrite_all(fd_.get(), buf, entry.host() + in_cluster);
      return;
    }
  }
  // A cluster shared with a snapshot or compressed moves to a new host cluster with all the
  // data it held; a cluster already ours only gets the touched subclusters written.
  const uint32_t old_alloc = entry.compressed() ? ~0u : entry.alloc_bits();
  const uint32_t new_alloc = (in_place ? 0 : old_alloc) | touched;
  const uint32_t lo = in_place ? first_sc : uint32_t(__builtin_ctz(new_alloc));
  const uint32_t hi = in_place ? end_sc : 32 - uint32_t(__builtin_clz(new_alloc));
  std::vector<uint8_t> data((hi - lo) * sc_size, 0);
  const uint64_t lo_off = lo * sc_size;
  if (!in_place && (old_alloc & ~touched)) {
    read_cluster_part(cluster_start + lo_off, data);
  } else {
    for (uint32_t sc : {first_sc, end_sc - 1}) {
      const uint64_t sc_off = sc * sc_size;
      if (in_cluster > sc_off || in_cluster + buf.size() < sc_off + sc_size) {
        read_cluster_part(cluster_start + sc_off,
                          std::span(data).subspan(sc_off - lo_off, sc_size));
      }
    }
  }
  std::memcpy(data.data() + (in_cluster - lo_off), buf.data(), buf.size());

  L2Entry next = entry;
  if (!in_place) {
    get_l2(guest_cluster / l2_entries(), true);  // table first: keeps data clusters contiguous
    next.word = alloc_clusters(1) | kFlagCopied;
    if (entry.compressed()) next.bitmap = 0;
  }
  const uint32_t zero = next.zero_bits() & ~(new_alloc | touched);
  next.bitmap = uint64_t(zero) << 32 | (next.alloc_bits() | new_alloc);
  pwrite_all(fd_.get(), data, next.host() + lo_off);
  set_l2_entry(guest_cluster, next);
  if (!in_place) release_entry_later(entry.word);
}

bool Image::cow_source_is_zero(uint64_t entry, uint64_t guest_cluster) const {
  if (entry & kFlagCompressed) return false;
  if ((entry & kL2FlagZero) && header_.version >= 3) return true;
  if (entry & kOffsetMask) return false;
  // Unallocated: reads through to the backing file, which must hold nothing there.
  return !backing_ || guest_cluster * cluster_size_ >= backing_->size();
}

bool Image::zero_host_cluster(uint64_t host) {
  // ZERO_RANGE also extends the file over the whole cluster, as a full write would.
  if (::fallocate(fd_.get(), FALLOC_FL_ZERO_RANGE, off_t(host), off_t(cluster_size_)) == 0) {
    return true;
  }
  if (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL) return false;
  throw_errno("fallocate");
}

std::vector<uint8_t> Image::compress(std::span<const uint8_t> cluster) const {
  // The image's last cluster may be short: it is compressed as a whole cluster, padded with
  // zeros, as qemu-img does (a compressed cluster always decompresses to a full cluster).
  thread_local std::vector<uint8_t> padded;
  if (cluster.size() < cluster_size_) {
    padded.assign(cluster.begin(), cluster.end());
    padded.resize(cluster_size_, 0);
    cluster = padded;
  }
  // Compressing into a scratch buffer of this thread and returning only the bytes produced
  // keeps a cluster-sized allocation (and its page faults) out of every call.
  thread_local std::vector<uint8_t> out;
  out.resize(cluster.size());
  size_t out_len = 0;
  if (header_.compression_type == CompressionType::kZlib) {
    z_stream zs{};
    if (deflateInit2(&zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK) {
      throw Qcow2Error("zlib init failed");
    }
    zs.next_in = const_cast<uint8_t*>(cluster.data());
    zs.avail_in = uInt(cluster.size());
    zs.next_out = out.data();
    zs.avail_out = uInt(out.size());
    const int rc = deflate(&zs, Z_FINISH);
    out_len = rc == Z_STREAM_END ? zs.total_out : 0;
    deflateEnd(&zs);
  } else {
    const size_t rc = ZSTD_compress(out.data(), out.size(), cluster.data(), cluster.size(), 3);
    out_len = ZSTD_isError(rc) ? 0 : rc;
  }
  // Compressed whenever it is any smaller, as qemu-img decides (seen: a 64 KiB cluster that
  // shrank by 9 bytes): compressed blobs are packed byte by byte, so even that is saved.
  if (out_len == 0 || out_len >= cluster_size_) return {};
  return {out.begin(), out.begin() + ptrdiff_t(out_len)};
}

void Image::write_compressed(uint64_t offset, std::span<const uint8_t> cluster) {
  write_compressed(offset, cluster, compress(cluster));
}

void Image::write_compressed(uint64_t offset, std::span<const uint8_t> cluster,
                             std::span<const uint8_t> out) {
  std::unique_lock lock(mu_);
  if (read_only_) throw std::system_error(EROFS, std::generic_category(), "image is read-only");
  const bool whole = cluster.size() == cluster_size_ || offset + cluster.size() == header_.size;
  if (offset % cluster_size_ != 0 || cluster.size() > cluster_size_ || !whole ||
      offset >= header_.size) {
    throw std::system_error(EINVAL, std::generic_category(), "compressed write must be a cluster");
  }
  const size_t out_len = out.size();
  const uint64_t guest_cluster = offset / cluster_size_;
  const L2Entry old = l2_entry(guest_cluster);
  if (out_len == 0 || (old.word & ~kFlagCopied) != 0 || old.alloc_bits()) {
    lock.unlock();
    write(offset, cluster);
    return;
  }
  get_l2(guest_cluster / l2_entries(), true);  // table first, as for every other write
  const uint64_t start = place_compressed(out_len);
  pwrite_all(fd_.get(), out, start);
  const uint32_t x = 62 - (header_.cluster_bits - 8);
  const uint64_t extra = ((start + out_len - 1) >> 9) - (start >> 9);
  set_l2_entry(guest_cluster, {kFlagCompressed | (extra << x) | start, 0});
  data_dirty_ = true;
}

void Image::align_file_end_to_sector() {
  std::lock_guard lock(mu_);
  const uint64_t size = file_size();
  if (size % 512 != 0 && ::ftruncate(fd_.get(), off_t(round_up(size, 512))) != 0) {
    throw_errno("ftruncate");
  }
}

// Compressed clusters are packed byte by byte, as qemu-img packs them: a blob starts right
// after the previous one and may run on into the next host cluster when that one is free.
// Each host cluster a blob touches holds one reference for it. Otherwise (nothing to continue,
// the next cluster taken, or the refcount at its maximum) the blob starts new clusters.
uint64_t Image::place_compressed(uint64_t length) {
  const uint64_t cs = cluster_size_;
  const uint64_t cursor = compressed_cursor_;
  const uint64_t current = cursor / cs;
  const bool can_continue = cursor != 0 && get_refcount(current) < max_refcount();
  const uint64_t spill =
      cursor % cs + length > cs ? div_round_up(cursor % cs + length - cs, cs) : 0;
  uint64_t start;
  if (can_continue && (spill == 0 || find_free_run(spill) == current + 1)) {
    if (spill != 0) alloc_clusters(spill);
    set_refcount(current, get_refcount(current) + 1);
    start = cursor;
  } else {
    start = alloc_clusters(div_round_up(length, cs));
  }
  compressed_cursor_ = (start + length) % cs == 0 ? 0 : start + length;
  return start;
}

void Image::zero_cluster(uint64_t guest_cluster, bool unmap) {
  if (extended_l2()) {
    // Every subcluster reads as zeros; like QEMU, keep a host cluster that is ours unless unmap.
    const L2Entry entry = l2_entry(guest_cluster);
    const bool keep = !unmap && !entry.compressed() && entry.host() && entry.copied();
    const L2Entry next{keep ? entry.host() | kFlagCopied : 0, kBitmapAllZero};
    if (next == entry) return;
    set_l2_entry(guest_cluster, next);
    if (!keep) release_entry_later(entry.word);
    return;
  }
  const uint64_t entry = l2_entry(guest_cluster).word;
  if (header_.version < 3) {
    // No zero flag: without a backing file an unallocated cluster reads as zeros.
    if (!backing_) {
      if (entry) set_l2_entry(guest_cluster, {});
      release_entry_later(entry);
      return;
    }
    std::vector<uint8_t> zeros(cluster_size_, 0);
    write_cluster_part(guest_cluster * cluster_size_, zeros);
    return;
  }
  const uint64_t host = entry & kOffsetMask;
  const bool keep = !unmap && !(entry & kFlagCompressed) && host && (entry & kFlagCopied);
  if (keep) {
    set_l2_entry(guest_cluster, {host | kFlagCopied | kL2FlagZero, 0});
    return;
  }
  set_l2_entry(guest_cluster, {kL2FlagZero, 0});
  release_entry_later(entry);
}

// Zeroes part of one cluster of an image with extended L2 entries as QEMU does: subclusters
// that end up all zeros get their zero bit (and lose their allocation bit; the host cluster
// stays), and a partly covered subcluster gets zeros written unless it reads as zeros already.
void Image::zero_subclusters(uint64_t offset, uint64_t length) {
  const uint64_t guest_cluster = offset / cluster_size_;
  const uint64_t cluster_start = guest_cluster * cluster_size_;
  const uint64_t in_cluster = offset - cluster_start;
  const uint64_t sc_size = subcluster_size();
  if (l2_entry(guest_cluster).compressed()) {
    std::vector<uint8_t> zeros(length, 0);
    write_subclusters(offset, zeros);
    return;
  }
  uint32_t zero_mask = 0;
  const uint32_t end_sc = uint32_t(div_round_up(in_cluster + length, sc_size));
  for (uint32_t sc = uint32_t(in_cluster / sc_size); sc < end_sc; ++sc) {
    const uint64_t sc_off = sc * sc_size;
    const uint64_t begin = std::max(in_cluster, sc_off);
    const uint64_t end = std::min(in_cluster + length, sc_off + sc_size);
    const ExtentKind kind = subcluster_kind(l2_entry(guest_cluster), sc, cluster_start + sc_off);
    const bool backing_zero = kind == ExtentKind::kUnallocated &&
                              (!backing_ || cluster_start + sc_off >= backing_->size());
    if (end - begin == sc_size || kind == ExtentKind::kZero || backing_zero) {
      zero_mask |= 1u << sc;
    } else {
      std::vector<uint8_t> zeros(end - begin, 0);
      write_subclusters(cluster_start + begin, zeros);
    }
  }
  if (zero_mask == 0) return;
  const L2Entry entry = l2_entry(guest_cluster);  // partial writes may have moved the cluster
  L2Entry next = entry;
  next.bitmap = uint64_t(entry.zero_bits() | zero_mask) << 32 | (entry.alloc_bits() & ~zero_mask);
  if (next != entry) set_l2_entry(guest_cluster, next);
}

void Image::write_zeroes(uint64_t offset, uint64_t length, bool may_unmap) {
  std::unique_lock lock(mu_);
  if (read_only_) throw std::system_error(EROFS, std::generic_category(), "image is read-only");
  if (offset > header_.size || length > header_.size - offset) {
    throw std::system_error(EINVAL, std::generic_category(), "write past the end of the image");
  }
  write_zeroes_locked(offset, length, may_unmap);
}

void Image::write_zeroes_locked(uint64_t offset, uint64_t length, bool may_unmap) {
  const uint64_t end = offset + length;
  while (offset < end) {
    const uint64_t in_cluster = offset % cluster_size_;
    const uint64_t n = std::min(end - offset, cluster_size_ - in_cluster);
    if (n == cluster_size_ || (in_cluster == 0 && offset + n == header_.size)) {
      zero_cluster(offset / cluster_size_, may_unmap);
    } else if (extended_l2()) {
      zero_subclusters(offset, n);
    } else {
      std::vector<uint8_t> zeros(n, 0);
      write_cluster_part(offset, zeros);
    }
    offset += n;
  }
  data_dirty_ = true;
}

void Image::discard(uint64_t offset, uint64_t length) {
  std::lock_guard lock(mu_);
  if (read_only_) throw std::system_error(EROFS, std::generic_category(), "image is read-only");
  if (offset > header_.size || length > header_.size - offset) {
    throw std::system_error(EINVAL, std::generic_category(), "discard past the end of the image");
  }
  // Only whole clusters can be given back; partial ones keep their data (discard is a hint).
  uint64_t first = div_round_up(offset, cluster_size_);
  uint64_t last = (offset + length) / cluster_size_;
  if (offset + length == header_.size) last = div_round_up(header_.size, cluster_size_);
  for (uint64_t c = first; c < last; ++c) discard_cluster(c);
  data_dirty_ = true;
}

void Image::discard_cluster(uint64_t guest_cluster) {
  const L2Entry entry = l2_entry(guest_cluster);
  if (extended_l2()) {
    // As QEMU: a discarded cluster reads as zeros whenever anything else could show through.
    const bool zero = backing_ || entry.host() || entry.compressed();
    const L2Entry next = zero ? L2Entry{0, kBitmapAllZero} : L2Entry{};
    if (next == entry) return;
    set_l2_entry(guest_cluster, next);
    release_entry_later(entry.word);
    return;
  }
  if (entry.word == 0) return;
  // With a backing file, "unallocated" would expose the backing data: use zero clusters.
  const uint64_t replacement = (backing_ && header_.version >= 3) ? kL2FlagZero : 0;
  if (backing_ && header_.version < 3) return;
  set_l2_entry(guest_cluster, {replacement, 0});
  release_entry_later(entry.word);
}

// ---------------------------------------------------------------------------------------------
// Flushing

void Image::flush() {
  std::lock_guard lock(mu_);
  flush_locked();
}

void Image::resize(uint64_t new_size) {
  std::lock_guard lock(mu_);
  if (read_only_) throw std::system_error(EROFS, std::generic_category(), "image is read-only");
  resize_locked(new_size);
}

void Image::resize_locked(uint64_t new_size) {
  if (new_size < header_.size) {
    shrink_locked(new_size);
    return;
  }
  if (new_size > kMaxVirtualSize) throw Qcow2Error("Image size too large");
  flush_locked();
  const uint64_t l1_needed = div_round_up(new_size, cluster_size_ * l2_entries());
  if (l1_needed * 8 > kMaxL1Bytes) throw Qcow2Error("Image size too large for the L1 table");
  if (l1_needed > l1_.size()) grow_l1_locked(l1_needed);
  const uint64_t old_size = header_.size;
  header_.size = new_size;
  write_header();
  sync_file();
  // The new area reads as zeros, not as whatever a longer backing file holds there (QEMU
  // writes zero clusters over it too).
  if (backing_ && backing_->size() > old_size && new_size > old_size) {
    write_zeroes_locked(old_size, new_size - old_size, false);
    flush_locked();
  }
}

void Image::grow_l1_locked(uint64_t entries) {
  // New table elsewhere; the header switches to it only once it and its refcounts are on disk.
  const uint64_t clusters = div_round_up(entries * 8, cluster_size_);
  const uint64_t new_offset = alloc_clusters(clusters);
  std::vector<uint8_t> raw(clusters * cluster_size_, 0);
  for (size_t i = 0; i < l1_.size(); ++i) store_be64(&raw[i * 8], l1_[i]);
  pwrite_all(fd_.get(), raw, new_offset);
  flush_refcounts();
  sync_file();
  const uint64_t old_offset = header_.l1_table_offset;
  const uint64_t old_clusters = div_round_up(l1_.size() * 8, cluster_size_);
  header_.l1_table_offset = new_offset;
  header_.l1_size = uint32_t(entries);
  l1_.resize(entries, 0);
  write_header();
  sync_file();
  if (old_offset != 0) {
    for (uint64_t c = 0; c < old_clusters; ++c)
      deferred_frees_.push_back(old_offset + c * cluster_size_);
  }
  flush_locked();
}

void Image::make_empty() {
  std::lock_guard lock(mu_);
  if (read_only_) throw std::system_error(EROFS, std::generic_category(), "image is read-only");
  const uint64_t per_table = l2_entries();
  const uint64_t clusters = div_round_up(header_.size, cluster_size_);
  for (uint64_t i = 0; i < l1_.size(); ++i) {
    if ((l1_[i] & kOffsetMask) == 0) continue;
    for (uint64_t j = 0; j < per_table && i * per_table + j < clusters; ++j) {
      const uint64_t guest_cluster = i * per_table + j;
      const L2Entry entry = l2_entry(guest_cluster);
      if (entry.empty()) continue;
      set_l2_entry(guest_cluster, {});
      release_entry_later(entry.word);
    }
  }
  data_dirty_ = true;
  flush_locked();
}

void Image::set_backing_file(const std::string& file, const std::string& format) {
  std::lock_guard lock(mu_);
  if (read_only_) throw std::system_error(EROFS, std::generic_category(), "image is read-only");
  if (file.size() > kMaxBackingNameLength) {
    throw std::system_error(EINVAL, std::generic_category(), "backing file name too long");
  }
  flush_locked();
  Header h = header_;
  h.backing_file = file;
  set_backing_format(h, file.empty() ? std::string() : format);
  if (file.empty()) {
    h.backing_file_offset = 0;
    h.backing_file_size = 0;
  }
  try {
    serialize_header(h, cluster_size_);
  } catch (const Qcow2Error&) {
    throw std::system_error(ENOSPC, std::generic_category(), "No space left in the file header");
  }
  header_ = std::move(h);
  write_header();
  sync_file();
}

void Image::flush_refcounts() {
  bool wrote = false;
  for (auto& [index, block] : refblocks_) {
    if (!block.dirty) continue;
    pwrite_all(fd_.get(), block.raw, refcount_table_[index] & kOffsetMask);
    block.dirty = false;
    wrote = true;
  }
  if (wrote || data_dirty_) sync_file();
  data_dirty_ = false;
  if (refcount_table_dirty_) {
    std::vector<uint8_t> raw(refcount_table_.size() * 8);
    for (size_t i = 0; i < refcount_table_.size(); ++i) store_be64(&raw[i * 8], refcount_table_[i]);
    pwrite_all(fd_.get(), raw, header_.refcount_table_offset);
    refcount_table_dirty_ = false;
    sync_file();
  }
}

void Image::flush_locked() {
  if (read_only_) return;
  flush_refcounts();
  bool wrote_l2 = false;
  for (auto& t : l2_lru_) {
    if (!t.dirty) continue;
    write_l2(t);
    wrote_l2 = true;
  }
  if (wrote_l2) sync_file();
  if (l1_dirty_begin_ < l1_dirty_end_) {
    std::vector<uint8_t> raw((l1_dirty_end_ - l1_dirty_begin_) * 8);
    for (uint64_t i = l1_dirty_begin_; i < l1_dirty_end_; ++i) {
      store_be64(&raw[(i - l1_dirty_begin_) * 8], l1_[i]);
    }
    pwrite_all(fd_.get(), raw, header_.l1_table_offset + l1_dirty_begin_ * 8);
    l1_dirty_begin_ = UINT64_MAX;
    l1_dirty_end_ = 0;
    sync_file();
  }
  if (!deferred_frees_.empty()) {
    // Nothing on disk references these any more: their refcounts may drop now.
    apply_deferred_frees();
    flush_refcounts();
  }
}

void Image::apply_deferred_frees() {
  // A read that looked a cluster up before it was dropped may still be reading it.
  unlocked_reads_done_.wait(mu_, [this] { return unlocked_reads_ == 0; });
  auto frees = std::move(deferred_frees_);
  deferred_frees_.clear();
  for (uint64_t item : frees) {
    uint64_t begin, end;
    if (item & kFlagCompressed) {
      const uint32_t x = 62 - (header_.cluster_bits - 8);
      const uint64_t coff = item & ((1ull << x) - 1);
      const uint64_t sectors = ((item & ~kFlagCopied & ~kFlagCompressed) >> x) + 1;
      begin = (coff & ~511ull) / cluster_size_;
      end = div_round_up((coff & ~511ull) + sectors * 512, cluster_size_);
    } else {
      begin = item / cluster_size_;
      end = begin + 1;
    }
    for (uint64_t c = begin; c < end; ++c) {
      const uint64_t rc = get_refcount(c);
      if (rc == 0) continue;  // already inconsistent; never underflow
      set_refcount(c, rc - 1);
      if (rc == 1) {
        refblock_clusters_.erase(c * cluster_size_);
        l2_clusters_.erase(c * cluster_size_);
        free_hint_ = std::min(free_hint_, c);
        if (compressed_cursor_ / cluster_size_ == c) compressed_cursor_ = 0;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Refcounts

uint64_t Image::max_refcount() const {
  const uint32_t bits = refcount_bits();
  return bits == 64 ? UINT64_MAX : (1ull << bits) - 1;
}

Image::RefBlock* Image::refblock(uint64_t block_index, bool create) {
  auto it = refblocks_.find(block_index);
  if (it != refblocks_.end()) return &it->second;
  if (block_index >= refcount_table_.size()) return nullptr;
  const uint64_t off = refcount_table_[block_index] & kOffsetMask;
  if (off == 0) {
    if (!create) return nullptr;
    return &refblocks_[block_index];  // caller fills it
  }
  if (off % cluster_size_ != 0 || off < cluster_size_) {
    throw Qcow2Error(
        fmt::format("refcount block {} has an invalid offset 0x{:x}", block_index, off));
  }
  RefBlock b;
  b.raw.resize(cluster_size_);
  pread_exact(fd_.get(), b.raw, off, "refcount block");
  return &(refblocks_[block_index] = std::move(b));
}

uint64_t Image::get_refcount(uint64_t cluster) {
  const uint64_t per_block = refcount_block_entries();
  RefBlock* b = refblock(cluster / per_block, false);
  if (!b || b->raw.empty()) return 0;
  const uint64_t i = cluster % per_block;
  const uint32_t bits = refcount_bits();
  const uint8_t* raw = b->raw.data();
  switch (bits) {
    case 1:
    case 2:
    case 4:
      return (raw[i * bits / 8] >> (i * bits % 8)) & ((1u << bits) - 1);
    case 8:
      return raw[i];
    case 16:
      return load_be16(raw + i * 2);
    case 32:
      return load_be32(raw + i * 4);
    default:
      return load_be64(raw + i * 8);
  }
}

void Image::set_refcount(uint64_t cluster, uint64_t value) {
  if (value > max_refcount()) throw Qcow2Error("refcount overflow");
  const uint64_t per_block = refcount_block_entries();
  const uint64_t bi = cluster / per_block;
  ensure_refcount_block(bi);
  RefBlock* b = refblock(bi, false);
  const uint64_t i = cluster % per_block;
  const uint32_t bits = refcount_bits();
  uint8_t* raw = b->raw.data();
  switch (bits) {
    case 1:
    case 2:
    case 4: {
      const uint32_t shift = i * bits % 8;
      const uint8_t mask = uint8_t(((1u << bits) - 1) << shift);
      raw[i * bits / 8] = uint8_t((raw[i * bits / 8] & ~mask) | (value << shift));
      break;
    }
    case 8:
      raw[i] = uint8_t(value);
      break;
    case 16:
      store_be16(raw + i * 2, uint16_t(value));
      break;
    case 32:
      store_be32(raw + i * 4, uint32_t(value));
      break;
    default:
      store_be64(raw + i * 8, value);
  }
  b->dirty = true;
}

bool Image::excluded(uint64_t cluster) const {
  if (check_in_use_ && cluster < check_in_use_->size() && (*check_in_use_)[cluster] != 0) {
    return true;
  }
  for (const auto& e : exclusions_) {
    if (cluster >= e.begin && cluster < e.end) return true;
  }
  return false;
}

void Image::ensure_refcount_block(uint64_t bi) {
  if (bi >= refcount_table_.size()) grow_refcount_table(bi);
  if (refcount_table_[bi] & kOffsetMask) {
    refblock(bi, false);
    return;
  }
  const uint64_t per_block = refcount_block_entries();
  // The block's whole range is free (no block = all zero refcounts), so normally the block can
  // live in its own range and describe itself.
  uint64_t place = 0;
  for (uint64_t c = std::max<uint64_t>(1, bi * per_block); c < (bi + 1) * per_block; ++c) {
    if (!excluded(c)) {
      place = c;
      break;
    }
  }
  RefBlock fresh;
  fresh.raw.assign(cluster_size_, 0);
  fresh.dirty = true;
  if (place != 0) {
    refblocks_[bi] = std::move(fresh);
    refcount_table_[bi] = place * cluster_size_;
    refblock_clusters_.insert(place * cluster_size_);
    refcount_table_dirty_ = true;
    set_refcount(place, 1);
    note_allocation(place);
    return;
  }
  // Range entirely taken by the allocation in progress: put the block elsewhere.
  const uint64_t off = alloc_clusters(1);
  refblocks_[bi] = std::move(fresh);
  refcount_table_[bi] = off;
  refblock_clusters_.insert(off);
  refcount_table_dirty_ = true;
}

void Image::grow_refcount_table(uint64_t bi) {
  const uint64_t per_block = refcount_block_entries();
  const uint64_t entries_per_cluster = cluster_size_ / 8;
  uint64_t entries = std::max<uint64_t>(bi + 1, refcount_table_.size() * 3 / 2);
  uint64_t clusters = 0, place = 0;
  for (;;) {
    clusters = div_round_up(entries, entries_per_cluster);
    place = find_free_run(clusters);
    // The table must also cover its own clusters and the blocks describing them.
    const uint64_t last_needed = place + clusters + div_round_up(clusters, per_block) + 2;
    if (last_needed / per_block < clusters * entries_per_cluster) break;
    entries = last_needed / per_block + 1;
  }
  if (clusters * cluster_size_ > kMaxRefcountTableBytes) throw Qcow2Error("refcount table full");
  const uint64_t old_offset = header_.refcount_table_offset;
  const uint64_t old_clusters = header_.refcount_table_clusters;
  refcount_table_.resize(clusters * entries_per_cluster, 0);
  exclusions_.push_back({place, place + clusters});
  for (uint64_t c = place; c < place + clusters; ++c) set_refcount(c, 1);
  exclusions_.pop_back();
  // Blocks first, then the new table, then the header that points at it.
  header_.refcount_table_offset = place * cluster_size_;
  header_.refcount_table_clusters = uint32_t(clusters);
  refcount_table_dirty_ = true;
  flush_refcounts();
  write_header();
  sync_file();
  for (uint64_t c = old_offset / cluster_size_; c < old_offset / cluster_size_ + old_clusters;
       ++c) {
    const uint64_t rc = get_refcount(c);
    if (rc) set_refcount(c, rc - 1);
    free_hint_ = std::min(free_hint_, c);
  }
}

uint64_t Image::find_free_run(uint64_t count) {
  uint64_t start = std::max<uint64_t>(free_hint_, 1);
  uint64_t run = 0;
  for (uint64_t c = start;; ++c) {
    if (get_refcount(c) != 0 || excluded(c)) {
      run = 0;
      start = c + 1;
      continue;
    }
    if (++run == count) return start;
  }
}

uint64_t Image::alloc_clusters(uint64_t count) {
  const uint64_t first = find_free_run(count);
  exclusions_.push_back({first, first + count});
  for (uint64_t c = first; c < first + count; ++c) {
    if (is_metadata(c * cluster_size_)) {
      throw Qcow2Error("refcounts are corrupt: allocation would overwrite image metadata");
    }
    exclusions_.back().begin = c;  // c stays excluded until its refcount is set
    set_refcount(c, 1);
    note_allocation(c);
  }
  exclusions_.pop_back();
  if (count == 1 || first == free_hint_) free_hint_ = first + count;
  return first * cluster_size_;
}

}  // namespace kiln::block::qcow2
