// The VMM's side of the control interface: what QMP (and later the manager's API) can ask of a
// running VM. It outlives each Machine (a reboot builds a new one) and turns the VMM's stop events
// into QMP events.
#pragma once

#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string_view>

#include "control/vm_control.h"
#include "vmm/config.h"
#include "vmm/machine.h"

namespace kiln::vmm {

class VmController : public control::VmControl {
 public:
  using EventSink = std::function<void(std::string_view name, nlohmann::json data)>;

  explicit VmController(const VmConfig& config) : config_(config) {}

  void set_event_sink(EventSink sink);
  // The machine now running (nullptr between machines).
  void attach(Machine* machine);
  // Reports how a machine ended (SHUTDOWN / RESET events).
  void machine_stopped(const StopEvent& event);
  // For the signal and console threads: runs f on the current machine, if any.
  void with_machine(const std::function<void(Machine&)>& f);

  // control::VmControl
  control::RunState status() const override;
  std::string name() const override { return config_.name; }
  std::string uuid() const override { return "00000000-0000-0000-0000-000000000000"; }
  control::VersionInfo version() const override;
  control::KvmInfo kvm() const override { return {true, true}; }
  std::vector<control::CpuInfo> cpus() const override;
  std::vector<control::BlockInfo> blocks() const override;
  std::vector<control::BlockStats> block_stats() const override;
  control::MemorySizeSummary memory() const override { return {config_.memory_bytes, 0}; }
  void stop() override;
  void cont() override;
  void system_powerdown() override;
  void system_reset() override;
  void quit() override;
  bool balloon(uint64_t target_bytes) override;
  std::optional<uint64_t> query_balloon() const override;
  std::optional<control::BalloonStats> balloon_stats() const override;
  std::optional<uint32_t> balloon_stats_interval() const override;
  bool set_balloon_stats_interval(uint32_t seconds) override;

 private:
  void emit(std::string_view name, nlohmann::json data = nullptr);
  Machine& running_machine() const;  // throws QmpError when there is none

  const VmConfig& config_;
  mutable std::mutex mutex_;
  Machine* machine_ = nullptr;
  uint32_t balloon_stats_interval_ = 0;       // kept across reboots, applied to each new machine
  control::BalloonStats last_balloon_stats_;  // the previous machine's, until the new one reports
  bool shut_down_ = false;
  EventSink sink_;
};

}  // namespace kiln::vmm
