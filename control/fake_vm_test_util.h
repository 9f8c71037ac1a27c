// Test doubles shared by the control tests: a scriptable VmControl and a line-oriented QMP client.
#pragma once

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "base/unique_fd.h"
#include "control/qmp_session.h"
#include "control/vm_control.h"

namespace kiln::control::testing {

// A VM that only keeps a run state, behaving like QEMU's: events only on real state changes.
class FakeVm : public VmControl {
 public:
  using EventSink = std::function<void(std::string_view, nlohmann::json)>;

  // Everything the tests may configure; read by the server thread, so set before start().
  RunState initial_state = RunState::kRunning;
  std::string vm_name = "testvm";
  std::string vm_uuid = "12345678-1234-1234-1234-123456789abc";
  VersionInfo version_info{7, 2, 22, ""};
  KvmInfo kvm_info{true, false};
  std::vector<CpuInfo> cpu_list;
  std::vector<BlockInfo> block_list;
  std::vector<BlockStats> block_stats_list;
  MemorySizeSummary memory_summary{64 << 20, 0};
  bool has_balloon = false;
  EventSink emit = [](std::string_view, nlohmann::json) {};
  // When set, stop() throws it (to test error classes coming from the VMM).
  std::optional<QmpError> stop_error;

  FakeVm() : state_(RunState::kRunning) {}
  void set_state(RunState s) {
    std::lock_guard lock(mutex_);
    state_ = s;
  }
  int quit_calls() const {
    std::lock_guard lock(mutex_);
    return quit_calls_;
  }
  std::optional<uint64_t> balloon_target() const {
    std::lock_guard lock(mutex_);
    return balloon_target_;
  }

  RunState status() const override {
    std::lock_guard lock(mutex_);
    return state_;
  }
  std::string name() const override { return vm_name; }
  std::string uuid() const override { return vm_uuid; }
  VersionInfo version() const override { return version_info; }
  KvmInfo kvm() const override { return kvm_info; }
  std::vector<CpuInfo> cpus() const override { return cpu_list; }
  std::vector<BlockInfo> blocks() const override { return block_list; }
  std::vector<BlockStats> block_stats() const override { return block_stats_list; }
  MemorySizeSummary memory() const override { return memory_summary; }

  void stop() override {
    if (stop_error) throw *stop_error;
    if (change_state_from_running(RunState::kPaused)) emit("STOP", nullptr);
  }
  void cont() override {
    {
      std::lock_guard lock(mutex_);
      if (state_ == RunState::kShutdown) {
        throw QmpError("GenericError", "Resetting the Virtual Machine is required");
      }
      if (state_ == RunState::kRunning) return;
      state_ = RunState::kRunning;
    }
    emit("RESUME", nullptr);
  }
  void system_powerdown() override { emit("POWERDOWN", nullptr); }
  void system_reset() override {
    emit("RESET", shutdown_event_data(false, ShutdownCause::kHostQmpSystemReset));
  }
  void quit() override {
    {
      std::lock_guard lock(mutex_);
      ++quit_calls_;
    }
    emit("SHUTDOWN", shutdown_event_data(false, ShutdownCause::kHostQmpQuit));
  }
  bool balloon(uint64_t target) override {
    if (!has_balloon) return false;
    std::lock_guard lock(mutex_);
    balloon_target_ = target;
    return true;
  }
  std::optional<uint64_t> query_balloon() const override {
    if (!has_balloon) return std::nullopt;
    return memory_summary.base_memory;
  }
  std::optional<BalloonStats> balloon_stats() const override {
    if (!has_balloon) return std::nullopt;
    std::lock_guard lock(mutex_);
    return balloon_stats_;
  }
  std::optional<uint32_t> balloon_stats_interval() const override {
    if (!has_balloon) return std::nullopt;
    std::lock_guard lock(mutex_);
    return stats_interval_;
  }
  bool set_balloon_stats_interval(uint32_t seconds) override {
    if (!has_balloon) return false;
    std::lock_guard lock(mutex_);
    stats_interval_ = seconds;
    return true;
  }
  void set_balloon_stats(BalloonStats stats) {
    std::lock_guard lock(mutex_);
    balloon_stats_ = std::move(stats);
  }

 private:
  bool change_state_from_running(RunState to) {
    std::lock_guard lock(mutex_);
    if (state_ != RunState::kRunning) return false;
    state_ = to;
    return true;
  }

  mutable std::mutex mutex_;
  RunState state_;
  int quit_calls_ = 0;
  std::optional<uint64_t> balloon_target_;
  BalloonStats balloon_stats_;
  uint32_t stats_interval_ = 0;
};

// A blocking-with-timeout QMP client over any connected stream socket.
class QmpTestClient {
 public:
  explicit QmpTestClient(UniqueFd fd) : fd_(std::move(fd)) {}

  static UniqueFd connect_unix(const std::string& path) {
    UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    if (connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return {};
    return fd;
  }

  int fd() const { return fd_.get(); }
  void close() { fd_.reset(); }

  bool send_raw(std::string_view bytes) {
    while (!bytes.empty()) {
      ssize_t n = ::send(fd_.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (n <= 0) return false;
      bytes.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }
  bool send(const nlohmann::json& message) { return send_raw(message.dump() + "\n"); }

  // The next line as JSON; nullopt on EOF or timeout.
  std::optional<nlohmann::json> read_message(int timeout_ms = 5000) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (true) {
      if (auto nl = buffer_.find('\n'); nl != std::string::npos) {
        std::string line = buffer_.substr(0, nl);
        buffer_.erase(0, nl + 1);
        return nlohmann::json::parse(line);
      }
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                      deadline - std::chrono::steady_clock::now())
                      .count();
      if (left <= 0) return std::nullopt;
      pollfd pfd{fd_.get(), POLLIN, 0};
      if (poll(&pfd, 1, static_cast<int>(left)) <= 0) continue;
      char chunk[65536];
      ssize_t n = ::recv(fd_.get(), chunk, sizeof(chunk), 0);
      if (n <= 0) {
        eof_ = true;
        return std::nullopt;
      }
      buffer_.append(chunk, static_cast<size_t>(n));
    }
  }

  // The next non-event message; events seen on the way are appended to events().
  std::optional<nlohmann::json> read_reply(int timeout_ms = 5000) {
    while (auto message = read_message(timeout_ms)) {
      if (!message->contains("event")) return message;
      events_.push_back(*message);
    }
    return std::nullopt;
  }

  nlohmann::json execute(const std::string& command, nlohmann::json args = nullptr) {
    nlohmann::json request = {{"execute", command}};
    if (!args.is_null()) request["arguments"] = std::move(args);
    send(request);
    return read_reply().value_or(nullptr);
  }

  std::vector<nlohmann::json>& events() { return events_; }
  bool saw_eof() const { return eof_; }

 private:
  UniqueFd fd_;
  std::string buffer_;
  std::vector<nlohmann::json> events_;
  bool eof_ = false;
};

}  // namespace kiln::control::testing
