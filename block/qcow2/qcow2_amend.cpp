// qemu-img amend for qcow2: compat level up/downgrade, lazy refcounts, refcount width, growth.
//
// Crash consistency: every step writes its new structures first, syncs, and only then switches
// the header (one sector write) over to them, so a crash leaves either the old or the new image,
// at worst with leaked clusters.
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "base/errors.h"
#include "base/math.h"
#include "block/qcow2/file_io.h"
#include "block/qcow2/qcow2.h"

namespace kiln::block::qcow2 {
namespace {

// Refcount `cluster` = `value` in refcount blocks laid out contiguously in memory.
void store_refcount(std::vector<uint8_t>& blocks, uint64_t cluster, uint32_t order,
                    uint64_t value) {
  const uint32_t bits = 1u << order;
  if (bits < 8) {
    const uint64_t bit = cluster * bits;
    const uint8_t mask = uint8_t(((1u << bits) - 1) << (bit % 8));
    blocks[bit / 8] = uint8_t((blocks[bit / 8] & ~mask) | ((value << (bit % 8)) & mask));
    return;
  }
  uint8_t* p = &blocks[cluster * (bits / 8)];
  for (uint32_t i = 0; i < bits / 8; ++i) p[i] = uint8_t(value >> (bits - 8 - 8 * i));
}

}  // namespace

void Image::amend(const AmendOptions& a) {
  if (read_only_) throw std::system_error(EROFS, std::generic_category(), "image is read-only");
  const uint32_t version = a.version.value_or(header_.version);
  const uint32_t old_bits = refcount_bits();
  const uint32_t bits = a.refcount_bits.value_or(old_bits);
  if (bits == 0 || bits > 64 || (bits & (bits - 1)) != 0) {
    throw Qcow2Error("Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (version < 3 && a.refcount_bits && bits != 16) {
    throw Qcow2Error(
        "Refcount widths other than 16 bits require compatibility level 1.1 or above (use "
        "compat=1.1 or greater)");
  }
  if (version < 3 && bits != 16) throw Qcow2Error("compat=0.10 requires refcount_bits=16");
  if (version < 3 && a.lazy_refcounts.value_or(false)) {
    throw Qcow2Error(
        "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 "
        "or greater)");
  }
  if (a.size && *a.size != header_.size) {
    if (*a.size % 512 != 0) throw Qcow2Error("The new size must be a multiple of 512");
    resize(*a.size);
  }

  std::lock_guard lock(mu_);
  flush_locked();
  if (version < 3 && header_.version >= 3) downgrade_to_v2();
  if (bits != old_bits) rewrite_refcounts(uint32_t(__builtin_ctz(bits)));

  Header h = header_;
  h.version = version;
  if (version < 3) {
    h.header_length = kV2HeaderLength;
    h.incompatible_features = h.compatible_features = h.autoclear_features = 0;
    h.compression_type = CompressionType::kZlib;
  } else {
    if (header_.version < 3) h.header_length = kV3HeaderLength;
    if (a.lazy_refcounts) {
      h.compatible_features = *a.lazy_refcounts ? (h.compatible_features | kCompatLazyRefcounts)
                                                : (h.compatible_features & ~kCompatLazyRefcounts);
    }
  }
  header_ = h;
  write_header();
  sync_file();
}

void Image::downgrade_to_v2() {
  // Version 2 has no subclusters (nor any other incompatible feature but compression, below).
  if (uint64_t left = header_.incompatible_features & ~(kIncompatDirty | kIncompatCompressionType))
    throw Qcow2Error(
        fmt::format("Cannot downgrade an image with incompatible features {:#x} set", left));
  if (header_.compression_type != CompressionType::kZlib) {
    std::vector<uint64_t> refs;
    std::vector<L2Ref> copied;
    if (check_locked(refs, copied).compressed_clusters) {
      throw Qcow2Error("Cannot downgrade an image with zstd-compressed clusters to compat=0.10");
    }
  }
  // Version 2 has no zero flag: snapshot tables that use it cannot be expressed.
  for (const auto& s : read_snapshots_locked()) {
    std::vector<uint8_t> raw(cluster_size_);
    for (uint64_t l1e : read_l1(s.info.l1_table_offset, s.info.l1_size)) {
      if (!(l1e & kOffsetMask)) continue;
      pread_exact(fd_.get(), raw, l1e & kOffsetMask, "snapshot L2 table");
      for (uint64_t i = 0; i < l2_entries(); ++i) {
        const uint64_t e = load_be64(&raw[i * 8]);
        if (!(e & kFlagCompressed) && (e & kL2FlagZero)) {
          throw Qcow2Error(
              fmt::format("Cannot downgrade: snapshot '{}' contains zero clusters", s.info.name));
        }
      }
    }
  }
  // Active zero clusters become real zeros: unallocated where nothing shows through, else data.
  const uint64_t clusters = div_round_up(header_.size, cluster_size_);
  std::vector<uint8_t> zeros;
  for (uint64_t c = 0; c < clusters; ++c) {
    if (!(l1_[c / l2_entries()] & kOffsetMask)) {
      c = (c / l2_entries() + 1) * l2_entries() - 1;  // whole L2 table unallocated
      continue;
    }
    const uint64_t entry = l2_entry(c).word;
    if ((entry & kFlagCompressed) || !(entry & kL2FlagZero)) continue;
    const uint64_t host = entry & kOffsetMask;
    if (zeros.empty()) zeros.assign(cluster_size_, 0);
    if (host && (entry & kFlagCopied)) {
      check_data_offset(host, c * cluster_size_);
      pwrite_all(fd_.get(), zeros, host);
      set_l2_entry(c, {host | kFlagCopied, 0});
      data_dirty_ = true;
    } else if (!host && (!backing_ || c * cluster_size_ >= backing_->size())) {
      set_l2_entry(c, {});
    } else {
      write_cluster_part(c * cluster_size_, zeros);  // copy-on-write into a new cluster
      data_dirty_ = true;
    }
  }
  flush_locked();
}

void Image::rewrite_refcounts(uint32_t new_order) {
  std::vector<uint64_t> refs;
  std::vector<L2Ref> copied;
  const CheckResult r = check_locked(refs, copied);
  if (r.corruptions || r.check_errors) {
    throw Qcow2Error("Image is corrupt; run 'check -r all' before changing refcount_bits");
  }
  // The old refcount structures are replaced, not referenced any more.
  auto drop = [&](uint64_t offset, uint64_t clusters) {
    for (uint64_t c = offset / cluster_size_; c < offset / cluster_size_ + clusters; ++c) {
      if (c < refs.size() && refs[c]) --refs[c];
    }
  };
  drop(header_.refcount_table_offset, header_.refcount_table_clusters);
  for (uint64_t e : refcount_table_) {
    if (e & kOffsetMask) drop(e & kOffsetMask, 1);
  }
  const uint64_t max = new_order == 6 ? UINT64_MAX : (1ull << (1u << new_order)) - 1;
  for (uint64_t c = 0; c < refs.size(); ++c) {
    if (refs[c] > max) {
      throw Qcow2Error(fmt::format(
          "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a "
          "refcount of {}",
          1u << new_order, c * cluster_size_, refs[c]));
    }
  }

  // New table and blocks go after everything in use; they must cover themselves.
  const uint64_t start = std::max<uint64_t>(refs.size(), div_round_up(file_size(), cluster_size_));
  const uint64_t per_block = cluster_size_ * 8 / (1u << new_order);
  uint64_t rt_clusters = 1, blocks = 1;
  for (;;) {
    const uint64_t total = start + rt_clusters + blocks;
    const uint64_t need_blocks = div_round_up(total, per_block);
    const uint64_t need_rt = div_round_up(need_blocks * 8, cluster_size_);
    if (need_blocks == blocks && need_rt == rt_clusters) break;
    blocks = need_blocks;
    rt_clusters = need_rt;
  }
  if (rt_clusters * cluster_size_ > kMaxRefcountTableBytes) {
    throw Qcow2Error("refcount table would be too large");
  }
  const uint64_t table_offset = start * cluster_size_;
  const uint64_t blocks_offset = table_offset + rt_clusters * cluster_size_;
  std::vector<uint8_t> table(rt_clusters * cluster_size_, 0);
  std::vector<uint8_t> block_bytes(blocks * cluster_size_, 0);
  for (uint64_t b = 0; b < blocks; ++b) {
    store_be64(&table[b * 8], blocks_offset + b * cluster_size_);
  }
  for (uint64_t c = 0; c < refs.size(); ++c) {
    if (refs[c]) store_refcount(block_bytes, c, new_order, refs[c]);
  }
  for (uint64_t c = start; c < start + rt_clusters + blocks; ++c) {
    store_refcount(block_bytes, c, new_order, 1);
  }
  pwrite_all(fd_.get(), block_bytes, blocks_offset);
  pwrite_all(fd_.get(), table, table_offset);
  sync_file();

  header_.refcount_order = new_order;
  header_.refcount_table_offset = table_offset;
  header_.refcount_table_clusters = uint32_t(rt_clusters);
  write_header();
  sync_file();
  // Reload the refcount table and drop the cached blocks of the old width.
  refblocks_.clear();
  refcount_table_dirty_ = false;
  validate_tables();
}

}  // namespace kiln::block::qcow2
