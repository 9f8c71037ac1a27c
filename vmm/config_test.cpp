#include "vmm/config.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace kiln::vmm {
namespace {

std::optional<VmConfig> parse(std::vector<std::string> args) {
  args.insert(args.begin(), "kiln");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  return parse_command_line(int(argv.size()), argv.data());
}

TEST(ParseMemorySize, AcceptsSuffixesAndBareMebibytes) {
  EXPECT_EQ(parse_memory_size("512M"), 512ull << 20);
  EXPECT_EQ(parse_memory_size("3G"), 3ull << 30);
  EXPECT_EQ(parse_memory_size("1024"), 1024ull << 20);
  EXPECT_EQ(parse_memory_size("1T"), 1ull << 40);
  for (const char* bad : {"", "0", "12X", "-1G", "G", "99999999999999999999G", "1e9"})
    EXPECT_THROW(parse_memory_size(bad), ConfigError) << bad;
}

TEST(ParseSerial, KnowsEveryMode) {
  EXPECT_EQ(parse_serial("stdio").mode, SerialConfig::Mode::kStdio);
  EXPECT_EQ(parse_serial("pty").mode, SerialConfig::Mode::kPty);
  EXPECT_EQ(parse_serial("off").mode, SerialConfig::Mode::kOff);
  auto file = parse_serial("file:/tmp/x.log");
  EXPECT_EQ(file.mode, SerialConfig::Mode::kFile);
  EXPECT_EQ(file.path, "/tmp/x.log");
  EXPECT_EQ(parse_serial("socket:/run/s").path, "/run/s");
  EXPECT_THROW(parse_serial("file:"), ConfigError);
  EXPECT_THROW(parse_serial("tcp:1234"), ConfigError);
}

TEST(ParseDisk, ReadsOptionsAndRefusesUnknownOnes) {
  auto d = parse_disk("path=/a.img,format=qcow2,readonly=on,cache=none,serial=abc");
  EXPECT_EQ(d.path, "/a.img");
  EXPECT_EQ(d.format, "qcow2");
  EXPECT_TRUE(d.read_only);
  EXPECT_EQ(d.cache, "none");
  EXPECT_EQ(d.serial, "abc");
  EXPECT_THROW(parse_disk("format=raw"), ConfigError);
  EXPECT_THROW(parse_disk("path=a,format=vmdk"), ConfigError);
  EXPECT_THROW(parse_disk("path=a,readonly=maybe"), ConfigError);
  EXPECT_THROW(parse_disk("path=a,bogus=1"), ConfigError);
  EXPECT_THROW(parse_disk("path=a,serial=012345678901234567890"), ConfigError);
}

TEST(CommandLine, ParsesEveryFlag) {
  auto c = parse({"--kernel",    "vmlinuz",
                  "--initramfs", "ir.gz",
                  "--cmdline",   "console=ttyS0 quiet",
                  "--cpus",      "4",
                  "--memory",    "3G",
                  "--serial",    "off",
                  "--name",      "web1",
                  "--hugepages", "--prealloc",
                  "--no-reboot", "--disk",
                  "path=d.img",  "--rng",
                  "--balloon",   "--kernel-cache",
                  "/var/cache/k"});
  ASSERT_TRUE(c);
  EXPECT_EQ(c->kernel, "vmlinuz");
  EXPECT_EQ(c->kernel_cache, "/var/cache/k");
  EXPECT_EQ(c->initramfs, "ir.gz");
  EXPECT_EQ(c->cmdline, "console=ttyS0 quiet");
  EXPECT_EQ(c->cpus, 4u);
  EXPECT_EQ(c->memory_bytes, 3ull << 30);
  EXPECT_EQ(c->serial.mode, SerialConfig::Mode::kOff);
  EXPECT_EQ(c->name, "web1");
  EXPECT_TRUE(c->hugepages && c->prealloc && c->no_reboot && c->rng && c->balloon);
  ASSERT_EQ(c->disks.size(), 1u);
}

TEST(CommandLine, MistakesAreConfigErrors) {
  EXPECT_THROW(parse({"--kernel", "k", "--bogus"}), ConfigError);
  EXPECT_THROW(parse({"--memory", "1G"}), ConfigError);  // no kernel
  EXPECT_THROW(parse({"--kernel", "k", "--cpus", "0"}), ConfigError);
  EXPECT_THROW(parse({"--kernel", "k", "--cpus", "many"}), ConfigError);
  EXPECT_THROW(parse({"--kernel", "k", "--memory", "8M"}), ConfigError);
  EXPECT_THROW(parse({"--kernel", "k", "--cmdline", std::string(70000, 'a')}), ConfigError);
}

TEST(ConfigDocument, RoundTripsThroughJsonAndFlagsOverrideIt) {
  VmConfig c;
  c.kernel = "vmlinuz";
  c.cpus = 2;
  c.memory_bytes = 1ull << 30;
  c.disks.push_back(parse_disk("path=d.img,format=qcow2,serial=s1"));
  c.balloon = true;
  c.kernel_cache = "kc";
  nlohmann::json j = c;
  std::string path = ::testing::TempDir() + "/vm.json";
  std::ofstream(path) << j.dump(2);
  auto loaded = parse({"--config", path, "--cpus", "3"});
  ASSERT_TRUE(loaded);
  EXPECT_EQ(loaded->kernel, "vmlinuz");
  EXPECT_EQ(loaded->kernel_cache, "kc");
  EXPECT_EQ(loaded->cpus, 3u);
  EXPECT_EQ(loaded->memory_bytes, 1ull << 30);
  ASSERT_EQ(loaded->disks.size(), 1u);
  EXPECT_EQ(loaded->disks[0].format, "qcow2");
  EXPECT_EQ(loaded->disks[0].serial, "s1");
  EXPECT_TRUE(loaded->balloon);
}

TEST(CommandLine, ConsoleTakesTheSerialBackendsAndDefaultsToPty) {
  auto bare = parse({"--kernel", "k", "--console"});
  ASSERT_TRUE(bare);
  EXPECT_EQ(bare->console.mode, SerialConfig::Mode::kPty);
  auto none = parse({"--kernel", "k"});
  EXPECT_EQ(none->console.mode, SerialConfig::Mode::kOff);
  auto file = parse({"--kernel", "k", "--console", "file:/tmp/hvc0.log"});
  EXPECT_EQ(file->console.mode, SerialConfig::Mode::kFile);
  EXPECT_EQ(file->console.path, "/tmp/hvc0.log");
  auto sock = parse({"--console", "socket:/tmp/c.sock", "--kernel", "k", "--serial", "off"});
  EXPECT_EQ(sock->console.mode, SerialConfig::Mode::kSocket);
  EXPECT_EQ(sock->kernel, "k");
  EXPECT_THROW(parse({"--kernel", "k", "--console", "tcp:1"}), ConfigError);
  // Two consoles cannot share the terminal or one socket path.
  EXPECT_THROW(parse({"--kernel", "k", "--console", "stdio"}), ConfigError);
  EXPECT_THROW(parse({"--kernel", "k", "--serial", "socket:/s", "--console", "socket:/s"}),
               ConfigError);
  EXPECT_TRUE(parse({"--kernel", "k", "--serial", "pty", "--console", "stdio"}));
}

TEST(CommandLine, VsockNeedsAUsableCid) {
  auto c = parse({"--kernel", "k", "--vsock", "cid=3"});
  ASSERT_TRUE(c);
  EXPECT_EQ(c->vsock_cid, 3u);
  EXPECT_FALSE(parse({"--kernel", "k"})->vsock_cid);
  EXPECT_EQ(parse_vsock("cid=4294967294"), 4294967294u);
  for (const char* bad :
       {"", "cid=", "cid=2", "cid=0", "cid=4294967295", "cid=x", "cid=-5", "cid=3,port=1", "3"})
    EXPECT_THROW(parse_vsock(bad), ConfigError) << bad;
  EXPECT_THROW(parse({"--kernel", "k", "--vsock", "cid=1"}), ConfigError);
}

TEST(CommandLine, BalloonOptions) {
  auto plain = parse({"--kernel", "k", "--balloon"});
  EXPECT_TRUE(plain->balloon);
  EXPECT_FALSE(plain->balloon_deflate_on_oom);
  auto oom = parse({"--balloon", "deflate-on-oom=on", "--kernel", "k"});
  EXPECT_TRUE(oom->balloon && oom->balloon_deflate_on_oom);
  EXPECT_THROW(parse({"--kernel", "k", "--balloon", "deflate-on-oom=maybe"}), ConfigError);
  EXPECT_THROW(parse({"--kernel", "k", "--balloon", "stats=on"}), ConfigError);
  VmConfig c;
  c.balloon = c.balloon_deflate_on_oom = true;
  nlohmann::json j = c;
  EXPECT_EQ(j["balloon"], (nlohmann::json{{"deflate_on_oom", true}}));
  VmConfig back = j.get<VmConfig>();
  EXPECT_TRUE(back.balloon && back.balloon_deflate_on_oom);
  EXPECT_TRUE((nlohmann::json{{"balloon", true}}.get<VmConfig>().balloon));
  EXPECT_THROW((nlohmann::json{{"balloon", {{"oom", true}}}}.get<VmConfig>()), ConfigError);
  EXPECT_THROW((nlohmann::json{{"balloon", "yes"}}.get<VmConfig>()), ConfigError);
}

TEST(ConfigDocument, VsockKey) {
  VmConfig c;
  c.vsock_cid = 7;
  nlohmann::json j = c;
  EXPECT_EQ(j["vsock"], (nlohmann::json{{"cid", 7}}));
  EXPECT_EQ(j.get<VmConfig>().vsock_cid, 7u);
  EXPECT_TRUE(nlohmann::json(VmConfig{})["vsock"].is_null());
  EXPECT_FALSE(nlohmann::json(VmConfig{}).get<VmConfig>().vsock_cid);
  EXPECT_THROW((nlohmann::json{{"vsock", {{"cid", 2}}}}.get<VmConfig>()), ConfigError);
  EXPECT_THROW((nlohmann::json{{"vsock", {{"cid", "3"}}}}.get<VmConfig>()), ConfigError);
  EXPECT_THROW((nlohmann::json{{"vsock", {{"cid", 3}, {"port", 1}}}}.get<VmConfig>()), ConfigError);
  EXPECT_THROW((nlohmann::json{{"vsock", 3}}.get<VmConfig>()), ConfigError);
}

TEST(ConfigDocument, ConsoleKey) {
  VmConfig c;
  c.kernel = "k";
  c.console = parse_serial("socket:/run/hvc0.sock");
  nlohmann::json j = c;
  EXPECT_EQ(j["console"], "socket:/run/hvc0.sock");
  VmConfig back = j.get<VmConfig>();
  EXPECT_EQ(back.console.mode, SerialConfig::Mode::kSocket);
  EXPECT_EQ(back.console.path, "/run/hvc0.sock");
  VmConfig off = nlohmann::json{{"kernel", "k"}}.get<VmConfig>();
  EXPECT_EQ(off.console.mode, SerialConfig::Mode::kOff);
  EXPECT_EQ(nlohmann::json(off)["console"], "off");
  EXPECT_THROW((nlohmann::json{{"console", "bogus"}}.get<VmConfig>()), ConfigError);
  EXPECT_THROW((nlohmann::json{{"console", 1}}.get<VmConfig>()), ConfigError);
}

TEST(ConfigDocument, BadDocumentsAreConfigErrors) {
  auto write = [](const std::string& text) {
    std::string path = ::testing::TempDir() + "/bad.json";
    std::ofstream(path) << text;
    return path;
  };
  EXPECT_THROW(parse({"--config", write("{\"kernel\": ")}), ConfigError);
  EXPECT_THROW(parse({"--config", write("[1,2]")}), ConfigError);
  EXPECT_THROW(parse({"--config", write("{\"kernel\":\"k\",\"cpus\":1e999}")}), ConfigError);
  EXPECT_THROW(parse({"--config", write("{\"kernel\":\"k\",\"cpu\":2}")}), ConfigError);
  EXPECT_THROW(parse({"--config", write("{\"kernel\":\"k\",\"cpus\":\"two\"}")}), ConfigError);
  EXPECT_THROW(parse({"--config", write("{\"kernel\":\"k\",\"disks\":[{\"path\":1}]}")}),
               ConfigError);
  EXPECT_THROW(parse({"--config", "/nonexistent/vm.json"}), ConfigError);
}

TEST(ParseNet, ReadsTapAndMacAndRefusesBadOnes) {
  NetConfig n = parse_net("tap=tap0,mac=52:54:00:AB:cd:01");
  EXPECT_EQ(n.tap, "tap0");
  EXPECT_EQ(n.mac, "52:54:00:ab:cd:01");
  EXPECT_EQ(parse_net("kiln-tap1").tap, "kiln-tap1");
  EXPECT_EQ(parse_net("tap=t").mac, "");
  EXPECT_THROW(parse_net("mac=52:54:00:00:00:01"), ConfigError);          // no tap
  EXPECT_THROW(parse_net("tap=a-name-too-long-for-linux"), ConfigError);  // > 15 chars
  EXPECT_THROW(parse_net("tap=t,mac=01:00:5e:00:00:01"), ConfigError);    // multicast
  EXPECT_THROW(parse_net("tap=t,mac=ff:ff:ff:ff:ff:ff"), ConfigError);    // broadcast
  EXPECT_THROW(parse_net("tap=t,mac=00:00:00:00:00:00"), ConfigError);
  EXPECT_THROW(parse_net("tap=t,mac=52:54:00:12:34"), ConfigError);     // short
  EXPECT_THROW(parse_net("tap=t,mac=52-54-00-12-34-56"), ConfigError);  // separators
  EXPECT_THROW(parse_net("tap=t,mac=52:54:00:12:34:5g"), ConfigError);
  EXPECT_THROW(parse_net("tap=t,queues=2"), ConfigError);
  try {
    parse_net("tap=t,mac=03:00:00:00:00:01");
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("multicast"), std::string::npos) << e.what();
  }
}

TEST(ParseNet, VhostIsOnOffOrTheDefault) {
  EXPECT_FALSE(parse_net("tap=t").vhost.has_value());
  EXPECT_EQ(parse_net("tap=t,vhost=on").vhost, std::optional<bool>(true));
  EXPECT_EQ(parse_net("tap=t,mac=52:54:00:00:00:01,vhost=off").vhost, std::optional<bool>(false));
  EXPECT_THROW(parse_net("tap=t,vhost=yes"), ConfigError);
  EXPECT_THROW(parse_net("tap=t,vhost="), ConfigError);
  EXPECT_THROW(parse_net("tap=t,vhost"), ConfigError);
}

TEST(CommandLine, NetVhostRoundTripsThroughJson) {
  auto c = parse({"--kernel", "k", "--net", "tap=tap0,vhost=on", "--net", "tap=tap1,vhost=off",
                  "--net", "tap=tap2"});
  ASSERT_TRUE(c);
  nlohmann::json j = *c;
  EXPECT_EQ(j["nets"][0]["vhost"], true);
  EXPECT_EQ(j["nets"][1]["vhost"], false);
  EXPECT_FALSE(j["nets"][2].contains("vhost"));  // the default stays the default
  std::string path = ::testing::TempDir() + "/vhostnet.json";
  std::ofstream(path) << j.dump(2);
  auto loaded = parse({"--config", path});
  ASSERT_TRUE(loaded);
  ASSERT_EQ(loaded->nets.size(), 3u);
  EXPECT_EQ(loaded->nets[0].vhost, std::optional<bool>(true));
  EXPECT_EQ(loaded->nets[1].vhost, std::optional<bool>(false));
  EXPECT_FALSE(loaded->nets[2].vhost.has_value());
  std::string bad = ::testing::TempDir() + "/badvhost.json";
  std::ofstream(bad) << R"({"kernel":"k","nets":[{"tap":"t","vhost":"on"}]})";
  EXPECT_THROW(parse({"--config", bad}), ConfigError);  // a boolean in JSON
}

TEST(CommandLine, NetIsRepeatableAndRoundTripsThroughJson) {
  auto c = parse({"--kernel", "k", "--net", "tap=tap0", "--net", "tap=tap1,mac=52:54:00:00:00:02"});
  ASSERT_TRUE(c);
  ASSERT_EQ(c->nets.size(), 2u);
  EXPECT_EQ(c->nets[0].tap, "tap0");
  EXPECT_EQ(c->nets[1].mac, "52:54:00:00:00:02");
  EXPECT_THROW(parse({"--kernel", "k", "--net", "tap=t0", "--net", "tap=t0"}), ConfigError);
  EXPECT_THROW(parse({"--kernel", "k", "--net", "tap=t0,mac=52:54:00:00:00:02", "--net",
                      "tap=t1,mac=52:54:00:00:00:02"}),
               ConfigError);

  nlohmann::json j = *c;
  std::string path = ::testing::TempDir() + "/net.json";
  std::ofstream(path) << j.dump(2);
  auto loaded = parse({"--config", path});
  ASSERT_TRUE(loaded);
  ASSERT_EQ(loaded->nets.size(), 2u);
  EXPECT_EQ(loaded->nets[0].tap, "tap0");
  EXPECT_EQ(loaded->nets[0].mac, "");
  EXPECT_EQ(loaded->nets[1].mac, "52:54:00:00:00:02");
  // Flags replace the document's list.
  auto overridden = parse({"--config", path, "--net", "tap=tap9"});
  ASSERT_TRUE(overridden);
  ASSERT_EQ(overridden->nets.size(), 1u);
  EXPECT_EQ(overridden->nets[0].tap, "tap9");

  auto write = [](const std::string& text) {
    std::string p = ::testing::TempDir() + "/badnet.json";
    std::ofstream(p) << text;
    return p;
  };
  EXPECT_THROW(parse({"--config", write(R"({"kernel":"k","nets":{"tap":"t"}})")}), ConfigError);
  EXPECT_THROW(parse({"--config", write(R"({"kernel":"k","nets":[{"tap":"t","vlan":3}]})")}),
               ConfigError);
  EXPECT_THROW(parse({"--config", write(R"({"kernel":"k","nets":[{"mac":"52:54:00:00:00:01"}]})")}),
               ConfigError);
  EXPECT_THROW(parse({"--config",
                      write(R"({"kernel":"k","nets":[{"tap":"t","mac":"01:00:00:00:00:01"}]})")}),
               ConfigError);
}

}  // namespace
}  // namespace kiln::vmm
