#include "vmm/kernel_cache.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string_view>

#include "arch/x86/boot.h"
#include "arch/x86/vmlinux.h"

namespace kiln::vmm {
namespace {

// Named by a hash of the whole bzImage and its size: a changed kernel file gets its own entry.
std::string cache_name(std::span<const uint8_t> bzimage) {
  std::string_view bytes(reinterpret_cast<const char*>(bzimage.data()), bzimage.size());
  return fmt::format("vmlinux-{:016x}-{}", std::hash<std::string_view>{}(bytes), bzimage.size());
}

void store(const std::filesystem::path& path, const std::vector<uint8_t>& vmlinux) {
  std::error_code ec;
  std::filesystem::create_directories(path.parent_path(), ec);
  auto tmp = path;
  tmp += fmt::format(".tmp{}", getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(vmlinux.data()), std::streamsize(vmlinux.size()));
    if (!out.flush()) {
      std::filesystem::remove(tmp, ec);
      spdlog::warn("--kernel-cache: cannot write {}", tmp.string());
      return;
    }
  }
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    spdlog::warn("--kernel-cache: cannot store {}", path.string());
  }
}

}  // namespace

FileBytes cached_vmlinux(const std::string& dir, std::span<const uint8_t> bzimage) {
  std::filesystem::path path = std::filesystem::path(dir) / cache_name(bzimage);
  std::error_code ec;
  if (std::filesystem::is_regular_file(path, ec)) {
    try {
      auto vmlinux = x86::map_boot_file(path.string());
      auto bytes = vmlinux.bytes();
      if (bytes.size() >= 4 && bytes[0] == 0x7F && bytes[1] == 'E') return vmlinux;
    } catch (const x86::BootError&) {
    }
    spdlog::warn("--kernel-cache: {} is unreadable or not ELF; unpacking again", path.string());
  }
  auto vmlinux = x86::compact_vmlinux(x86::extract_vmlinux(bzimage));
  store(path, vmlinux);
  return FileBytes(std::move(vmlinux));
}

}  // namespace kiln::vmm
