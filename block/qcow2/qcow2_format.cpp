#include "block/qcow2/qcow2_format.h"

#include <fmt/format.h>

namespace kiln::block::qcow2 {
namespace {

void parse_extensions(std::span<const uint8_t> bytes, uint64_t start, uint64_t end, Header& h) {
  uint64_t pos = start;
  while (pos + 8 <= end) {
    const uint32_t type = load_be32(&bytes[pos]);
    const uint32_t len = load_be32(&bytes[pos + 4]);
    pos += 8;
    if (type == kExtEnd) return;
    if (len > end - pos) {
      throw Qcow2Error(
          fmt::format("header extension 0x{:x} of {} bytes runs past the header", type, len));
    }
    HeaderExtension ext{type, {bytes.begin() + pos, bytes.begin() + pos + len}};
    h.extensions.push_back(std::move(ext));
    pos += (uint64_t(len) + 7) & ~7ull;
  }
  // No end marker before the limit: QEMU tolerates a header that fills its space exactly.
}

}  // namespace

Header parse_header(std::span<const uint8_t> bytes) {
  if (bytes.size() < kV2HeaderLength) throw Qcow2Error("image is too short for a qcow2 header");
  const uint8_t* p = bytes.data();
  if (load_be32(p) != kMagic) throw Qcow2Error("image is not in qcow2 format (bad magic)");
  Header h;
  h.version = load_be32(p + 4);
  if (h.version != 2 && h.version != 3) {
    throw Qcow2Error(fmt::format("unsupported qcow2 version {}", h.version));
  }
  h.backing_file_offset = load_be64(p + 8);
  h.backing_file_size = load_be32(p + 16);
  h.cluster_bits = load_be32(p + 20);
  h.size = load_be64(p + 24);
  h.crypt_method = load_be32(p + 32);
  h.l1_size = load_be32(p + 36);
  h.l1_table_offset = load_be64(p + 40);
  h.refcount_table_offset = load_be64(p + 48);
  h.refcount_table_clusters = load_be32(p + 56);
  h.nb_snapshots = load_be32(p + 60);
  h.snapshots_offset = load_be64(p + 64);
  if (h.cluster_bits < kMinClusterBits || h.cluster_bits > kMaxClusterBits) {
    throw Qcow2Error(fmt::format("unsupported cluster size: 2^{}", h.cluster_bits));
  }
  if (h.version == 2) {
    h.header_length = kV2HeaderLength;
    h.refcount_order = 4;
  } else {
    if (bytes.size() < 104) throw Qcow2Error("image is too short for a qcow2 v3 header");
    h.incompatible_features = load_be64(p + 72);
    h.compatible_features = load_be64(p + 80);
    h.autoclear_features = load_be64(p + 88);
    h.refcount_order = load_be32(p + 96);
    h.header_length = load_be32(p + 100);
    if (h.header_length < 104 || h.header_length % 8 != 0) {
      throw Qcow2Error(fmt::format("invalid header_length {}", h.header_length));
    }
    if (h.refcount_order > 6) {
      throw Qcow2Error(fmt::format("invalid refcount_order {}", h.refcount_order));
    }
  }
  const uint64_t cluster_size = 1ull << h.cluster_bits;
  if (h.header_length > cluster_size || h.header_length > bytes.size()) {
    throw Qcow2Error("qcow2 header exceeds the first cluster");
  }
  if (h.header_length > 104) h.compression_type = CompressionType(p[104]);
  if (h.compression_type != CompressionType::kZlib &&
      h.compression_type != CompressionType::kZstd) {
    throw Qcow2Error(fmt::format("unknown compression type {}", int(h.compression_type)));
  }
  if (h.compression_type != CompressionType::kZlib &&
      !(h.incompatible_features & kIncompatCompressionType)) {
    throw Qcow2Error("compression type set without the compression-type feature bit");
  }

  // Extensions end where the backing file name starts (or at the end of the first cluster).
  uint64_t ext_end = std::min<uint64_t>(cluster_size, bytes.size());
  if (h.backing_file_offset != 0) {
    if (h.backing_file_size > kMaxBackingNameLength) {
      throw Qcow2Error("backing file name too long");
    }
    if (h.backing_file_offset < h.header_length || h.backing_file_offset >= cluster_size ||
        h.backing_file_offset + h.backing_file_size >
            std::min<uint64_t>(cluster_size, bytes.size())) {
      throw Qcow2Error("backing file name lies outside the header cluster");
    }
    ext_end = h.backing_file_offset;
    h.backing_file.assign(reinterpret_cast<const char*>(p + h.backing_file_offset),
                          h.backing_file_size);
  }
  parse_extensions(bytes, h.header_length, ext_end, h);
  return h;
}

std::vector<uint8_t> serialize_header(const Header& h, uint64_t cluster_size) {
  std::vector<uint8_t> out(h.version == 2 ? kV2HeaderLength : h.header_length);
  uint8_t* p = out.data();
  store_be32(p, kMagic);
  store_be32(p + 4, h.version);
  store_be32(p + 20, h.cluster_bits);
  store_be64(p + 24, h.size);
  store_be32(p + 32, h.crypt_method);
  store_be32(p + 36, h.l1_size);
  store_be64(p + 40, h.l1_table_offset);
  store_be64(p + 48, h.refcount_table_offset);
  store_be32(p + 56, h.refcount_table_clusters);
  store_be32(p + 60, h.nb_snapshots);
  store_be64(p + 64, h.snapshots_offset);
  if (h.version >= 3) {
    store_be64(p + 72, h.incompatible_features);
    store_be64(p + 80, h.compatible_features);
    store_be64(p + 88, h.autoclear_features);
    store_be32(p + 96, h.refcount_order);
    store_be32(p + 100, h.header_length);
    if (h.header_length > 104) p[104] = uint8_t(h.compression_type);
  }
  for (const auto& ext : h.extensions) {
    const size_t pos = out.size();
    out.resize(pos + 8 + ((ext.data.size() + 7) & ~size_t{7}));
    store_be32(&out[pos], ext.type);
    store_be32(&out[pos + 4], uint32_t(ext.data.size()));
    std::memcpy(&out[pos + 8], ext.data.data(), ext.data.size());
  }
  out.resize(out.size() + 8);  // end-of-extensions marker (zeros)
  if (!h.backing_file.empty()) {
    const uint64_t name_offset = out.size();
    out.insert(out.end(), h.backing_file.begin(), h.backing_file.end());
    store_be64(out.data() + 8, name_offset);
    store_be32(out.data() + 16, uint32_t(h.backing_file.size()));
  }
  if (out.size() > cluster_size) throw Qcow2Error("header and extensions exceed one cluster");
  return out;
}

std::string backing_format_of(const Header& h) {
  for (const auto& ext : h.extensions) {
    if (ext.type == kExtBackingFormat) return {ext.data.begin(), ext.data.end()};
  }
  return {};
}

void set_backing_format(Header& h, const std::string& fmt) {
  std::erase_if(h.extensions, [](const HeaderExtension& e) { return e.type == kExtBackingFormat; });
  if (!fmt.empty()) {
    h.extensions.insert(h.extensions.begin(),
                        HeaderExtension{kExtBackingFormat, {fmt.begin(), fmt.end()}});
  }
}

}  // namespace kiln::block::qcow2
