#include "devices/legacy/debug_exit.h"

#include <algorithm>
#include <stdexcept>
#include <utility>

namespace kiln::devices::legacy {

DebugExit::DebugExit(std::function<void(uint8_t code)> on_exit) : on_exit_(std::move(on_exit)) {}

void DebugExit::read(uint64_t, std::span<uint8_t> data) {
  std::fill(data.begin(), data.end(), 0xff);
}

void DebugExit::write(uint64_t, std::span<const uint8_t> data) {
  if (!on_exit_) return;
  for (uint8_t code : data) on_exit_(code);
}

void DebugExit::restore(const State& state) {
  if (state.version != State::kVersion)
    throw std::invalid_argument("debug exit: unknown state version");
}

}  // namespace kiln::devices::legacy
