// One schema for a VM: what the command line, `--config vm.json` and (later) the API and snapshots
// all produce and consume. Parsing lives here; building a machine from it lives in machine.h.
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace kiln::vmm {

// A user's mistake in flags or in a config document: reported in one line, exit code 2.
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct SerialConfig {
  enum class Mode { kStdio, kPty, kFile, kSocket, kOff };
  Mode mode = Mode::kStdio;
  std::string path;  // kFile / kSocket
};

struct DiskConfig {
  std::string path;
  std::string format = "raw";  // raw | qcow2
  bool read_only = false;
  std::string cache = "writeback";  // writeback | none
  std::string serial;
};

// Whether virtio-net uses vhost-net when the config does not say.
inline constexpr bool kNetVhostByDefault = true;

struct NetConfig {
  std::string tap;  // host tap interface name
  std::string mac;  // "52:54:00:12:34:56" (lowercase); empty: derived from the tap name
  // The data path in the host kernel (vhost-net) rather than in kiln. nullopt: the default
  // (kNetVhostByDefault), falling back to userspace when the host has no /dev/vhost-net.
  std::optional<bool> vhost;
};

struct VmConfig {
  std::string name = "kiln";
  std::string kernel;
  std::string initramfs;
  std::string kernel_cache;  // --kernel-cache DIR: boot the bzImage's vmlinux, kept in DIR
  std::string cmdline = "console=ttyS0";
  uint32_t cpus = 1;
  uint64_t memory_bytes = 512ull << 20;
  SerialConfig serial;
  bool hugepages = false;
  bool prealloc = false;
  bool no_reboot = false;
  std::vector<DiskConfig> disks;
  std::vector<NetConfig> nets;
  bool rng = false;
  // virtio-console (hvc0) host end; kOff: no device. Same backends as the serial port.
  SerialConfig console{SerialConfig::Mode::kOff, ""};
  bool balloon = false;
  bool balloon_deflate_on_oom = false;  // --balloon deflate-on-oom=on
  std::optional<uint64_t> vsock_cid;    // virtio-vsock through the host's vhost-vsock
  std::string kvm_device = "/dev/kvm";
  std::string qmp;  // "unix:PATH[,server]"
  int qmp_fd = -1;

  // Checks what can be checked without touching the host (files are checked when opened).
  void validate() const;
};

// "512M", "3G", "1024" (MiB, as QEMU's -m), "1T": bytes. Throws ConfigError.
uint64_t parse_memory_size(const std::string& text);
SerialConfig parse_serial(const std::string& text);
// As parse_serial, for --console; an empty text (bare --console) is a pty.
SerialConfig parse_console(const std::string& text);
// Options of --balloon ("" or "deflate-on-oom=on|off") into `config`.
void parse_balloon(const std::string& text, VmConfig& config);
// "cid=N" (3 <= N < 2^32 - 1): the guest's vsock context ID.
uint64_t parse_vsock(const std::string& text);
// "path=F[,format=raw|qcow2][,readonly=on][,cache=none|writeback][,serial=S]"
DiskConfig parse_disk(const std::string& text);

// "tap=NAME[,mac=52:54:00:12:34:56][,vhost=on|off]"
NetConfig parse_net(const std::string& text);

void to_json(nlohmann::json& j, const VmConfig& config);
void from_json(const nlohmann::json& j, VmConfig& config);
VmConfig load_config_file(const std::string& path);

// Parses kiln's command line into a config. Throws ConfigError for any mistake; returns nullopt
// when it printed help or the version and the program should exit 0.
std::optional<VmConfig> parse_command_line(int argc, char** argv);

}  // namespace kiln::vmm
