#include "arch/x86/vmlinux.h"

#include <gtest/gtest.h>
#include <zlib.h>
#include <zstd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "arch/x86/boot.h"

namespace kiln::x86 {
namespace {

constexpr size_t kOffPayloadOffset = 0x248;
constexpr size_t kOffPayloadLength = 0x24C;

std::vector<uint8_t> real_bzimage() {
  const char* home = std::getenv("HOME");
  std::filesystem::path dir =
      std::filesystem::path(home ? home : "/") / ".cache/kiln/kernel/current/boot";
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec))
    if (entry.path().filename().string().starts_with("vmlinuz-"))
      return read_boot_file(entry.path().string());
  ADD_FAILURE() << "no " << dir << "/vmlinuz-*: run scripts/setup to fetch the test kernel";
  return {};
}

uint32_t get32(const std::vector<uint8_t>& bytes, size_t offset) {
  uint32_t v;
  std::memcpy(&v, bytes.data() + offset, 4);
  return v;
}
void put32(std::vector<uint8_t>& bytes, size_t offset, uint32_t v) {
  std::memcpy(bytes.data() + offset, &v, 4);
}

uint64_t payload_start(const std::vector<uint8_t>& image) {
  return parse_setup_header(image).setup_size() + get32(image, kOffPayloadOffset);
}

// The real image with its payload replaced by `payload` (which must be no longer).
std::vector<uint8_t> with_payload(std::vector<uint8_t> image, const std::vector<uint8_t>& payload) {
  uint64_t start = payload_start(image);
  EXPECT_LE(payload.size(), get32(image, kOffPayloadLength));
  std::copy(payload.begin(), payload.end(), image.begin() + start);
  put32(image, kOffPayloadLength, uint32_t(payload.size()));
  return image;
}

std::vector<uint8_t> fake_vmlinux() {
  std::vector<uint8_t> elf(300000);
  for (size_t i = 0; i < elf.size(); ++i) elf[i] = uint8_t(i * 131 / 7);
  const uint8_t ident[] = {0x7F, 'E', 'L', 'F', 2, 1, 1};
  std::memcpy(elf.data(), ident, sizeof ident);
  return elf;
}

std::vector<uint8_t> gzip(const std::vector<uint8_t>& in) {
  z_stream s{};
  EXPECT_EQ(deflateInit2(&s, 6, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY), Z_OK);
  std::vector<uint8_t> out(deflateBound(&s, uLong(in.size())) + 64);
  s.next_in = const_cast<Bytef*>(in.data());
  s.avail_in = uInt(in.size());
  s.next_out = out.data();
  s.avail_out = uInt(out.size());
  EXPECT_EQ(deflate(&s, Z_FINISH), Z_STREAM_END);
  out.resize(s.total_out);
  deflateEnd(&s);
  return out;
}

std::vector<uint8_t> zstd(const std::vector<uint8_t>& in) {
  std::vector<uint8_t> out(ZSTD_compressBound(in.size()));
  size_t n = ZSTD_compress(out.data(), out.size(), in.data(), in.size(), 3);
  EXPECT_FALSE(ZSTD_isError(n));
  out.resize(n);
  return out;
}

TEST(Vmlinux, ExtractsTheDebianKernelsXzPayloadAsAnX86_64Elf) {
  auto image = real_bzimage();
  ASSERT_FALSE(image.empty());
  auto vmlinux = extract_vmlinux(image);
  ASSERT_GT(vmlinux.size(), image.size());  // it was compressed
  EXPECT_EQ(vmlinux[0], 0x7F);
  EXPECT_EQ(std::memcmp(vmlinux.data() + 1, "ELF", 3), 0);
  uint16_t machine;
  std::memcpy(&machine, vmlinux.data() + 18, 2);
  EXPECT_EQ(machine, 62);  // EM_X86_64
}

// What a kernel's load leaves in guest RAM below 128 MiB.
std::vector<uint8_t> loaded_ram(std::span<const uint8_t> kernel) {
  auto mem = memory::GuestMemory::create_ram(256ull << 20);
  load_linux(mem, kernel, {}, "console=ttyS0", 0xE0000);
  auto ram = mem.slice(0, 128ull << 20);
  EXPECT_TRUE(ram);
  return {ram->data(), ram->data() + ram->size()};
}

TEST(Vmlinux, CompactingKeepsWhatTheLoaderPlacesAndHalvesTheFile) {
  auto image = real_bzimage();
  ASSERT_FALSE(image.empty());
  auto vmlinux = extract_vmlinux(image);
  auto compact = compact_vmlinux(vmlinux);
  EXPECT_LT(compact.size(), vmlinux.size() * 6 / 10);
  ElfLayout before = parse_elf(vmlinux), after = parse_elf(compact);
  EXPECT_EQ(after.entry, before.entry);
  ASSERT_EQ(after.segments.size(), before.segments.size());
  for (size_t i = 0; i < after.segments.size(); ++i) {
    EXPECT_EQ(after.segments[i].paddr, before.segments[i].paddr);
    EXPECT_EQ(after.segments[i].memsz, before.segments[i].memsz);
    EXPECT_EQ(after.segments[i].offset % 4096, after.segments[i].paddr % 4096);
  }
  // The loader's view is the same byte for byte: the trimmed zeros come back as zero fill.
  EXPECT_TRUE(loaded_ram(compact) == loaded_ram(vmlinux));
  // Compacting is idempotent.
  EXPECT_EQ(compact_vmlinux(compact), compact);
}

TEST(Vmlinux, CompactingRefusesWhatTheLoaderRefuses) {
  auto elf = fake_vmlinux();  // ELF magic but no valid program headers
  EXPECT_THROW(compact_vmlinux(elf), BootError);
  EXPECT_THROW(compact_vmlinux(std::vector<uint8_t>(10, 0x7F)), BootError);
}

TEST(Vmlinux, UnpacksGzipAndZstdPayloads) {
  auto image = real_bzimage();
  ASSERT_FALSE(image.empty());
  auto elf = fake_vmlinux();
  EXPECT_EQ(extract_vmlinux(with_payload(image, gzip(elf))), elf);
  EXPECT_EQ(extract_vmlinux(with_payload(image, zstd(elf))), elf);
}

TEST(Vmlinux, BadPayloadsAreRefusedWithAReason) {
  auto image = real_bzimage();
  ASSERT_FALSE(image.empty());
  auto expect_error = [](const std::vector<uint8_t>& bad, const std::string& text) {
    try {
      extract_vmlinux(bad);
      ADD_FAILURE() << "accepted; expected: " << text;
    } catch (const BootError& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  };
  auto corrupt = image;
  uint64_t start = payload_start(image);
  for (uint64_t i = start + 4096; i < start + 8192; ++i) corrupt[i] ^= 0x5A;
  expect_error(corrupt, "corrupt");
  auto truncated = with_payload(image, {image.begin() + start, image.begin() + start + 100000});
  expect_error(truncated, "truncated");
  auto outside = image;
  put32(outside, kOffPayloadLength, uint32_t(image.size()));
  expect_error(outside, "outside the file");
  expect_error(with_payload(image, {'B', 'Z', 'h', '9', 0, 0, 0, 0}), "only xz, zstd, gzip");
  auto not_elf = fake_vmlinux();
  not_elf[1] = 'X';
  expect_error(with_payload(image, gzip(not_elf)), "not a 64-bit little-endian ELF");
  std::vector<uint8_t> short_file(100, 0);
  expect_error(short_file, "truncated");
}

}  // namespace
}  // namespace kiln::x86
