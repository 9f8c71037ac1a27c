// The MC146818-style CMOS RTC at ports 0x70 (index, bit 7 masks NMI) and 0x71 (data).
//
// Time is not counted by the device: it is the injected clock (host UTC by default) plus an offset
// the guest changes by setting the time, so it stays right across pauses and snapshots. Registers
// are encoded on every read in BCD or binary (status B bit 2) and 12 or 24 hour (status B bit 1).
// While status B's SET bit is on, the time registers are frozen and writable, as on hardware;
// clearing SET starts the clock from what was written.
//
// Status A never shows an update in progress (UIP), so readers that wait for it never stall; the
// update cycle is instantaneous here. Status D always reports valid RAM and time (VRT).
// Update-ended and alarm interrupts (status C UF/AF, IRQ 8 when enabled in status B) happen when
// the clock is observed to pass a second boundary: on every status C read, so polling guests see
// them, and on poll(), which the VMM calls from a host timer (every ~100 ms keeps them timely)
// when the IRQ is wired. The periodic interrupt (PIE/PF) is not implemented: it needs sub-second
// timing; its rate bits are stored and PF never sets.
//
// The century lives at CMOS index 0x32 (kCenturyRegister): the FADT's CENTURY field must name it.
//
// Thread safety: every entry point locks; the clock and the IrqLine are called with the lock held
// (the IrqLine must not call back into this device).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "devices/bus.h"
#include "devices/irq.h"

namespace kiln::devices::legacy {

class Rtc : public BusDevice {
 public:
  static constexpr uint64_t kBase = 0x70;
  static constexpr uint64_t kLength = 2;
  static constexpr uint8_t kCenturyRegister = 0x32;

  // Seconds since 1970-01-01T00:00:00Z.
  using Clock = std::function<int64_t()>;
  static int64_t host_utc_clock();

  struct State {
    static constexpr uint32_t kVersion = 1;
    uint32_t version = kVersion;
    // The 128 bytes of CMOS. Time registers hold meaningful values only while SET is on.
    std::array<uint8_t, 128> cmos{};
    uint8_t index = 0;
    bool nmi_disabled = false;
    int64_t offset_seconds = 0;  // guest time minus the clock
    int64_t last_checked = 0;    // guest time up to which update/alarm events were raised
  };

  // `irq` (ISA IRQ 8) may be null.
  explicit Rtc(Clock clock = host_utc_clock, std::shared_ptr<IrqLine> irq = nullptr);

  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t offset, std::span<const uint8_t> data) override;

  // Whether the guest masked NMIs through bit 7 of port 0x70 (for the VMM to honour if it wants).
  bool nmi_disabled() const;

  // Raises the update-ended and alarm events for seconds that passed since the last check.
  void poll();

  State save() const;
  // Throws std::invalid_argument for an unknown version or an absurd time offset.
  void restore(const State& state);

 private:
  uint8_t read_cmos(uint8_t index);
  void write_cmos(uint8_t index, uint8_t value);
  void write_status_b(uint8_t value);
  bool updates_halted() const;
  int64_t guest_time() const;
  // Writes the current time into the time registers, in the current format.
  void freeze_time_registers();
  // Restarts the clock from the time registers.
  void start_from_time_registers();
  // Sets UF, and AF when the alarm matches, for the seconds passed since state_.last_checked.
  void raise_time_events();
  bool alarm_matches();
  void update_irq(bool force = false);

  mutable std::mutex mutex_;
  State state_;
  const Clock clock_;
  const std::shared_ptr<IrqLine> irq_;
  bool irq_level_ = false;
};

}  // namespace kiln::devices::legacy
