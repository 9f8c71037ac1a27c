// A device for ports Linux touches that need no behaviour: writes are dropped and reads return a
// fixed value. Claiming them keeps the VMM from treating every such access as an unexpected exit
// worth logging, at no cost to the guest, which sees what real hardware shows it.
//
// kQuietPorts lists the ports kiln sinks and why:
//   0x80  POST code port. Linux's default I/O delay (io_delay=0x80, outb_p and friends) writes it;
//         reads return all ones (there is no POST card latch).
//   0xED  The alternative I/O delay port (io_delay=0xed); unused on PCs, so all ones.
// Unclaimed ports already read all ones on the Bus; the sink only makes them intentional.
//
// Stateless: thread-safe, nothing to save.
#pragma once

#include <array>
#include <cstdint>

#include "devices/bus.h"

namespace kiln::devices::legacy {

class Sink : public BusDevice {
 public:
  explicit Sink(uint8_t read_value = 0xff) : read_value_(read_value) {}

  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t offset, std::span<const uint8_t> data) override;

 private:
  const uint8_t read_value_;
};

struct QuietPort {
  uint64_t port;
  uint64_t length;
  uint8_t read_value;
};
inline constexpr std::array<QuietPort, 2> kQuietPorts{{{0x80, 1, 0xff}, {0xed, 1, 0xff}}};

// Inserts a Sink for each of kQuietPorts on `bus`.
void insert_quiet_ports(Bus& bus);

}  // namespace kiln::devices::legacy
