// A VM assembled from a VmConfig: KVM VM and vCPUs, guest memory, buses and devices, the loaded
// kernel. run() drives it until the guest powers off, resets or fails; the caller decides whether a
// reset means booting a fresh Machine (reboot) or exiting (--no-reboot).
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "control/vm_control.h"
#include "vmm/config.h"

namespace kiln::vmm {

enum class StopReason {
  kPowerOff,   // ACPI S5 from the guest
  kReset,      // guest reboot (ACPI reset register, i8042 pulse, triple fault on request)
  kDebugExit,  // the guest wrote the debug-exit port
  kQuit,       // the host asked (signal grace period over, QMP quit)
  kFatal,      // triple fault or KVM internal error: message has the registers
};

// Who asked for the stop: QMP's SHUTDOWN/RESET events report it.
enum class StopOrigin { kGuest, kHostQmp, kHostSignal, kHostUi, kHostError };

struct StopEvent {
  StopReason reason = StopReason::kPowerOff;
  int code = 0;  // kDebugExit: the byte the guest wrote
  std::string message;
  StopOrigin origin = StopOrigin::kGuest;
};

// Where the serial console (and the virtio console, hvc0, when configured) go; owned by the
// caller so they survive a reboot.
struct ConsoleIo {
  std::function<void(std::span<const uint8_t>)> write;
  std::function<void(std::span<const uint8_t>)> virtio_write;
};

class Machine {
 public:
  // Builds the whole VM; throws ConfigError for user mistakes the host reveals (missing kernel,
  // too many vCPUs) and std::runtime_error subclasses for host failures.
  Machine(const VmConfig& config, ConsoleIo console);
  ~Machine();

  // Runs the vCPUs until the first stop event; returns it. Call once.
  StopEvent run();

  // Thread-safe controls (signal handler threads, QMP).
  void press_power_button();
  void request_stop(StopEvent event);
  // pause() returns once every vCPU is out of KVM_RUN; the guest's clock stands still until
  // resume(), as under QEMU's stop/cont.
  void pause();
  void resume();
  bool paused() const;
  // Host thread IDs of the vCPU threads (index order); 0 for one not started yet.
  std::vector<int> vcpu_thread_ids() const;
  // The disks the guest sees, for QMP's query-block.
  std::vector<control::BlockInfo> block_info() const;
  // Their I/O counters, for QMP's query-blockstats.
  std::vector<control::BlockStats> block_stats() const;
  // Host console input for the serial port (stdin reader thread).
  bool send_console_input(std::span<const uint8_t> bytes);
  // Host input for the virtio console (hvc0); false when there is none.
  bool send_virtio_console_input(std::span<const uint8_t> bytes);

  // virtio-balloon: asks the guest to shrink to `bytes`; false without a balloon device.
  bool set_balloon_target(uint64_t bytes);
  // The guest's size as the balloon reports it; nullopt without a balloon device.
  std::optional<uint64_t> balloon_actual() const;
  // The guest's last memory statistics; nullopt without a balloon device.
  std::optional<control::BalloonStats> balloon_stats() const;
  // Asks the guest for statistics every `seconds` (0 stops); false without a balloon device.
  bool set_balloon_stats_interval(uint32_t seconds);
  // Called with the guest's new size whenever its balloon driver reports one (vCPU thread).
  void set_balloon_listener(std::function<void(uint64_t)> listener);

  const VmConfig& config() const { return config_; }

 private:
  struct Impl;
  VmConfig config_;  // before impl_, which refers to it
  std::unique_ptr<Impl> impl_;
};

}  // namespace kiln::vmm
