#include "devices/legacy/debug_exit.h"

#include <gtest/gtest.h>

#include <memory>
#include <vector>

namespace kiln::devices::legacy {
namespace {

TEST(DebugExit, WrittenByteIsTheExitCode) {
  std::vector<uint8_t> codes;
  Bus bus;
  bus.insert(std::make_shared<DebugExit>([&](uint8_t code) { codes.push_back(code); }),
             DebugExit::kPort, DebugExit::kLength);
  uint8_t byte[1] = {42};
  EXPECT_TRUE(bus.write(0x501, byte));
  byte[0] = 0;
  EXPECT_TRUE(bus.write(0x501, byte));
  EXPECT_EQ(codes, (std::vector<uint8_t>{42, 0}));
  EXPECT_TRUE(bus.read(0x501, byte));
  EXPECT_EQ(byte[0], 0xff);
  EXPECT_FALSE(bus.write(0x500, byte));
  EXPECT_FALSE(bus.write(0x502, byte));
  EXPECT_EQ(codes.size(), 2u);
}

TEST(DebugExit, SaveRestoreRoundTrip) {
  DebugExit device(nullptr);
  DebugExit::State state = device.save();
  EXPECT_NO_THROW(device.restore(state));
  uint8_t byte[1] = {1};
  device.write(0, byte);  // no callback: nothing happens
  state.version = 3;
  EXPECT_THROW(device.restore(state), std::invalid_argument);
}

}  // namespace
}  // namespace kiln::devices::legacy
