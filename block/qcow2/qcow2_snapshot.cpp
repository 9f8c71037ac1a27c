// Internal snapshots: reading the snapshot table.
#include <fmt/format.h>
#include <time.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <system_error>

#include "base/math.h"
#include "block/qcow2/file_io.h"
#include "block/qcow2/qcow2.h"

namespace kiln::block::qcow2 {

namespace {
constexpr uint32_t kMaxSnapshotExtraData = 1024;  // QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA
}  // namespace

std::vector<SnapshotInfo> Image::snapshots() {
  std::lock_guard lock(mu_);
  std::vector<SnapshotInfo> out;
  for (auto& s : read_snapshots_locked()) out.push_back(std::move(s.info));
  return out;
}

std::vector<Image::RawSnapshot> Image::read_snapshots_locked() {
  std::vector<RawSnapshot> out;
  const uint64_t fsize = file_size();
  uint64_t pos = header_.snapshots_offset;
  for (uint32_t i = 0; i < header_.nb_snapshots; ++i) {
    uint8_t fixed[40];
    if (pos > fsize || fsize - pos < sizeof fixed) {
      throw Qcow2Error("snapshot table lies past the end of the file");
    }
    pread_exact(fd_.get(), fixed, pos, "snapshot table");
    SnapshotInfo s;
    s.l1_table_offset = load_be64(fixed);
    s.l1_size = load_be32(fixed + 8);
    const uint16_t id_size = load_be16(fixed + 12), name_size = load_be16(fixed + 14);
    s.date_sec = load_be32(fixed + 16);
    s.date_nsec = load_be32(fixed + 20);
    s.vm_clock_nsec = load_be64(fixed + 24);
    s.vm_state_size = load_be32(fixed + 32);
    const uint32_t extra_size = load_be32(fixed + 36);
    if (extra_size > kMaxSnapshotExtraData) {
      throw Qcow2Error(fmt::format("snapshot {} has too much extra data", i));
    }
    const uint64_t var_size = uint64_t(extra_size) + id_size + name_size;
    if (fsize - pos - sizeof fixed < var_size) {
      throw Qcow2Error("snapshot table lies past the end of the file");
    }
    const uint64_t total = (sizeof fixed + var_size + 7) & ~uint64_t{7};
    std::vector<uint8_t> bytes(total);
    pread_zero_fill(fd_.get(), bytes, pos);
    const uint8_t* var = bytes.data() + sizeof fixed;
    s.disk_size = header_.size;
    if (extra_size >= 8) s.vm_state_size = load_be64(var);
    if (extra_size >= 16) s.disk_size = load_be64(var + 8);
    if (extra_size >= 24) s.icount = int64_t(load_be64(var + 16));
    s.id.assign(var + extra_size, var + extra_size + id_size);
    s.name.assign(var + extra_size + id_size, var + var_size);
    out.push_back({std::move(s), std::move(bytes)});
    pos += total;
  }
  return out;
}

size_t Image::find_snapshot(const std::vector<RawSnapshot>& list, const std::string& id_or_name,
                            bool by_id) const {
  for (size_t i = 0; by_id && i < list.size(); ++i) {
    if (list[i].info.id == id_or_name) return i;
  }
  for (size_t i = 0; i < list.size(); ++i) {
    if (list[i].info.name == id_or_name) return i;
  }
  throw std::system_error(ENOENT, std::generic_category(), "snapshot not found");
}

void Image::write_snapshot_table(const std::vector<RawSnapshot>& list) {
  uint64_t old_size = 0;
  for (const auto& s : read_snapshots_locked()) old_size += s.bytes.size();
  const uint64_t old_offset = header_.snapshots_offset;
  std::vector<uint8_t> table;
  for (const auto& s : list) table.insert(table.end(), s.bytes.begin(), s.bytes.end());
  uint64_t new_offset = 0;
  if (!table.empty()) {
    new_offset = alloc_clusters(div_round_up(table.size(), cluster_size_));
    pwrite_all(fd_.get(), table, new_offset);
  }
  flush_refcounts();
  sync_file();
  header_.nb_snapshots = uint32_t(list.size());
  header_.snapshots_offset = new_offset;
  write_header();
  sync_file();
  if (old_offset && old_size) {
    for (uint64_t c = 0; c < div_round_up(old_size, cluster_size_); ++c) {
      deferred_frees_.push_back(old_offset + c * cluster_size_);
    }
  }
  flush_locked();
}

std::vector<uint64_t> Image::read_l1(uint64_t offset, uint32_t size) {
  if (uint64_t(size) * 8 > kMaxL1Bytes || offset % cluster_size_ != 0 || offset == 0) {
    throw Qcow2Error("snapshot has an invalid L1 table");
  }
  std::vector<uint8_t> raw(size * 8ull);
  pread_exact(fd_.get(), raw, offset, "snapshot L1 table");
  std::vector<uint64_t> l1(size);
  for (size_t i = 0; i < l1.size(); ++i) l1[i] = load_be64(&raw[i * 8]);
  return l1;
}

uint64_t Image::adjust_refcount(uint64_t cluster, int addend) {
  const uint64_t rc = get_refcount(cluster);
  if (addend == 0) return rc;
  if (addend < 0 && rc == 0) throw Qcow2Error("refcount underflow while updating a snapshot");
  if (addend > 0 && rc >= max_refcount()) throw Qcow2Error("refcount overflow");
  const uint64_t now = addend > 0 ? rc + 1 : rc - 1;
  // A read may still be using a cluster it looked up before it was dropped (Image::read).
  if (now == 0) unlocked_reads_done_.wait(mu_, [this] { return unlocked_reads_ == 0; });
  set_refcount(cluster, now);
  if (now == 0) {
    free_hint_ = std::min(free_hint_, cluster);
    if (compressed_cursor_ / cluster_size_ == cluster) compressed_cursor_ = 0;
  }
  return now;
}

void Image::update_snapshot_refcounts(std::vector<uint64_t>& l1, int addend, bool active) {
  const uint32_t x = 62 - (header_.cluster_bits - 8);
  for (size_t i = 0; i < l1.size(); ++i) {
    const uint64_t l2_off = l1[i] & kOffsetMask;
    if (l2_off == 0) continue;
    if (l2_off % cluster_size_ != 0 || l2_off < cluster_size_) {
      throw Qcow2Error(fmt::format("L1 entry {} has an invalid L2 table offset 0x{:x}", i, l2_off));
    }
    L2Table* t = load_l2(l2_off);
    bool changed = false;
    for (auto& l2e : t->entries) {
      uint64_t& e = l2e.word;  // the subcluster bitmap of an extended entry never changes here
      if (e & kFlagCompressed) {
        if (addend != 0) {
          const uint64_t coff = e & ((1ull << x) - 1);
          const uint64_t sectors = ((e & ~kFlagCopied & ~kFlagCompressed) >> x) + 1;
          const uint64_t begin = (coff & ~511ull) / cluster_size_;
          const uint64_t end = div_round_up((coff & ~511ull) + sectors * 512, cluster_size_);
          for (uint64_t c = begin; c < end; ++c) adjust_refcount(c, addend);
        }
        continue;
      }
      const uint64_t host = e & kOffsetMask;
      if (host == 0) continue;
      const uint64_t rc = adjust_refcount(host / cluster_size_, addend);
      const uint64_t ne = rc == 1 ? (e | kFlagCopied) : (e & ~kFlagCopied);
      if (ne != e) {
        e = ne;
        changed = true;
      }
    }
    if (changed) t->dirty = true;
    const uint64_t rc = adjust_refcount(l2_off / cluster_size_, addend);
    if (rc == 0) {
      // The table is free now: forget it without writing it back.
      auto it = l2_index_.find(l2_off);
      if (it != l2_index_.end()) {
        l2_lru_.erase(it->second);
        l2_index_.erase(it);
      }
      l2_clusters_.erase(l2_off);
    }
    const uint64_t ne = rc == 1 ? (l1[i] | kFlagCopied) : (l1[i] & ~kFlagCopied);
    if (ne != l1[i]) {
      l1[i] = ne;
      if (active) {
        l1_dirty_begin_ = std::min<uint64_t>(l1_dirty_begin_, i);
        l1_dirty_end_ = std::max<uint64_t>(l1_dirty_end_, i + 1);
      }
    }
  }
}

void Image::create_snapshot(const std::string& name) {
  std::lock_guard lock(mu_);
  if (read_only_) throw std::system_error(EROFS, std::generic_category(), "image is read-only");
  flush_locked();
  auto list = read_snapshots_locked();
  if (list.size() >= kMaxSnapshots) throw Qcow2Error("too many snapshots");
  // One-bit refcounts cannot count a second reference: refuse before touching anything.
  if (max_refcount() < 2) {
    throw std::system_error(EINVAL, std::generic_category(),
                            "refcount_bits=1 cannot share clusters");
  }
  uint64_t max_id = 0;
  for (const auto& s : list)
    max_id = std::max<uint64_t>(max_id, std::strtoull(s.info.id.c_str(), nullptr, 10));
  update_snapshot_refcounts(l1_, 1, true);
  // The snapshot's own copy of the (now shared) L1 table.
  const uint64_t l1_bytes = l1_.size() * 8;
  uint64_t sn_l1 = 0;
  if (l1_bytes) {
    sn_l1 = alloc_clusters(div_round_up(l1_bytes, cluster_size_));
    std::vector<uint8_t> raw(l1_bytes);
    for (size_t i = 0; i < l1_.size(); ++i) store_be64(&raw[i * 8], l1_[i]);
    pwrite_all(fd_.get(), raw, sn_l1);
  }
  data_dirty_ = true;
  flush_locked();

  timespec now{};
  ::clock_gettime(CLOCK_REALTIME, &now);
  RawSnapshot s;
  s.info.id = std::to_string(max_id + 1);
  s.info.name = name.substr(0, 255);
  s.info.l1_table_offset = sn_l1;
  s.info.l1_size = uint32_t(l1_.size());
  s.info.date_sec = uint32_t(now.tv_sec);
  s.info.date_nsec = uint32_t(now.tv_nsec / 1000 * 1000);  // microseconds, as qemu-img
  s.info.disk_size = header_.size;
  s.info.icount = 0;
  constexpr uint32_t kExtra = 24;
  const size_t var = kExtra + s.info.id.size() + s.info.name.size();
  s.bytes.assign((40 + var + 7) & ~size_t{7}, 0);
  uint8_t* p = s.bytes.data();
  store_be64(p, sn_l1);
  store_be32(p + 8, s.info.l1_size);
  store_be16(p + 12, uint16_t(s.info.id.size()));
  store_be16(p + 14, uint16_t(s.info.name.size()));
  store_be32(p + 16, s.info.date_sec);
  store_be32(p + 20, s.info.date_nsec);
  store_be32(p + 36, kExtra);
  store_be64(p + 48, header_.size);  // extra data: vm state size (0), disk size, icount (0)
  std::memcpy(p + 40 + kExtra, s.info.id.data(), s.info.id.size());
  std::memcpy(p + 40 + kExtra + s.info.id.size(), s.info.name.data(), s.info.name.size());
  list.push_back(std::move(s));
  write_snapshot_table(list);
}

void Image::delete_snapshot(const std::string& name) {
  std::lock_guard lock(mu_);
  if (read_only_) throw std::system_error(EROFS, std::generic_category(), "image is read-only");
  flush_locked();
  auto list = read_snapshots_locked();
  const size_t index = find_snapshot(list, name, false);
  const SnapshotInfo info = list[index].info;
  std::vector<uint64_t> sn_l1 = read_l1(info.l1_table_offset, info.l1_size);
  // The table forgets the snapshot first: a crash after this only leaks clusters.
  list.erase(list.begin() + long(index));
  write_snapshot_table(list);
  update_snapshot_refcounts(sn_l1, -1, false);
  for (uint64_t c = 0; c < div_round_up(info.l1_size * 8ull, cluster_size_); ++c) {
    adjust_refcount(info.l1_table_offset / cluster_size_ + c, -1);
  }
  update_snapshot_refcounts(l1_, 0, true);
  data_dirty_ = true;
  flush_locked();
  rebuild_metadata_set();
}

void Image::apply_snapshot(const std::string& id_or_name) {
  std::lock_guard lock(mu_);
  if (read_only_) throw std::system_error(EROFS, std::generic_category(), "image is read-only");
  flush_locked();
  auto list = read_snapshots_locked();
  const SnapshotInfo info = list[find_snapshot(list, id_or_name, true)].info;
  // The image takes the snapshot's size first, as QEMU does: what the current L1 maps past a
  // smaller size is dropped anyway, and a larger one needs room in the L1 table.
  if (info.disk_size != header_.size) resize_locked(info.disk_size);
  if (info.l1_size > l1_.size()) grow_l1_locked(info.l1_size);
  std::vector<uint64_t> sn_l1 = read_l1(info.l1_table_offset, info.l1_size);
  update_snapshot_refcounts(sn_l1, 1, false);
  std::vector<uint64_t> old_l1 = l1_;
  sn_l1.resize(l1_.size(), 0);
  l1_ = sn_l1;
  l1_dirty_begin_ = 0;
  l1_dirty_end_ = l1_.size();
  data_dirty_ = true;
  flush_locked();
  update_snapshot_refcounts(old_l1, -1, false);
  update_snapshot_refcounts(l1_, 0, true);
  rebuild_metadata_set();
  flush_locked();
}

}  // namespace kiln::block::qcow2
