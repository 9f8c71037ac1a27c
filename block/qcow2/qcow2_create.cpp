// Image creation and size parsing.
#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iterator>

#include "base/errors.h"
#include "base/math.h"
#include "block/qcow2/file_io.h"
#include "block/qcow2/qcow2.h"

namespace kiln::block::qcow2 {
namespace {

uint32_t log2_exact(uint64_t v, const char* what) {
  if (v == 0 || (v & (v - 1)) != 0)
    throw Qcow2Error(fmt::format("{} must be a power of two", what));
  return uint32_t(__builtin_ctzll(v));
}

// Sets refcount 1 for `cluster` in refcount blocks laid out contiguously in memory.
void mark(std::vector<uint8_t>& blocks, uint64_t cluster, uint32_t order) {
  const uint32_t bits = 1u << order;
  const uint64_t bit = cluster * bits;
  if (bits < 8) {
    blocks[bit / 8] |= uint8_t(1u << (bit % 8));
  } else {
    blocks[bit / 8 + bits / 8 - 1] = 1;  // big-endian value 1: last byte of the entry
  }
}

// The feature name table (spec: "Feature name table" header extension): a name for each
// feature bit, so that a tool that does not know a feature can still name it in its error.
// These are the entries qemu-img 7.2 writes, in its order: read from the images it creates.
HeaderExtension feature_name_table() {
  struct Feature {
    uint8_t type;  // 0 incompatible, 1 compatible, 2 autoclear
    uint8_t bit;
    const char* name;
  };
  static constexpr Feature kFeatures[] = {
      {0, 0, "dirty bit"},        {0, 1, "corrupt bit"},         {0, 2, "external data file"},
      {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
      {2, 0, "bitmaps"},          {2, 1, "raw external data"},
  };
  constexpr size_t kEntrySize = 48;  // type, bit number, name padded with zeros to 46 bytes
  HeaderExtension table{kExtFeatureNames, std::vector<uint8_t>(std::size(kFeatures) * kEntrySize)};
  for (size_t i = 0; i < std::size(kFeatures); ++i) {
    uint8_t* entry = &table.data[i * kEntrySize];
    entry[0] = kFeatures[i].type;
    entry[1] = kFeatures[i].bit;
    std::memcpy(entry + 2, kFeatures[i].name, std::strlen(kFeatures[i].name));
  }
  return table;
}

// qemu-img 7.2 writes the table into version 3 images with clusters larger than 4 KiB (seen
// from 8 KiB to 2 MiB; never at 512 B-4 KiB), after the backing format.
bool qemu_writes_feature_names(uint32_t version, uint64_t cluster_size) {
  return version >= 3 && cluster_size > 4096;
}

}  // namespace

uint64_t parse_size(const std::string& text) {
  if (text.empty()) throw std::invalid_argument("empty size");
  char* end = nullptr;
  errno = 0;
  const double value = std::strtod(text.c_str(), &end);
  if (errno != 0 || end == text.c_str() || value < 0 || !std::isdigit(uint8_t(text[0]))) {
    throw std::invalid_argument(fmt::format("invalid size '{}'", text));
  }
  std::string suffix(end);
  uint64_t mult = 1;
  if (suffix.empty() || suffix == "b" || suffix == "B") {
    mult = 1;
  } else if (suffix.size() == 1) {
    static const std::string kUnits = "KMGTPE";
    auto pos = kUnits.find(char(std::toupper(suffix[0])));
    if (pos == std::string::npos)
      throw std::invalid_argument(fmt::format("invalid size '{}'", text));
    mult = 1ull << (10 * (pos + 1));
  } else {
    throw std::invalid_argument(fmt::format("invalid size '{}'", text));
  }
  const double bytes = value * double(mult);
  if (bytes >= 9.2e18) throw std::invalid_argument(fmt::format("size '{}' too large", text));
  if (std::floor(bytes) != bytes)
    throw std::invalid_argument("size must be a whole number of bytes");
  return uint64_t(bytes);
}

void Image::create(const std::string& path, const CreateOptions& o) {
  const uint32_t cluster_bits = log2_exact(o.cluster_size, "cluster size");
  if (cluster_bits < kMinClusterBits || cluster_bits > kMaxClusterBits) {
    throw Qcow2Error("Cluster size must be a power of two between 512 and 2048k");
  }
  const uint32_t refcount_order = log2_exact(o.refcount_bits, "refcount_bits");
  if (refcount_order > 6) throw Qcow2Error("refcount_bits must be at most 64");
  if (o.version == 2 && o.refcount_bits != 16) {
    throw Qcow2Error(
        "Different refcount widths than 16 bits require compatibility level 1.1 or "
        "above (use compat=1.1 or greater)");
  }
  if (o.version == 2 && o.compression_type != CompressionType::kZlib) {
    throw Qcow2Error("Compression type other than zlib requires compat=1.1 or greater");
  }
  if (o.version == 2 && o.lazy_refcounts) {
    throw Qcow2Error("Lazy refcounts only supported with compatibility level 1.1 and above");
  }
  if (o.extended_l2 && o.version < 3) {
    throw Qcow2Error(
        "Extended L2 entries are only supported with compatibility level 1.1 and above (use "
        "version=v3 or greater)");
  }
  if (o.extended_l2 && cluster_bits < kMinExtendedL2ClusterBits) {
    throw Qcow2Error(fmt::format(
        "Extended L2 entries are only supported with cluster sizes of at least {} bytes",
        1u << kMinExtendedL2ClusterBits));
  }
  if (o.size > kMaxVirtualSize) throw Qcow2Error("Image size too large");
  if (o.preallocate_metadata && !o.backing_file.empty()) {
    throw Qcow2Error(
        "Backing file and preallocation can only be used at the same time if extended_l2 is on");
  }
  if (!o.backing_format.empty() && o.backing_file.empty()) {
    throw Qcow2Error("Backing format cannot be used without backing file");
  }

  const uint64_t cs = o.cluster_size;
  Header h;
  h.version = o.version;
  h.cluster_bits = cluster_bits;
  h.size = o.size;
  h.refcount_order = refcount_order;
  h.header_length = o.version == 2 ? kV2HeaderLength : kV3HeaderLength;
  h.compression_type = o.compression_type;
  if (o.compression_type != CompressionType::kZlib) {
    h.incompatible_features |= kIncompatCompressionType;
  }
  if (o.lazy_refcounts) h.compatible_features |= kCompatLazyRefcounts;
  if (o.extended_l2) h.incompatible_features |= kIncompatExtendedL2;
  h.backing_file = o.backing_file;
  set_backing_format(h, o.backing_format);
  if (qemu_writes_feature_names(o.version, o.cluster_size)) {
    h.extensions.push_back(feature_name_table());
  }
  const uint64_t l2_entry_bytes = o.extended_l2 ? 16 : 8;
  h.l1_size = uint32_t(div_round_up(o.size, cs * (cs / l2_entry_bytes)));
  if (uint64_t(h.l1_size) * 8 > kMaxL1Bytes) throw Qcow2Error("Image size too large for L1");
  // An empty image has no L1 table at all (offset 0), as qemu-img makes it.
  const uint64_t l1_clusters = div_round_up(h.l1_size * 8ull, cs);

  // Header, refcount table, refcount blocks, L1 table; the refcount structures must cover
  // themselves, so iterate until the layout is stable.
  const uint64_t per_block = cs * 8 / o.refcount_bits;
  uint64_t rt_clusters = 1, blocks = 1;
  for (;;) {
    const uint64_t total = 1 + rt_clusters + blocks + l1_clusters;
    const uint64_t need_blocks = div_round_up(total, per_block);
    const uint64_t need_rt = div_round_up(need_blocks * 8, cs);
    if (need_blocks == blocks && need_rt == rt_clusters) break;
    blocks = need_blocks;
    rt_clusters = need_rt;
  }
  const uint64_t total = 1 + rt_clusters + blocks + l1_clusters;
  h.refcount_table_offset = cs;
  h.refcount_table_clusters = uint32_t(rt_clusters);
  h.l1_table_offset = h.l1_size ? (1 + rt_clusters + blocks) * cs : 0;

  std::vector<uint8_t> file(total * cs, 0);
  auto header_bytes = serialize_header(h, cs);
  std::copy(header_bytes.begin(), header_bytes.end(), file.begin());
  for (uint64_t b = 0; b < blocks; ++b) {
    store_be64(&file[cs + b * 8], (1 + rt_clusters + b) * cs);
  }
  std::vector<uint8_t> refblocks(blocks * cs, 0);
  for (uint64_t c = 0; c < total; ++c) mark(refblocks, c, refcount_order);
  std::copy(refblocks.begin(), refblocks.end(), file.begin() + (1 + rt_clusters) * cs);
  // As qemu-img: the file ends with the L1 table's last entry, not with its cluster (which the
  // refcounts reserve all the same; the rest reads as zeros). Byte for byte the same file.
  file.resize(h.l1_size ? h.l1_table_offset + uint64_t(h.l1_size) * 8
                        : (1 + rt_clusters + blocks) * cs);

  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!fd) throw_errno(fmt::format("Could not create '{}'", path));
  lock_image(fd.get(), path, false, false);
  if (::ftruncate(fd.get(), 0) != 0) throw_errno("ftruncate");
  pwrite_all(fd.get(), file, 0);
  if (::fdatasync(fd.get()) != 0) throw_errno("fdatasync");
  fd.reset();

  if (o.preallocate_metadata) {
    OpenOptions opts;
    opts.read_only = false;
    opts.format = "qcow2";
    auto img = Image::open(path, opts);
    std::lock_guard lock(img->mu_);
    const uint64_t clusters = div_round_up(o.size, cs);
    uint64_t end = 0;
    // Host runs of data clusters, for falloc/full preallocation.
    std::vector<std::pair<uint64_t, uint64_t>> runs;
    for (uint64_t c = 0; c < clusters; ++c) {
      img->get_l2(c / img->l2_entries(), true);  // table first: keeps data contiguous
      const uint64_t host = img->alloc_clusters(1);
      // As QEMU: the host cluster is reserved, its subclusters stay unallocated (read as zeros).
      img->set_l2_entry(c, {host | kFlagCopied, 0});
      end = std::max(end, host + cs);
      if (!runs.empty() && runs.back().first + runs.back().second == host) {
        runs.back().second += cs;
      } else {
        runs.emplace_back(host, cs);
      }
    }
    // Data before the tables that map it, as everywhere else.
    for (const auto& [offset, length] : runs) {
      preallocate_range(img->fd_.get(), offset, length, o.data_preallocation);
    }
    img->flush_locked();
    // The data clusters read as zeros until written: make the (sparse) file cover them.
    if (end > img->file_size() && ::ftruncate(img->fd_.get(), off_t(end)) != 0) {
      throw_errno("ftruncate");
    }
  }
}

}  // namespace kiln::block::qcow2
