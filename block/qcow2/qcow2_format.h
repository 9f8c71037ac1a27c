// On-disk layout of qcow2 (QEMU docs/interop/qcow2.txt): constants, the parsed header and the
// big-endian helpers shared by the image code, create and check. Every value read from a file is
// untrusted; validation lives in qcow2.cpp, this header only describes the layout.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace kiln::block::qcow2 {

// Every problem with an image file's contents (as opposed to I/O errors, which are
// std::system_error) is reported with this type and a message naming the bad field.
class Qcow2Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"
inline constexpr uint32_t kV2HeaderLength = 72;
inline constexpr uint32_t kV3HeaderLength = 112;  // with compression_type + padding
inline constexpr uint32_t kMinClusterBits = 9;
inline constexpr uint32_t kMaxClusterBits = 21;

// Incompatible feature bits.
inline constexpr uint64_t kIncompatDirty = 1ull << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ull << 1;
inline constexpr uint64_t kIncompatExternalData = 1ull << 2;
inline constexpr uint64_t kIncompatCompressionType = 1ull << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
// The incompatible bits this implementation understands and honours.
inline constexpr uint64_t kIncompatSupported =
    kIncompatDirty | kIncompatCorrupt | kIncompatCompressionType | kIncompatExtendedL2;
inline constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;

// Header extension types.
inline constexpr uint32_t kExtEnd = 0;
inline constexpr uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr uint32_t kExtFeatureNames = 0x6803f857;

// Table entry bits.
inline constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;  // bits 9-55
inline constexpr uint64_t kFlagCopied = 1ull << 63;
inline constexpr uint64_t kFlagCompressed = 1ull << 62;
inline constexpr uint64_t kL2FlagZero = 1ull << 0;
inline constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;

// Extended L2 entries: 32 subclusters per cluster, and QEMU requires clusters of at least 16 KiB
// (so that a subcluster is at least 512 bytes).
inline constexpr uint32_t kSubclustersPerCluster = 32;
inline constexpr uint32_t kMinExtendedL2ClusterBits = 14;
inline constexpr uint64_t kBitmapAllAlloc = 0x00000000ffffffffull;
inline constexpr uint64_t kBitmapAllZero = 0xffffffff00000000ull;

// One L2 table entry. Standard images have only the 64-bit descriptor (`word`); images with
// extended L2 entries add a subcluster bitmap: bit i = subcluster i allocated, bit 32+i =
// subcluster i reads as zeros. Keeping both halves in one value lets the table code stay the
// same for both entry widths.
struct L2Entry {
  uint64_t word = 0;
  uint64_t bitmap = 0;

  uint64_t host() const { return word & kOffsetMask; }
  bool compressed() const { return word & kFlagCompressed; }
  bool copied() const { return word & kFlagCopied; }
  bool empty() const { return word == 0 && bitmap == 0; }
  uint32_t alloc_bits() const { return uint32_t(bitmap); }
  uint32_t zero_bits() const { return uint32_t(bitmap >> 32); }
  bool operator==(const L2Entry&) const = default;
  // Why the bitmap is not valid for this descriptor ("" when it is), as qemu-img check says it.
  // Only meaningful in images with extended L2 entries.
  const char* bitmap_error() const {
    if (compressed()) return bitmap ? "compressed cluster with non-zero subcluster bitmap" : "";
    if (alloc_bits() & zero_bits()) return "subcluster both allocated and reading as zeros";
    if (host() == 0 && alloc_bits()) return "unallocated cluster with allocated subclusters";
    return "";
  }
};

// Subcluster bits [first, first + count) of a 32-bit half of the bitmap.
inline uint32_t subcluster_mask(uint32_t first, uint32_t count) {
  return count >= 32 ? ~0u << first : ((1u << count) - 1) << first;
}

enum class CompressionType : uint8_t { kZlib = 0, kZstd = 1 };

// QEMU refuses larger tables too; they bound how much memory an untrusted header can make us use.
inline constexpr uint64_t kMaxL1Bytes = 32ull << 20;
inline constexpr uint64_t kMaxRefcountTableBytes = 8ull << 20;
inline constexpr uint64_t kMaxBackingNameLength = 1023;
inline constexpr uint64_t kMaxVirtualSize = 1ull << 55;  // host offsets are 56-bit
inline constexpr uint32_t kMaxSnapshots = 65536;

struct HeaderExtension {
  uint32_t type = 0;
  std::vector<uint8_t> data;
};

struct Header {
  uint32_t version = 3;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 16;
  uint64_t size = 0;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = kV3HeaderLength;
  CompressionType compression_type = CompressionType::kZlib;

  // Extensions in file order, the backing format one included; unknown ones are kept verbatim
  // so that rewriting the header never loses them.
  std::vector<HeaderExtension> extensions;
  std::string backing_file;
};

inline uint16_t load_be16(const uint8_t* p) { return uint16_t(p[0] << 8 | p[1]); }
inline uint32_t load_be32(const uint8_t* p) {
  return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3];
}
inline uint64_t load_be64(const uint8_t* p) {
  return uint64_t(load_be32(p)) << 32 | load_be32(p + 4);
}
inline void store_be16(uint8_t* p, uint16_t v) {
  p[0] = uint8_t(v >> 8);
  p[1] = uint8_t(v);
}
inline void store_be32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = uint8_t(v >> (24 - 8 * i));
}
inline void store_be64(uint8_t* p, uint64_t v) {
  store_be32(p, uint32_t(v >> 32));
  store_be32(p + 4, uint32_t(v));
}

inline L2Entry load_l2_entry(const uint8_t* p, bool extended) {
  return {load_be64(p), extended ? load_be64(p + 8) : 0};
}
inline void store_l2_entry(uint8_t* p, const L2Entry& e, bool extended) {
  store_be64(p, e.word);
  if (extended) store_be64(p + 8, e.bitmap);
}

// Parses the fixed header fields, extensions and backing file name from the start of the file
// (`bytes` is the first cluster or less). Throws Qcow2Error for anything malformed.
Header parse_header(std::span<const uint8_t> bytes);
// Serializes header + extensions + backing name; throws if it does not fit in `cluster_size`.
std::vector<uint8_t> serialize_header(const Header& h, uint64_t cluster_size);
// The backing format recorded in the header's extension, or "".
std::string backing_format_of(const Header& h);
void set_backing_format(Header& h, const std::string& fmt);

}  // namespace kiln::block::qcow2
