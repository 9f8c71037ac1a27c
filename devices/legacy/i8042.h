// The i8042 keyboard controller, as far as a VM needs it: Linux's probe (self test, command byte,
// port enable/disable, AUX loopback) and the reset line (command 0xFE, or output port bit 0
// cleared through command 0xD1), which is how `reboot=k` restarts the machine.
//
// No keyboard or mouse is attached: bytes the guest sends to them are dropped, so their drivers
// time out and report no device. The controller answers every command itself, so nothing the
// guest polls for hangs.
//
// The controller sits at data port 0x60 and command/status port 0x64. Port 0x61 between them is
// the PIT's speaker/NMI status port, which KVM emulates in the kernel, so insert() registers two
// 1-byte ranges rather than 0x60..0x64.
//
// Thread safety: all entry points lock. IrqLines are driven under the lock and must not call back
// into this device; on_reset runs without the lock.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "devices/bus.h"
#include "devices/irq.h"

namespace kiln::devices::legacy {

class I8042 {
 public:
  static constexpr uint64_t kDataPort = 0x60;
  static constexpr uint64_t kCommandPort = 0x64;  // status register on reads

  struct State {
    static constexpr uint32_t kVersion = 1;
    uint32_t version = kVersion;
    // Controller RAM; byte 0 is the command byte: keyboard interrupt, system flag, translation.
    std::array<uint8_t, 32> ram{0x45};
    uint8_t output_port = 0x03;  // bit 0: reset line (active low) released, bit 1: A20 enabled
    uint8_t output_buffer = 0;
    bool output_full = false;
    bool output_from_aux = false;
    bool last_write_was_command = false;
    uint8_t pending_command = 0;  // a command still waiting for its data byte, or 0
  };

  // `on_reset` is called when the guest pulses the reset line. The IRQ lines (ISA IRQ 1 and 12)
  // may be null; when set they follow the output buffer like on a PC.
  explicit I8042(std::function<void()> on_reset, std::shared_ptr<IrqLine> keyboard_irq = nullptr,
                 std::shared_ptr<IrqLine> aux_irq = nullptr);

  // Registers the data port (0x60) and command/status port (0x64) of `controller` on `bus`.
  static void insert(Bus& bus, const std::shared_ptr<I8042>& controller);

  uint8_t read_data();
  uint8_t read_status();
  void write_data(uint8_t value);
  void write_command(uint8_t command);

  State save() const;
  // Throws std::invalid_argument for an unknown version.
  void restore(const State& state);

 private:
  // Runs `command`; returns whether it pulsed the reset line.
  bool run_command(uint8_t command);
  // Consumes a data byte for state_.pending_command; returns whether it pulsed the reset line.
  bool complete_command(uint8_t value);
  void respond(uint8_t value, bool from_aux = false);
  uint8_t& command_byte() { return state_.ram[0]; }
  void update_irqs(bool force = false);

  mutable std::mutex mutex_;
  State state_;
  const std::function<void()> on_reset_;
  const std::shared_ptr<IrqLine> keyboard_irq_;
  const std::shared_ptr<IrqLine> aux_irq_;
  bool keyboard_level_ = false;
  bool aux_level_ = false;
};

}  // namespace kiln::devices::legacy
