// ACPI fixed-hardware power management (docs/MACHINE.md), one device over ports 0x600..0x608:
//   0x600 PM1a_STS (16 bit, write 1 to clear)   0x602 PM1a_EN (16 bit)
//   0x604 PM1a_CNT (16 bit)                       0x606..0x607 unused (read all ones)
//   0x608 RESET_REG (write 0x01 resets)
// It provides the fixed power button (PWRBTN_STS/EN, bit 8), soft-off (S5: SLP_TYP 5 with SLP_EN)
// and the reset register. SCI (IRQ 9, level) is asserted while PM1_STS & PM1_EN is non-zero.
// SCI_EN always reads 1: there is no legacy (SMM) mode to switch from, the FADT has no SMI_CMD.
// Accesses of any width at any offset work byte by byte, so 8-bit and 16-bit drivers agree.
//
// Thread safety: all entry points lock. The SCI IrqLine is driven under the lock and must not call
// back into this device; on_poweroff and on_reset run without the lock.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "devices/bus.h"
#include "devices/irq.h"

namespace kiln::devices::legacy {

class AcpiPm : public BusDevice {
 public:
  static constexpr uint64_t kBase = 0x600;
  static constexpr uint64_t kLength = 9;
  static constexpr uint64_t kPm1EventBlock = 0x600;    // FADT PM1a_EVT_BLK, length 4
  static constexpr uint64_t kPm1ControlBlock = 0x604;  // FADT PM1a_CNT_BLK, length 2
  static constexpr uint64_t kResetRegister = 0x608;    // FADT RESET_REG (system I/O, 8 bit)
  static constexpr uint8_t kResetValue = 0x01;         // FADT RESET_VALUE
  static constexpr uint8_t kSoftOffSleepType = 5;      // SLP_TYP for \_S5
  static constexpr uint16_t kPowerButtonStatus = 1 << 8;

  struct State {
    static constexpr uint32_t kVersion = 1;
    uint32_t version = kVersion;
    uint16_t pm1_status = 0;
    uint16_t pm1_enable = 0;
    uint16_t pm1_control = 0;  // the stored bits: BM_RLD and SLP_TYP
  };

  struct Callbacks {
    std::function<void()> on_poweroff;
    std::function<void()> on_reset;
  };

  AcpiPm(std::shared_ptr<IrqLine> sci, Callbacks callbacks);

  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t offset, std::span<const uint8_t> data) override;

  // Host side: the power button was pressed (sets PWRBTN_STS, raising SCI if enabled).
  void press_power_button();

  State save() const;
  // Throws std::invalid_argument for an unknown version.
  void restore(const State& state);

 private:
  enum class Action { kNone, kPoweroff, kReset };

  uint8_t read_byte(uint64_t offset) const;
  Action write_byte(uint64_t offset, uint8_t value);
  Action sleep(uint8_t sleep_type);
  void update_sci(bool force = false);

  mutable std::mutex mutex_;
  State state_;
  const std::shared_ptr<IrqLine> sci_;
  const Callbacks callbacks_;
  bool sci_level_ = false;
};

}  // namespace kiln::devices::legacy
