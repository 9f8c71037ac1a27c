#include "devices/legacy/acpi_pm.h"

#include <gtest/gtest.h>

#include "devices/legacy/fake_irq_for_test.h"

namespace kiln::devices::legacy {
namespace {

constexpr uint64_t kStatus = 0x600, kEnable = 0x602, kControl = 0x604, kReset = 0x608;

class AcpiPmTest : public ::testing::Test {
 protected:
  AcpiPmTest() { bus.insert(pm, AcpiPm::kBase, AcpiPm::kLength); }

  void out(uint64_t port, uint64_t value, size_t size) {
    uint8_t data[8];
    store_le(std::span(data, size), value);
    ASSERT_TRUE(bus.write(port, std::span<const uint8_t>(data, size)));
  }
  uint64_t in(uint64_t port, size_t size) {
    uint8_t data[8] = {};
    EXPECT_TRUE(bus.read(port, std::span(data, size)));
    return load_le(std::span<const uint8_t>(data, size));
  }

  int poweroffs = 0, resets = 0;
  std::shared_ptr<FakeIrq> sci = std::make_shared<FakeIrq>();
  std::shared_ptr<AcpiPm> pm = std::make_shared<AcpiPm>(
      sci, AcpiPm::Callbacks{[this] { ++poweroffs; }, [this] { ++resets; }});
  Bus bus;
};

TEST_F(AcpiPmTest, ControlReadsSciEnabled) {
  EXPECT_EQ(in(kControl, 2), 0x0001u);
  out(kControl, 0x0000, 2);  // cannot leave ACPI mode
  EXPECT_EQ(in(kControl, 2) & 1, 1u);
}

TEST_F(AcpiPmTest, SoftOffWithSixteenBitWrites) {
  out(kControl, (5 << 10) | 1, 2);  // Linux writes SLP_TYP first, then adds SLP_EN
  EXPECT_EQ(poweroffs, 0);
  EXPECT_EQ(in(kControl, 2), (5u << 10) | 1);
  out(kControl, (5 << 10) | (1 << 13) | 1, 2);
  EXPECT_EQ(poweroffs, 1);
  EXPECT_EQ(in(kControl, 2) & (1 << 13), 0u);  // SLP_EN is write-only
}

TEST_F(AcpiPmTest, SoftOffWithByteWriteToTheHighByte) {
  out(kControl + 1, (5 << 2) | (1 << 5), 1);
  EXPECT_EQ(poweroffs, 1);
}

TEST_F(AcpiPmTest, OtherSleepTypesAreIgnored) {
  for (uint64_t type : {0, 1, 3, 4, 7}) out(kControl, (type << 10) | (1 << 13), 2);
  EXPECT_EQ(poweroffs, 0);
  EXPECT_EQ(resets, 0);
}

TEST_F(AcpiPmTest, ResetRegister) {
  out(kReset, 0x06, 1);
  EXPECT_EQ(resets, 0);
  out(kReset, 0x01, 1);
  EXPECT_EQ(resets, 1);
  EXPECT_EQ(poweroffs, 0);
}

TEST_F(AcpiPmTest, PowerButtonRaisesSciUntilWrittenOneToClear) {
  pm->press_power_button();
  EXPECT_EQ(in(kStatus, 2), 0x0100u);
  EXPECT_FALSE(sci->level);  // not enabled yet
  out(kEnable, 0x0100, 2);
  EXPECT_TRUE(sci->level);
  out(kStatus, 0x0000, 2);  // writing zeros clears nothing
  EXPECT_TRUE(sci->level);
  out(kStatus, 0xfeff, 2);  // every other bit: still set
  EXPECT_TRUE(sci->level);
  out(kStatus, 0x0100, 2);
  EXPECT_FALSE(sci->level);
  EXPECT_EQ(in(kStatus, 2), 0u);
  EXPECT_EQ(sci->changes, (std::vector<bool>{true, false}));
}

TEST_F(AcpiPmTest, ByteAndDwordAccessesAreByteAccurate) {
  out(kEnable + 1, 0x01, 1);  // PWRBTN_EN through the high byte
  EXPECT_EQ(in(kEnable, 2), 0x0100u);
  pm->press_power_button();
  EXPECT_TRUE(sci->level);
  EXPECT_EQ(in(kStatus + 1, 1), 0x01u);
  EXPECT_EQ(in(kStatus, 4), 0x01000100u);  // status and enable in one read
  out(kStatus, 0x00000100, 4);             // clears status, and writes enable to 0
  EXPECT_EQ(in(kStatus, 4), 0u);
  EXPECT_FALSE(sci->level);
  EXPECT_EQ(in(0x606, 2), 0xffffu);  // the gap
}

TEST_F(AcpiPmTest, SaveRestoreRoundTrip) {
  out(kEnable, 0x0100, 2);
  out(kControl, 5 << 10, 2);
  pm->press_power_button();
  AcpiPm::State saved = pm->save();

  auto sci2 = std::make_shared<FakeIrq>();
  int poweroffs2 = 0;
  AcpiPm copy(sci2, {[&] { ++poweroffs2; }, nullptr});
  copy.restore(saved);
  EXPECT_TRUE(sci2->level);
  uint8_t data[2];
  copy.read(0, data);
  EXPECT_EQ(load_le(data), 0x0100u);
  copy.read(4, data);
  EXPECT_EQ(load_le(data), (5u << 10) | 1);
  uint8_t slp_en[1] = {(5 << 2) | (1 << 5)};
  copy.write(5, slp_en);
  EXPECT_EQ(poweroffs2, 1);

  saved.version = 0;
  EXPECT_THROW(copy.restore(saved), std::invalid_argument);
}

}  // namespace
}  // namespace kiln::devices::legacy
