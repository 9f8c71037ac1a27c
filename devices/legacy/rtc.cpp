#include "devices/legacy/rtc.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <utility>

namespace kiln::devices::legacy {
namespace {

constexpr uint8_t kSeconds = 0x00;
constexpr uint8_t kSecondsAlarm = 0x01;
constexpr uint8_t kMinutes = 0x02;
constexpr uint8_t kMinutesAlarm = 0x03;
constexpr uint8_t kHours = 0x04;
constexpr uint8_t kHoursAlarm = 0x05;
constexpr uint8_t kDayOfWeek = 0x06;
constexpr uint8_t kDayOfMonth = 0x07;
constexpr uint8_t kMonth = 0x08;
constexpr uint8_t kYear = 0x09;
constexpr uint8_t kStatusA = 0x0a;
constexpr uint8_t kStatusB = 0x0b;
constexpr uint8_t kStatusC = 0x0c;
constexpr uint8_t kStatusD = 0x0d;

constexpr uint8_t kStatusAUpdateInProgress = 0x80;
constexpr uint8_t kStatusADefault = 0x26;  // 32.768 kHz time base, 1024 Hz periodic rate
constexpr uint8_t kStatusBSet = 0x80;
constexpr uint8_t kStatusBInterruptEnables = 0x70;  // PIE, AIE, UIE
constexpr uint8_t kStatusBUpdateInterrupt = 0x10;
constexpr uint8_t kStatusCInterruptRequest = 0x80;  // IRQF: an enabled flag is set
constexpr uint8_t kStatusCAlarm = 0x20;
constexpr uint8_t kStatusCUpdateEnded = 0x10;
constexpr uint8_t kAlarmDontCare = 0xc0;  // alarm values 0xc0..0xff match any value
constexpr uint8_t kStatusBBinary = 0x04;
constexpr uint8_t kStatusB24Hour = 0x02;
constexpr uint8_t kStatusBDefault = kStatusB24Hour;  // what PC firmware leaves: BCD, 24 hour
constexpr uint8_t kStatusDValidRam = 0x80;
constexpr uint8_t kHourPm = 0x80;

constexpr uint8_t kIndexMask = 0x7f;
constexpr uint8_t kNmiDisable = 0x80;

constexpr int64_t kSecondsPerDay = 86400;
// Seconds of missed time to search for an alarm match after a long gap (a paused VM); older
// matches are dropped, as they would be by a guest that only reads the latest flags anyway.
constexpr int64_t kMaxAlarmCatchUp = 60;
// Far beyond any date the registers can express (year 25599), small enough never to overflow.
constexpr int64_t kMaxOffsetSeconds = int64_t{1} << 40;

bool is_time_register(uint8_t index) {
  return index == kSeconds || index == kMinutes || index == kHours || index == kDayOfWeek ||
         index == kDayOfMonth || index == kMonth || index == kYear ||
         index == Rtc::kCenturyRegister;
}

struct CivilDate {
  int64_t year;
  int64_t month;  // 1..12
  int64_t day;    // 1..31
};

// Days since 1970-01-01 of a proleptic Gregorian date, counting in 400-year eras (146097 days)
// whose years start on March 1st so the leap day falls at the end.
int64_t days_from_civil(CivilDate date) {
  const int64_t year = date.month <= 2 ? date.year - 1 : date.year;
  const int64_t era = (year >= 0 ? year : year - 399) / 400;
  const int64_t year_of_era = year - era * 400;
  const int64_t month_from_march = date.month > 2 ? date.month - 3 : date.month + 9;
  const int64_t day_of_year = (153 * month_from_march + 2) / 5 + date.day - 1;
  const int64_t day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
  return era * 146097 + day_of_era - 719468;  // 719468: days from 0000-03-01 to 1970-01-01
}

CivilDate civil_from_days(int64_t days) {
  days += 719468;
  const int64_t era = (days >= 0 ? days : days - 146096) / 146097;
  const int64_t day_of_era = days - era * 146097;
  const int64_t year_of_era =
      (day_of_era - day_of_era / 1460 + day_of_era / 36524 - day_of_era / 146096) / 365;
  const int64_t day_of_year =
      day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
  const int64_t month_from_march = (5 * day_of_year + 2) / 153;
  const int64_t day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
  const int64_t month = month_from_march < 10 ? month_from_march + 3 : month_from_march - 9;
  return {year_of_era + era * 400 + (month <= 2 ? 1 : 0), month, day};
}

int64_t floor_div(int64_t a, int64_t b) { return a / b - (a % b != 0 && (a < 0) != (b < 0)); }
int64_t floor_mod(int64_t a, int64_t b) { return a - floor_div(a, b) * b; }

// Register encoding per status B.
class Format {
 public:
  explicit Format(uint8_t status_b)
      : binary_(status_b & kStatusBBinary), hour24_(status_b & kStatusB24Hour) {}

  uint8_t encode(int64_t value) const {  // value in 0..99 (or 0..255 in binary)
    return binary_ ? uint8_t(value) : uint8_t((value / 10) << 4 | (value % 10));
  }
  int64_t decode(uint8_t reg) const { return binary_ ? reg : (reg >> 4) * 10 + (reg & 0x0f); }

  uint8_t encode_hour(int64_t hour) const {
    if (hour24_) return encode(hour);
    const int64_t hour12 = hour % 12 == 0 ? 12 : hour % 12;
    return encode(hour12) | (hour >= 12 ? kHourPm : 0);
  }
  int64_t decode_hour(uint8_t reg) const {
    if (hour24_) return decode(reg);
    return decode(reg & ~kHourPm) % 12 + (reg & kHourPm ? 12 : 0);
  }

 private:
  bool binary_;
  bool hour24_;
};

}  // namespace

int64_t Rtc::host_utc_clock() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Rtc::Rtc(Clock clock, std::shared_ptr<IrqLine> irq)
    : clock_(std::move(clock)), irq_(std::move(irq)) {
  state_.cmos[kStatusA] = kStatusADefault;
  state_.cmos[kStatusB] = kStatusBDefault;
  state_.cmos[kStatusD] = kStatusDValidRam;
  state_.last_checked = guest_time();
}

void Rtc::read(uint64_t offset, std::span<uint8_t> data) {
  std::lock_guard lock(mutex_);
  for (size_t i = 0; i < data.size(); ++i) {
    if (offset + i == 0) {
      // The index port is write-only on PCs; returning the latched index is harmless.
      data[i] = state_.index | (state_.nmi_disabled ? kNmiDisable : 0);
    } else if (offset + i == 1) {
      data[i] = read_cmos(state_.index);
    } else {
      data[i] = 0xff;
    }
  }
}

void Rtc::write(uint64_t offset, std::span<const uint8_t> data) {
  std::lock_guard lock(mutex_);
  for (size_t i = 0; i < data.size(); ++i) {
    if (offset + i == 0) {
      state_.index = data[i] & kIndexMask;
      state_.nmi_disabled = data[i] & kNmiDisable;
    } else if (offset + i == 1) {
      write_cmos(state_.index, data[i]);
    }
  }
}

bool Rtc::nmi_disabled() const {
  std::lock_guard lock(mutex_);
  return state_.nmi_disabled;
}

uint8_t Rtc::read_cmos(uint8_t index) {
  if (is_time_register(index) && !updates_halted()) {
    freeze_time_registers();  // cheap: encode now, then read like frozen registers
  }
  switch (index) {
    case kStatusA:
      return state_.cmos[kStatusA] & ~kStatusAUpdateInProgress;
    case kStatusC: {
      raise_time_events();
      uint8_t flags = state_.cmos[kStatusC];
      if (flags & state_.cmos[kStatusB] & kStatusBInterruptEnables)
        flags |= kStatusCInterruptRequest;
      state_.cmos[kStatusC] = 0;  // reading C acknowledges the interrupt flags
      update_irq();
      return flags;
    }
    case kStatusD:
      return kStatusDValidRam;
    default:
      return state_.cmos[index];
  }
}

void Rtc::write_cmos(uint8_t index, uint8_t value) {
  if (is_time_register(index)) {
    if (updates_halted()) {
      state_.cmos[index] = value;
    } else {
      // A running clock takes the new field and keeps counting from the resulting time.
      freeze_time_registers();
      state_.cmos[index] = value;
      start_from_time_registers();
    }
    return;
  }
  switch (index) {
    case kStatusA:
      state_.cmos[kStatusA] = value & ~kStatusAUpdateInProgress;
      break;
    case kStatusB:
      write_status_b(value);
      break;
    case kStatusC:
    case kStatusD:
      break;  // read-only
    default:
      state_.cmos[index] = value;
      break;
  }
}

void Rtc::write_status_b(uint8_t value) {
  const bool was_halted = updates_halted();
  const bool halting = value & kStatusBSet;
  if (halting) value &= ~kStatusBUpdateInterrupt;  // SET clears UIE on the MC146818
  if (halting && !was_halted) {
    // Freeze in the format the guest will read and write while SET is on.
    state_.cmos[kStatusB] = value;
    freeze_time_registers();
  } else if (!halting && was_halted) {
    // Interpret the registers in the format they were written in, then switch formats; a chip
    // would reinterpret them, but a guest changing format and releasing SET at once means this.
    start_from_time_registers();
    state_.cmos[kStatusB] = value;
  } else {
    state_.cmos[kStatusB] = value;
  }
  update_irq();  // enabling an interrupt whose flag is already set raises it
}

bool Rtc::updates_halted() const { return state_.cmos[kStatusB] & kStatusBSet; }

int64_t Rtc::guest_time() const { return clock_() + state_.offset_seconds; }

void Rtc::freeze_time_registers() {
  const Format format(state_.cmos[kStatusB]);
  const int64_t now = guest_time();
  const int64_t days = floor_div(now, kSecondsPerDay);
  const int64_t second_of_day = floor_mod(now, kSecondsPerDay);
  const CivilDate date = civil_from_days(days);
  auto& cmos = state_.cmos;
  cmos[kSeconds] = format.encode(second_of_day % 60);
  cmos[kMinutes] = format.encode(second_of_day / 60 % 60);
  cmos[kHours] = format.encode_hour(second_of_day / 3600);
  cmos[kDayOfWeek] = format.encode(floor_mod(days + 4, 7) + 1);  // 1970-01-01 was a Thursday
  cmos[kDayOfMonth] = format.encode(date.day);
  cmos[kMonth] = format.encode(date.month);
  cmos[kYear] = format.encode(floor_mod(date.year, 100));
  cmos[kCenturyRegister] = format.encode(floor_mod(floor_div(date.year, 100), 100));
}

void Rtc::start_from_time_registers() {
  const Format format(state_.cmos[kStatusB]);
  const auto& cmos = state_.cmos;
  // Nonsense fields (month 0, BCD digits above 9) still give a finite time; the guest that
  // wrote them reads back whatever date that is, rather than crashing anything.
  const CivilDate date{format.decode(cmos[kCenturyRegister]) * 100 + format.decode(cmos[kYear]),
                       format.decode(cmos[kMonth]), format.decode(cmos[kDayOfMonth])};
  const int64_t seconds = days_from_civil(date) * kSecondsPerDay +
                          format.decode_hour(cmos[kHours]) * 3600 +
                          format.decode(cmos[kMinutes]) * 60 + format.decode(cmos[kSeconds]);
  state_.offset_seconds = seconds - clock_();
  state_.last_checked = seconds;  // a new time is not a run of passed seconds
}

void Rtc::poll() {
  std::lock_guard lock(mutex_);
  raise_time_events();
  update_irq();
}

void Rtc::raise_time_events() {
  if (updates_halted()) return;  // SET stops the update cycle
  const int64_t now = guest_time();
  if (now <= state_.last_checked) return;
  state_.cmos[kStatusC] |= kStatusCUpdateEnded;
  // The alarm is compared against each second the clock entered, in the current format.
  const int64_t resume = state_.offset_seconds;
  for (int64_t second = std::max(state_.last_checked + 1, now - kMaxAlarmCatchUp + 1);
       second <= now; ++second) {
    state_.offset_seconds = resume - (now - second);
    freeze_time_registers();
    if (alarm_matches()) state_.cmos[kStatusC] |= kStatusCAlarm;
  }
  state_.offset_seconds = resume;
  state_.last_checked = now;
}

bool Rtc::alarm_matches() {
  const auto& cmos = state_.cmos;
  auto field_matches = [&](uint8_t alarm, uint8_t field) {
    return (cmos[alarm] & kAlarmDontCare) == kAlarmDontCare || cmos[alarm] == cmos[field];
  };
  return field_matches(kSecondsAlarm, kSeconds) && field_matches(kMinutesAlarm, kMinutes) &&
         field_matches(kHoursAlarm, kHours);
}

void Rtc::update_irq(bool force) {
  const bool level = state_.cmos[kStatusC] & state_.cmos[kStatusB] & kStatusBInterruptEnables;
  if (level == irq_level_ && !force) return;
  irq_level_ = level;
  if (irq_) irq_->set_level(level);
}

Rtc::State Rtc::save() const {
  std::lock_guard lock(mutex_);
  return state_;
}

void Rtc::restore(const State& state) {
  if (state.version != State::kVersion) throw std::invalid_argument("rtc: unknown state version");
  if (state.offset_seconds > kMaxOffsetSeconds || state.offset_seconds < -kMaxOffsetSeconds)
    throw std::invalid_argument("rtc: time offset out of range");
  if (state.last_checked > 2 * kMaxOffsetSeconds || state.last_checked < -2 * kMaxOffsetSeconds)
    throw std::invalid_argument("rtc: last event check out of range");
  std::lock_guard lock(mutex_);
  state_ = state;
  state_.index &= kIndexMask;
  update_irq(/*force=*/true);
}

}  // namespace kiln::devices::legacy
