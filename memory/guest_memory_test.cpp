#include "memory/guest_memory.h"

#include <gtest/gtest.h>

#include <array>
#include <cstdint>

namespace kiln::memory {
namespace {

TEST(LayoutRam, SmallGuestIsOneRegionFromZero) {
  auto specs = layout_ram(512ull << 20);
  ASSERT_EQ(specs.size(), 1u);
  EXPECT_EQ(specs[0].gpa, 0u);
  EXPECT_EQ(specs[0].size, 512ull << 20);
}

TEST(LayoutRam, LargeGuestSkipsTheHoleBelowFourGiB) {
  auto specs = layout_ram(6ull << 30);
  ASSERT_EQ(specs.size(), 2u);
  EXPECT_EQ(specs[0].size, kMmioHoleStart);
  EXPECT_EQ(specs[1].gpa, kFourGiB);
  EXPECT_EQ(specs[0].size + specs[1].size, 6ull << 30);
}

TEST(LayoutRam, ZeroIsRefused) { EXPECT_THROW(layout_ram(0), std::invalid_argument); }

TEST(GuestMemory, ReadWriteRoundTripsAndStaysInBounds) {
  auto mem = GuestMemory::create_ram(1 << 20);
  EXPECT_TRUE(mem.write_obj<uint32_t>(0x1000, 0xdeadbeef));
  EXPECT_EQ(mem.read_obj<uint32_t>(0x1000), 0xdeadbeefu);
  // Last bytes of RAM are reachable, one byte further is not.
  EXPECT_TRUE(mem.write_obj<uint8_t>((1 << 20) - 1, 7));
  EXPECT_FALSE(mem.write_obj<uint16_t>((1 << 20) - 1, 7));
  EXPECT_FALSE(mem.read_obj<uint8_t>(1 << 20).has_value());
}

TEST(GuestMemory, SliceRejectsWrappingAndHugeLengths) {
  auto mem = GuestMemory::create_ram(1 << 20);
  EXPECT_FALSE(mem.slice(UINT64_MAX - 1, 4).has_value());
  EXPECT_FALSE(mem.slice(0x1000, UINT64_MAX).has_value());
  EXPECT_FALSE(mem.slice(0x1000, UINT64_MAX - 0xfff).has_value());
  auto whole = mem.slice(0, 1 << 20);
  ASSERT_TRUE(whole.has_value());
  EXPECT_EQ(whole->size(), 1u << 20);
  EXPECT_TRUE(mem.slice(1 << 20, 0).has_value());
}

TEST(GuestMemory, AccessDoesNotCrossTheHole) {
  RegionSpec specs[] = {{0, 0x2000}, {0x4000, 0x2000}};
  auto mem = GuestMemory::create(specs);
  EXPECT_EQ(mem.total_size(), 0x4000u);
  EXPECT_EQ(mem.end(), 0x6000u);
  EXPECT_FALSE(mem.read_obj<uint64_t>(0x1ffc).has_value());
  EXPECT_FALSE(mem.read_obj<uint8_t>(0x3000).has_value());
  EXPECT_TRUE(mem.read_obj<uint64_t>(0x4000).has_value());
  EXPECT_EQ(mem.find(0x4fff)->gpa, 0x4000u);
  EXPECT_EQ(mem.find(0x2000), nullptr);
}

TEST(GuestMemory, OverlappingOrUnalignedRegionsAreRefused) {
  RegionSpec overlap[] = {{0, 0x2000}, {0x1000, 0x2000}};
  EXPECT_THROW(GuestMemory::create(overlap), std::invalid_argument);
  RegionSpec unaligned[] = {{0x10, 0x1000}};
  EXPECT_THROW(GuestMemory::create(unaligned), std::invalid_argument);
}

TEST(GuestMemory, DirtyLogRecordsVmmWritesOnlyWhenEnabled) {
  auto mem = GuestMemory::create_ram(1 << 20);
  mem.write_obj<uint32_t>(0x0, 1);
  EXPECT_EQ(mem.take_dirty_log(0)[0], 0u);
  mem.enable_dirty_log(true);
  mem.write_obj<uint32_t>(0x1ffe, 1);  // straddles pages 1 and 2
  mem.write_obj<uint8_t>(0x41000, 1);  // page 65
  auto log = mem.take_dirty_log(0);
  EXPECT_EQ(log[0], 0b110u);
  EXPECT_EQ(log[1], 0b10u);
  EXPECT_EQ(mem.take_dirty_log(0)[0], 0u);  // taking clears
}

TEST(GuestMemory, DiscardZeroesPages) {
  auto mem = GuestMemory::create_ram(1 << 20);
  mem.write_obj<uint32_t>(0x3000, 42);
  EXPECT_TRUE(mem.discard(0x3000, 0x1000));
  EXPECT_EQ(mem.read_obj<uint32_t>(0x3000), 0u);
  EXPECT_FALSE(mem.discard(0x3001, 0x1000));
  EXPECT_FALSE(mem.discard(0xff000, 0x2000));
}

TEST(GuestMemory, MoveTransfersOwnership) {
  auto a = GuestMemory::create_ram(1 << 20);
  a.write_obj<uint32_t>(0x10, 5);
  GuestMemory b = std::move(a);
  EXPECT_EQ(b.read_obj<uint32_t>(0x10), 5u);
  EXPECT_TRUE(a.regions().empty());
}

}  // namespace
}  // namespace kiln::memory
