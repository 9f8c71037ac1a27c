// kiln: the VMM executable. Parses the config, builds a Machine, runs it, and maps how it ended to
// an exit status: 0 guest powered off (or quit), 2 a user error, 3 the guest crashed the vCPU
// (triple fault, KVM internal error), 1 a host failure; a debug-exit byte is returned as is.
#include <fmt/format.h>
#include <signal.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/prctl.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <thread>

#include "control/qmp_server.h"
#include "hv/kvm.h"
#include "vmm/config.h"
#include "vmm/console.h"
#include "vmm/machine.h"
#include "vmm/vm_controller.h"

namespace kiln::vmm {
namespace {

constexpr int kExitHostError = 1;
constexpr int kExitUsage = 2;
constexpr int kExitGuestCrash = 3;
constexpr auto kShutdownGrace = std::chrono::seconds(30);

// The VM's controller, for the signal thread (set once run_vm has built it).
std::atomic<VmController*> g_controller{nullptr};

void with_machine(const std::function<void(Machine&)>& f) {
  if (VmController* controller = g_controller.load()) controller->with_machine(f);
}

// SIGTERM/SIGINT/SIGHUP press the ACPI power button; if the guest is not down after the grace
// period, kiln stops it. A second signal stops it at once.
void handle_signals(sigset_t set) {
  int presses = 0;
  for (;;) {
    int sig = 0;
    if (sigwait(&set, &sig) != 0) continue;
    if (++presses == 1) {
      spdlog::info("{}: asking the guest to power off", strsignal(sig));
      with_machine([](Machine& m) { m.press_power_button(); });
      std::thread([] {
        std::this_thread::sleep_for(kShutdownGrace);
        with_machine([](Machine& m) {
          m.request_stop({StopReason::kQuit, kExitHostError,
                          "the guest did not power off in time; stopped it",
                          StopOrigin::kHostSignal});
        });
      }).detach();
    } else {
      with_machine([](Machine& m) {
        m.request_stop({StopReason::kQuit, 0, "stopped by signal", StopOrigin::kHostSignal});
      });
    }
  }
}

sigset_t block_termination_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);  // inherited by every thread started after this
  return set;
}

void set_process_title(const std::string& name) {
  std::string title = "kiln:" + name;
  prctl(PR_SET_NAME, title.substr(0, 15).c_str());
}

std::unique_ptr<control::QmpServer> start_qmp(const VmConfig& config, VmController& controller) {
  UniqueFd socket;
  try {
    if (!config.qmp.empty())
      socket = control::QmpServer::open_endpoint(config.qmp);
    else if (config.qmp_fd >= 0)
      socket = UniqueFd(config.qmp_fd);
    else
      return nullptr;
  } catch (const std::exception& e) {
    throw ConfigError(fmt::format("--qmp: {}", e.what()));
  }
  auto server = std::make_unique<control::QmpServer>(controller, std::move(socket));
  controller.set_event_sink([s = server.get()](std::string_view name, nlohmann::json data) {
    s->emit_event(name, std::move(data));
  });
  server->start();
  return server;
}

// Builds and runs machines (a guest reset builds a fresh one) until one ends for good.
int run_machines(const VmConfig& config, VmController& controller) {
  auto console = open_console(config.serial);
  console->start(
      [&controller](std::span<const uint8_t> bytes) {
        controller.with_machine([&](Machine& m) { m.send_console_input(bytes); });
      },
      [&controller] {
        controller.with_machine([](Machine& m) {
          m.request_stop({StopReason::kQuit, 0, "quit from console", StopOrigin::kHostUi});
        });
      });
  ConsoleIo io{[&console](std::span<const uint8_t> bytes) { console->write(bytes); }, {}};
  // The virtio console (hvc0) has a host end of its own, with the same backends as --serial.
  std::unique_ptr<HostConsole> virtio_console;
  if (config.console.mode != SerialConfig::Mode::kOff) {
    virtio_console = open_console(config.console, "--console");
    virtio_console->start(
        [&controller](std::span<const uint8_t> bytes) {
          controller.with_machine([&](Machine& m) { m.send_virtio_console_input(bytes); });
        },
        [&controller] {
          controller.with_machine([](Machine& m) {
            m.request_stop({StopReason::kQuit, 0, "quit from console", StopOrigin::kHostUi});
          });
        });
    io.virtio_write = [&virtio_console](std::span<const uint8_t> bytes) {
      virtio_console->write(bytes);
    };
  }
  for (;;) {
    Machine machine(config, io);
    controller.attach(&machine);
    StopEvent event = machine.run();
    controller.attach(nullptr);
    controller.machine_stopped(event);
    switch (event.reason) {
      case StopReason::kPowerOff:
        return 0;
      case StopReason::kReset:
        if (config.no_reboot) return 0;
        spdlog::info("guest reset: rebooting");
        continue;
      case StopReason::kDebugExit:
        return event.code;
      case StopReason::kQuit:
        if (event.code) spdlog::error("{}", event.message);
        return event.code;
      case StopReason::kFatal:
        spdlog::error("the guest stopped: {}", event.message);
        return kExitGuestCrash;
    }
  }
}

int run_vm(const VmConfig& config) {
  VmController controller(config);
  auto qmp = start_qmp(config, controller);
  g_controller = &controller;
  int status = run_machines(config, controller);
  g_controller = nullptr;
  if (qmp) qmp->stop();  // delivers the SHUTDOWN event still queued
  return status;
}

}  // namespace
}  // namespace kiln::vmm

int main(int argc, char** argv) {
  using namespace kiln::vmm;
  // Diagnostics go to stderr: stdout is the guest's console.
  spdlog::set_default_logger(spdlog::stderr_color_mt("kiln"));
  spdlog::set_pattern("kiln: %^%l%$: %v");
  // KILN_LOG=debug|trace shows unclaimed (or all) device accesses; spdlog's own env loader
  // would also do, but one variable with kiln's name is what users look for.
  if (const char* level = std::getenv("KILN_LOG"))
    spdlog::set_level(spdlog::level::from_str(level));
  sigset_t signals = block_termination_signals();
  std::optional<VmConfig> config;
  try {
    config = parse_command_line(argc, argv);
    if (!config) return 0;
  } catch (const ConfigError& e) {
    fmt::print(stderr, "kiln: error: {}\n", e.what());
    return kExitUsage;
  }
  set_process_title(config->name);
  std::thread(handle_signals, signals).detach();
  try {
    return run_vm(*config);
  } catch (const ConfigError& e) {
    fmt::print(stderr, "kiln: error: {}\n", e.what());
    return kExitUsage;
  } catch (const kiln::hv::HvError& e) {
    fmt::print(stderr, "kiln: error: {}\n", e.what());
    return kExitUsage;
  } catch (const std::exception& e) {
    fmt::print(stderr, "kiln: error: {}\n", e.what());
    return kExitHostError;
  }
}
