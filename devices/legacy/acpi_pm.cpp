#include "devices/legacy/acpi_pm.h"

#include <spdlog/spdlog.h>

#include <stdexcept>
#include <utility>
#include <vector>

namespace kiln::devices::legacy {
namespace {

// Offsets from kBase.
constexpr uint64_t kStatusLow = 0, kStatusHigh = 1;
constexpr uint64_t kEnableLow = 2, kEnableHigh = 3;
constexpr uint64_t kControlLow = 4, kControlHigh = 5;
constexpr uint64_t kReset = 8;

constexpr uint16_t kControlSciEnable = 1 << 0;
constexpr uint16_t kControlStoredBits = 0x1c02;      // BM_RLD (1), SLP_TYP (10-12)
constexpr uint8_t kControlHighSleepTypeShift = 2;    // SLP_TYP is bits 10-12: 2-4 of the high byte
constexpr uint8_t kControlHighSleepEnable = 1 << 5;  // SLP_EN is bit 13: 5 of the high byte

uint16_t set_byte(uint16_t word, bool high, uint8_t value) {
  return high ? uint16_t((word & 0x00ff) | (value << 8)) : uint16_t((word & 0xff00) | value);
}
uint8_t get_byte(uint16_t word, bool high) { return uint8_t(high ? word >> 8 : word); }

}  // namespace

AcpiPm::AcpiPm(std::shared_ptr<IrqLine> sci, Callbacks callbacks)
    : sci_(std::move(sci)), callbacks_(std::move(callbacks)) {}

void AcpiPm::read(uint64_t offset, std::span<uint8_t> data) {
  std::lock_guard lock(mutex_);
  for (size_t i = 0; i < data.size(); ++i) data[i] = read_byte(offset + i);
}

void AcpiPm::write(uint64_t offset, std::span<const uint8_t> data) {
  std::vector<Action> actions;
  {
    std::lock_guard lock(mutex_);
    for (size_t i = 0; i < data.size(); ++i) {
      Action action = write_byte(offset + i, data[i]);
      if (action != Action::kNone) actions.push_back(action);
    }
    update_sci();
  }
  for (Action action : actions) {
    const auto& callback =
        action == Action::kPoweroff ? callbacks_.on_poweroff : callbacks_.on_reset;
    if (callback) callback();
  }
}

uint8_t AcpiPm::read_byte(uint64_t offset) const {
  switch (offset) {
    case kStatusLow:
    case kStatusHigh:
      return get_byte(state_.pm1_status, offset == kStatusHigh);
    case kEnableLow:
    case kEnableHigh:
      return get_byte(state_.pm1_enable, offset == kEnableHigh);
    case kControlLow:
    case kControlHigh:
      return get_byte(state_.pm1_control | kControlSciEnable, offset == kControlHigh);
    case kReset:
      return 0;
    default:
      return 0xff;  // the gap between the control block and the reset register
  }
}

AcpiPm::Action AcpiPm::write_byte(uint64_t offset, uint8_t value) {
  switch (offset) {
    case kStatusLow:
    case kStatusHigh:
      state_.pm1_status &= ~set_byte(0, offset == kStatusHigh, value);
      return Action::kNone;
    case kEnableLow:
    case kEnableHigh:
      state_.pm1_enable = set_byte(state_.pm1_enable, offset == kEnableHigh, value);
      return Action::kNone;
    case kControlLow:
    case kControlHigh: {
      const uint16_t written = set_byte(state_.pm1_control, offset == kControlHigh, value);
      state_.pm1_control = written & kControlStoredBits;
      // SLP_TYP and SLP_EN share the high byte, so an 8-bit or a 16-bit write both carry them.
      if (offset == kControlHigh && (value & kControlHighSleepEnable))
        return sleep((value >> kControlHighSleepTypeShift) & 0x7);
      return Action::kNone;
    }
    case kReset:
      return value == kResetValue ? Action::kReset : Action::kNone;
    default:
      return Action::kNone;
  }
}

AcpiPm::Action AcpiPm::sleep(uint8_t sleep_type) {
  if (sleep_type == kSoftOffSleepType) return Action::kPoweroff;
  // Only \_S5 is described in the DSDT; a guest asking for another state gets nothing.
  spdlog::warn("acpi: ignoring request for sleep type {} (only S5, type {}, is supported)",
               sleep_type, kSoftOffSleepType);
  return Action::kNone;
}

void AcpiPm::press_power_button() {
  std::lock_guard lock(mutex_);
  state_.pm1_status |= kPowerButtonStatus;
  update_sci();
}

void AcpiPm::update_sci(bool force) {
  const bool level = (state_.pm1_status & state_.pm1_enable) != 0;
  if (level == sci_level_ && !force) return;
  sci_level_ = level;
  if (sci_) sci_->set_level(level);
}

AcpiPm::State AcpiPm::save() const {
  std::lock_guard lock(mutex_);
  return state_;
}

void AcpiPm::restore(const State& state) {
  if (state.version != State::kVersion)
    throw std::invalid_argument("acpi pm: unknown state version");
  std::lock_guard lock(mutex_);
  state_ = state;
  state_.pm1_control &= kControlStoredBits;
  update_sci(/*force=*/true);
}

}  // namespace kiln::devices::legacy
