#include "devices/legacy/rtc.h"

#include <gtest/gtest.h>

#include <memory>

#include "devices/legacy/fake_irq_for_test.h"

namespace kiln::devices::legacy {
namespace {

// Unix times of the dates under test (independently computed with Python's calendar.timegm).
constexpr int64_t kLeapDay2024 = 1709214330;   // 2024-02-29 13:45:30 UTC, a Thursday
constexpr int64_t kPast2038 = 2147483648;      // 2038-01-19 03:14:08 UTC, a Tuesday, 2^31
constexpr int64_t kEndOfFeb2100 = 4107542399;  // 2100-02-28 23:59:59 UTC, a Sunday
constexpr int64_t kEndOf1999 = 946684799;      // 1999-12-31 23:59:59 UTC, a Friday

constexpr uint8_t kSec = 0x00, kMin = 0x02, kHour = 0x04, kWeekday = 0x06, kDay = 0x07,
                  kMonth = 0x08, kYear = 0x09, kA = 0x0a, kB = 0x0b, kC = 0x0c, kD = 0x0d,
                  kCentury = Rtc::kCenturyRegister;

class RtcTest : public ::testing::Test {
 protected:
  RtcTest() { bus.insert(rtc, Rtc::kBase, Rtc::kLength); }

  uint8_t cmos(uint8_t index) {
    uint8_t data[1] = {index};
    EXPECT_TRUE(bus.write(0x70, data));
    EXPECT_TRUE(bus.read(0x71, data));
    return data[0];
  }
  void set_cmos(uint8_t index, uint8_t value) {
    uint8_t data[1] = {index};
    EXPECT_TRUE(bus.write(0x70, data));
    data[0] = value;
    EXPECT_TRUE(bus.write(0x71, data));
  }

  int64_t now = kLeapDay2024;
  std::shared_ptr<FakeIrq> irq = std::make_shared<FakeIrq>();
  std::shared_ptr<Rtc> rtc = std::make_shared<Rtc>([this] { return now; }, irq);
  Bus bus;
};

TEST_F(RtcTest, LeapDayInBcd24Hour) {
  EXPECT_EQ(cmos(kB), 0x02);
  EXPECT_EQ(cmos(kSec), 0x30);
  EXPECT_EQ(cmos(kMin), 0x45);
  EXPECT_EQ(cmos(kHour), 0x13);
  EXPECT_EQ(cmos(kWeekday), 5);  // Sunday is 1
  EXPECT_EQ(cmos(kDay), 0x29);
  EXPECT_EQ(cmos(kMonth), 0x02);
  EXPECT_EQ(cmos(kYear), 0x24);
  EXPECT_EQ(cmos(kCentury), 0x20);
  now += 10 * 3600 + 14 * 60 + 30;  // 2024-03-01 00:00:00
  EXPECT_EQ(cmos(kHour), 0x00);
  EXPECT_EQ(cmos(kDay), 0x01);
  EXPECT_EQ(cmos(kMonth), 0x03);
  EXPECT_EQ(cmos(kWeekday), 6);
}

TEST_F(RtcTest, LeapDayInBinary) {
  set_cmos(kB, 0x06);
  EXPECT_EQ(cmos(kSec), 30);
  EXPECT_EQ(cmos(kMin), 45);
  EXPECT_EQ(cmos(kHour), 13);
  EXPECT_EQ(cmos(kDay), 29);
  EXPECT_EQ(cmos(kMonth), 2);
  EXPECT_EQ(cmos(kYear), 24);
  EXPECT_EQ(cmos(kCentury), 20);
}

TEST_F(RtcTest, TwelveHourModeMarksPmInBit7) {
  set_cmos(kB, 0x00);                             // BCD, 12 hour
  EXPECT_EQ(cmos(kHour), 0x81);                   // 1 PM
  now = kLeapDay2024 - 13 * 3600 - 45 * 60 - 30;  // midnight
  EXPECT_EQ(cmos(kHour), 0x12);                   // 12 AM
  now += 12 * 3600;                               // noon
  EXPECT_EQ(cmos(kHour), 0x92);                   // 12 PM
  now += 11 * 3600;                               // 23:00
  EXPECT_EQ(cmos(kHour), 0x91);
  set_cmos(kB, 0x04);            // binary, 12 hour
  EXPECT_EQ(cmos(kHour), 0x8b);  // 11 PM
  now -= 11 * 3600;
  EXPECT_EQ(cmos(kHour), 0x8c);  // 12 PM
}

TEST_F(RtcTest, Year2038AndBeyond) {
  now = kPast2038;
  EXPECT_EQ(cmos(kYear), 0x38);
  EXPECT_EQ(cmos(kMonth), 0x01);
  EXPECT_EQ(cmos(kDay), 0x19);
  EXPECT_EQ(cmos(kHour), 0x03);
  EXPECT_EQ(cmos(kMin), 0x14);
  EXPECT_EQ(cmos(kSec), 0x08);
  EXPECT_EQ(cmos(kWeekday), 3);
  now = kEndOfFeb2100 + 1;  // 2100 is not a leap year
  EXPECT_EQ(cmos(kCentury), 0x21);
  EXPECT_EQ(cmos(kYear), 0x00);
  EXPECT_EQ(cmos(kMonth), 0x03);
  EXPECT_EQ(cmos(kDay), 0x01);
  EXPECT_EQ(cmos(kWeekday), 2);
}

TEST_F(RtcTest, CenturyRollsOver) {
  now = kEndOf1999;
  EXPECT_EQ(cmos(kCentury), 0x19);
  EXPECT_EQ(cmos(kYear), 0x99);
  now += 1;
  EXPECT_EQ(cmos(kCentury), 0x20);
  EXPECT_EQ(cmos(kYear), 0x00);
  EXPECT_EQ(cmos(kMonth), 0x01);
}

TEST_F(RtcTest, StatusRegisters) {
  EXPECT_EQ(cmos(kA) & 0x80, 0);  // never an update in progress
  EXPECT_EQ(cmos(kA), 0x26);
  set_cmos(kA, 0xa6);
  EXPECT_EQ(cmos(kA), 0x26);
  EXPECT_EQ(cmos(kC), 0x00);
  EXPECT_EQ(cmos(kD), 0x80);
  set_cmos(kD, 0x00);
  EXPECT_EQ(cmos(kD), 0x80);
}

TEST_F(RtcTest, SettingTheTimeWithSetBitStartsTheClockFromIt) {
  set_cmos(kB, 0x82);  // SET: halt updates
  now += 100;
  EXPECT_EQ(cmos(kSec), 0x30);  // frozen
  set_cmos(kCentury, 0x20);
  set_cmos(kYear, 0x38);
  set_cmos(kMonth, 0x01);
  set_cmos(kDay, 0x19);
  set_cmos(kHour, 0x03);
  set_cmos(kMin, 0x14);
  set_cmos(kSec, 0x07);
  set_cmos(kB, 0x02);
  EXPECT_EQ(cmos(kSec), 0x07);
  now += 1;
  EXPECT_EQ(cmos(kSec), 0x08);
  EXPECT_EQ(rtc->save().offset_seconds, kPast2038 - now);
}

TEST_F(RtcTest, SettingTimeIn12HourBinaryRoundTrips) {
  set_cmos(kB, 0x84);          // SET, binary, 12 hour
  set_cmos(kHour, 0x80 | 12);  // 12 PM
  set_cmos(kMin, 0);
  set_cmos(kSec, 0);
  set_cmos(kB, 0x04);
  set_cmos(kB, 0x06);  // switch to 24 hour to read it
  EXPECT_EQ(cmos(kHour), 12);
  EXPECT_EQ(cmos(kDay), 29);
}

TEST_F(RtcTest, WritingOneFieldWhileRunningKeepsTheOthers) {
  set_cmos(kMin, 0x00);
  EXPECT_EQ(cmos(kMin), 0x00);
  EXPECT_EQ(cmos(kHour), 0x13);
  EXPECT_EQ(cmos(kSec), 0x30);
  now += 60;
  EXPECT_EQ(cmos(kMin), 0x01);
}

TEST_F(RtcTest, GarbageTimeFieldsDoNotBreakTheClock) {
  set_cmos(kB, 0x82);
  set_cmos(kMonth, 0xff);
  set_cmos(kDay, 0x00);
  set_cmos(kCentury, 0xff);
  set_cmos(kB, 0x02);
  uint8_t month = cmos(kMonth);
  EXPECT_GE(month, 0x01);
  EXPECT_LE(month, 0x12);
}

TEST_F(RtcTest, CmosRamAndNmiMask) {
  set_cmos(0x0e, 0x12);
  set_cmos(0x7f, 0x34);
  EXPECT_EQ(cmos(0x0e), 0x12);
  EXPECT_EQ(cmos(0x7f), 0x34);
  uint8_t data[1] = {0x80 | 0x0e};  // NMI masked, index 0x0e
  bus.write(0x70, data);
  bus.read(0x71, data);
  EXPECT_EQ(data[0], 0x12);
  EXPECT_TRUE(rtc->nmi_disabled());
  data[0] = 0x0e;
  bus.write(0x70, data);
  EXPECT_FALSE(rtc->nmi_disabled());
}

TEST_F(RtcTest, UpdateEndedInterruptEachSecond) {
  set_cmos(kB, 0x12);  // UIE, 24 hour
  rtc->poll();
  EXPECT_FALSE(irq->level);  // no second has passed
  now += 1;
  rtc->poll();
  EXPECT_TRUE(irq->level);
  EXPECT_EQ(cmos(kC), 0x90);  // IRQF and UF; reading acknowledges
  EXPECT_FALSE(irq->level);
  EXPECT_EQ(cmos(kC), 0x00);
  now += 1;
  EXPECT_EQ(cmos(kC), 0x90);  // a polling guest sees the flag without poll()
}

TEST_F(RtcTest, FlagsWithoutEnablesDoNotInterruptUntilEnabled) {
  now += 1;
  rtc->poll();
  EXPECT_FALSE(irq->level);
  set_cmos(kB, 0x12);  // enabling UIE with UF already set raises the line
  EXPECT_TRUE(irq->level);
  set_cmos(kB, 0x02);
  EXPECT_FALSE(irq->level);
  EXPECT_EQ(cmos(kC), 0x10);  // UF without IRQF
}

TEST_F(RtcTest, SetBitStopsUpdateEvents) {
  set_cmos(kB, 0x92);  // SET clears UIE
  EXPECT_EQ(cmos(kB), 0x82);
  now += 5;
  rtc->poll();
  EXPECT_EQ(cmos(kC), 0x00);
}

TEST_F(RtcTest, AlarmInterruptAtTheMatchingSecond) {
  set_cmos(0x05, 0x13);  // alarm 13:45:35
  set_cmos(0x03, 0x45);
  set_cmos(0x01, 0x35);
  set_cmos(kB, 0x22);  // AIE, 24 hour
  now += 4;
  rtc->poll();
  EXPECT_FALSE(irq->level);
  EXPECT_EQ(cmos(kC), 0x10);  // UF only, not enabled
  now += 1;
  rtc->poll();
  EXPECT_TRUE(irq->level);
  EXPECT_EQ(cmos(kC), 0xb0);  // IRQF, AF, UF
  EXPECT_FALSE(irq->level);
  now += 1;
  rtc->poll();
  EXPECT_FALSE(irq->level);
}

TEST_F(RtcTest, DontCareAlarmMatchesEveryMinuteEvenAcrossAGap) {
  set_cmos(0x05, 0xc0);
  set_cmos(0x03, 0xff);
  set_cmos(0x01, 0x00);  // at second 0 of every minute
  set_cmos(kB, 0x22);
  now += 29;  // 13:45:59
  rtc->poll();
  EXPECT_FALSE(irq->level);
  now += 40;  // 13:46:39, passing 13:46:00 between polls
  rtc->poll();
  EXPECT_TRUE(irq->level);
}

TEST_F(RtcTest, SaveRestoreRoundTrip) {
  set_cmos(0x40, 0xab);
  set_cmos(kB, 0x82);
  set_cmos(kYear, 0x30);
  set_cmos(kB, 0x06);  // binary now; clock runs with an offset
  cmos(0x40);          // leave index 0x40 selected
  Rtc::State saved = rtc->save();

  auto copy_irq = std::make_shared<FakeIrq>();
  Rtc copy([this] { return now + 5; }, copy_irq);
  copy.restore(saved);
  EXPECT_FALSE(copy_irq->level);
  copy.poll();                    // five seconds passed for the copy
  EXPECT_FALSE(copy_irq->level);  // UIE is off
  Bus bus2;
  auto shared = std::shared_ptr<Rtc>(&copy, [](Rtc*) {});
  bus2.insert(shared, Rtc::kBase, Rtc::kLength);
  uint8_t data[1];
  bus2.read(0x71, data);  // the saved index is still selected
  EXPECT_EQ(data[0], 0xab);
  data[0] = kYear;
  bus2.write(0x70, data);
  bus2.read(0x71, data);
  EXPECT_EQ(data[0], 30);  // binary, 2030
  data[0] = kSec;
  bus2.write(0x70, data);
  bus2.read(0x71, data);
  EXPECT_EQ(data[0], 35);  // the copy's clock is 5 s ahead

  saved.version = 2;
  EXPECT_THROW(copy.restore(saved), std::invalid_argument);
  saved.version = Rtc::State::kVersion;
  saved.offset_seconds = INT64_MAX;
  EXPECT_THROW(copy.restore(saved), std::invalid_argument);
}

TEST_F(RtcTest, RestoreRedrivesAPendingInterrupt) {
  set_cmos(kB, 0x12);
  now += 1;
  rtc->poll();
  auto copy_irq = std::make_shared<FakeIrq>();
  Rtc copy([this] { return now; }, copy_irq);
  copy.restore(rtc->save());
  EXPECT_TRUE(copy_irq->level);
}

TEST(RtcHostClock, DefaultClockIsTheHostWallClock) {
  Rtc rtc;
  Bus bus;
  bus.insert(std::shared_ptr<Rtc>(&rtc, [](Rtc*) {}), Rtc::kBase, Rtc::kLength);
  uint8_t data[1] = {0x32};
  bus.write(0x70, data);
  bus.read(0x71, data);
  EXPECT_EQ(data[0], 0x20);  // this code runs in the 21st century
}

}  // namespace
}  // namespace kiln::devices::legacy
