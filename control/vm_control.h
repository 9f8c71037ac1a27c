// The narrow interface between the QMP protocol code and the VM it controls. The VMM implements
// VmControl; QmpServer only ever talks to the VM through it, so the protocol can be tested with a
// fake VM and the VMM never sees JSON.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace kiln::control {

// QEMU's RunState (qapi/run-state.json, 7.2): the strings are part of the wire protocol.
enum class RunState {
  kDebug,
  kInmigrate,
  kInternalError,
  kIoError,
  kPaused,
  kPostmigrate,
  kPrelaunch,
  kFinishMigrate,
  kRestoreVm,
  kRunning,
  kSaveVm,
  kShutdown,
  kSuspended,
  kWatchdog,
  kGuestPanicked,
  kColo,
};
std::string_view run_state_name(RunState state);

// QEMU's ShutdownCause: the "reason" member of the SHUTDOWN and RESET events.
enum class ShutdownCause {
  kNone,
  kHostError,
  kHostQmpQuit,
  kHostQmpSystemReset,
  kHostSignal,
  kHostUi,
  kGuestShutdown,
  kGuestReset,
  kGuestPanic,
  kSubsystemReset,
};
std::string_view shutdown_cause_name(ShutdownCause cause);

// Thrown by a VmControl method to make a command fail with a QMP error (for example cont while the
// guest is shut down). error_class is one of QMP's classes: "GenericError", "DeviceNotFound", ...
class QmpError : public std::runtime_error {
 public:
  QmpError(std::string error_class, const std::string& desc)
      : std::runtime_error(desc), error_class_(std::move(error_class)) {}
  const std::string& error_class() const { return error_class_; }

 private:
  std::string error_class_;
};

struct VersionInfo {
  int64_t major = 0;
  int64_t minor = 0;
  int64_t micro = 0;
  std::string package;
};

struct KvmInfo {
  bool present = false;
  bool enabled = false;
};

// One vCPU as query-cpus-fast reports it (the target is always "x86_64").
struct CpuInfo {
  int64_t cpu_index = 0;
  int64_t host_thread_id = 0;  // the host TID running this vCPU ("thread-id")
  std::string qom_path;
  int64_t socket_id = 0;
  int64_t core_id = 0;
  int64_t thread_id = 0;  // SMT thread within the core (props.thread-id)
};

// The medium in a block device (QEMU's BlockDeviceInfo, reduced to what kiln knows).
struct BlockMedium {
  std::string file;
  std::optional<std::string> node_name;
  bool read_only = false;
  std::string driver;  // "raw", "qcow2"
  std::optional<std::string> backing_file;
  int64_t backing_file_depth = 0;
  bool encrypted = false;
  uint64_t virtual_size = 0;
  std::optional<uint64_t> actual_size;
  std::optional<bool> dirty_flag;
  bool cache_writeback = true;
  bool cache_direct = false;
  bool cache_no_flush = false;
};

struct BlockInfo {
  std::string device;
  std::optional<std::string> qdev;  // absent for a drive with no guest device
  bool removable = false;
  bool locked = false;
  std::optional<BlockMedium> inserted;
  std::optional<bool> tray_open;
  std::optional<std::string> io_status;  // "ok", "failed", "nospace"
};

// I/O accounting of one block device (QEMU's BlockStats/BlockDeviceStats, counters kiln keeps).
struct BlockStats {
  std::string device;
  std::optional<std::string> qdev;
  std::optional<std::string> node_name;
  uint64_t rd_bytes = 0, wr_bytes = 0, unmap_bytes = 0;
  uint64_t rd_operations = 0, wr_operations = 0, flush_operations = 0, unmap_operations = 0;
  uint64_t rd_total_time_ns = 0, wr_total_time_ns = 0, flush_total_time_ns = 0,
           unmap_total_time_ns = 0;
  uint64_t wr_highest_offset = 0;
  uint64_t failed_rd_operations = 0, failed_wr_operations = 0, failed_flush_operations = 0,
           failed_unmap_operations = 0;
  uint64_t invalid_rd_operations = 0, invalid_wr_operations = 0, invalid_flush_operations = 0,
           invalid_unmap_operations = 0;
};

// The guest's memory statistics as its balloon driver last reported them (QOM "guest-stats").
struct BalloonStats {
  int64_t last_update = 0;              // host time of the report, seconds since the epoch; 0: none
  std::map<uint16_t, uint64_t> values;  // by VIRTIO_BALLOON_S_* tag, as the guest reported them
};

struct MemorySizeSummary {
  uint64_t base_memory = 0;
  uint64_t plugged_memory = 0;
};

// Implemented by the VMM. Every method is called from the QMP server thread, so implementations
// must be thread-safe with respect to the vCPU threads. Any method may throw QmpError to fail the
// command. Lifecycle methods should emit the matching event (STOP, RESUME, POWERDOWN, RESET,
// SHUTDOWN) through QmpServer::emit_event when the state actually changes, as QEMU does.
class VmControl {
 public:
  virtual ~VmControl() = default;

  virtual RunState status() const = 0;
  virtual std::string name() const = 0;  // empty: no name (query-name returns {})
  virtual std::string uuid() const = 0;  // "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
  virtual VersionInfo version() const = 0;
  virtual KvmInfo kvm() const = 0;
  virtual std::vector<CpuInfo> cpus() const = 0;
  virtual std::vector<BlockInfo> blocks() const = 0;
  virtual std::vector<BlockStats> block_stats() const { return {}; }
  virtual MemorySizeSummary memory() const = 0;

  virtual void stop() = 0;
  virtual void cont() = 0;
  virtual void system_powerdown() = 0;
  virtual void system_reset() = 0;
  // Called after the reply to "quit" was handed to the socket. Must not wait for the QMP server
  // thread (it is the caller): request the shutdown and return.
  virtual void quit() = 0;

  // Asks the balloon to resize the guest to target_bytes; false when there is no balloon device.
  virtual bool balloon(uint64_t target_bytes) = 0;
  // The guest's current size as the balloon sees it; nullopt when there is no balloon device.
  virtual std::optional<uint64_t> query_balloon() const = 0;
  // The balloon's statistics and their polling interval in seconds (0: not polling); nullopt
  // when there is no balloon device.
  virtual std::optional<BalloonStats> balloon_stats() const { return std::nullopt; }
  virtual std::optional<uint32_t> balloon_stats_interval() const { return std::nullopt; }
  // Asks the guest for fresh statistics every `seconds` (0 stops); false without a balloon.
  virtual bool set_balloon_stats_interval(uint32_t /*seconds*/) { return false; }
};

}  // namespace kiln::control
