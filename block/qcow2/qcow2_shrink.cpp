// Shrinking a qcow2 image (qemu-img resize --shrink, amend -o size=): every cluster past the new
// end loses its mapping, L2 tables that map nothing but such clusters go, and the file is cut
// after its last used cluster. The L1 table keeps its size, as QEMU's does.
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "base/errors.h"
#include "base/math.h"
#include "block/qcow2/qcow2.h"

namespace kiln::block::qcow2 {

void Image::shrink_locked(uint64_t new_size) {
  if (new_size % 512 != 0) throw Qcow2Error("The new size must be a multiple of 512");
  flush_locked();  // nothing deferred: refcounts below are the ones on disk
  const uint64_t per_table = l2_entries();
  const uint64_t kept_clusters = div_round_up(new_size, cluster_size_);
  const uint64_t old_clusters = div_round_up(header_.size, cluster_size_);
  const uint64_t kept_tables = div_round_up(kept_clusters, per_table);
  for (uint64_t i = kept_tables; i < l1_.size(); ++i) drop_l2_table_locked(i);
  // The table that maps both kept and dropped clusters loses only the dropped entries.
  const uint64_t partial_end = std::min(old_clusters, kept_tables * per_table);
  for (uint64_t c = kept_clusters; c < partial_end; ++c) {
    const L2Entry entry = l2_entry(c);
    if (entry.empty()) continue;
    set_l2_entry(c, {});
    release_entry_later(entry.word);
  }
  // The last kept cluster's bytes past the new end would reappear if the image grew again.
  if (const uint64_t tail = kept_clusters * cluster_size_ - new_size; tail != 0) {
    const L2Entry last = l2_entry(kept_clusters - 1);
    if (last.host() || last.compressed()) {
      std::vector<uint8_t> zeros(tail, 0);
      write_cluster_part(new_size, zeros);
    }
  }
  data_dirty_ = true;
  // References go before the size does: a crash in between leaves the old size reading zeros
  // past the new end, never a header that hides clusters still referenced.
  flush_locked();
  header_.size = new_size;
  write_header();
  sync_file();
  drop_empty_refcount_blocks_locked();
  truncate_after_last_cluster_locked();
}

void Image::drop_empty_refcount_blocks_locked() {
  const uint64_t per_block = refcount_block_entries();
  for (uint64_t bi = 0; bi < refcount_table_.size(); ++bi) {
    const uint64_t offset = refcount_table_[bi] & kOffsetMask;
    if (offset == 0) continue;
    const uint64_t own = offset / cluster_size_;
    const bool describes_itself = own / per_block == bi;
    bool empty = true;
    for (uint64_t c = bi * per_block; c < (bi + 1) * per_block && empty; ++c) {
      empty = get_refcount(c) == (describes_itself && c == own ? 1 : 0);
    }
    if (!empty) continue;
    // No cluster it counts is in use, so the table may forget it: a missing block reads as
    // all-zero refcounts. A block counted elsewhere loses that reference once the table is out.
    refblocks_.erase(bi);
    refblock_clusters_.erase(offset);
    refcount_table_[bi] = 0;
    refcount_table_dirty_ = true;
    if (!describes_itself) deferred_frees_.push_back(offset);
    free_hint_ = std::min(free_hint_, own);
  }
  flush_locked();
}

void Image::drop_l2_table_locked(uint64_t l1_index) {
  const uint64_t offset = l1_[l1_index] & kOffsetMask;
  if (offset == 0) return;
  // A data cluster's refcount counts the L1 tables reaching it, also through an L2 table a
  // snapshot shares: the active L1 gives up its reference to each, and to the table.
  for (const L2Entry& entry : get_l2(l1_index, false)->entries) release_entry_later(entry.word);
  if (auto cached = l2_index_.find(offset); cached != l2_index_.end()) {
    l2_lru_.erase(cached->second);  // gone: never written back
    l2_index_.erase(cached);
  }
  deferred_frees_.push_back(offset);
  l1_[l1_index] = 0;
  l1_dirty_begin_ = std::min(l1_dirty_begin_, l1_index);
  l1_dirty_end_ = std::max(l1_dirty_end_, l1_index + 1);
}

void Image::truncate_after_last_cluster_locked() {
  const uint64_t size = file_size();
  uint64_t end = div_round_up(size, cluster_size_);
  while (end > 1 && get_refcount(end - 1) == 0) --end;
  if (end * cluster_size_ >= size) return;
  if (::ftruncate(fd_.get(), off_t(end * cluster_size_)) != 0) throw_errno("ftruncate");
  free_hint_ = std::min(free_hint_, end);
}

}  // namespace kiln::block::qcow2
