// A 16550A UART (COM1 at 0x3F8, IRQ 4 per docs/MACHINE.md).
//
// Transmission is instantaneous: THR is always empty, every written byte goes straight to the
// output callback (or back into the receiver in MCR loopback mode). Reception goes through the
// 16-byte FIFO (or the single holding register when FIFOs are off); host input that does not fit
// waits in a bounded backlog and flows into the FIFO as the guest reads, so pasting a large block
// never overruns. Only loopback transmission can overrun, exactly as on hardware.
//
// Thread safety: read/write (vCPU threads), enqueue_input (host threads) and save/restore may be
// called concurrently. The IrqLine is driven with the device lock held (so level changes reach it
// in order); it must not call back into this device. The output callback runs without the lock.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "devices/bus.h"
#include "devices/irq.h"

namespace kiln::devices::legacy {

class Serial : public BusDevice {
 public:
  static constexpr uint64_t kCom1Base = 0x3f8;
  static constexpr uint64_t kLength = 8;
  static constexpr size_t kFifoSize = 16;
  static constexpr size_t kDefaultBacklogCapacity = 64 * 1024;

  using Output = std::function<void(std::span<const uint8_t>)>;

  // Everything the guest can observe; the backlog is included so typed-ahead input survives.
  struct State {
    static constexpr uint32_t kVersion = 1;
    uint32_t version = kVersion;
    uint8_t ier = 0;
    uint8_t lcr = 0;
    uint8_t mcr = 0;
    uint8_t fcr = 0;  // the bits that stick: enable, DMA mode, trigger level
    uint8_t scr = 0;
    uint8_t lsr_errors = 0;  // OE/PE/FE/BI, cleared by reading LSR
    uint8_t msr_deltas = 0;  // DCTS/DDSR/TERI/DDCD, cleared by reading MSR
    uint16_t divisor = 1;    // 115200 baud; only stored, no timing depends on it
    bool thre_pending = false;
    std::array<uint8_t, kFifoSize> rx_fifo{};
    uint8_t rx_head = 0;
    uint8_t rx_count = 0;
    std::vector<uint8_t> backlog;  // host input not yet in the FIFO
  };

  // `irq` may be null (no interrupt wired). `output` receives transmitted bytes.
  Serial(std::shared_ptr<IrqLine> irq, Output output,
         size_t backlog_capacity = kDefaultBacklogCapacity);

  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t offset, std::span<const uint8_t> data) override;

  // Host input (console, socket). All or nothing: returns false, taking nothing, when the
  // backlog cannot hold all of `bytes`.
  bool enqueue_input(std::span<const uint8_t> bytes);

  State save() const;
  // Throws std::invalid_argument for an unknown version or inconsistent FIFO fields.
  void restore(const State& state);

 private:
  uint8_t read_register(uint64_t offset);
  // Appends to `tx` the byte to hand to the output callback, if any.
  void write_register(uint64_t offset, uint8_t value, std::vector<uint8_t>& tx);

  uint8_t read_rbr();
  uint8_t read_iir();
  uint8_t read_lsr();
  uint8_t read_msr();
  void write_ier(uint8_t value);
  void write_fcr(uint8_t value);
  void write_mcr(uint8_t value);
  void transmit(uint8_t byte, std::vector<uint8_t>& tx);

  bool fifo_enabled() const;
  bool loopback() const;
  size_t rx_capacity() const;
  size_t trigger_level() const;
  uint8_t modem_lines() const;
  uint8_t pending_interrupt_id() const;

  void receive(uint8_t byte);  // the receiver shift register completing a character
  void push_rx(uint8_t byte);
  void clear_rx();
  void refill_from_backlog();
  void update_irq(bool force = false);

  mutable std::mutex mutex_;
  State state_;
  std::deque<uint8_t> backlog_;  // state_.backlog is only used by save/restore
  const size_t backlog_capacity_;
  const std::shared_ptr<IrqLine> irq_;
  const Output output_;
  bool irq_level_ = false;
};

}  // namespace kiln::devices::legacy
