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
// Periodic, alarm and update-ended interrupts are not implemented: the PIE/AIE/UIE bits are
// stored but status C never reports a flag.
//
// The century lives at CMOS index 0x32 (kCenturyRegister): the FADT's CENTURY field must name it.
//
// Thread safety: read/write/save/restore lock; the clock is called with the lock held.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <mutex>

#include "devices/bus.h"

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
  };

  explicit Rtc(Clock clock = host_utc_clock);

  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t offset, std::span<const uint8_t> data) override;

  // Whether the guest masked NMIs through bit 7 of port 0x70 (for the VMM to honour if it wants).
  bool nmi_disabled() const;

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

  mutable std::mutex mutex_;
  State state_;
  const Clock clock_;
};

}  // namespace kiln::devices::legacy
