#include "vmm/vm_controller.h"

#include "control/qmp_session.h"

namespace kiln::vmm {
namespace {

using control::ShutdownCause;

ShutdownCause cause_of(StopOrigin origin, ShutdownCause guest_cause) {
  switch (origin) {
    case StopOrigin::kGuest:
      return guest_cause;
    case StopOrigin::kHostQmp:
      return guest_cause == ShutdownCause::kGuestReset ? ShutdownCause::kHostQmpSystemReset
                                                       : ShutdownCause::kHostQmpQuit;
    case StopOrigin::kHostSignal:
      return ShutdownCause::kHostSignal;
    case StopOrigin::kHostUi:
      return ShutdownCause::kHostUi;
    case StopOrigin::kHostError:
      return ShutdownCause::kHostError;
  }
  return guest_cause;
}

}  // namespace

void VmController::set_event_sink(EventSink sink) {
  std::lock_guard lock(mutex_);
  sink_ = std::move(sink);
}

void VmController::attach(Machine* machine) {
  std::lock_guard lock(mutex_);
  // As QEMU's device, statistics outlive a reboot until the guest reports new ones.
  if (machine_ && !machine)
    last_balloon_stats_ = machine_->balloon_stats().value_or(last_balloon_stats_);
  machine_ = machine;
  if (machine && balloon_stats_interval_)
    machine->set_balloon_stats_interval(balloon_stats_interval_);
  // BALLOON_CHANGE comes from a vCPU thread: it goes to the sink directly, never through
  // mutex_ (which stop() holds while it waits for the vCPUs).
  if (machine && sink_)
    machine->set_balloon_listener([sink = sink_](uint64_t actual) {
      sink("BALLOON_CHANGE", nlohmann::json{{"actual", actual}});
    });
}

void VmController::with_machine(const std::function<void(Machine&)>& f) {
  std::lock_guard lock(mutex_);
  if (machine_) f(*machine_);
}

void VmController::emit(std::string_view name, nlohmann::json data) {
  EventSink sink;
  {
    std::lock_guard lock(mutex_);
    sink = sink_;
  }
  if (sink) sink(name, std::move(data));
}

void VmController::machine_stopped(const StopEvent& event) {
  const bool guest = event.origin == StopOrigin::kGuest;
  switch (event.reason) {
    case StopReason::kReset:
      emit("RESET",
           control::shutdown_event_data(guest, cause_of(event.origin, ShutdownCause::kGuestReset)));
      if (!config_.no_reboot) return;
      emit("SHUTDOWN", control::shutdown_event_data(guest, ShutdownCause::kGuestReset));
      break;
    case StopReason::kPowerOff:
    case StopReason::kDebugExit:
      emit("SHUTDOWN", control::shutdown_event_data(true, ShutdownCause::kGuestShutdown));
      break;
    case StopReason::kQuit:
      emit("SHUTDOWN", control::shutdown_event_data(
                           false, cause_of(event.origin, ShutdownCause::kHostQmpQuit)));
      break;
    case StopReason::kFatal:
      emit("SHUTDOWN", control::shutdown_event_data(guest, ShutdownCause::kGuestPanic));
      break;
  }
  std::lock_guard lock(mutex_);
  shut_down_ = true;
}

control::RunState VmController::status() const {
  std::lock_guard lock(mutex_);
  if (shut_down_) return control::RunState::kShutdown;
  if (!machine_) return control::RunState::kPrelaunch;
  return machine_->paused() ? control::RunState::kPaused : control::RunState::kRunning;
}

control::VersionInfo VmController::version() const { return {0, 1, 0, "kiln 0.1.0"}; }

std::vector<control::CpuInfo> VmController::cpus() const {
  std::lock_guard lock(mutex_);
  std::vector<control::CpuInfo> cpus;
  if (!machine_) return cpus;
  auto tids = machine_->vcpu_thread_ids();
  for (size_t i = 0; i < tids.size(); ++i) {
    control::CpuInfo cpu;
    cpu.cpu_index = int64_t(i);
    cpu.host_thread_id = tids[i];
    cpu.qom_path = "/machine/unattached/device[" + std::to_string(i) + "]";
    cpu.core_id = int64_t(i);  // one socket, one thread per core (arch/x86/cpuid.h)
    cpus.push_back(cpu);
  }
  return cpus;
}

std::vector<control::BlockInfo> VmController::blocks() const {
  std::lock_guard lock(mutex_);
  return machine_ ? machine_->block_info() : std::vector<control::BlockInfo>{};
}

std::vector<control::BlockStats> VmController::block_stats() const {
  std::lock_guard lock(mutex_);
  return machine_ ? machine_->block_stats() : std::vector<control::BlockStats>{};
}

Machine& VmController::running_machine() const {
  if (!machine_) throw control::QmpError("GenericError", "The VM is not running");
  return *machine_;
}

void VmController::stop() {
  {
    std::lock_guard lock(mutex_);
    Machine& machine = running_machine();
    if (machine.paused()) return;
    machine.pause();
  }
  emit("STOP");
}

void VmController::cont() {
  {
    std::lock_guard lock(mutex_);
    Machine& machine = running_machine();
    if (!machine.paused()) return;
    machine.resume();
  }
  emit("RESUME");
}

void VmController::system_powerdown() {
  {
    std::lock_guard lock(mutex_);
    running_machine().press_power_button();
  }
  emit("POWERDOWN");
}

void VmController::system_reset() {
  std::lock_guard lock(mutex_);
  running_machine().request_stop(
      {StopReason::kReset, 0, "reset by QMP system_reset", StopOrigin::kHostQmp});
}

void VmController::quit() {
  std::lock_guard lock(mutex_);
  if (machine_) machine_->request_stop({StopReason::kQuit, 0, "quit by QMP", StopOrigin::kHostQmp});
}

bool VmController::balloon(uint64_t target_bytes) {
  if (!config_.balloon) return false;
  std::lock_guard lock(mutex_);
  return running_machine().set_balloon_target(target_bytes);
}

std::optional<uint64_t> VmController::query_balloon() const {
  if (!config_.balloon) return std::nullopt;
  std::lock_guard lock(mutex_);
  // Between machines (a reboot) the guest has all its RAM.
  return machine_ ? machine_->balloon_actual() : std::optional<uint64_t>(config_.memory_bytes);
}

std::optional<control::BalloonStats> VmController::balloon_stats() const {
  if (!config_.balloon) return std::nullopt;
  std::lock_guard lock(mutex_);
  if (machine_) {
    auto stats = machine_->balloon_stats();
    if (stats && stats->last_update) return stats;
  }
  return last_balloon_stats_;
}

std::optional<uint32_t> VmController::balloon_stats_interval() const {
  if (!config_.balloon) return std::nullopt;
  std::lock_guard lock(mutex_);
  return balloon_stats_interval_;
}

bool VmController::set_balloon_stats_interval(uint32_t seconds) {
  if (!config_.balloon) return false;
  std::lock_guard lock(mutex_);
  balloon_stats_interval_ = seconds;
  if (machine_) machine_->set_balloon_stats_interval(seconds);
  return true;
}

}  // namespace kiln::vmm
