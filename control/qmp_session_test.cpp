#include "control/qmp_session.h"

#include <gtest/gtest.h>

#include <set>

#include "control/fake_vm_test_util.h"

namespace kiln::control {
namespace {

using nlohmann::json;
using testing::FakeVm;

std::set<std::string> keys(const json& object) {
  std::set<std::string> out;
  for (const auto& [key, value] : object.items()) out.insert(key);
  return out;
}

class QmpSessionTest : public ::testing::Test {
 protected:
  QmpSessionTest() {
    vm_.cpu_list = {{0, 1001, "/machine/unattached/device[0]", 0, 0, 0},
                    {1, 1002, "/machine/unattached/device[2]", 0, 1, 0}};
    vm_.emit = [this](std::string_view name, json data) {
      events_.push_back(make_event(name, data, std::chrono::system_clock::now()));
    };
  }

  json run(const json& request) { return session_.handle_request(request).message; }
  json run(std::string_view text) { return session_.handle_text(text).message; }
  json exec(const std::string& command, json args = nullptr) {
    json request = {{"execute", command}};
    if (!args.is_null()) request["arguments"] = args;
    return run(request);
  }
  json ret(const std::string& command, json args = nullptr) {
    json reply = exec(command, args);
    EXPECT_TRUE(reply.contains("return")) << reply;
    return reply.value("return", json());
  }
  void negotiate() { ASSERT_EQ(exec("qmp_capabilities"), json({{"return", json::object()}})); }
  static void expect_error(const json& reply, std::string_view error_class, std::string_view desc) {
    EXPECT_EQ(reply["error"]["class"], error_class) << reply;
    EXPECT_EQ(reply["error"]["desc"], desc) << reply;
    EXPECT_EQ(keys(reply["error"]), (std::set<std::string>{"class", "desc"}));
  }
  std::string hmp(const std::string& line) {
    json reply = exec("human-monitor-command", {{"command-line", line}});
    return reply.value("return", json("<error>")).get<std::string>();
  }

  FakeVm vm_;
  QmpSession session_{vm_};
  std::vector<json> events_;
};

TEST_F(QmpSessionTest, GreetingAdvertisesVersionAndNoCapabilities) {
  vm_.version_info = {1, 2, 3, "kiln"};
  json greeting = session_.greeting();
  EXPECT_EQ(greeting, json::parse(R"({"QMP": {"version": {"qemu": {"micro": 3, "minor": 2,
      "major": 1}, "package": "kiln"}, "capabilities": []}})"));
}

TEST_F(QmpSessionTest, CommandsBeforeNegotiationAreRejectedAsQemuDoes) {
  for (const char* command : {"query-status", "quit", "no-such-command"}) {
    expect_error(exec(command), "CommandNotFound",
                 "Expecting capabilities negotiation with 'qmp_capabilities'");
  }
  EXPECT_FALSE(session_.negotiated());
  EXPECT_EQ(vm_.quit_calls(), 0);
  negotiate();
  EXPECT_TRUE(session_.negotiated());
  expect_error(exec("qmp_capabilities"), "CommandNotFound",
               "Capabilities negotiation is already complete, command ignored");
}

TEST_F(QmpSessionTest, CapabilitiesEnableList) {
  expect_error(exec("qmp_capabilities", {{"enable", "oob"}}), "GenericError",
               "Invalid parameter type for 'enable', expected: array");
  expect_error(exec("qmp_capabilities", {{"enable", {"oob"}}}), "GenericError",
               "Capability 'oob' not available");
  EXPECT_FALSE(session_.negotiated());
  EXPECT_EQ(exec("qmp_capabilities", {{"enable", json::array()}}),
            json({{"return", json::object()}}));
}

TEST_F(QmpSessionTest, IdIsEchoedWhateverItsType) {
  for (json id : {json(1), json("abc"), json::parse(R"({"a":[null]})"), json::array({1, 2}),
                  json(nullptr), json(1.5)}) {
    json reply = run(json{{"execute", "qmp_capabilities"}, {"id", id}});
    EXPECT_EQ(reply["id"], id);
  }
  // Negotiated by the first request above; error replies echo the id too.
  json reply = run(json{{"execute", "nope"}, {"id", "x"}});
  EXPECT_EQ(reply["id"], "x");
  EXPECT_TRUE(reply.contains("error"));
}

TEST_F(QmpSessionTest, QueryVersionAndCommands) {
  negotiate();
  vm_.version_info = {7, 2, 0, "pkg"};
  EXPECT_EQ(ret("query-version"), json::parse(R"({"qemu": {"micro": 0, "minor": 2, "major": 7},
      "package": "pkg"})"));
  std::set<std::string> names;
  for (const auto& entry : ret("query-commands")) {
    EXPECT_EQ(keys(entry), std::set<std::string>{"name"});
    names.insert(entry["name"].get<std::string>());
  }
  for (const char* expected : {"qmp_capabilities",
                               "query-version",
                               "query-commands",
                               "query-status",
                               "query-name",
                               "query-uuid",
                               "query-kvm",
                               "query-cpus-fast",
                               "query-block",
                               "query-blockstats",
                               "query-memory-size-summary",
                               "stop",
                               "cont",
                               "system_powerdown",
                               "system_reset",
                               "quit",
                               "balloon",
                               "query-balloon",
                               "qom-list",
                               "qom-get",
                               "qom-set",
                               "human-monitor-command"}) {
    EXPECT_TRUE(names.count(expected)) << expected;
  }
}

TEST_F(QmpSessionTest, QueryStatusFollowsTheVm) {
  negotiate();
  EXPECT_EQ(ret("query-status"), json::parse(R"({"status":"running","running":true,
      "singlestep":false})"));
  vm_.set_state(RunState::kPrelaunch);
  EXPECT_EQ(ret("query-status")["status"], "prelaunch");
  EXPECT_EQ(ret("query-status")["running"], false);
  vm_.set_state(RunState::kGuestPanicked);
  EXPECT_EQ(ret("query-status")["status"], "guest-panicked");
}

TEST_F(QmpSessionTest, QueryNameUuidKvmMemory) {
  negotiate();
  EXPECT_EQ(ret("query-name"), json({{"name", "testvm"}}));
  vm_.vm_name.clear();
  EXPECT_EQ(ret("query-name"), json::object());
  EXPECT_EQ(ret("query-uuid"), json({{"UUID", "12345678-1234-1234-1234-123456789abc"}}));
  EXPECT_EQ(ret("query-kvm"), json({{"enabled", false}, {"present", true}}));
  vm_.memory_summary = {1 << 30, 4096};
  EXPECT_EQ(ret("query-memory-size-summary"),
            json({{"base-memory", 1 << 30}, {"plugged-memory", 4096}}));
}

TEST_F(QmpSessionTest, QueryCpusFast) {
  negotiate();
  json cpus = ret("query-cpus-fast");
  ASSERT_EQ(cpus.size(), 2u);
  EXPECT_EQ(cpus[1], json::parse(R"({"cpu-index": 1, "thread-id": 1002,
      "qom-path": "/machine/unattached/device[2]", "target": "x86_64",
      "props": {"core-id": 1, "thread-id": 0, "socket-id": 0}})"));
}

TEST_F(QmpSessionTest, QueryBlock) {
  negotiate();
  BlockMedium medium;
  medium.file = "/img/disk.qcow2";
  medium.node_name = "node0";
  medium.driver = "qcow2";
  medium.read_only = true;
  medium.virtual_size = 1 << 20;
  medium.backing_file = "/img/base.raw";
  medium.backing_file_depth = 1;
  vm_.block_list = {
      {"disk0", "/machine/peripheral/vda/virtio-backend", false, false, medium, std::nullopt, "ok"},
      {"cd0", std::nullopt, true, true, std::nullopt, true, std::nullopt}};
  json blocks = ret("query-block");
  ASSERT_EQ(blocks.size(), 2u);
  EXPECT_EQ(keys(blocks[0]), (std::set<std::string>{"device", "qdev", "removable", "locked",
                                                    "inserted", "io-status", "type"}));
  EXPECT_EQ(blocks[0]["qdev"], "/machine/peripheral/vda/virtio-backend");
  const json& inserted = blocks[0]["inserted"];
  EXPECT_EQ(inserted["file"], "/img/disk.qcow2");
  EXPECT_EQ(inserted["ro"], true);
  EXPECT_EQ(inserted["drv"], "qcow2");
  EXPECT_EQ(inserted["backing_file"], "/img/base.raw");
  EXPECT_EQ(inserted["backing_file_depth"], 1);
  EXPECT_EQ(inserted["encrypted"], false);
  EXPECT_EQ(inserted["image"]["virtual-size"], 1 << 20);
  EXPECT_EQ(inserted["image"]["format"], "qcow2");
  EXPECT_EQ(keys(inserted["cache"]), (std::set<std::string>{"writeback", "direct", "no-flush"}));
  EXPECT_EQ(keys(blocks[1]),
            (std::set<std::string>{"device", "removable", "locked", "tray_open", "type"}));
  EXPECT_EQ(blocks[1]["locked"], true);
}

TEST_F(QmpSessionTest, QueryBlockstats) {
  negotiate();
  EXPECT_EQ(ret("query-blockstats"), json::array());
  BlockStats stats;
  stats.device = "disk0";
  stats.node_name = "node0";
  stats.rd_bytes = 512;
  stats.wr_operations = 3;
  vm_.block_stats_list = {stats};
  json list = ret("query-blockstats");
  ASSERT_EQ(list.size(), 1u);
  EXPECT_EQ(keys(list[0]), (std::set<std::string>{"device", "node-name", "stats"}));
  EXPECT_EQ(list[0]["stats"]["rd_bytes"], 512);
  EXPECT_EQ(list[0]["stats"]["wr_operations"], 3);
  EXPECT_TRUE(list[0]["stats"]["timed_stats"].is_array());
  EXPECT_EQ(ret("query-blockstats", {{"query-nodes", false}}).size(), 1u);
}

TEST_F(QmpSessionTest, LifecycleCommandsReachTheVm) {
  negotiate();
  EXPECT_EQ(ret("stop"), json::object());
  EXPECT_EQ(vm_.status(), RunState::kPaused);
  EXPECT_EQ(ret("stop"), json::object());  // idempotent, no second event
  EXPECT_EQ(ret("cont"), json::object());
  EXPECT_EQ(vm_.status(), RunState::kRunning);
  EXPECT_EQ(ret("system_powerdown"), json::object());
  EXPECT_EQ(ret("system_reset"), json::object());
  std::vector<std::string> names;
  for (const auto& e : events_) names.push_back(e["event"]);
  EXPECT_EQ(names, (std::vector<std::string>{"STOP", "RESUME", "POWERDOWN", "RESET"}));
  EXPECT_EQ(events_.back()["data"], json::parse(R"({"guest":false,
      "reason":"host-qmp-system-reset"})"));
}

TEST_F(QmpSessionTest, QuitRepliesAndLeavesTheCallToTheServer) {
  negotiate();
  QmpReply reply = session_.handle_request(json{{"execute", "quit"}});
  EXPECT_EQ(reply.message, json({{"return", json::object()}}));
  EXPECT_TRUE(reply.quit_after_send);
  EXPECT_EQ(vm_.quit_calls(), 0);
  EXPECT_FALSE(session_.handle_request(json{{"execute", "stop"}}).quit_after_send);
}

TEST_F(QmpSessionTest, VmErrorsKeepTheirClass) {
  negotiate();
  vm_.set_state(RunState::kShutdown);
  expect_error(exec("cont"), "GenericError", "Resetting the Virtual Machine is required");
  for (const char* error_class : {"KVMMissingCap", "DeviceNotFound", "GenericError"}) {
    vm_.stop_error = QmpError(error_class, "nope");
    expect_error(exec("stop"), error_class, "nope");
  }
}

TEST_F(QmpSessionTest, BalloonWithoutDeviceIsDeviceNotActive) {
  negotiate();
  expect_error(exec("query-balloon"), "DeviceNotActive", "No balloon device has been activated");
  expect_error(exec("balloon", {{"value", 1 << 20}}), "DeviceNotActive",
               "No balloon device has been activated");
}

TEST_F(QmpSessionTest, BalloonWithDevice) {
  negotiate();
  vm_.has_balloon = true;
  EXPECT_EQ(ret("balloon", {{"value", 32 << 20}}), json::object());
  EXPECT_EQ(vm_.balloon_target(), 32u << 20);
  EXPECT_EQ(ret("query-balloon"), json({{"actual", 64 << 20}}));
  expect_error(exec("balloon", {{"value", 0}}), "GenericError",
               "Parameter 'target' expects a size");
  expect_error(exec("balloon", {{"value", -5}}), "GenericError",
               "Parameter 'target' expects a size");
}

TEST_F(QmpSessionTest, BalloonGuestStatsThroughQom) {
  negotiate();
  const json path = "/machine/peripheral/balloon0";
  expect_error(exec("qom-get", {{"path", path}, {"property", "guest-stats"}}), "DeviceNotFound",
               "Device '/machine/peripheral/balloon0' not found");
  vm_.has_balloon = true;
  // Before the guest reports: last-update 0 and every statistic unknown, (uint64_t)-1 as QEMU.
  json stats = ret("qom-get", {{"path", path}, {"property", "guest-stats"}});
  EXPECT_EQ(stats["last-update"], 0);
  ASSERT_EQ(stats["stats"].size(), 10u);
  EXPECT_EQ(stats["stats"]["stat-free-memory"], UINT64_MAX);
  vm_.set_balloon_stats({1700000000, {{4, 1u << 20}, {5, 64u << 20}, {9, 0}}});
  stats = ret("qom-get", {{"path", "balloon0"}, {"property", "guest-stats"}});
  EXPECT_EQ(stats["last-update"], 1700000000);
  EXPECT_EQ(stats["stats"]["stat-free-memory"], 1u << 20);
  EXPECT_EQ(stats["stats"]["stat-total-memory"], 64u << 20);
  EXPECT_EQ(stats["stats"]["stat-htlb-pgfail"], 0);
  EXPECT_EQ(stats["stats"]["stat-swap-in"], UINT64_MAX);

  const json interval = "guest-stats-polling-interval";
  EXPECT_EQ(ret("qom-get", {{"path", path}, {"property", interval}}), 0);
  EXPECT_EQ(ret("qom-set", {{"path", path}, {"property", interval}, {"value", 2}}), json::object());
  EXPECT_EQ(ret("qom-get", {{"path", path}, {"property", interval}}), 2);
  expect_error(exec("qom-set", {{"path", path}, {"property", interval}, {"value", -1}}),
               "GenericError", "timer value must be greater than zero");
  expect_error(exec("qom-set", {{"path", path}, {"property", interval}, {"value", 1ll << 32}}),
               "GenericError", "timer value is too big");
  expect_error(exec("qom-set", {{"path", path}, {"property", interval}, {"value", 1.5}}),
               "GenericError",
               "Invalid parameter type for 'guest-stats-polling-interval', expected: integer");
  EXPECT_EQ(ret("qom-get", {{"path", path}, {"property", interval}}), 2);
  expect_error(exec("qom-set", {{"path", path}, {"property", "guest-stats"}, {"value", 1}}),
               "GenericError", "Property 'virtio-balloon-device.guest-stats' is not writable");
  expect_error(exec("qom-get", {{"path", path}, {"property", "foo"}}), "GenericError",
               "Property 'virtio-balloon-pci.foo' not found");
  expect_error(exec("qom-get", {{"path", "/machine/peripheral/nothere"}, {"property", "type"}}),
               "DeviceNotFound", "Device '/machine/peripheral/nothere' not found");
  expect_error(exec("qom-set", {{"path", path}, {"property", interval}}), "GenericError",
               "Parameter 'value' is missing");
  EXPECT_EQ(ret("qom-get", {{"path", path}, {"property", "type"}}), "virtio-balloon-pci");
  std::set<std::string> listed;
  for (const auto& entry : ret("qom-list", {{"path", path}})) listed.insert(entry["name"]);
  EXPECT_EQ(listed, (std::set<std::string>{"type", "guest-stats", "guest-stats-polling-interval"}));
}

TEST_F(QmpSessionTest, ArgumentValidationTexts) {
  negotiate();
  expect_error(exec("balloon", json::object()), "GenericError", "Parameter 'value' is missing");
  expect_error(exec("balloon", {{"value", "x"}}), "GenericError",
               "Invalid parameter type for 'value', expected: integer");
  expect_error(exec("balloon", {{"value", 1.5}}), "GenericError",
               "Invalid parameter type for 'value', expected: integer");
  expect_error(run(std::string_view(R"({"execute":"balloon","arguments":{"value":1e3}})")),
               "GenericError", "Invalid parameter type for 'value', expected: integer");
  expect_error(
      run(std::string_view(R"({"execute":"balloon","arguments":{"value":9223372036854775808}})")),
      "GenericError", "Invalid parameter type for 'value', expected: integer");
  expect_error(exec("balloon", {{"value", 1}, {"foo", 2}}), "GenericError",
               "Parameter 'foo' is unexpected");
  expect_error(exec("query-status", {{"x", 1}}), "GenericError", "Parameter 'x' is unexpected");
  // Missing is reported before unexpected, as QEMU's visitor does.
  expect_error(exec("balloon", {{"foo", 2}}), "GenericError", "Parameter 'value' is missing");
  expect_error(exec("human-monitor-command", {{"command-line", 42}}), "GenericError",
               "Invalid parameter type for 'command-line', expected: string");
  expect_error(exec("query-blockstats", {{"query-nodes", 1}}), "GenericError",
               "Invalid parameter type for 'query-nodes', expected: boolean");
  EXPECT_EQ(exec("query-name", json::object()), json({{"return", {{"name", "testvm"}}}}));
}

TEST_F(QmpSessionTest, EnvelopeErrors) {
  negotiate();
  for (const char* text : {"[1,2]", "\"str\"", "42", "null", "true"}) {
    expect_error(run(std::string_view(text)), "GenericError", "QMP input must be a JSON object");
  }
  expect_error(run(json{{"id", 1}}), "GenericError", "QMP input lacks member 'execute'");
  EXPECT_EQ(run(json{{"id", 1}})["id"], 1);
  expect_error(run(json{{"execute", 1}}), "GenericError",
               "QMP input member 'execute' must be a string");
  expect_error(run(json{{"execute", "query-name"}, {"arguments", {1}}}), "GenericError",
               "QMP input member 'arguments' must be an object");
  expect_error(run(json{{"execute", "query-name"}, {"arguments", nullptr}}), "GenericError",
               "QMP input member 'arguments' must be an object");
  expect_error(run(json{{"execute", "query-name"}, {"foo", 1}}), "GenericError",
               "QMP input member 'foo' is unexpected");
  expect_error(run(json{{"execute", "query-name"}, {"exec-oob", "x"}}), "GenericError",
               "QMP input member 'exec-oob' is unexpected");
  expect_error(exec("nope"), "CommandNotFound", "The command nope has not been found");
}

TEST_F(QmpSessionTest, MalformedJsonIsAParseError) {
  for (const char* text : {R"({"execute":"query-status", "bad"  })", "{\"a\":}", "{'a':1}", "[1,]",
                           "{\"a\":\"\xff\"}", "nul",
                           // Found by the fuzzer: a number overflow is out_of_range, not
                           // parse_error, and once escaped as an uncaught exception.
                           "{\"a\":1e048576}"}) {
    json reply = run(std::string_view(text));
    EXPECT_EQ(reply["error"]["class"], "GenericError") << text;
    EXPECT_EQ(reply["error"]["desc"].get<std::string>().rfind("JSON parse error, ", 0), 0u)
        << reply;
  }
}

TEST_F(QmpSessionTest, HumanMonitorInfoCommands) {
  negotiate();
  vm_.version_info = {7, 2, 22, "kiln"};
  EXPECT_EQ(hmp("info status"), "VM status: running\r\n");
  EXPECT_EQ(hmp("  info   version "), "7.2.22kiln\r\n");
  EXPECT_EQ(hmp("info name"), "testvm\r\n");
  EXPECT_EQ(hmp("info kvm"), "kvm support: disabled\r\n");
  EXPECT_EQ(hmp("info cpus"), "* CPU #0: thread_id=1001\r\n  CPU #1: thread_id=1002\r\n");
  EXPECT_EQ(exec("human-monitor-command", {{"command-line", "info cpus"}, {"cpu-index", 1}}),
            json({{"return", "  CPU #0: thread_id=1001\r\n* CPU #1: thread_id=1002\r\n"}}));
  expect_error(exec("human-monitor-command", {{"command-line", "info cpus"}, {"cpu-index", 7}}),
               "GenericError", "Parameter 'cpu-index' expects a CPU number");
  EXPECT_EQ(hmp("info balloon"), "Error: No balloon device has been activated\r\n");
  vm_.has_balloon = true;
  EXPECT_EQ(hmp("info balloon"), "balloon: actual=64\r\n");
  vm_.kvm_info = {true, true};
  EXPECT_EQ(hmp("info kvm"), "kvm support: enabled\r\n");
  vm_.kvm_info = {false, false};
  EXPECT_EQ(hmp("info kvm"), "kvm support: not compiled\r\n");
  vm_.vm_name.clear();
  EXPECT_EQ(hmp("info name"), "");
  vm_.set_state(RunState::kPrelaunch);
  EXPECT_EQ(hmp("info status"), "VM status: paused (prelaunch)\r\n");
  vm_.set_state(RunState::kPaused);
  EXPECT_EQ(hmp("info status"), "VM status: paused\r\n");
}

TEST_F(QmpSessionTest, HumanMonitorOtherInput) {
  negotiate();
  EXPECT_EQ(hmp(""), "");
  EXPECT_EQ(hmp("foo"), "unknown command: 'foo'\r\n");
  EXPECT_EQ(hmp("info foo"), "unknown command: 'info foo'\r\n");
  EXPECT_EQ(hmp("info status extra"),
            "status: extraneous characters at the end of line\r\n"
            "Try \"help info status\" for more information\r\n");
  EXPECT_NE(hmp("info").find("info status  -- show the current VM status"), std::string::npos);
  EXPECT_EQ(hmp("stop"), "");
  EXPECT_EQ(vm_.status(), RunState::kPaused);
  EXPECT_EQ(hmp("cont"), "");
  EXPECT_EQ(vm_.status(), RunState::kRunning);
  vm_.stop_error = QmpError("GenericError", "cannot");
  EXPECT_EQ(hmp("stop"), "Error: cannot\r\n");
  expect_error(exec("human-monitor-command"), "GenericError",
               "Parameter 'command-line' is missing");
}

TEST(QmpEvents, TimestampAndOptionalData) {
  auto when = std::chrono::system_clock::time_point(std::chrono::microseconds(1796454379603871));
  EXPECT_EQ(make_event("STOP", nullptr, when), json::parse(R"({"timestamp": {"seconds":
      1796454379, "microseconds": 603871}, "event": "STOP"})"));
  json with_data =
      make_event("SHUTDOWN", shutdown_event_data(true, ShutdownCause::kGuestPanic), when);
  EXPECT_EQ(with_data["data"], json::parse(R"({"guest": true, "reason": "guest-panic"})"));
}

TEST(QmpEvents, ShutdownCauseStrings) {
  EXPECT_EQ(shutdown_cause_name(ShutdownCause::kGuestShutdown), "guest-shutdown");
  EXPECT_EQ(shutdown_cause_name(ShutdownCause::kGuestReset), "guest-reset");
  EXPECT_EQ(shutdown_cause_name(ShutdownCause::kHostQmpQuit), "host-qmp-quit");
  EXPECT_EQ(shutdown_cause_name(ShutdownCause::kHostQmpSystemReset), "host-qmp-system-reset");
  EXPECT_EQ(shutdown_cause_name(ShutdownCause::kHostSignal), "host-signal");
  EXPECT_EQ(shutdown_cause_name(ShutdownCause::kGuestPanic), "guest-panic");
  EXPECT_EQ(run_state_name(RunState::kInternalError), "internal-error");
  EXPECT_EQ(run_state_name(RunState::kRunning), "running");
}

TEST(QmpSerialize, InvalidUtf8FromTheVmDoesNotThrow) {
  std::string line = serialize_message(json{{"return", {{"name", std::string("a\xff")}}}});
  EXPECT_EQ(line.substr(line.size() - 2), "\r\n");
  EXPECT_TRUE(json::accept(line));
}

}  // namespace
}  // namespace kiln::control
