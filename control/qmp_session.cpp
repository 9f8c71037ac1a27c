#include "control/qmp_session.h"

#include <array>
#include <cinttypes>
#include <cstdio>
#include <limits>
#include <sstream>

#include "control/qom.h"

namespace kiln::control {
namespace {

using nlohmann::json;

constexpr std::string_view kGenericError = "GenericError";
constexpr std::string_view kCommandNotFound = "CommandNotFound";
constexpr std::string_view kDeviceNotActive = "DeviceNotActive";
constexpr std::string_view kNoBalloon = "No balloon device has been activated";

// Thrown inside the session to turn into an {"error": ...} reply.
struct CommandFailure {
  std::string_view error_class;
  std::string desc;
};

[[noreturn]] void fail(std::string desc) { throw CommandFailure{kGenericError, std::move(desc)}; }

enum class ArgType { kInteger, kString, kBoolean, kArray, kAny };

struct ArgSpec {
  std::string_view name;
  ArgType type;
  bool required;
};

std::string_view type_name(ArgType type) {
  switch (type) {
    case ArgType::kInteger:
      return "integer";
    case ArgType::kString:
      return "string";
    case ArgType::kBoolean:
      return "boolean";
    case ArgType::kArray:
      return "array";
    case ArgType::kAny:
      return "any";
  }
  return "?";
}

// QAPI's 'int' is int64: floats (1e3, 1.5) and unsigned values past INT64_MAX are not integers.
bool is_int64(const json& value) {
  if (!value.is_number_integer()) return false;
  return !value.is_number_unsigned() ||
         value.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
}

bool has_type(const json& value, ArgType type) {
  switch (type) {
    case ArgType::kInteger:
      return is_int64(value);
    case ArgType::kString:
      return value.is_string();
    case ArgType::kBoolean:
      return value.is_boolean();
    case ArgType::kArray:
      return value.is_array();
    case ArgType::kAny:
      return true;
  }
  return false;
}

struct CommandSpec {
  std::string_view name;
  std::vector<ArgSpec> args;
};

const std::vector<CommandSpec>& command_table() {
  static const std::vector<CommandSpec> table = {
      {"qmp_capabilities", {{"enable", ArgType::kArray, false}}},
      {"query-version", {}},
      {"query-commands", {}},
      {"query-status", {}},
      {"query-name", {}},
      {"query-uuid", {}},
      {"query-kvm", {}},
      {"query-cpus-fast", {}},
      {"query-block", {}},
      {"query-blockstats", {{"query-nodes", ArgType::kBoolean, false}}},
      {"query-memory-size-summary", {}},
      {"stop", {}},
      {"cont", {}},
      {"system_powerdown", {}},
      {"system_reset", {}},
      {"quit", {}},
      {"balloon", {{"value", ArgType::kInteger, true}}},
      {"query-balloon", {}},
      {"qom-list", {{"path", ArgType::kString, true}}},
      {"qom-get", {{"path", ArgType::kString, true}, {"property", ArgType::kString, true}}},
      {"qom-set",
       {{"path", ArgType::kString, true},
        {"property", ArgType::kString, true},
        {"value", ArgType::kAny, true}}},
      {"human-monitor-command",
       {{"command-line", ArgType::kString, true}, {"cpu-index", ArgType::kInteger, false}}},
  };
  return table;
}

const CommandSpec* find_command(std::string_view name) {
  for (const auto& spec : command_table()) {
    if (spec.name == name) return &spec;
  }
  return nullptr;
}

// Same order as QEMU's input visitor: declared members first (missing, then type), then whatever
// is left over is unexpected.
void validate_arguments(const CommandSpec& spec, const json& args) {
  for (const auto& arg : spec.args) {
    auto it = args.find(arg.name);
    if (it == args.end()) {
      if (arg.required) fail("Parameter '" + std::string(arg.name) + "' is missing");
      continue;
    }
    if (!has_type(*it, arg.type)) {
      fail("Invalid parameter type for '" + std::string(arg.name) +
           "', expected: " + std::string(type_name(arg.type)));
    }
  }
  for (const auto& [key, value] : args.items()) {
    bool declared = false;
    for (const auto& arg : spec.args) declared = declared || arg.name == key;
    if (!declared) fail("Parameter '" + key + "' is unexpected");
  }
}

// Checks the request envelope as QEMU's qmp_dispatch does; returns the error text or "".
std::string envelope_error(const json& request) {
  for (const auto& [key, value] : request.items()) {
    if (key != "execute" && key != "arguments" && key != "id") {
      return "QMP input member '" + key + "' is unexpected";
    }
  }
  auto execute = request.find("execute");
  if (execute != request.end() && !execute->is_string()) {
    return "QMP input member 'execute' must be a string";
  }
  auto arguments = request.find("arguments");
  if (arguments != request.end() && !arguments->is_object()) {
    return "QMP input member 'arguments' must be an object";
  }
  if (execute == request.end()) return "QMP input lacks member 'execute'";
  return "";
}

json version_json(const VersionInfo& v) {
  return {{"qemu", {{"major", v.major}, {"minor", v.minor}, {"micro", v.micro}}},
          {"package", v.package}};
}

json cpu_json(const CpuInfo& cpu) {
  return {{"cpu-index", cpu.cpu_index},
          {"thread-id", cpu.host_thread_id},
          {"qom-path", cpu.qom_path},
          {"target", "x86_64"},
          {"props",
           {{"socket-id", cpu.socket_id}, {"core-id", cpu.core_id}, {"thread-id", cpu.thread_id}}}};
}

json medium_json(const BlockMedium& m) {
  json image = {{"filename", m.file}, {"format", m.driver}, {"virtual-size", m.virtual_size}};
  if (m.actual_size) image["actual-size"] = *m.actual_size;
  if (m.dirty_flag) image["dirty-flag"] = *m.dirty_flag;
  if (m.backing_file) image["backing-filename"] = *m.backing_file;
  json out = {{"file", m.file},
              {"ro", m.read_only},
              {"drv", m.driver},
              {"backing_file_depth", m.backing_file_depth},
              {"encrypted", m.encrypted},
              {"detect_zeroes", "off"},
              {"bps", 0},
              {"bps_rd", 0},
              {"bps_wr", 0},
              {"iops", 0},
              {"iops_rd", 0},
              {"iops_wr", 0},
              {"write_threshold", 0},
              {"image", image},
              {"cache",
               {{"writeback", m.cache_writeback},
                {"direct", m.cache_direct},
                {"no-flush", m.cache_no_flush}}}};
  if (m.node_name) out["node-name"] = *m.node_name;
  if (m.backing_file) out["backing_file"] = *m.backing_file;
  return out;
}

json block_json(const BlockInfo& b) {
  // "type" is deprecated in QEMU but still always present (and always "unknown").
  json out = {
      {"device", b.device}, {"removable", b.removable}, {"locked", b.locked}, {"type", "unknown"}};
  if (b.qdev) out["qdev"] = *b.qdev;
  if (b.inserted) out["inserted"] = medium_json(*b.inserted);
  if (b.tray_open) out["tray_open"] = *b.tray_open;
  if (b.io_status) out["io-status"] = *b.io_status;
  return out;
}

json block_stats_json(const BlockStats& s) {
  json stats = {{"rd_bytes", s.rd_bytes},
                {"wr_bytes", s.wr_bytes},
                {"unmap_bytes", s.unmap_bytes},
                {"rd_operations", s.rd_operations},
                {"wr_operations", s.wr_operations},
                {"flush_operations", s.flush_operations},
                {"unmap_operations", s.unmap_operations},
                {"rd_total_time_ns", s.rd_total_time_ns},
                {"wr_total_time_ns", s.wr_total_time_ns},
                {"flush_total_time_ns", s.flush_total_time_ns},
                {"unmap_total_time_ns", s.unmap_total_time_ns},
                {"wr_highest_offset", s.wr_highest_offset},
                {"rd_merged", 0},
                {"wr_merged", 0},
                {"unmap_merged", 0},
                {"failed_rd_operations", s.failed_rd_operations},
                {"failed_wr_operations", s.failed_wr_operations},
                {"failed_flush_operations", s.failed_flush_operations},
                {"failed_unmap_operations", s.failed_unmap_operations},
                {"invalid_rd_operations", s.invalid_rd_operations},
                {"invalid_wr_operations", s.invalid_wr_operations},
                {"invalid_flush_operations", s.invalid_flush_operations},
                {"invalid_unmap_operations", s.invalid_unmap_operations},
                {"account_invalid", true},
                {"account_failed", true},
                {"timed_stats", json::array()}};
  json out = {{"device", s.device}, {"stats", stats}};
  if (s.qdev) out["qdev"] = *s.qdev;
  if (s.node_name) out["node-name"] = *s.node_name;
  return out;
}

std::vector<std::string> split_words(std::string_view line) {
  std::vector<std::string> words;
  std::istringstream in{std::string(line)};
  for (std::string word; in >> word;) words.push_back(word);
  return words;
}

std::string extraneous(const std::string& name, const std::string& help_topic) {
  return name + ": extraneous characters at the end of line\r\nTry \"help " + help_topic +
         "\" for more information\r\n";
}

struct InfoTopic {
  std::string_view name;
  std::string_view help;
};

constexpr std::array<InfoTopic, 6> kInfoTopics = {{
    {"balloon", "show balloon information"},
    {"cpus", "show infos for each CPU"},
    {"kvm", "show KVM information"},
    {"name", "show the current VM name"},
    {"status", "show the current VM status (running|paused)"},
    {"version", "show the version of QEMU"},
}};

}  // namespace

json make_error(std::string_view error_class, std::string_view desc) {
  return {{"error", {{"class", error_class}, {"desc", desc}}}};
}

json make_event(std::string_view name, const json& data,
                std::chrono::system_clock::time_point when) {
  auto micros =
      std::chrono::duration_cast<std::chrono::microseconds>(when.time_since_epoch()).count();
  json event = {{"timestamp", {{"seconds", micros / 1000000}, {"microseconds", micros % 1000000}}},
                {"event", name}};
  if (!data.is_null()) event["data"] = data;
  return event;
}

json shutdown_event_data(bool guest, ShutdownCause reason) {
  return {{"guest", guest}, {"reason", shutdown_cause_name(reason)}};
}

std::string serialize_message(const json& message) {
  return message.dump(-1, ' ', false, json::error_handler_t::replace) + "\r\n";
}

std::vector<std::string> QmpSession::command_names() {
  std::vector<std::string> names;
  for (const auto& spec : command_table()) names.emplace_back(spec.name);
  return names;
}

json QmpSession::greeting() const {
  return {{"QMP", {{"version", version_json(vm_.version())}, {"capabilities", json::array()}}}};
}

QmpReply QmpSession::handle_text(std::string_view text) {
  json request;
  try {
    request = json::parse(text);
  } catch (const json::exception& e) {
    // Not only parse_error: a number too large for a double ("1e999999") is out_of_range.
    // nlohmann's what() is "[json.exception.parse_error.101] parse error at ...: <reason>";
    // keep the human part after the bracketed id.
    std::string what = e.what();
    auto bracket = what.find("] ");
    return {make_error(
        kGenericError,
        "JSON parse error, " + (bracket == std::string::npos ? what : what.substr(bracket + 2)))};
  }
  return handle_request(request);
}

QmpReply QmpSession::handle_request(const json& request) {
  if (!request.is_object()) return {make_error(kGenericError, "QMP input must be a JSON object")};
  QmpReply reply;
  try {
    std::string bad = envelope_error(request);
    if (!bad.empty()) throw CommandFailure{kGenericError, bad};
    const std::string& command = request["execute"].get_ref<const std::string&>();
    static const json kNoArguments = json::object();
    auto args = request.find("arguments");
    reply.message = {{"return", execute(command, args == request.end() ? kNoArguments : *args,
                                        reply.quit_after_send)}};
  } catch (const CommandFailure& failure) {
    reply.message = make_error(failure.error_class, failure.desc);
  } catch (const QmpError& error) {
    reply.message = make_error(error.error_class(), error.what());
  } catch (const std::exception& error) {
    reply.message = make_error(kGenericError, error.what());
  }
  if (auto id = request.find("id"); id != request.end()) reply.message["id"] = *id;
  return reply;
}

json QmpSession::execute(const std::string& command, const json& args, bool& quit) {
  if (!negotiated_ && command != "qmp_capabilities") {
    throw CommandFailure{kCommandNotFound,
                         "Expecting capabilities negotiation with 'qmp_capabilities'"};
  }
  const CommandSpec* spec = find_command(command);
  if (spec == nullptr) {
    throw CommandFailure{kCommandNotFound, "The command " + command + " has not been found"};
  }
  if (command == "qmp_capabilities" && negotiated_) {
    throw CommandFailure{kCommandNotFound,
                         "Capabilities negotiation is already complete, command ignored"};
  }
  validate_arguments(*spec, args);

  if (command == "qmp_capabilities") {
    for (const auto& capability : args.value("enable", json::array())) {
      if (!capability.is_string()) fail("Invalid parameter type for 'enable', expected: string");
      fail("Capability '" + capability.get<std::string>() + "' not available");
    }
    negotiated_ = true;
    return json::object();
  }
  if (command == "query-version") return version_json(vm_.version());
  if (command == "query-commands") {
    json list = json::array();
    for (const auto& name : command_names()) list.push_back({{"name", name}});
    return list;
  }
  if (command == "query-status") {
    RunState state = vm_.status();
    return {{"status", run_state_name(state)},
            {"running", state == RunState::kRunning},
            {"singlestep", false}};
  }
  if (command == "query-name") {
    std::string name = vm_.name();
    return name.empty() ? json::object() : json{{"name", name}};
  }
  if (command == "query-uuid") return {{"UUID", vm_.uuid()}};
  if (command == "query-kvm") {
    KvmInfo kvm = vm_.kvm();
    return {{"enabled", kvm.enabled}, {"present", kvm.present}};
  }
  if (command == "query-cpus-fast") {
    json list = json::array();
    for (const auto& cpu : vm_.cpus()) list.push_back(cpu_json(cpu));
    return list;
  }
  if (command == "query-block") {
    json list = json::array();
    for (const auto& block : vm_.blocks()) list.push_back(block_json(block));
    return list;
  }
  if (command == "query-blockstats") {
    json list = json::array();
    for (const auto& stats : vm_.block_stats()) list.push_back(block_stats_json(stats));
    return list;
  }
  if (command == "query-memory-size-summary") {
    MemorySizeSummary memory = vm_.memory();
    return {{"base-memory", memory.base_memory}, {"plugged-memory", memory.plugged_memory}};
  }
  if (command == "stop") {
    vm_.stop();
  } else if (command == "cont") {
    vm_.cont();
  } else if (command == "system_powerdown") {
    vm_.system_powerdown();
  } else if (command == "system_reset") {
    vm_.system_reset();
  } else if (command == "quit") {
    quit = true;  // the server calls vm_.quit() once this reply is on its way
  } else if (command == "balloon") {
    int64_t target = args["value"].get<int64_t>();
    if (target <= 0) fail("Parameter 'target' expects a size");
    if (!vm_.balloon(static_cast<uint64_t>(target))) {
      throw CommandFailure{kDeviceNotActive, std::string(kNoBalloon)};
    }
  } else if (command == "query-balloon") {
    auto actual = vm_.query_balloon();
    if (!actual) throw CommandFailure{kDeviceNotActive, std::string(kNoBalloon)};
    return {{"actual", *actual}};
  } else if (command == "qom-list") {
    return qom_list(vm_, args["path"]);
  } else if (command == "qom-get") {
    return qom_get(vm_, args["path"], args["property"]);
  } else if (command == "qom-set") {
    qom_set(vm_, args["path"], args["property"], args["value"]);
  } else if (command == "human-monitor-command") {
    return human_monitor_command(args);
  }
  return json::object();
}

// A small subset of the human monitor, with QEMU's exact texts (lines end in \r\n).
json QmpSession::human_monitor_command(const json& args) {
  std::vector<CpuInfo> cpus;
  std::optional<int64_t> monitor_cpu;
  if (auto index = args.find("cpu-index"); index != args.end()) {
    cpus = vm_.cpus();
    for (const auto& cpu : cpus) {
      if (cpu.cpu_index == index->get<int64_t>()) monitor_cpu = cpu.cpu_index;
    }
    if (!monitor_cpu) fail("Parameter 'cpu-index' expects a CPU number");
  }
  std::vector<std::string> words = split_words(args["command-line"].get<std::string>());
  if (words.empty()) return "";
  const std::string& verb = words[0];
  try {
    if (verb == "stop" || verb == "cont" || verb == "system_reset" || verb == "system_powerdown") {
      if (words.size() > 1) return extraneous(verb, verb);
      if (verb == "stop") vm_.stop();
      if (verb == "cont") vm_.cont();
      if (verb == "system_reset") vm_.system_reset();
      if (verb == "system_powerdown") vm_.system_powerdown();
      return "";
    }
    if (verb != "info") return "unknown command: '" + verb + "'\r\n";
    if (words.size() == 1) {
      std::string help;
      for (const auto& topic : kInfoTopics) {
        help += "info " + std::string(topic.name) + "  -- " + std::string(topic.help) + "\r\n";
      }
      return help;
    }
    const std::string& topic = words[1];
    bool known = false;
    for (const auto& t : kInfoTopics) known = known || t.name == topic;
    if (!known) return "unknown command: 'info " + topic + "'\r\n";
    if (words.size() > 2) return extraneous(topic, "info " + topic);

    if (topic == "status") {
      RunState state = vm_.status();
      std::string text = "VM status: ";
      text += state == RunState::kRunning ? "running" : "paused";
      if (state != RunState::kRunning && state != RunState::kPaused) {
        text += " (" + std::string(run_state_name(state)) + ")";
      }
      return text + "\r\n";
    }
    if (topic == "version") {
      VersionInfo v = vm_.version();
      return std::to_string(v.major) + "." + std::to_string(v.minor) + "." +
             std::to_string(v.micro) + v.package + "\r\n";
    }
    if (topic == "name") {
      std::string name = vm_.name();
      return name.empty() ? "" : name + "\r\n";
    }
    if (topic == "kvm") {
      KvmInfo kvm = vm_.kvm();
      if (!kvm.present) return "kvm support: not compiled\r\n";
      return std::string("kvm support: ") + (kvm.enabled ? "enabled" : "disabled") + "\r\n";
    }
    if (topic == "cpus") {
      if (!monitor_cpu) cpus = vm_.cpus();
      std::string text;
      for (size_t i = 0; i < cpus.size(); ++i) {
        bool current = monitor_cpu ? cpus[i].cpu_index == *monitor_cpu : i == 0;
        text += std::string(current ? "*" : " ") + " CPU #" + std::to_string(cpus[i].cpu_index) +
                ": thread_id=" + std::to_string(cpus[i].host_thread_id) + "\r\n";
      }
      return text;
    }
    // topic == "balloon"
    auto actual = vm_.query_balloon();
    if (!actual) return "Error: " + std::string(kNoBalloon) + "\r\n";
    return "balloon: actual=" + std::to_string(*actual >> 20) + "\r\n";
  } catch (const QmpError& error) {
    return "Error: " + std::string(error.what()) + "\r\n";
  }
}

}  // namespace kiln::control
