#include "devices/legacy/i8042.h"

#include <gtest/gtest.h>

#include "devices/legacy/fake_irq_for_test.h"

namespace kiln::devices::legacy {
namespace {

constexpr uint64_t kData = I8042::kDataPort;
constexpr uint64_t kCommand = I8042::kCommandPort;

class I8042Test : public ::testing::Test {
 protected:
  I8042Test() { I8042::insert(bus, controller); }

  void out(uint64_t port, uint8_t value) {
    uint8_t data[1] = {value};
    ASSERT_TRUE(bus.write(port, data));
  }
  uint8_t in(uint64_t port) {
    uint8_t data[1] = {0};
    EXPECT_TRUE(bus.read(port, data));
    return data[0];
  }
  // What Linux's i8042_command does for a command with a reply: write, poll OBF, read.
  uint8_t command_with_reply(uint8_t command) {
    out(kCommand, command);
    EXPECT_EQ(in(kCommand)&0x01, 0x01) << "no reply to command " << int(command);
    return in(kData);
  }

  int resets = 0;
  std::shared_ptr<FakeIrq> keyboard_irq = std::make_shared<FakeIrq>();
  std::shared_ptr<FakeIrq> aux_irq = std::make_shared<FakeIrq>();
  std::shared_ptr<I8042> controller =
      std::make_shared<I8042>([this] { ++resets; }, keyboard_irq, aux_irq);
  Bus bus;
};

TEST_F(I8042Test, OnlyPorts60And64AreClaimedSo61StaysWithThePit) {
  uint8_t data[1];
  EXPECT_FALSE(bus.read(0x61, data));
  EXPECT_FALSE(bus.read(0x62, data));
  EXPECT_TRUE(bus.read(0x60, data));
  EXPECT_TRUE(bus.read(0x64, data));
}

TEST_F(I8042Test, StatusStartsIdleWithTheSystemFlag) {
  EXPECT_EQ(in(kCommand), 0x14);  // not inhibited, system flag, nothing to read
}

TEST_F(I8042Test, LinuxProbeSequence) {
  EXPECT_EQ(command_with_reply(0xaa), 0x55);  // self test
  EXPECT_EQ(in(kCommand)&0x01, 0);            // the flush loop terminates
  EXPECT_EQ(command_with_reply(0x20), 0x45);
  out(kCommand, 0x60);
  out(kData, 0x47);
  EXPECT_EQ(in(kCommand)&0x08, 0);  // last write went to the data port
  EXPECT_EQ(command_with_reply(0x20), 0x47);
  out(kCommand, 0xa7);
  EXPECT_EQ(command_with_reply(0x20) & 0x20, 0x20);
  out(kCommand, 0xa8);
  EXPECT_EQ(command_with_reply(0x20) & 0x20, 0);
  out(kCommand, 0xad);
  EXPECT_EQ(command_with_reply(0x20) & 0x10, 0x10);
  out(kCommand, 0xae);
  EXPECT_EQ(command_with_reply(0x20) & 0x10, 0);
  EXPECT_EQ(command_with_reply(0xa9), 0x00);
  EXPECT_EQ(command_with_reply(0xab), 0x00);
}

TEST_F(I8042Test, AuxLoopbackAnswersFromTheAuxPortAndRaisesIrq12) {
  out(kCommand, 0xd3);
  out(kData, 0x11);
  EXPECT_FALSE(aux_irq->level);  // the default command byte leaves the AUX interrupt off
  EXPECT_EQ(in(kData), 0x11);
  out(kCommand, 0x60);
  out(kData, 0x47);
  out(kCommand, 0xd3);
  out(kData, 0x5a);
  EXPECT_EQ(in(kCommand)&0x21, 0x21);
  EXPECT_TRUE(aux_irq->level);
  EXPECT_FALSE(keyboard_irq->level);
  EXPECT_EQ(in(kData), 0x5a);
  EXPECT_FALSE(aux_irq->level);
}

TEST_F(I8042Test, KeyboardIrqFollowsTheOutputBufferAndCommandByte) {
  out(kCommand, 0xd2);
  out(kData, 0x1c);
  EXPECT_TRUE(keyboard_irq->level);
  EXPECT_EQ(in(kData), 0x1c);
  EXPECT_FALSE(keyboard_irq->level);
  out(kCommand, 0x60);
  out(kData, 0x44);  // interrupts off
  EXPECT_EQ(command_with_reply(0xaa), 0x55);
  EXPECT_FALSE(keyboard_irq->level);
}

TEST_F(I8042Test, BytesForTheAbsentKeyboardAreDropped) {
  out(kData, 0xff);  // keyboard reset command
  EXPECT_EQ(in(kCommand)&0x01, 0);
  EXPECT_EQ(resets, 0);
}

TEST_F(I8042Test, PulseResetCommandResets) {
  out(kCommand, 0xfe);
  EXPECT_EQ(resets, 1);
  out(kCommand, 0xff);  // pulses nothing
  EXPECT_EQ(resets, 1);
  out(kCommand, 0xf0);  // pulses bits 0-3, including reset
  EXPECT_EQ(resets, 2);
}

TEST_F(I8042Test, OutputPortWriteWithBitZeroClearResets) {
  EXPECT_EQ(command_with_reply(0xd0), 0x03);
  out(kCommand, 0xd1);
  out(kData, 0x03);  // A20 on, reset released: no reset
  EXPECT_EQ(resets, 0);
  out(kCommand, 0xd1);
  out(kData, 0x02);
  EXPECT_EQ(resets, 1);
}

TEST_F(I8042Test, ANewCommandAbandonsOneWaitingForData) {
  out(kCommand, 0xd1);
  out(kCommand, 0xae);
  out(kData, 0x00);  // now a keyboard byte, not an output port value
  EXPECT_EQ(resets, 0);
}

TEST_F(I8042Test, SaveRestoreRoundTrip) {
  out(kCommand, 0x60);
  out(kData, 0x47);
  out(kCommand, 0xd3);
  out(kData, 0x99);
  out(kCommand, 0xd1);  // left waiting for its data byte
  I8042::State saved = controller->save();

  int copy_resets = 0;
  auto copy_aux_irq = std::make_shared<FakeIrq>();
  auto copy = std::make_shared<I8042>([&] { ++copy_resets; }, nullptr, copy_aux_irq);
  copy->restore(saved);
  EXPECT_TRUE(copy_aux_irq->level);
  EXPECT_EQ(copy->read_status(), controller->read_status());
  EXPECT_EQ(copy->read_data(), 0x99);
  copy->write_data(0x00);  // completes the saved 0xd1
  EXPECT_EQ(copy_resets, 1);
  copy->write_command(0x20);
  EXPECT_EQ(copy->read_data(), 0x47);

  saved.version = 7;
  EXPECT_THROW(copy->restore(saved), std::invalid_argument);
}

}  // namespace
}  // namespace kiln::devices::legacy
