#include "arch/x86/e820.h"

#include <algorithm>

namespace kiln::x86 {
namespace {

void add_ram_outside_low_reserved(uint64_t start, uint64_t end, std::vector<E820Entry>& map) {
  auto add = [&](uint64_t from, uint64_t to) {
    if (from < to) map.push_back({from, to - from, E820Type::kRam});
  };
  add(start, std::min(end, kLowReservedStart));
  add(std::max(start, kLowReservedEnd), end);
}

}  // namespace

std::vector<E820Entry> build_e820(std::span<const memory::RegionSpec> ram) {
  std::vector<E820Entry> map;
  for (const memory::RegionSpec& region : ram)
    add_ram_outside_low_reserved(region.gpa, region.gpa + region.size, map);
  map.push_back({kLowReservedStart, kLowReservedEnd - kLowReservedStart, E820Type::kReserved});
  map.push_back({kEcamBase, kEcamSize, E820Type::kReserved});
  std::sort(map.begin(), map.end(), [](auto& a, auto& b) { return a.addr < b.addr; });
  return map;
}

std::vector<E820Entry> build_e820(const memory::GuestMemory& mem) {
  std::vector<memory::RegionSpec> ram;
  for (const memory::Region& region : mem.regions()) ram.push_back({region.gpa, region.size});
  return build_e820(ram);
}

}  // namespace kiln::x86
