#include "vmm/kernel_cache.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "arch/x86/boot.h"
#include "arch/x86/vmlinux.h"

namespace kiln::vmm {
namespace {

namespace fs = std::filesystem;

std::vector<uint8_t> real_bzimage() {
  const char* home = std::getenv("HOME");
  fs::path dir = fs::path(home ? home : "/") / ".cache/kiln/kernel/current/boot";
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec))
    if (entry.path().filename().string().starts_with("vmlinuz-"))
      return x86::read_boot_file(entry.path().string());
  ADD_FAILURE() << "no " << dir << "/vmlinuz-*: run scripts/setup to fetch the test kernel";
  return {};
}

std::vector<fs::path> entries(const fs::path& dir) {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path());
  return out;
}

std::vector<uint8_t> cached(const std::string& dir, std::span<const uint8_t> bzimage) {
  auto file = cached_vmlinux(dir, bzimage);
  return {file.bytes().begin(), file.bytes().end()};
}

TEST(KernelCache, UnpacksOnceThenServesTheStoredVmlinux) {
  auto bzimage = real_bzimage();
  ASSERT_FALSE(bzimage.empty());
  fs::path dir = fs::path(::testing::TempDir()) / "kiln-kernel-cache";
  fs::remove_all(dir);
  auto first = cached(dir.string(), bzimage);
  EXPECT_EQ(first, x86::compact_vmlinux(x86::extract_vmlinux(bzimage)));
  auto stored = entries(dir);
  ASSERT_EQ(stored.size(), 1u);  // no temporary file left behind
  EXPECT_EQ(fs::file_size(stored[0]), first.size());

  // The second boot reads the file: a marker written into its padding comes back.
  std::vector<uint8_t> marked = first;
  marked[8] = 0xAB;  // e_ident padding
  std::ofstream(stored[0], std::ios::binary)
      .write(reinterpret_cast<const char*>(marked.data()), std::streamsize(marked.size()));
  EXPECT_EQ(cached(dir.string(), bzimage)[8], 0xAB);

  // A damaged entry is replaced by a fresh unpacking.
  std::ofstream(stored[0], std::ios::binary | std::ios::trunc) << "garbage";
  EXPECT_EQ(cached(dir.string(), bzimage), first);
  EXPECT_EQ(fs::file_size(stored[0]), first.size());
  fs::remove_all(dir);
}

TEST(KernelCache, AnUnwritableDirectoryStillBoots) {
  auto bzimage = real_bzimage();
  ASSERT_FALSE(bzimage.empty());
  EXPECT_EQ(cached("/proc/no-such-dir", bzimage),
            x86::compact_vmlinux(x86::extract_vmlinux(bzimage)));
}

}  // namespace
}  // namespace kiln::vmm
