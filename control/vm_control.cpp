#include "control/vm_control.h"

namespace kiln::control {

std::string_view run_state_name(RunState state) {
  switch (state) {
    case RunState::kDebug:
      return "debug";
    case RunState::kInmigrate:
      return "inmigrate";
    case RunState::kInternalError:
      return "internal-error";
    case RunState::kIoError:
      return "io-error";
    case RunState::kPaused:
      return "paused";
    case RunState::kPostmigrate:
      return "postmigrate";
    case RunState::kPrelaunch:
      return "prelaunch";
    case RunState::kFinishMigrate:
      return "finish-migrate";
    case RunState::kRestoreVm:
      return "restore-vm";
    case RunState::kRunning:
      return "running";
    case RunState::kSaveVm:
      return "save-vm";
    case RunState::kShutdown:
      return "shutdown";
    case RunState::kSuspended:
      return "suspended";
    case RunState::kWatchdog:
      return "watchdog";
    case RunState::kGuestPanicked:
      return "guest-panicked";
    case RunState::kColo:
      return "colo";
  }
  return "running";
}

std::string_view shutdown_cause_name(ShutdownCause cause) {
  switch (cause) {
    case ShutdownCause::kNone:
      return "none";
    case ShutdownCause::kHostError:
      return "host-error";
    case ShutdownCause::kHostQmpQuit:
      return "host-qmp-quit";
    case ShutdownCause::kHostQmpSystemReset:
      return "host-qmp-system-reset";
    case ShutdownCause::kHostSignal:
      return "host-signal";
    case ShutdownCause::kHostUi:
      return "host-ui";
    case ShutdownCause::kGuestShutdown:
      return "guest-shutdown";
    case ShutdownCause::kGuestReset:
      return "guest-reset";
    case ShutdownCause::kGuestPanic:
      return "guest-panic";
    case ShutdownCause::kSubsystemReset:
      return "subsystem-reset";
  }
  return "none";
}

}  // namespace kiln::control
