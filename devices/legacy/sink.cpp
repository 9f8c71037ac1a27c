#include "devices/legacy/sink.h"

#include <algorithm>
#include <memory>

namespace kiln::devices::legacy {

void Sink::read(uint64_t, std::span<uint8_t> data) {
  std::fill(data.begin(), data.end(), read_value_);
}

void Sink::write(uint64_t, std::span<const uint8_t>) {}

void insert_quiet_ports(Bus& bus) {
  for (const QuietPort& quiet : kQuietPorts)
    bus.insert(std::make_shared<Sink>(quiet.read_value), quiet.port, quiet.length);
}

}  // namespace kiln::devices::legacy
