// qemu-img check for qcow2: recount every reference, compare with the stored refcounts, and
// optionally repair leaks (refcount too high) and corruptions (refcount too low, bad COPIED flags).
#include <fmt/format.h>

#include <algorithm>

#include "base/math.h"
#include "block/qcow2/file_io.h"
#include "block/qcow2/qcow2.h"

namespace kiln::block::qcow2 {

void Image::note_allocation(uint64_t cluster) {
  if (check_in_use_ && cluster < check_in_use_->size()) (*check_in_use_)[cluster] += 1;
}

void Image::add_refs(uint64_t offset, uint64_t length, std::vector<uint64_t>& refs, CheckResult& r,
                     const char* what) {
  if (length == 0) return;
  const uint64_t first = offset / cluster_size_;
  const uint64_t last = (offset + length - 1) / cluster_size_;
  for (uint64_t c = first; c <= last; ++c) {
    if (c >= refs.size()) {
      ++r.corruptions;
      r.messages.push_back(
          fmt::format("ERROR: {} at offset 0x{:x} lies beyond the end of the image file", what,
                      c * cluster_size_));
      return;
    }
    ++refs[c];
  }
}

void Image::walk_l1(uint64_t l1_offset, uint64_t l1_size, bool active, std::vector<uint64_t>& refs,
                    CheckResult& r) {
  std::vector<uint8_t> raw(l1_size * 8);
  try {
    pread_exact(fd_.get(), raw, l1_offset, "L1 table");
  } catch (const std::exception& e) {
    ++r.check_errors;
    r.messages.push_back(fmt::format("ERROR: {}", e.what()));
    return;
  }
  const uint32_t x = 62 - (header_.cluster_bits - 8);
  uint64_t last_host = 0;
  std::vector<uint8_t> l2raw(cluster_size_);
  for (uint64_t i = 0; i < l1_size; ++i) {
    const uint64_t l2_off = load_be64(&raw[i * 8]) & kOffsetMask;
    if (l2_off == 0) continue;
    if (l2_off % cluster_size_ != 0) {
      ++r.corruptions;
      r.messages.push_back(fmt::format(
          "ERROR l2_offset={:x}: Table is not cluster aligned; L1 entry corrupted", l2_off));
      continue;
    }
    const uint64_t before = r.corruptions;
    add_refs(l2_off, cluster_size_, refs, r, "L2 table");
    if (r.corruptions != before) continue;
    pread_zero_fill(fd_.get(), l2raw, l2_off);
    for (uint64_t j = 0; j < l2_entries(); ++j) {
      const L2Entry e = load_l2_entry(&l2raw[j * l2_entry_bytes()], extended_l2());
      if (extended_l2() && e.compressed() && e.bitmap) {
        // QEMU also drops the cluster's references here, so its repair would free live data;
        // keeping them makes this a report only.
        ++r.corruptions;
        r.messages.push_back(
            fmt::format("ERROR compressed cluster {} with non-zero subcluster allocation "
                        "bitmap, entry=0x{:x}",
                        j, e.word));
      }
      check_l2_entry(e, x, active, last_host, refs, r);
    }
  }
}

void Image::check_l2_entry(const L2Entry& e, uint32_t x, bool active, uint64_t& last_host,
                           std::vector<uint64_t>& refs, CheckResult& r) {
  if (e.compressed()) {
    const uint64_t coff = e.word & ((1ull << x) - 1);
    const uint64_t sectors = ((e.word & ~kFlagCopied & ~kFlagCompressed) >> x) + 1;
    add_refs(coff & ~511ull, sectors * 512, refs, r, "compressed cluster");
    if (active) {
      ++r.allocated_clusters;
      ++r.compressed_clusters;
      ++r.fragmented_clusters;  // as qemu-img counts them: re-read sector by sector
    }
    return;
  }
  const uint64_t host = e.host();
  if (extended_l2() && (e.alloc_bits() & e.zero_bits()) && host) {
    ++r.corruptions;
    r.messages.push_back(fmt::format(
        "ERROR offset={:x}: Allocated cluster has corrupted subcluster allocation bitmap", host));
  }
  if (host == 0) {
    if (extended_l2() && e.alloc_bits()) {
      ++r.corruptions;
      r.messages.push_back("ERROR: Unallocated cluster has non-zero subcluster allocation map");
    }
    return;
  }
  if (host % cluster_size_ != 0) {
    ++r.corruptions;
    r.messages.push_back(
        fmt::format("ERROR offset={:x}: Cluster is not properly aligned; L2 "
                    "entry corrupted.",
                    host));
    return;
  }
  add_refs(host, cluster_size_, refs, r, "data cluster");
  if (active) {
    ++r.allocated_clusters;
    if (last_host != 0 && host != last_host + cluster_size_) ++r.fragmented_clusters;
    last_host = host;
  }
}

CheckResult Image::check_locked(std::vector<uint64_t>& refs, std::vector<L2Ref>& copied) {
  CheckResult r;
  const uint64_t fsize = file_size();
  refs.assign(div_round_up(fsize, cluster_size_), 0);
  copied.clear();
  r.total_clusters = div_round_up(header_.size, cluster_size_);

  add_refs(0, cluster_size_, refs, r, "header");
  add_refs(header_.l1_table_offset, header_.l1_size * 8ull, refs, r, "L1 table");
  walk_l1(header_.l1_table_offset, header_.l1_size, true, refs, r);
  add_refs(header_.refcount_table_offset, uint64_t(header_.refcount_table_clusters) * cluster_size_,
           refs, r, "refcount table");
  for (uint64_t i = 0; i < refcount_table_.size(); ++i) {
    const uint64_t off = refcount_table_[i] & kOffsetMask;
    if (off == 0) continue;
    if (off % cluster_size_ != 0 || off >= fsize) {
      ++r.corruptions;
      r.messages.push_back(
          fmt::format("ERROR refcount block {} is not cluster aligned or lies "
                      "outside the image",
                      i));
      continue;
    }
    add_refs(off, cluster_size_, refs, r, "refcount block");
  }

  // Internal snapshots: their tables and the clusters they reference.
  uint64_t pos = header_.snapshots_offset;
  for (uint32_t s = 0; s < header_.nb_snapshots; ++s) {
    uint8_t fixed[40];
    try {
      pread_exact(fd_.get(), fixed, pos, "snapshot table");
    } catch (const std::exception& e) {
      ++r.check_errors;
      r.messages.push_back(fmt::format("ERROR: {}", e.what()));
      break;
    }
    const uint64_t l1_off = load_be64(fixed);
    const uint32_t l1_size = load_be32(fixed + 8);
    const uint16_t id_len = load_be16(fixed + 12);
    const uint16_t name_len = load_be16(fixed + 14);
    const uint32_t extra = load_be32(fixed + 36);
    if (l1_off % cluster_size_ != 0 || uint64_t(l1_size) * 8 > kMaxL1Bytes || extra > 1024) {
      ++r.corruptions;
      r.messages.push_back(fmt::format("ERROR snapshot {} has an invalid L1 table", s));
      break;
    }
    add_refs(l1_off, l1_size * 8ull, refs, r, "snapshot L1 table");
    walk_l1(l1_off, l1_size, false, refs, r);
    pos += (40ull + extra + id_len + name_len + 7) & ~7ull;
  }
  if (header_.nb_snapshots) {
    add_refs(header_.snapshots_offset, pos - header_.snapshots_offset, refs, r, "snapshot table");
  }

  uint64_t end_cluster = 0;
  for (uint64_t c = 0; c < refs.size(); ++c) {
    uint64_t disk = 0;
    try {
      disk = get_refcount(c);
    } catch (const std::exception&) {
      disk = 0;  // unreadable refcount block: reported above
    }
    if (disk || refs[c]) end_cluster = c + 1;
    if (disk < refs[c]) {
      ++r.corruptions;
      r.messages.push_back(
          fmt::format("ERROR cluster {} refcount={} reference={}", c, disk, refs[c]));
    } else if (disk > refs[c]) {
      ++r.leaks;
      r.messages.push_back(
          fmt::format("Leaked cluster {} refcount={} reference={}", c, disk, refs[c]));
    }
  }
  r.image_end_offset = end_cluster * cluster_size_;

  // COPIED must be set exactly when the refcount is 1 (active L1/L2 only).
  std::vector<uint8_t> l2raw(cluster_size_);
  for (uint64_t i = 0; i < l1_.size(); ++i) {
    const uint64_t l2_off = l1_[i] & kOffsetMask;
    if (l2_off == 0 || l2_off % cluster_size_ != 0 || l2_off >= fsize) continue;
    auto rc_of = [&](uint64_t off) {
      try {
        return get_refcount(off / cluster_size_);
      } catch (const std::exception&) {
        return uint64_t{0};
      }
    };
    const uint64_t l2_rc = rc_of(l2_off);
    if ((l2_rc == 1) != bool(l1_[i] & kFlagCopied) && l2_rc != 0) {
      ++r.corruptions;
      r.messages.push_back(
          fmt::format("ERROR OFLAG_COPIED L2 cluster: l1_index={} l1_entry={:x} "
                      "refcount={}",
                      i, l1_[i], l2_rc));
      copied.push_back({0, i, l1_[i]});
    }
    pread_zero_fill(fd_.get(), l2raw, l2_off);
    for (uint64_t j = 0; j < l2_entries(); ++j) {
      const uint64_t e = load_be64(&l2raw[j * l2_entry_bytes()]);
      const uint64_t host = e & kOffsetMask;
      if ((e & kFlagCompressed) || host == 0 || host % cluster_size_ != 0 || host >= fsize) {
        continue;
      }
      const uint64_t rc = rc_of(host);
      if ((rc == 1) != bool(e & kFlagCopied)) {
        ++r.corruptions;
        r.messages.push_back(
            fmt::format("ERROR OFLAG_COPIED data cluster: l2_entry={:x} "
                        "refcount={}",
                        e, rc));
        copied.push_back({l2_off, j, e});
      }
    }
  }
  return r;
}

void Image::repair(RepairMode mode, std::vector<uint64_t>& refs, const std::vector<L2Ref>& copied) {
  check_in_use_ = &refs;
  const uint64_t fsize = file_size();
  if (mode == RepairMode::kAll) {
    // Refcount blocks that cannot be read are dropped; set_refcount() rebuilds them.
    for (uint64_t i = 0; i < refcount_table_.size(); ++i) {
      const uint64_t off = refcount_table_[i] & kOffsetMask;
      if (off && (off % cluster_size_ != 0 || off >= fsize)) {
        refcount_table_[i] = 0;
        refcount_table_dirty_ = true;
        refblocks_.erase(i);
      }
    }
  }
  for (uint64_t c = 0; c < refs.size(); ++c) {
    uint64_t disk = 0;
    try {
      disk = get_refcount(c);
    } catch (const std::exception&) {
      disk = 0;
    }
    const bool fix = disk > refs[c] || (mode == RepairMode::kAll && disk < refs[c]);
    if (fix) set_refcount(c, std::min(refs[c], max_refcount()));
  }
  free_hint_ = 1;
  if (mode == RepairMode::kAll) {
    for (const auto& ref : copied) {
      if (ref.table_offset == 0) {
        const uint64_t off = l1_[ref.index] & kOffsetMask;
        l1_[ref.index] = get_refcount(off / cluster_size_) == 1 ? (off | kFlagCopied) : off;
        l1_dirty_begin_ = std::min(l1_dirty_begin_, ref.index);
        l1_dirty_end_ = std::max(l1_dirty_end_, ref.index + 1);
        continue;
      }
      L2Table* t = load_l2(ref.table_offset);
      uint64_t& e = t->entries[ref.index].word;
      const bool one = get_refcount((e & kOffsetMask) / cluster_size_) == 1;
      e = one ? (e | kFlagCopied) : (e & ~kFlagCopied);
      t->dirty = true;
    }
  }
  check_in_use_ = nullptr;
  rebuild_metadata_set();
  flush_locked();
}

CheckResult Image::check(RepairMode mode) {
  std::lock_guard lock(mu_);
  flush_locked();
  std::vector<uint64_t> refs;
  std::vector<L2Ref> copied;
  CheckResult first = check_locked(refs, copied);
  const bool want =
      (first.leaks && mode != RepairMode::kNone) || (first.corruptions && mode == RepairMode::kAll);
  if (!want) return first;
  if (read_only_) throw Qcow2Error("cannot repair an image opened read-only");
  repair(mode, refs, copied);
  CheckResult after = check_locked(refs, copied);
  after.leaks_fixed = first.leaks > after.leaks ? first.leaks - after.leaks : 0;
  after.corruptions_fixed =
      first.corruptions > after.corruptions ? first.corruptions - after.corruptions : 0;
  after.messages.insert(after.messages.begin(), first.messages.begin(), first.messages.end());
  return after;
}

}  // namespace kiln::block::qcow2
