// The QMP protocol for one client, without any socket: negotiation state, request validation,
// command dispatch to VmControl, and reply/event formatting. QmpServer owns one per connection;
// tests and the fuzzer drive it directly.
#pragma once

#include <chrono>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "control/vm_control.h"

namespace kiln::control {

struct QmpReply {
  nlohmann::json message;
  bool quit_after_send = false;  // the command was "quit": call VmControl::quit() once sent
};

class QmpSession {
 public:
  explicit QmpSession(VmControl& vm) : vm_(vm) {}

  // {"QMP": {"version": ..., "capabilities": []}}; no "oob": kiln does not implement it.
  nlohmann::json greeting() const;
  bool negotiated() const { return negotiated_; }

  // Parses one top-level JSON text (as cut by JsonStreamSplitter) and executes it.
  QmpReply handle_text(std::string_view text);
  // Executes an already parsed request.
  QmpReply handle_request(const nlohmann::json& request);

  // The names of every command, for query-commands.
  static std::vector<std::string> command_names();

 private:
  nlohmann::json execute(const std::string& command, const nlohmann::json& args, bool& quit);
  nlohmann::json human_monitor_command(const nlohmann::json& args);

  VmControl& vm_;
  bool negotiated_ = false;
};

// {"error": {"class": ..., "desc": ...}}
nlohmann::json make_error(std::string_view error_class, std::string_view desc);

// {"timestamp": {"seconds", "microseconds"}, "event": name, "data": data}; "data" is left out when
// null, as QEMU does for events without data (STOP, RESUME, POWERDOWN).
nlohmann::json make_event(std::string_view name, const nlohmann::json& data,
                          std::chrono::system_clock::time_point when);

// Data of the SHUTDOWN and RESET events.
nlohmann::json shutdown_event_data(bool guest, ShutdownCause reason);

// Serializes one message as a QMP line. Invalid UTF-8 is replaced rather than thrown on, since
// strings may originate from the VMM.
std::string serialize_message(const nlohmann::json& message);

}  // namespace kiln::control
