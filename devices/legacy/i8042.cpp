#include "devices/legacy/i8042.h"

#include <spdlog/spdlog.h>

#include <stdexcept>
#include <utility>

namespace kiln::devices::legacy {
namespace {

constexpr uint8_t kStatusOutputFull = 0x01;
constexpr uint8_t kStatusSystemFlag = 0x04;
constexpr uint8_t kStatusLastWasCommand = 0x08;
constexpr uint8_t kStatusNotInhibited = 0x10;
constexpr uint8_t kStatusAuxData = 0x20;

constexpr uint8_t kCtrKeyboardInterrupt = 0x01;
constexpr uint8_t kCtrAuxInterrupt = 0x02;
constexpr uint8_t kCtrSystemFlag = 0x04;
constexpr uint8_t kCtrKeyboardDisabled = 0x10;
constexpr uint8_t kCtrAuxDisabled = 0x20;

constexpr uint8_t kOutputPortResetReleased = 0x01;

constexpr uint8_t kCmdReadRamFirst = 0x20, kCmdReadRamLast = 0x3f;
constexpr uint8_t kCmdWriteRamFirst = 0x60, kCmdWriteRamLast = 0x7f;
constexpr uint8_t kCmdDisableAux = 0xa7;
constexpr uint8_t kCmdEnableAux = 0xa8;
constexpr uint8_t kCmdTestAux = 0xa9;
constexpr uint8_t kCmdSelfTest = 0xaa;
constexpr uint8_t kCmdTestKeyboard = 0xab;
constexpr uint8_t kCmdDisableKeyboard = 0xad;
constexpr uint8_t kCmdEnableKeyboard = 0xae;
constexpr uint8_t kCmdReadInputPort = 0xc0;
constexpr uint8_t kCmdReadOutputPort = 0xd0;
constexpr uint8_t kCmdWriteOutputPort = 0xd1;
constexpr uint8_t kCmdWriteKeyboardBuffer = 0xd2;
constexpr uint8_t kCmdWriteAuxBuffer = 0xd3;
constexpr uint8_t kCmdWriteToAux = 0xd4;
constexpr uint8_t kCmdPulseFirst = 0xf0;  // 0xf0..0xff: pulse output port bits 0-3 (0 = pulse)

constexpr uint8_t kSelfTestPassed = 0x55;
constexpr uint8_t kInterfaceTestPassed = 0x00;
constexpr uint8_t kInputPortNotInhibited = 0x80;

class Port : public BusDevice {
 public:
  Port(std::shared_ptr<I8042> controller, bool command)
      : controller_(std::move(controller)), command_(command) {}

  void read(uint64_t, std::span<uint8_t> data) override {
    // Each byte of a wider access is a separate port read, as the CPU would split it.
    for (auto& byte : data) byte = command_ ? controller_->read_status() : controller_->read_data();
  }
  void write(uint64_t, std::span<const uint8_t> data) override {
    for (uint8_t byte : data) {
      if (command_) {
        controller_->write_command(byte);
      } else {
        controller_->write_data(byte);
      }
    }
  }

 private:
  const std::shared_ptr<I8042> controller_;
  const bool command_;
};

}  // namespace

I8042::I8042(std::function<void()> on_reset, std::shared_ptr<IrqLine> keyboard_irq,
             std::shared_ptr<IrqLine> aux_irq)
    : on_reset_(std::move(on_reset)),
      keyboard_irq_(std::move(keyboard_irq)),
      aux_irq_(std::move(aux_irq)) {}

void I8042::insert(Bus& bus, const std::shared_ptr<I8042>& controller) {
  bus.insert(std::make_shared<Port>(controller, false), kDataPort, 1);
  bus.insert(std::make_shared<Port>(controller, true), kCommandPort, 1);
}

uint8_t I8042::read_data() {
  std::lock_guard lock(mutex_);
  state_.output_full = false;  // an empty buffer reads its last value again
  update_irqs();
  return state_.output_buffer;
}

uint8_t I8042::read_status() {
  std::lock_guard lock(mutex_);
  // The input buffer is consumed synchronously, so "input full" (bit 1) is never set.
  uint8_t status = kStatusNotInhibited;
  if (state_.output_full) status |= kStatusOutputFull;
  if (state_.output_full && state_.output_from_aux) status |= kStatusAuxData;
  if (command_byte() & kCtrSystemFlag) status |= kStatusSystemFlag;
  if (state_.last_write_was_command) status |= kStatusLastWasCommand;
  return status;
}

void I8042::write_data(uint8_t value) {
  bool reset = false;
  {
    std::lock_guard lock(mutex_);
    state_.last_write_was_command = false;
    if (state_.pending_command != 0) {
      reset = complete_command(value);
    }
    // Otherwise the byte is for the keyboard, and there is none: it is dropped.
    update_irqs();
  }
  if (reset && on_reset_) on_reset_();
}

void I8042::write_command(uint8_t command) {
  bool reset = false;
  {
    std::lock_guard lock(mutex_);
    state_.last_write_was_command = true;
    state_.pending_command = 0;  // a new command abandons one still waiting for data
    reset = run_command(command);
    update_irqs();
  }
  if (reset && on_reset_) on_reset_();
}

bool I8042::run_command(uint8_t command) {
  if (command >= kCmdReadRamFirst && command <= kCmdReadRamLast) {
    respond(state_.ram[command - kCmdReadRamFirst]);
    return false;
  }
  if (command >= kCmdWriteRamFirst && command <= kCmdWriteRamLast) {
    state_.pending_command = command;
    return false;
  }
  if (command >= kCmdPulseFirst) {
    return (command & kOutputPortResetReleased) == 0;  // pulsing bit 0 low is a reset
  }
  switch (command) {
    case kCmdDisableAux:
      command_byte() |= kCtrAuxDisabled;
      break;
    case kCmdEnableAux:
      command_byte() &= ~kCtrAuxDisabled;
      break;
    case kCmdTestAux:
    case kCmdTestKeyboard:
      respond(kInterfaceTestPassed);
      break;
    case kCmdSelfTest:
      respond(kSelfTestPassed);
      break;
    case kCmdDisableKeyboard:
      command_byte() |= kCtrKeyboardDisabled;
      break;
    case kCmdEnableKeyboard:
      command_byte() &= ~kCtrKeyboardDisabled;
      break;
    case kCmdReadInputPort:
      respond(kInputPortNotInhibited);
      break;
    case kCmdReadOutputPort:
      respond(state_.output_port);
      break;
    case kCmdWriteOutputPort:
    case kCmdWriteKeyboardBuffer:
    case kCmdWriteAuxBuffer:
    case kCmdWriteToAux:
      state_.pending_command = command;
      break;
    default:
      spdlog::debug("i8042: ignoring unsupported command {:#04x}", command);
      break;
  }
  return false;
}

bool I8042::complete_command(uint8_t value) {
  const uint8_t command = state_.pending_command;
  state_.pending_command = 0;
  if (command >= kCmdWriteRamFirst && command <= kCmdWriteRamLast) {
    state_.ram[command - kCmdWriteRamFirst] = value;
    return false;
  }
  switch (command) {
    case kCmdWriteOutputPort:
      state_.output_port = value;
      // The reset line is active low: clearing bit 0 resets the CPU. A20 (bit 1) cannot be
      // masked under KVM and is only remembered.
      return (value & kOutputPortResetReleased) == 0;
    case kCmdWriteKeyboardBuffer:
      respond(value, /*from_aux=*/false);
      break;
    case kCmdWriteAuxBuffer:
      respond(value, /*from_aux=*/true);
      break;
    default:  // kCmdWriteToAux: there is no mouse to receive it
      break;
  }
  return false;
}

void I8042::respond(uint8_t value, bool from_aux) {
  state_.output_buffer = value;
  state_.output_full = true;
  state_.output_from_aux = from_aux;
}

void I8042::update_irqs(bool force) {
  const bool full = state_.output_full;
  const bool keyboard = full && !state_.output_from_aux && (command_byte() & kCtrKeyboardInterrupt);
  const bool aux = full && state_.output_from_aux && (command_byte() & kCtrAuxInterrupt);
  if (keyboard_irq_ && (force || keyboard != keyboard_level_)) keyboard_irq_->set_level(keyboard);
  if (aux_irq_ && (force || aux != aux_level_)) aux_irq_->set_level(aux);
  keyboard_level_ = keyboard;
  aux_level_ = aux;
}

I8042::State I8042::save() const {
  std::lock_guard lock(mutex_);
  return state_;
}

void I8042::restore(const State& state) {
  if (state.version != State::kVersion) throw std::invalid_argument("i8042: unknown state version");
  std::lock_guard lock(mutex_);
  state_ = state;
  update_irqs(/*force=*/true);
}

}  // namespace kiln::devices::legacy
