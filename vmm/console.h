// The host end of the serial console: stdio (raw terminal with a Ctrl-A x escape), a pty, a file,
// a unix socket, or nothing. Outlives Machines, so a reboot keeps the same console.
#pragma once

#include <functional>
#include <memory>
#include <span>
#include <string>

#include "vmm/config.h"

namespace kiln::vmm {

class HostConsole {
 public:
  virtual ~HostConsole() = default;
  // Writes guest output; never blocks the vCPU for long (drops output no one reads).
  virtual void write(std::span<const uint8_t> bytes) = 0;
  // Starts delivering host input to `input`; `quit` is called on the escape sequence.
  virtual void start(std::function<void(std::span<const uint8_t>)> input,
                     std::function<void()> quit) = 0;
};

// Throws ConfigError if the console cannot be opened (bad file path, socket in use). `flag`
// names the option in messages: "--serial" (the 16550) or "--console" (virtio-console, hvc0).
std::unique_ptr<HostConsole> open_console(const SerialConfig& config,
                                          const std::string& flag = "--serial");

}  // namespace kiln::vmm
