#include "arch/x86/e820.h"

#include <gtest/gtest.h>

namespace kiln::x86 {
namespace {

constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kGiB = 1ull << 30;

void expect_sorted_without_overlap(const std::vector<E820Entry>& map) {
  for (size_t i = 1; i < map.size(); ++i) EXPECT_LE(map[i - 1].end(), map[i].addr) << i;
}

uint64_t ram_bytes(const std::vector<E820Entry>& map) {
  uint64_t total = 0;
  for (const E820Entry& e : map)
    if (e.type == E820Type::kRam) total += e.size;
  return total;
}

TEST(E820, SmallGuest) {
  auto map = build_e820(memory::layout_ram(512 * kMiB));
  std::vector<E820Entry> expected = {
      {0, 0x9FC00, E820Type::kRam},
      {0x9FC00, 0x100000 - 0x9FC00, E820Type::kReserved},
      {0x100000, 512 * kMiB - 0x100000, E820Type::kRam},
      {0xE0000000, 256 * kMiB, E820Type::kReserved},
  };
  EXPECT_EQ(map, expected);
  // Everything but the legacy area is usable.
  EXPECT_EQ(ram_bytes(map), 512 * kMiB - (0x100000 - 0x9FC00));
}

TEST(E820, LargeGuestSplitsAroundTheHole) {
  auto map = build_e820(memory::layout_ram(6 * kGiB));
  std::vector<E820Entry> expected = {
      {0, 0x9FC00, E820Type::kRam},
      {0x9FC00, 0x100000 - 0x9FC00, E820Type::kReserved},
      {0x100000, 0xC0000000 - 0x100000, E820Type::kRam},
      {0xE0000000, 256 * kMiB, E820Type::kReserved},
      {4 * kGiB, 6 * kGiB - 0xC0000000, E820Type::kRam},
  };
  EXPECT_EQ(map, expected);
  expect_sorted_without_overlap(map);
  EXPECT_EQ(ram_bytes(map), 6 * kGiB - (0x100000 - 0x9FC00));
}

TEST(E820, FromGuestMemoryMatchesItsRegions) {
  auto mem = memory::GuestMemory::create_ram(64 * kMiB);
  auto map = build_e820(mem);
  ASSERT_EQ(map.size(), 4u);
  EXPECT_EQ(map[2].end(), 64 * kMiB);
  expect_sorted_without_overlap(map);
}

}  // namespace
}  // namespace kiln::x86
