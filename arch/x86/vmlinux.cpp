#include "arch/x86/vmlinux.h"

#include <lzma.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>

#include "arch/x86/boot.h"
#include "base/math.h"

namespace kiln::x86 {
namespace {

constexpr size_t kOffPayloadOffset = 0x248;
constexpr size_t kOffPayloadLength = 0x24C;
constexpr size_t kChunk = 4 << 20;
constexpr uint64_t kPage = 4096;
constexpr size_t kElfHeaderSize = 64;
constexpr size_t kElfPhdrSize = 56;
constexpr uint32_t kPtLoad = 1;

uint32_t le32(std::span<const uint8_t> bytes, size_t offset) {
  uint32_t value;
  std::memcpy(&value, bytes.data() + offset, sizeof value);
  return value;
}

bool starts_with(std::span<const uint8_t> data, std::initializer_list<uint8_t> magic) {
  return data.size() >= magic.size() && std::equal(magic.begin(), magic.end(), data.begin());
}

// Grows `out` by one chunk and returns the new free space; refuses to pass kMaxVmlinuxSize.
std::span<uint8_t> grow(std::vector<uint8_t>& out, size_t used) {
  if (used >= kMaxVmlinuxSize)
    throw BootError("kernel payload decompresses to more than " +
                    std::to_string(kMaxVmlinuxSize >> 20) + " MiB");
  out.resize(std::min<uint64_t>(used + kChunk, kMaxVmlinuxSize));
  return {out.data() + used, out.size() - used};
}

std::vector<uint8_t> unxz(std::span<const uint8_t> in) {
  lzma_stream s = LZMA_STREAM_INIT;
  if (lzma_stream_decoder(&s, UINT64_MAX, 0) != LZMA_OK)
    throw BootError("cannot start the xz decoder");
  std::unique_ptr<lzma_stream, void (*)(lzma_stream*)> guard(&s, lzma_end);
  std::vector<uint8_t> out;
  size_t used = 0;
  s.next_in = in.data();
  s.avail_in = in.size();
  for (;;) {
    auto space = grow(out, used);
    s.next_out = space.data();
    s.avail_out = space.size();
    lzma_ret ret = lzma_code(&s, LZMA_FINISH);
    used = out.size() - s.avail_out;
    if (ret == LZMA_STREAM_END) break;
    if (ret != LZMA_OK && ret != LZMA_BUF_ERROR)
      throw BootError("kernel payload is corrupt (xz error " + std::to_string(ret) + ")");
    if (ret == LZMA_BUF_ERROR && s.avail_out) throw BootError("kernel payload is truncated (xz)");
  }
  out.resize(used);
  return out;
}

std::vector<uint8_t> unzstd(std::span<const uint8_t> in) {
  std::unique_ptr<ZSTD_DCtx, size_t (*)(ZSTD_DCtx*)> ctx(ZSTD_createDCtx(), ZSTD_freeDCtx);
  if (!ctx) throw std::bad_alloc();
  ZSTD_inBuffer input{in.data(), in.size(), 0};
  std::vector<uint8_t> out;
  size_t used = 0;
  for (;;) {
    auto space = grow(out, used);
    ZSTD_outBuffer output{space.data(), space.size(), 0};
    size_t ret = ZSTD_decompressStream(ctx.get(), &output, &input);
    used += output.pos;
    if (ZSTD_isError(ret))
      throw BootError(std::string("kernel payload is corrupt (zstd: ") + ZSTD_getErrorName(ret) +
                      ")");
    if (ret == 0) break;  // end of the frame; the kernel's 4-byte size trailer follows
    if (input.pos == input.size && output.pos < output.size)
      throw BootError("kernel payload is truncated (zstd)");
  }
  out.resize(used);
  return out;
}

std::vector<uint8_t> gunzip(std::span<const uint8_t> in) {
  z_stream s{};
  if (inflateInit2(&s, 16 + MAX_WBITS) != Z_OK) throw BootError("cannot start the gzip decoder");
  std::unique_ptr<z_stream, int (*)(z_stream*)> guard(&s, inflateEnd);
  s.next_in = const_cast<Bytef*>(in.data());
  s.avail_in = uInt(in.size());
  std::vector<uint8_t> out;
  size_t used = 0;
  for (;;) {
    auto space = grow(out, used);
    s.next_out = space.data();
    s.avail_out = uInt(space.size());
    int ret = inflate(&s, Z_NO_FLUSH);
    used = out.size() - s.avail_out;
    if (ret == Z_STREAM_END) break;
    if (ret != Z_OK && !(ret == Z_BUF_ERROR && s.avail_out == 0))
      throw BootError("kernel payload is corrupt or truncated (gzip error " + std::to_string(ret) +
                      ")");
  }
  out.resize(used);
  return out;
}

}  // namespace

std::vector<uint8_t> extract_vmlinux(std::span<const uint8_t> bzimage) {
  SetupHeader hdr = parse_setup_header(bzimage);
  uint64_t offset = hdr.setup_size() + le32(bzimage, kOffPayloadOffset);
  uint64_t length = le32(bzimage, kOffPayloadLength);
  if (offset > bzimage.size() || length > bzimage.size() - offset || length == 0)
    throw BootError("bzImage payload (offset " + std::to_string(offset) + ", " +
                    std::to_string(length) + " bytes) lies outside the file");
  auto payload = bzimage.subspan(offset, length);
  std::vector<uint8_t> vmlinux;
  if (starts_with(payload, {0xFD, '7', 'z', 'X', 'Z', 0x00}))
    vmlinux = unxz(payload);
  else if (starts_with(payload, {0x28, 0xB5, 0x2F, 0xFD}))
    vmlinux = unzstd(payload);
  else if (starts_with(payload, {0x1F, 0x8B}))
    vmlinux = gunzip(payload);
  else
    throw BootError(
        "bzImage payload uses a compression kiln does not unpack (only xz, zstd, gzip)");
  if (!starts_with(vmlinux, {0x7F, 'E', 'L', 'F', 2, 1}))
    throw BootError("bzImage payload is not a 64-bit little-endian ELF vmlinux");
  return vmlinux;
}

namespace {

template <typename T>
void put(std::vector<uint8_t>& out, size_t offset, T value) {
  std::memcpy(out.data() + offset, &value, sizeof value);
}

// The segment's file bytes without their trailing zeros.
uint64_t trimmed_size(std::span<const uint8_t> bytes) {
  auto last = std::find_if(bytes.rbegin(), bytes.rend(), [](uint8_t b) { return b != 0; });
  return uint64_t(bytes.rend() - last);
}

// One program header (ELF64 layout, as in the System V gABI).
void put_phdr(std::vector<uint8_t>& out, size_t at, const ElfSegment& seg, uint64_t vaddr) {
  put<uint32_t>(out, at, kPtLoad);
  put<uint32_t>(out, at + 4, 7);  // PF_R | PF_W | PF_X: the kernel sets its own permissions
  put<uint64_t>(out, at + 8, seg.offset);
  put<uint64_t>(out, at + 16, vaddr);
  put<uint64_t>(out, at + 24, seg.paddr);
  put<uint64_t>(out, at + 32, seg.filesz);
  put<uint64_t>(out, at + 40, seg.memsz);
  put<uint64_t>(out, at + 48, kPage);
}

}  // namespace

std::vector<uint8_t> compact_vmlinux(std::span<const uint8_t> elf) {
  ElfLayout layout = parse_elf(elf);
  size_t headers = kElfHeaderSize + kElfPhdrSize * layout.segments.size();
  std::vector<ElfSegment> packed;
  uint64_t end = headers;
  for (const ElfSegment& seg : layout.segments) {
    ElfSegment out = seg;
    out.filesz = trimmed_size(elf.subspan(seg.offset, seg.filesz));
    // p_offset stays congruent to the address modulo the page size, as the gABI asks.
    out.offset = round_up(end, kPage) + seg.paddr % kPage;
    end = out.offset + out.filesz;
    packed.push_back(out);
  }
  std::vector<uint8_t> out(end);
  std::copy_n(elf.begin(), kElfHeaderSize, out.begin());
  put<uint64_t>(out, 32, kElfHeaderSize);  // e_phoff
  put<uint64_t>(out, 40, 0);               // e_shoff: no sections
  put<uint16_t>(out, 54, kElfPhdrSize);    // e_phentsize
  put<uint16_t>(out, 56, uint16_t(packed.size()));
  put<uint16_t>(out, 58, 64);  // e_shentsize
  put<uint16_t>(out, 60, 0);   // e_shnum
  put<uint16_t>(out, 62, 0);   // e_shstrndx
  for (size_t i = 0; i < packed.size(); ++i) {
    // The kernel's virtual addresses are not needed to boot it; readelf still wants one.
    put_phdr(out, kElfHeaderSize + i * kElfPhdrSize, packed[i], packed[i].paddr);
    std::copy_n(elf.begin() + int64_t(layout.segments[i].offset), packed[i].filesz,
                out.begin() + int64_t(packed[i].offset));
  }
  return out;
}

}  // namespace kiln::x86
