// Guest physical memory: anonymous host mappings laid out around the 32-bit device hole, with
// bounds-checked access. Every read or write a device makes on behalf of the guest goes through
// here, so a guest-supplied address can never reach host memory outside the guest's.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

namespace kiln::memory {

// Start of the hole below 4 GiB that holds the PCI 32-bit MMIO window, ECAM, IOAPIC and LAPIC.
inline constexpr uint64_t kMmioHoleStart = 0xC000'0000;
inline constexpr uint64_t kFourGiB = 0x1'0000'0000;

struct RegionSpec {
  uint64_t gpa = 0;
  uint64_t size = 0;
};

// One contiguous guest-physical range backed by one host mapping.
struct Region {
  uint64_t gpa = 0;
  uint64_t size = 0;
  uint8_t* host = nullptr;
  uint64_t end() const { return gpa + size; }
  bool contains(uint64_t addr, uint64_t len) const {
    return addr >= gpa && len <= size && addr - gpa <= size - len;
  }
};

struct Options {
  bool hugepages = false;  // back RAM with MAP_HUGETLB (2 MiB pages); fails if none are reserved
  bool prealloc = false;   // populate every page up front (MAP_POPULATE)
};

// Splits `ram_size` bytes of RAM into regions below the MMIO hole and above 4 GiB.
std::vector<RegionSpec> layout_ram(uint64_t ram_size);

class GuestMemory {
 public:
  // Maps every region; throws std::system_error on failure. Regions must not overlap.
  static GuestMemory create(std::span<const RegionSpec> specs, const Options& options = {});
  // Convenience: layout_ram + create.
  static GuestMemory create_ram(uint64_t ram_size, const Options& options = {});

  GuestMemory(GuestMemory&&) noexcept;
  GuestMemory& operator=(GuestMemory&&) noexcept;
  GuestMemory(const GuestMemory&) = delete;
  GuestMemory& operator=(const GuestMemory&) = delete;
  ~GuestMemory();

  const std::vector<Region>& regions() const { return regions_; }
  uint64_t total_size() const;
  // The highest guest-physical address of RAM, plus one.
  uint64_t end() const;

  // Host view of [gpa, gpa+len) if it lies entirely inside one region; nullopt otherwise.
  // len == 0 is valid inside or at the end of a region.
  std::optional<std::span<uint8_t>> slice(uint64_t gpa, uint64_t len) const;
  // The region holding `gpa`, if any.
  const Region* find(uint64_t gpa) const;

  // Copies across region boundaries are refused (guest RAM is not contiguous across the hole).
  bool read(uint64_t gpa, std::span<uint8_t> out) const;
  bool write(uint64_t gpa, std::span<const uint8_t> in) const;

  template <class T>
  std::optional<T> read_obj(uint64_t gpa) const {
    static_assert(std::is_trivially_copyable_v<T>);
    T value;
    if (!read(gpa, {reinterpret_cast<uint8_t*>(&value), sizeof(T)})) return std::nullopt;
    return value;
  }
  template <class T>
  bool write_obj(uint64_t gpa, const T& value) const {
    static_assert(std::is_trivially_copyable_v<T>);
    return write(gpa, {reinterpret_cast<const uint8_t*>(&value), sizeof(T)});
  }

  // Software dirty log for writes made by the VMM itself (devices, loaders); KVM tracks the
  // vCPUs' writes. Off until enabled; migration ORs both logs together.
  void enable_dirty_log(bool on);
  void mark_dirty(uint64_t gpa, uint64_t len) const;
  // Returns and clears the dirty bitmap (one bit per 4 KiB page) of region `index`.
  std::vector<uint64_t> take_dirty_log(size_t index);

  // Gives pages back to the host (balloon inflate). The range must lie inside one region.
  bool discard(uint64_t gpa, uint64_t len) const;

 private:
  GuestMemory() = default;
  struct DirtyLog;
  std::vector<Region> regions_;
  std::vector<size_t> mapping_sizes_;
  std::unique_ptr<DirtyLog> dirty_;
};

}  // namespace kiln::memory
