#include "devices/legacy/serial.h"

#include <stdexcept>
#include <utility>

namespace kiln::devices::legacy {
namespace {

// Register offsets from the base port.
constexpr uint64_t kRbrThrDll = 0;
constexpr uint64_t kIerDlm = 1;
constexpr uint64_t kIirFcr = 2;
constexpr uint64_t kLcr = 3;
constexpr uint64_t kMcr = 4;
constexpr uint64_t kLsr = 5;
constexpr uint64_t kMsr = 6;
constexpr uint64_t kScr = 7;

constexpr uint8_t kIerRxData = 0x01;
constexpr uint8_t kIerThre = 0x02;
constexpr uint8_t kIerLineStatus = 0x04;
constexpr uint8_t kIerModemStatus = 0x08;
constexpr uint8_t kIerMask = 0x0f;

// IIR interrupt identifications, highest priority first.
constexpr uint8_t kIirLineStatus = 0x06;
constexpr uint8_t kIirRxData = 0x04;
constexpr uint8_t kIirCharTimeout = 0x0c;
constexpr uint8_t kIirThre = 0x02;
constexpr uint8_t kIirModemStatus = 0x00;
constexpr uint8_t kIirNone = 0x01;
constexpr uint8_t kIirFifosEnabled = 0xc0;

constexpr uint8_t kFcrEnable = 0x01;
constexpr uint8_t kFcrClearRx = 0x02;
constexpr uint8_t kFcrSticky = 0xc9;  // enable, DMA mode select, trigger level

constexpr uint8_t kLcrDlab = 0x80;

constexpr uint8_t kMcrDtr = 0x01;
constexpr uint8_t kMcrRts = 0x02;
constexpr uint8_t kMcrOut1 = 0x04;
constexpr uint8_t kMcrOut2 = 0x08;
constexpr uint8_t kMcrLoop = 0x10;
constexpr uint8_t kMcrMask = 0x1f;

constexpr uint8_t kLsrDataReady = 0x01;
constexpr uint8_t kLsrOverrun = 0x02;
constexpr uint8_t kLsrErrors = 0x1e;  // OE, PE, FE, BI
constexpr uint8_t kLsrThre = 0x20;
constexpr uint8_t kLsrTemt = 0x40;

constexpr uint8_t kMsrDcts = 0x01;
constexpr uint8_t kMsrDdsr = 0x02;
constexpr uint8_t kMsrTeri = 0x04;
constexpr uint8_t kMsrDdcd = 0x08;
constexpr uint8_t kMsrCts = 0x10;
constexpr uint8_t kMsrDsr = 0x20;
constexpr uint8_t kMsrRi = 0x40;
constexpr uint8_t kMsrDcd = 0x80;

}  // namespace

Serial::Serial(std::shared_ptr<IrqLine> irq, Output output, size_t backlog_capacity)
    : backlog_capacity_(backlog_capacity), irq_(std::move(irq)), output_(std::move(output)) {}

void Serial::read(uint64_t offset, std::span<uint8_t> data) {
  std::lock_guard lock(mutex_);
  for (size_t i = 0; i < data.size(); ++i) data[i] = read_register(offset + i);
  update_irq();
}

void Serial::write(uint64_t offset, std::span<const uint8_t> data) {
  std::vector<uint8_t> tx;
  {
    std::lock_guard lock(mutex_);
    for (size_t i = 0; i < data.size(); ++i) write_register(offset + i, data[i], tx);
    update_irq();
  }
  if (!tx.empty() && output_) output_(tx);
}

uint8_t Serial::read_register(uint64_t offset) {
  const bool dlab = state_.lcr & kLcrDlab;
  switch (offset) {
    case kRbrThrDll:
      return dlab ? uint8_t(state_.divisor) : read_rbr();
    case kIerDlm:
      return dlab ? uint8_t(state_.divisor >> 8) : state_.ier;
    case kIirFcr:
      return read_iir();
    case kLcr:
      return state_.lcr;
    case kMcr:
      return state_.mcr;
    case kLsr:
      return read_lsr();
    case kMsr:
      return read_msr();
    case kScr:
      return state_.scr;
    default:
      return 0xff;  // only reachable when called directly with a bad offset
  }
}

void Serial::write_register(uint64_t offset, uint8_t value, std::vector<uint8_t>& tx) {
  const bool dlab = state_.lcr & kLcrDlab;
  switch (offset) {
    case kRbrThrDll:
      if (dlab) {
        state_.divisor = uint16_t((state_.divisor & 0xff00) | value);
      } else {
        transmit(value, tx);
      }
      break;
    case kIerDlm:
      if (dlab) {
        state_.divisor = uint16_t((state_.divisor & 0x00ff) | (value << 8));
      } else {
        write_ier(value);
      }
      break;
    case kIirFcr:
      write_fcr(value);
      break;
    case kLcr:
      state_.lcr = value;
      break;
    case kMcr:
      write_mcr(value);
      break;
    case kScr:
      state_.scr = value;
      break;
    default:
      break;  // LSR and MSR are read-only (writes to them are factory test modes)
  }
}

uint8_t Serial::read_rbr() {
  if (state_.rx_count == 0) return 0;
  uint8_t byte = state_.rx_fifo[state_.rx_head];
  state_.rx_head = uint8_t((state_.rx_head + 1) % kFifoSize);
  --state_.rx_count;
  refill_from_backlog();
  return byte;
}

uint8_t Serial::read_iir() {
  uint8_t id = pending_interrupt_id();
  // Reading IIR is how the THRE interrupt is acknowledged when it is the one reported.
  if (id == kIirThre) state_.thre_pending = false;
  return id | (fifo_enabled() ? kIirFifosEnabled : 0);
}

uint8_t Serial::read_lsr() {
  uint8_t value = state_.lsr_errors | kLsrThre | kLsrTemt;
  if (state_.rx_count > 0) value |= kLsrDataReady;
  state_.lsr_errors = 0;
  return value;
}

uint8_t Serial::read_msr() {
  uint8_t value = modem_lines() | state_.msr_deltas;
  state_.msr_deltas = 0;
  return value;
}

void Serial::write_ier(uint8_t value) {
  const bool thre_newly_enabled = (value & kIerThre) && !(state_.ier & kIerThre);
  state_.ier = value & kIerMask;
  // THR is always empty, so enabling its interrupt raises it at once. Linux's 8250 driver
  // depends on this: it starts transmission by setting IER.ETBEI and waits for the interrupt.
  if (thre_newly_enabled) state_.thre_pending = true;
}

void Serial::write_fcr(uint8_t value) {
  const bool was_enabled = fifo_enabled();
  // With FCR bit 0 clear the other bits are not programmed and the FIFOs are off and empty.
  if (!(value & kFcrEnable)) {
    state_.fcr = 0;
    if (was_enabled) clear_rx();
  } else {
    state_.fcr = value & kFcrSticky;
    if (!was_enabled || (value & kFcrClearRx)) clear_rx();
  }
  // Clearing the transmit FIFO (bit 2) has nothing to do: it is always empty.
  refill_from_backlog();
}

void Serial::write_mcr(uint8_t value) {
  const uint8_t old_lines = modem_lines();
  state_.mcr = value & kMcrMask;
  const uint8_t new_lines = modem_lines();
  const uint8_t changed = old_lines ^ new_lines;
  if (changed & kMsrCts) state_.msr_deltas |= kMsrDcts;
  if (changed & kMsrDsr) state_.msr_deltas |= kMsrDdsr;
  if ((old_lines & kMsrRi) && !(new_lines & kMsrRi)) state_.msr_deltas |= kMsrTeri;
  if (changed & kMsrDcd) state_.msr_deltas |= kMsrDdcd;
  refill_from_backlog();  // leaving loopback reconnects the host input
}

void Serial::transmit(uint8_t byte, std::vector<uint8_t>& tx) {
  if (loopback()) {
    receive(byte);
  } else {
    tx.push_back(byte);
  }
  // Writing THR acknowledges the THRE interrupt, but the byte leaves at once and THR is empty
  // again, which raises it anew: a transmit-interrupt loop keeps running until IER disables it.
  state_.thre_pending = true;
}

bool Serial::fifo_enabled() const { return state_.fcr & kFcrEnable; }

bool Serial::loopback() const { return state_.mcr & kMcrLoop; }

size_t Serial::rx_capacity() const { return fifo_enabled() ? kFifoSize : 1; }

size_t Serial::trigger_level() const {
  static constexpr size_t kLevels[4] = {1, 4, 8, 14};
  return fifo_enabled() ? kLevels[state_.fcr >> 6] : 1;
}

uint8_t Serial::modem_lines() const {
  if (!loopback()) {
    // Nothing drives the lines, so report a ready modem with carrier: getty and busybox wait
    // for DCD/CTS/DSR on a serial line before using it.
    return kMsrCts | kMsrDsr | kMsrDcd;
  }
  // In loopback the outputs are wired back to the inputs.
  uint8_t lines = 0;
  if (state_.mcr & kMcrRts) lines |= kMsrCts;
  if (state_.mcr & kMcrDtr) lines |= kMsrDsr;
  if (state_.mcr & kMcrOut1) lines |= kMsrRi;
  if (state_.mcr & kMcrOut2) lines |= kMsrDcd;
  return lines;
}

uint8_t Serial::pending_interrupt_id() const {
  if ((state_.ier & kIerLineStatus) && state_.lsr_errors) return kIirLineStatus;
  if ((state_.ier & kIerRxData) && state_.rx_count > 0) {
    // The FIFO is refilled eagerly from the backlog, so data below the trigger level means no
    // more is arriving: report it as the character timeout a real UART would raise after four
    // idle character times, instead of modelling that delay.
    return state_.rx_count >= trigger_level() ? kIirRxData : kIirCharTimeout;
  }
  if ((state_.ier & kIerThre) && state_.thre_pending) return kIirThre;
  if ((state_.ier & kIerModemStatus) && state_.msr_deltas) return kIirModemStatus;
  return kIirNone;
}

void Serial::receive(uint8_t byte) {
  if (state_.rx_count < rx_capacity()) {
    push_rx(byte);
    return;
  }
  state_.lsr_errors |= kLsrOverrun;
  // A full FIFO keeps its contents and loses the new character; without FIFOs the new
  // character overwrites the unread one in the holding register.
  if (!fifo_enabled()) {
    clear_rx();
    push_rx(byte);
  }
}

void Serial::push_rx(uint8_t byte) {
  state_.rx_fifo[(state_.rx_head + state_.rx_count) % kFifoSize] = byte;
  ++state_.rx_count;
}

void Serial::clear_rx() {
  state_.rx_head = 0;
  state_.rx_count = 0;
}

void Serial::refill_from_backlog() {
  if (loopback()) return;  // the receive pin is disconnected in loopback mode
  while (!backlog_.empty() && state_.rx_count < rx_capacity()) {
    push_rx(backlog_.front());
    backlog_.pop_front();
  }
}

void Serial::update_irq(bool force) {
  // On PCs OUT2 gates the UART's interrupt onto the ISA bus; in loopback the OUT pins are
  // forced inactive, so the interrupt does not leave the chip either.
  const bool level = pending_interrupt_id() != kIirNone && (state_.mcr & kMcrOut2) && !loopback();
  if (level == irq_level_ && !force) return;
  irq_level_ = level;
  if (irq_) irq_->set_level(level);
}

bool Serial::enqueue_input(std::span<const uint8_t> bytes) {
  std::lock_guard lock(mutex_);
  if (bytes.size() > backlog_capacity_ - backlog_.size()) return false;
  backlog_.insert(backlog_.end(), bytes.begin(), bytes.end());
  refill_from_backlog();
  update_irq();
  return true;
}

Serial::State Serial::save() const {
  std::lock_guard lock(mutex_);
  State state = state_;
  state.backlog.assign(backlog_.begin(), backlog_.end());
  return state;
}

void Serial::restore(const State& state) {
  if (state.version != State::kVersion)
    throw std::invalid_argument("serial: unknown state version");
  if (state.rx_head >= kFifoSize || state.rx_count > kFifoSize)
    throw std::invalid_argument("serial: receive FIFO indices out of range");
  if ((state.fcr & kFcrEnable) == 0 && state.rx_count > 1)
    throw std::invalid_argument("serial: more than one byte held with FIFOs disabled");
  if (state.backlog.size() > backlog_capacity_)
    throw std::invalid_argument("serial: input backlog larger than this device holds");
  std::lock_guard lock(mutex_);
  state_ = state;
  state_.ier &= kIerMask;
  state_.mcr &= kMcrMask;
  state_.fcr &= kFcrSticky;
  state_.lsr_errors &= kLsrErrors;
  state_.msr_deltas &= 0x0f;
  backlog_.assign(state.backlog.begin(), state.backlog.end());
  state_.backlog.clear();
  update_irq(/*force=*/true);
}

}  // namespace kiln::devices::legacy
