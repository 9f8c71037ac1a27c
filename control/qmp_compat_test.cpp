// Runs one QMP client script against real QEMU 7.2 (TCG, no KVM needed) and against QmpServer with
// a FakeVm configured like that QEMU, and compares the transcripts: exact text where both sides
// must agree byte-for-byte (errors, states), otherwise the shapes (key sets and JSON types,
// recursively). QEMU missing is a failure, not a skip: compatibility is this module's contract.
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "control/fake_vm_test_util.h"
#include "control/qmp_server.h"

extern char** environ;

namespace kiln::control {
namespace {

using nlohmann::json;
using testing::FakeVm;
using testing::QmpTestClient;
using namespace std::chrono_literals;

enum class Compare {
  kExact,          // equal once event timestamps are set aside
  kShape,          // same key sets and types, recursively
  kDigitsAsN,      // HMP text equal once every number is replaced (thread ids, versions)
  kParseError,     // both a GenericError whose desc starts "JSON parse error, "
  kUnordered,      // same multiset of shapes (quit: QEMU sends SHUTDOWN first, we reply first)
  kNoBlockParent,  // shapes, minus the protocol-layer child node kiln does not model
};

struct Step {
  std::string raw;  // sent as is ("" sends nothing: the greeting)
  Compare compare;
};

std::vector<Step> script(bool has_balloon) {
  std::vector<Step> steps = {
      {"", Compare::kShape},  // QEMU advertises "oob", which kiln deliberately does not
      {R"({"execute":"query-status"})", Compare::kExact},
      {R"({"execute":"qmp_capabilities","id":[1,"a"]})", Compare::kExact},
      {R"({"execute":"qmp_capabilities"})", Compare::kExact},
      {R"({"execute":"query-version"})", Compare::kExact},
      {R"({"execute":"query-commands"})", Compare::kShape},
      {R"({"execute":"query-status"})", Compare::kExact},
      {R"({"execute":"query-name"})", Compare::kExact},
      {R"({"execute":"query-uuid"})", Compare::kExact},
      {R"({"execute":"query-kvm"})", Compare::kExact},
      {R"({"execute":"query-cpus-fast"})", Compare::kShape},
      {R"({"execute":"query-block"})", Compare::kShape},
      {R"({"execute":"query-blockstats"})", Compare::kNoBlockParent},
      {R"({"execute":"query-memory-size-summary"})", Compare::kExact},
      {R"({"execute":"query-balloon"})", has_balloon ? Compare::kShape : Compare::kExact},
      {R"({"execute":"balloon","arguments":{"value":67108864}})", Compare::kExact},
      {R"({"execute":"balloon","arguments":{"value":0}})",
       has_balloon ? Compare::kExact : Compare::kShape},
      {R"({"execute":"balloon","arguments":{}})", Compare::kExact},
      {R"({"execute":"balloon","arguments":{"value":"x"}})", Compare::kExact},
      {R"({"execute":"balloon","arguments":{"value":1.5}})", Compare::kExact},
      {R"({"execute":"balloon","arguments":{"value":1,"foo":2}})", Compare::kExact},
      {R"({"execute":"balloon","arguments":[1]})", Compare::kExact},
      // The balloon's QOM statistics: QEMU is given -device virtio-balloon,id=balloon0. The
      // guest never runs (-S), so even the figures compare exactly: all unknown.
      {R"({"execute":"qom-get","arguments":{"path":"/machine/peripheral/balloon0","property":"guest-stats"}})",
       Compare::kExact},
      {R"({"execute":"qom-get","arguments":{"path":"balloon0","property":"guest-stats-polling-interval"}})",
       Compare::kExact},
      {R"({"execute":"qom-set","arguments":{"path":"/machine/peripheral/balloon0","property":"guest-stats-polling-interval","value":2}})",
       Compare::kExact},
      {R"({"execute":"qom-get","arguments":{"path":"/machine/peripheral/balloon0","property":"guest-stats-polling-interval"}})",
       Compare::kExact},
      {R"({"execute":"qom-set","arguments":{"path":"/machine/peripheral/balloon0","property":"guest-stats-polling-interval","value":-1}})",
       Compare::kExact},
      {R"({"execute":"qom-set","arguments":{"path":"/machine/peripheral/balloon0","property":"guest-stats-polling-interval","value":4294967296}})",
       Compare::kExact},
      {R"({"execute":"qom-set","arguments":{"path":"/machine/peripheral/balloon0","property":"guest-stats-polling-interval","value":"x"}})",
       Compare::kExact},
      {R"({"execute":"qom-set","arguments":{"path":"/machine/peripheral/balloon0","property":"guest-stats","value":1}})",
       Compare::kExact},
      {R"({"execute":"qom-get","arguments":{"path":"/machine/peripheral/balloon0","property":"foo"}})",
       Compare::kExact},
      {R"({"execute":"qom-get","arguments":{"path":"/machine/peripheral/balloon0","property":"type"}})",
       Compare::kExact},
      {R"({"execute":"qom-get","arguments":{"path":"/machine/peripheral/nothere","property":"type"}})",
       Compare::kExact},
      {R"({"execute":"qom-get","arguments":{"property":"x"}})", Compare::kExact},
      {R"({"execute":"qom-list","arguments":{"path":"/machine/peripheral/balloon0"}})",
       has_balloon ? Compare::kShape : Compare::kExact},
      {R"({"execute":"query-status","arguments":{"x":1}})", Compare::kExact},
      {R"({"execute":"no-such-command","id":5})", Compare::kExact},
      {R"({"execute":1})", Compare::kExact},
      {R"({"foo":1})", Compare::kExact},
      {R"({"id":{"x":null}})", Compare::kExact},
      {R"([1,2])", Compare::kExact},
      {R"("str")", Compare::kExact},
      {R"(})", Compare::kExact},
      {R"({"execute":"query-status", "bad"  })", Compare::kParseError},
      {R"({"execute":"query-name"}{"execute":"query-uuid","id":2})", Compare::kExact},
      {R"({"execute":"human-monitor-command","arguments":{"command-line":"info status"}})",
       Compare::kExact},
      {R"({"execute":"human-monitor-command","arguments":{"command-line":" info  name "}})",
       Compare::kExact},
      {R"({"execute":"human-monitor-command","arguments":{"command-line":"info kvm"}})",
       Compare::kExact},
      {R"({"execute":"human-monitor-command","arguments":{"command-line":"info version"}})",
       Compare::kExact},
      {R"({"execute":"human-monitor-command","arguments":{"command-line":"info cpus"}})",
       Compare::kDigitsAsN},
      {R"({"execute":"human-monitor-command","arguments":{"command-line":"info balloon"}})",
       Compare::kExact},
      {R"({"execute":"human-monitor-command","arguments":{"command-line":"info foo"}})",
       Compare::kExact},
      {R"({"execute":"human-monitor-command","arguments":{"command-line":"foo"}})",
       Compare::kExact},
      {R"({"execute":"human-monitor-command","arguments":{"command-line":"info status x"}})",
       Compare::kExact},
      {R"({"execute":"human-monitor-command","arguments":{"command-line":""}})", Compare::kExact},
      {R"({"execute":"human-monitor-command","arguments":{"command-line":42}})", Compare::kExact},
      {R"({"execute":"human-monitor-command"})", Compare::kExact},
      {R"({"execute":"cont"})", Compare::kExact},
      {R"({"execute":"stop"})", Compare::kExact},
      {R"({"execute":"stop"})", Compare::kExact},
      {R"({"execute":"query-status"})", Compare::kExact},
      {R"({"execute":"human-monitor-command","arguments":{"command-line":"info status"}})",
       Compare::kExact},
      {R"({"execute":"cont","id":"c"})", Compare::kExact},
      {R"({"execute":"system_reset"})", Compare::kExact},
      {R"({"execute":"system_powerdown"})", Compare::kExact},
      {R"({"execute":"quit","id":"q"})", Compare::kUnordered},
  };
  return steps;
}

using Transcript = std::vector<std::vector<json>>;

// Sends each step and collects everything up to its reply (events included). For quit, also
// whatever arrives until the server hangs up or goes quiet.
Transcript run_script(QmpTestClient& client, const std::vector<Step>& steps) {
  Transcript transcript;
  for (const auto& step : steps) {
    std::vector<json> messages;
    if (!step.raw.empty()) client.send_raw(step.raw + "\n");
    while (auto message = client.read_message(5000)) {
      messages.push_back(*message);
      if (!message->contains("event")) break;
    }
    if (step.compare == Compare::kUnordered) {
      while (auto message = client.read_message(1000)) messages.push_back(*message);
    }
    transcript.push_back(messages);
    // Two objects in one write produce two replies; the second belongs to the same step.
    if (step.raw.find("}{") != std::string::npos) {
      if (auto second = client.read_message(5000)) transcript.back().push_back(*second);
    }
  }
  return transcript;
}

std::string type_of(const json& value) {
  if (value.is_object()) return "object";
  if (value.is_array()) return "array";
  if (value.is_string()) return "string";
  if (value.is_boolean()) return "boolean";
  if (value.is_null()) return "null";
  if (value.is_number_integer()) return "integer";
  return "number";
}

// Reports every place where the two values differ in type or key set.
void expect_same_shape(const json& ours, const json& qemu, const std::string& path) {
  if (type_of(ours) != type_of(qemu)) {
    ADD_FAILURE() << path << ": kiln has " << type_of(ours) << ", QEMU has " << type_of(qemu)
                  << "\n kiln: " << ours << "\n QEMU: " << qemu;
    return;
  }
  if (ours.is_object()) {
    for (const auto& [key, value] : ours.items()) {
      if (!qemu.contains(key)) ADD_FAILURE() << path << ": kiln has extra key '" << key << "'";
    }
    for (const auto& [key, value] : qemu.items()) {
      if (!ours.contains(key)) {
        ADD_FAILURE() << path << ": kiln lacks key '" << key << "'";
      } else {
        expect_same_shape(ours[key], value, path + "." + key);
      }
    }
  } else if (ours.is_array()) {
    // Element counts depend on the machine; every element on either side must match the shape
    // of the other side's first one.
    if (!ours.empty() && !qemu.empty()) {
      for (size_t i = 0; i < ours.size(); ++i) {
        expect_same_shape(ours[i], qemu[0], path + "[" + std::to_string(i) + "]");
      }
      for (size_t i = 1; i < qemu.size(); ++i) {
        expect_same_shape(ours[0], qemu[i], path + "[" + std::to_string(i) + "]");
      }
    }
  }
}

json without_timestamp(json message) {
  if (message.contains("timestamp")) message.erase("timestamp");
  return message;
}

// Replaces every run of digits by "N". (No std::regex: GCC 12 warns inside it under ASan.)
std::string digits_as_n(const std::string& text) {
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    bool digit = text[i] >= '0' && text[i] <= '9';
    bool run_continues = digit && i > 0 && text[i - 1] >= '0' && text[i - 1] <= '9';
    if (!digit) out += text[i];
    if (digit && !run_continues) out += 'N';
  }
  return out;
}

json shape_key(const json& value) {
  if (value.is_object()) {
    json out = json::object();
    for (const auto& [key, member] : value.items()) out[key] = shape_key(member);
    return out;
  }
  return type_of(value);
}

void compare_step(const Step& step, const std::vector<json>& ours, const std::vector<json>& qemu) {
  SCOPED_TRACE("step " + step.raw);
  if (step.compare == Compare::kUnordered) {
    std::multiset<std::string> a, b;
    for (const auto& m : ours) a.insert(without_timestamp(m).dump());
    for (const auto& m : qemu) b.insert(without_timestamp(m).dump());
    EXPECT_EQ(a, b);
    EXPECT_EQ(ours.size(), 2u) << "expected the reply and the SHUTDOWN event";
    return;
  }
  ASSERT_EQ(ours.size(), qemu.size()) << "kiln: " << json(ours) << "\nQEMU: " << json(qemu);
  for (size_t i = 0; i < ours.size(); ++i) {
    const json& a = ours[i];
    const json& b = qemu[i];
    if (a.contains("timestamp") || b.contains("timestamp")) {
      expect_same_shape(a["timestamp"], b["timestamp"], "timestamp");
    }
    switch (step.compare) {
      case Compare::kExact:
        EXPECT_EQ(without_timestamp(a), without_timestamp(b));
        break;
      case Compare::kShape:
        expect_same_shape(a, b, "$");
        break;
      case Compare::kDigitsAsN:
        ASSERT_TRUE(a.contains("return") && b.contains("return")) << a << b;
        EXPECT_EQ(digits_as_n(a["return"]), digits_as_n(b["return"]));
        break;
      case Compare::kParseError:
        for (const json* m : {&a, &b}) {
          EXPECT_EQ((*m)["error"]["class"], "GenericError") << *m;
          EXPECT_EQ((*m)["error"]["desc"].get<std::string>().rfind("JSON parse error, ", 0), 0u)
              << *m;
        }
        break;
      case Compare::kNoBlockParent: {
        auto strip = [](json reply) {
          for (auto& entry : reply["return"]) {
            entry.erase("parent");
            entry.erase("driver-specific");
          }
          return reply;
        };
        expect_same_shape(strip(a), strip(b), "$");
        break;
      }
      case Compare::kUnordered:
        break;
    }
  }
}

class QemuProcess {
 public:
  // Returns false (with a test failure) when QEMU cannot be started.
  bool start(const std::vector<std::string>& args) {
    std::vector<char*> argv;
    for (const auto& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
    argv.push_back(nullptr);
    int err = posix_spawnp(&pid_, argv[0], nullptr, nullptr, argv.data(), environ);
    if (err != 0) {
      pid_ = -1;
      ADD_FAILURE() << "cannot run " << args[0] << ": " << strerror(err)
                    << " (install qemu-system-x86 7.2; this test does not skip)";
      return false;
    }
    return true;
  }
  bool alive() { return pid_ > 0 && waitpid(pid_, nullptr, WNOHANG) == 0; }
  ~QemuProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

 private:
  pid_t pid_ = -1;
};

struct MachineConfig {
  std::vector<std::string> qemu_args;  // after the binary, before -qmp
  bool has_balloon;
  std::function<void(FakeVm&, const std::string& image)> configure_fake;
};

BlockMedium raw_medium(const std::string& image, bool read_only) {
  BlockMedium medium;
  medium.file = image;
  medium.node_name = "kiln-node0";
  medium.read_only = read_only;
  medium.driver = "raw";
  medium.virtual_size = 1 << 20;
  medium.actual_size = 4096;
  medium.dirty_flag = false;
  return medium;
}

void run_compat(const MachineConfig& config) {
  std::string dir = (std::filesystem::temp_directory_path() / "kiln-qmpc-XXXXXX").string();
  ASSERT_NE(mkdtemp(dir.data()), nullptr);
  std::string image = dir + "/disk.raw";
  { std::ofstream(image).flush(); }
  std::filesystem::resize_file(image, 1 << 20);

  const char* qemu_env = getenv("KILN_QEMU");
  std::vector<std::string> args = {qemu_env ? qemu_env : "qemu-system-x86_64"};
  for (std::string arg : config.qemu_args) {
    if (auto at = arg.find("@IMAGE@"); at != std::string::npos) arg.replace(at, 7, image);
    args.push_back(arg);
  }
  std::string qemu_socket = dir + "/qemu.sock";
  args.insert(args.end(), {"-qmp", "unix:" + qemu_socket + ",server=on,wait=off"});

  Transcript qemu_transcript;
  {
    QemuProcess qemu;
    ASSERT_TRUE(qemu.start(args));
    UniqueFd fd;
    for (int i = 0; i < 600 && !fd; ++i) {  // 30 s: a loaded CI host starts QEMU slowly
      fd = QmpTestClient::connect_unix(qemu_socket);
      if (!fd) std::this_thread::sleep_for(50ms);
      ASSERT_TRUE(fd || qemu.alive()) << "QEMU exited early";
    }
    ASSERT_TRUE(fd) << "QEMU QMP socket never came up";
    QmpTestClient client(std::move(fd));
    qemu_transcript = run_script(client, script(config.has_balloon));
  }

  FakeVm vm;
  config.configure_fake(vm, image);
  // Pretend to be exactly this QEMU build, so version texts can be compared byte for byte.
  ASSERT_FALSE(qemu_transcript.empty() || qemu_transcript[0].empty());
  const json& qemu_version = qemu_transcript[0][0]["QMP"]["version"];
  vm.version_info = {qemu_version["qemu"]["major"], qemu_version["qemu"]["minor"],
                     qemu_version["qemu"]["micro"], qemu_version["package"]};
  std::string our_socket = dir + "/kiln.sock";
  QmpServer server(vm, QmpServer::listen_unix(our_socket));
  vm.emit = [&](std::string_view name, json data) { server.emit_event(name, data); };
  server.start();
  QmpTestClient client(QmpTestClient::connect_unix(our_socket));
  Transcript our_transcript = run_script(client, script(config.has_balloon));
  server.stop();

  auto steps = script(config.has_balloon);
  ASSERT_EQ(our_transcript.size(), steps.size());
  ASSERT_EQ(qemu_transcript.size(), steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    compare_step(steps[i], our_transcript[i], qemu_transcript[i]);
  }
  std::filesystem::remove_all(dir);
}

TEST(QmpCompat, EmptyMachineMatchesQemu) {
  run_compat({{"-M", "none", "-display", "none", "-accel", "tcg", "-m", "64", "-name", "testvm",
               "-uuid", "12345678-1234-1234-1234-123456789abc", "-drive",
               "if=none,id=disk0,file=@IMAGE@,format=raw"},
              false,
              [](FakeVm& vm, const std::string& image) {
                vm.kvm_info = {true, false};
                vm.memory_summary = {64 << 20, 0};
                vm.block_list = {{"disk0", std::nullopt, true, false, raw_medium(image, false),
                                  std::nullopt, std::nullopt}};
                BlockStats stats;
                stats.device = "disk0";
                stats.node_name = "kiln-node0";
                vm.block_stats_list = {stats};
              }});
}

TEST(QmpCompat, PcMachineWithCpusDiskAndBalloonMatchesQemu) {
  run_compat({{"-M",       "pc",
               "-S",       "-nodefaults",
               "-display", "none",
               "-accel",   "tcg",
               "-smp",     "2",
               "-m",       "128",
               "-name",    "testvm",
               "-uuid",    "12345678-1234-1234-1234-123456789abc",
               "-device",  "virtio-balloon,id=balloon0",
               "-drive",   "if=virtio,id=disk1,file=@IMAGE@,format=raw,readonly=on"},
              true,
              [](FakeVm& vm, const std::string& image) {
                vm.set_state(RunState::kPrelaunch);
                vm.kvm_info = {true, false};
                vm.memory_summary = {128 << 20, 0};
                vm.has_balloon = true;
                vm.cpu_list = {{0, 4242, "/machine/unattached/device[0]", 0, 0, 0},
                               {1, 4243, "/machine/unattached/device[2]", 0, 1, 0}};
                vm.block_list = {{"disk1", "/machine/peripheral-anon/device[1]/virtio-backend",
                                  false, false, raw_medium(image, true), std::nullopt, "ok"}};
                BlockStats stats;
                stats.device = "disk1";
                stats.qdev = "/machine/peripheral-anon/device[1]/virtio-backend";
                stats.node_name = "kiln-node0";
                vm.block_stats_list = {stats};
              }});
}

}  // namespace
}  // namespace kiln::control
