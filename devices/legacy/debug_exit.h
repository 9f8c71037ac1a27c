// The debug exit port (0x501, docs/MACHINE.md): a byte the guest writes there ends kiln with that
// byte as exit status. Test guests use it to report pass/fail without a shutdown sequence.
// Reads return all ones, as from an unclaimed port. Stateless apart from the version, so save and
// restore exist only for uniformity with the other devices.
//
// Thread safety: on_exit is called from the writing vCPU thread, without any lock held.
#pragma once

#include <cstdint>
#include <functional>

#include "devices/bus.h"

namespace kiln::devices::legacy {

class DebugExit : public BusDevice {
 public:
  static constexpr uint64_t kPort = 0x501;
  static constexpr uint64_t kLength = 1;

  struct State {
    static constexpr uint32_t kVersion = 1;
    uint32_t version = kVersion;
  };

  explicit DebugExit(std::function<void(uint8_t code)> on_exit);

  void read(uint64_t offset, std::span<uint8_t> data) override;
  // Every byte written calls on_exit; a wider access calls it once per byte, lowest first.
  void write(uint64_t offset, std::span<const uint8_t> data) override;

  State save() const { return {}; }
  // Throws std::invalid_argument for an unknown version.
  void restore(const State& state);

 private:
  const std::function<void(uint8_t)> on_exit_;
};

}  // namespace kiln::devices::legacy
