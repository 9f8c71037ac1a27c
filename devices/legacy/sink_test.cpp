#include "devices/legacy/sink.h"

#include <gtest/gtest.h>

#include <memory>

namespace kiln::devices::legacy {
namespace {

TEST(Sink, QuietPortsAreClaimedReadAllOnesAndSwallowWrites) {
  Bus bus;
  insert_quiet_ports(bus);
  for (uint64_t port : {0x80, 0xed}) {
    uint8_t byte[1] = {0x12};
    EXPECT_TRUE(bus.write(port, byte)) << port;
    EXPECT_TRUE(bus.read(port, byte)) << port;
    EXPECT_EQ(byte[0], 0xff) << port;
  }
  uint8_t byte[1];
  EXPECT_FALSE(bus.read(0x81, byte));  // DMA page registers are not sunk
}

TEST(Sink, ReadsTheConfiguredValueAtAnyWidth) {
  Bus bus;
  bus.insert(std::make_shared<Sink>(0x00), 0x100, 4);
  uint8_t dword[4] = {1, 2, 3, 4};
  EXPECT_TRUE(bus.read(0x100, dword));
  EXPECT_EQ(load_le(dword), 0u);
}

}  // namespace
}  // namespace kiln::devices::legacy
