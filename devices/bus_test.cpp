#include "devices/bus.h"

#include <gtest/gtest.h>

#include <vector>

namespace kiln::devices {
namespace {

struct Recorder : BusDevice {
  std::vector<std::pair<uint64_t, uint64_t>> writes;
  void read(uint64_t offset, std::span<uint8_t> data) override { store_le(data, offset + 0x100); }
  void write(uint64_t offset, std::span<const uint8_t> data) override {
    writes.emplace_back(offset, load_le(data));
  }
};

TEST(Bus, DispatchesWithOffsetsRelativeToBase) {
  Bus bus;
  auto dev = std::make_shared<Recorder>();
  bus.insert(dev, 0x3f8, 8);
  uint8_t byte[1];
  EXPECT_TRUE(bus.read(0x3fa, byte));
  EXPECT_EQ(byte[0], 0x02);
  uint8_t word[2] = {0x34, 0x12};
  EXPECT_TRUE(bus.write(0x3fe, word));
  ASSERT_EQ(dev->writes.size(), 1u);
  EXPECT_EQ(dev->writes[0], std::make_pair(uint64_t{6}, uint64_t{0x1234}));
}

TEST(Bus, UnclaimedReadsAreAllOnesAndAccessesPastTheEndMiss) {
  Bus bus;
  bus.insert(std::make_shared<Recorder>(), 0x1000, 4);
  uint8_t data[4] = {};
  EXPECT_FALSE(bus.read(0x2000, data));
  EXPECT_EQ(load_le(data), 0xffffffffu);
  EXPECT_FALSE(bus.read(0x1002, data));  // straddles the end
  EXPECT_FALSE(bus.read(0xfff, std::span<uint8_t>(data, 1)));
}

TEST(Bus, OverlapsAndEmptyRangesAreRefused) {
  Bus bus;
  bus.insert(std::make_shared<Recorder>(), 0x100, 0x10);
  EXPECT_THROW(bus.insert(std::make_shared<Recorder>(), 0x10f, 1), std::invalid_argument);
  EXPECT_THROW(bus.insert(std::make_shared<Recorder>(), 0xf0, 0x11), std::invalid_argument);
  EXPECT_THROW(bus.insert(std::make_shared<Recorder>(), 0x200, 0), std::invalid_argument);
  EXPECT_THROW(bus.insert(std::make_shared<Recorder>(), UINT64_MAX, 2), std::invalid_argument);
  bus.insert(std::make_shared<Recorder>(), 0x110, 1);  // adjacent is fine
}

TEST(Bus, RemoveFreesTheRange) {
  Bus bus;
  bus.insert(std::make_shared<Recorder>(), 0x100, 0x10);
  EXPECT_TRUE(bus.remove(0x100));
  EXPECT_FALSE(bus.remove(0x100));
  uint8_t data[1];
  EXPECT_FALSE(bus.read(0x100, data));
}

TEST(Bus, ClearDropsEveryDevice) {
  Bus bus;
  auto dev = std::make_shared<Recorder>();
  bus.insert(dev, 0x100, 0x10);
  bus.insert(dev, 0x200, 0x10);
  EXPECT_EQ(dev.use_count(), 3);
  bus.clear();
  EXPECT_EQ(dev.use_count(), 1);
  uint8_t data[1];
  EXPECT_FALSE(bus.read(0x200, data));
}

}  // namespace
}  // namespace kiln::devices
