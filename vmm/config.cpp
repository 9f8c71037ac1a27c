#include "vmm/config.h"

#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cctype>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

namespace kiln::vmm {
namespace {

constexpr const char* kVersion = "kiln 0.1.0";
constexpr uint32_t kMaxCmdline = 64 * 1024;

// Splits "a=1,b=2" into key/value pairs; a bare word is returned with an empty key.
std::vector<std::pair<std::string, std::string>> split_options(const std::string& text) {
  std::vector<std::pair<std::string, std::string>> out;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    auto eq = item.find('=');
    if (eq == std::string::npos)
      out.emplace_back("", item);
    else
      out.emplace_back(item.substr(0, eq), item.substr(eq + 1));
  }
  return out;
}

bool parse_on_off(const std::string& key, const std::string& value) {
  if (value == "on" || value == "true" || value == "yes") return true;
  if (value == "off" || value == "false" || value == "no") return false;
  throw ConfigError(fmt::format("{}: expected on or off, got '{}'", key, value));
}

template <class T>
T get_field(const nlohmann::json& j, const char* key) {
  try {
    return j.at(key).get<T>();
  } catch (const nlohmann::json::exception&) {
    throw ConfigError(fmt::format("config: '{}' has the wrong type", key));
  }
}

void check_known_keys(const nlohmann::json& j, const std::set<std::string>& known,
                      const std::string& where) {
  for (auto it = j.begin(); it != j.end(); ++it)
    if (!known.count(it.key()))
      throw ConfigError(fmt::format("config: unknown key '{}' in {}", it.key(), where));
}

std::string serial_to_string(const SerialConfig& s) {
  switch (s.mode) {
    case SerialConfig::Mode::kStdio:
      return "stdio";
    case SerialConfig::Mode::kPty:
      return "pty";
    case SerialConfig::Mode::kFile:
      return "file:" + s.path;
    case SerialConfig::Mode::kSocket:
      return "socket:" + s.path;
    case SerialConfig::Mode::kOff:
      return "off";
  }
  return "off";
}

}  // namespace

uint64_t parse_memory_size(const std::string& text) {
  size_t used = 0;
  unsigned long long number = 0;
  try {
    number = std::stoull(text, &used);
  } catch (const std::exception&) {
    throw ConfigError(fmt::format("invalid memory size '{}' (use e.g. 512M or 2G)", text));
  }
  std::string suffix = text.substr(used);
  uint64_t shift = 20;  // a bare number is MiB, as QEMU's -m
  if (suffix == "K" || suffix == "k")
    shift = 10;
  else if (suffix == "M" || suffix == "m" || suffix.empty())
    shift = 20;
  else if (suffix == "G" || suffix == "g")
    shift = 30;
  else if (suffix == "T" || suffix == "t")
    shift = 40;
  else
    throw ConfigError(fmt::format("invalid memory size '{}' (use e.g. 512M or 2G)", text));
  if (number == 0 || number > (UINT64_MAX >> shift))
    throw ConfigError(fmt::format("invalid memory size '{}'", text));
  return uint64_t(number) << shift;
}

SerialConfig parse_serial(const std::string& text) {
  SerialConfig s;
  if (text == "stdio")
    s.mode = SerialConfig::Mode::kStdio;
  else if (text == "pty")
    s.mode = SerialConfig::Mode::kPty;
  else if (text == "off" || text == "none")
    s.mode = SerialConfig::Mode::kOff;
  else if (text.starts_with("file:") && text.size() > 5)
    s = {SerialConfig::Mode::kFile, text.substr(5)};
  else if (text.starts_with("socket:") && text.size() > 7)
    s = {SerialConfig::Mode::kSocket, text.substr(7)};
  else
    throw ConfigError(
        fmt::format("invalid --serial '{}' (stdio|pty|file:PATH|socket:PATH|off)", text));
  return s;
}

SerialConfig parse_console(const std::string& text) {
  if (text.empty()) return {SerialConfig::Mode::kPty, ""};
  try {
    return parse_serial(text);
  } catch (const ConfigError&) {
    throw ConfigError(
        fmt::format("invalid --console '{}' (stdio|pty|file:PATH|socket:PATH|off)", text));
  }
}

void parse_balloon(const std::string& text, VmConfig& config) {
  config.balloon = true;
  for (const auto& [key, value] : split_options(text)) {
    if (key.empty() && value.empty()) continue;
    if (key != "deflate-on-oom")
      throw ConfigError(fmt::format("--balloon: unknown option '{}' (deflate-on-oom=on|off)",
                                    key.empty() ? value : key));
    config.balloon_deflate_on_oom = parse_on_off("--balloon deflate-on-oom", value);
  }
}

uint64_t parse_vsock(const std::string& text) {
  std::optional<uint64_t> cid;
  for (const auto& [key, value] : split_options(text)) {
    if (key != "cid")
      throw ConfigError(
          fmt::format("--vsock: unknown option '{}' (cid=N)", key.empty() ? value : key));
    size_t used = 0;
    try {
      cid = std::stoull(value, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != value.size() || !std::isdigit(uint8_t(value[0])))
      throw ConfigError(fmt::format("--vsock: cid '{}' is not a number", value));
  }
  if (!cid) throw ConfigError("--vsock needs cid=N");
  // 0-2 are the hypervisor, local and host CIDs; 0xFFFFFFFF is VMADDR_CID_ANY.
  if (*cid < 3 || *cid >= 0xFFFF'FFFFull)
    throw ConfigError(fmt::format("--vsock: cid {} is out of range (3 to 4294967294)", *cid));
  return *cid;
}

DiskConfig parse_disk(const std::string& text) {
  DiskConfig disk;
  for (const auto& [key, value] : split_options(text)) {
    if (key == "path" || (key.empty() && disk.path.empty()))
      disk.path = value;
    else if (key == "format")
      disk.format = value;
    else if (key == "readonly")
      disk.read_only = parse_on_off("readonly", value);
    else if (key == "cache")
      disk.cache = value;
    else if (key == "serial")
      disk.serial = value;
    else
      throw ConfigError(fmt::format("--disk: unknown option '{}'", key.empty() ? value : key));
  }
  if (disk.path.empty()) throw ConfigError("--disk needs path=FILE");
  if (disk.format != "raw" && disk.format != "qcow2")
    throw ConfigError(fmt::format("--disk: unknown format '{}' (raw|qcow2)", disk.format));
  if (disk.cache != "writeback" && disk.cache != "none")
    throw ConfigError(fmt::format("--disk: unknown cache mode '{}' (writeback|none)", disk.cache));
  if (disk.serial.size() > 20) throw ConfigError("--disk: serial is longer than 20 characters");
  return disk;
}

NetConfig parse_net(const std::string& text) {
  NetConfig net;
  for (const auto& [key, value] : split_options(text)) {
    if (key == "tap" || (key.empty() && net.tap.empty()))
      net.tap = value;
    else if (key == "mac")
      net.mac = value;
    else if (key == "vhost" && (value == "on" || value == "off"))
      net.vhost = value == "on";
    else if (key == "vhost")
      throw ConfigError(fmt::format("--net: vhost must be on or off, not '{}'", value));
    else
      throw ConfigError(fmt::format("--net: unknown option '{}'", key.empty() ? value : key));
  }
  // IFNAMSIZ is 16 with the terminating NUL; '/' and whitespace are not valid in names.
  if (net.tap.empty()) throw ConfigError("--net needs tap=NAME");
  if (net.tap.size() > 15 || net.tap.find_first_of("/ \t\n:") != std::string::npos)
    throw ConfigError(fmt::format("--net: '{}' is not a valid interface name", net.tap));
  if (!net.mac.empty()) {
    std::string mac;
    bool ok = net.mac.size() == 17;
    for (size_t i = 0; ok && i < net.mac.size(); ++i) {
      char c = char(std::tolower(static_cast<unsigned char>(net.mac[i])));
      ok = i % 3 == 2 ? c == ':' : std::isxdigit(static_cast<unsigned char>(c)) != 0;
      mac += c;
    }
    if (!ok)
      throw ConfigError(
          fmt::format("--net: malformed MAC address '{}' (want e.g. 52:54:00:12:34:56)", net.mac));
    if (std::stoi(mac.substr(0, 2), nullptr, 16) & 1)
      throw ConfigError(fmt::format("--net: MAC address {} is multicast", mac));
    if (mac == "00:00:00:00:00:00") throw ConfigError("--net: MAC address must not be all zeros");
    net.mac = mac;
  }
  return net;
}

void VmConfig::validate() const {
  if (kernel.empty()) throw ConfigError("no kernel given (--kernel FILE)");
  if (cpus == 0 || cpus > 254)
    throw ConfigError(fmt::format("--cpus {} is out of range (1-254)", cpus));
  if (memory_bytes < (16ull << 20)) throw ConfigError("--memory must be at least 16M");
  if (cmdline.size() >= kMaxCmdline) throw ConfigError("--cmdline is too long");
  if (name.empty() || name.size() > 64) throw ConfigError("--name must be 1 to 64 characters");
  if (serial.mode == SerialConfig::Mode::kStdio && console.mode == SerialConfig::Mode::kStdio)
    throw ConfigError("--serial and --console cannot both use stdio");
  if (serial.mode == SerialConfig::Mode::kSocket && console.mode == SerialConfig::Mode::kSocket &&
      serial.path == console.path)
    throw ConfigError("--serial and --console cannot share a socket path");
  for (size_t i = 0; i < nets.size(); ++i)
    for (size_t j = 0; j < i; ++j) {
      if (nets[i].tap == nets[j].tap)
        throw ConfigError(fmt::format("--net: tap {} is given twice", nets[i].tap));
      if (!nets[i].mac.empty() && nets[i].mac == nets[j].mac)
        throw ConfigError(fmt::format("--net: MAC address {} is given twice", nets[i].mac));
    }
}

void to_json(nlohmann::json& j, const VmConfig& c) {
  j = {{"name", c.name},
       {"kernel", c.kernel},
       {"initramfs", c.initramfs},
       {"kernel_cache", c.kernel_cache},
       {"cmdline", c.cmdline},
       {"cpus", c.cpus},
       {"memory", fmt::format("{}M", c.memory_bytes >> 20)},
       {"serial", serial_to_string(c.serial)},
       {"hugepages", c.hugepages},
       {"prealloc", c.prealloc},
       {"no_reboot", c.no_reboot},
       {"rng", c.rng},
       {"console", serial_to_string(c.console)},
       {"balloon", c.balloon && c.balloon_deflate_on_oom ? nlohmann::json{{"deflate_on_oom", true}}
                                                         : nlohmann::json(c.balloon)},
       {"vsock", c.vsock_cid ? nlohmann::json{{"cid", *c.vsock_cid}} : nlohmann::json()},
       {"qmp", c.qmp}};

  j["disks"] = nlohmann::json::array();
  for (const DiskConfig& d : c.disks)
    j["disks"].push_back({{"path", d.path},
                          {"format", d.format},
                          {"readonly", d.read_only},
                          {"cache", d.cache},
                          {"serial", d.serial}});
  j["nets"] = nlohmann::json::array();
  for (const NetConfig& n : c.nets) {
    nlohmann::json net = {{"tap", n.tap}};
    if (!n.mac.empty()) net["mac"] = n.mac;
    if (n.vhost) net["vhost"] = *n.vhost;
    j["nets"].push_back(net);
  }
}

void from_json(const nlohmann::json& j, VmConfig& c) {
  if (!j.is_object()) throw ConfigError("config: the document must be a JSON object");
  check_known_keys(j,
                   {"name", "kernel", "kernel_cache", "initramfs", "cmdline", "cpus", "memory",
                    "serial", "hugepages", "prealloc", "no_reboot", "disks", "nets", "rng", "qmp",
                    "console", "balloon", "vsock"},
                   "the VM");
  if (j.contains("name")) c.name = get_field<std::string>(j, "name");
  if (j.contains("kernel")) c.kernel = get_field<std::string>(j, "kernel");
  if (j.contains("initramfs")) c.initramfs = get_field<std::string>(j, "initramfs");
  if (j.contains("kernel_cache")) c.kernel_cache = get_field<std::string>(j, "kernel_cache");
  if (j.contains("cmdline")) c.cmdline = get_field<std::string>(j, "cmdline");
  if (j.contains("cpus")) c.cpus = get_field<uint32_t>(j, "cpus");
  if (j.contains("memory")) {
    const auto& m = j.at("memory");
    if (m.is_string())
      c.memory_bytes = parse_memory_size(m.get<std::string>());
    else if (m.is_number_unsigned())
      c.memory_bytes = parse_memory_size(std::to_string(m.get<uint64_t>()));
    else
      throw ConfigError("config: 'memory' must be a size string or a number of MiB");
  }
  if (j.contains("serial")) c.serial = parse_serial(get_field<std::string>(j, "serial"));
  if (j.contains("hugepages")) c.hugepages = get_field<bool>(j, "hugepages");
  if (j.contains("prealloc")) c.prealloc = get_field<bool>(j, "prealloc");
  if (j.contains("no_reboot")) c.no_reboot = get_field<bool>(j, "no_reboot");
  if (j.contains("rng")) c.rng = get_field<bool>(j, "rng");
  if (j.contains("qmp")) c.qmp = get_field<std::string>(j, "qmp");
  if (j.contains("console")) c.console = parse_console(get_field<std::string>(j, "console"));
  if (j.contains("balloon")) {
    // true, or an object with the options: {"deflate_on_oom": true}
    const auto& b = j.at("balloon");
    if (b.is_object()) {
      check_known_keys(b, {"deflate_on_oom"}, "balloon");
      c.balloon = true;
      if (b.contains("deflate_on_oom"))
        c.balloon_deflate_on_oom = get_field<bool>(b, "deflate_on_oom");
    } else {
      c.balloon = get_field<bool>(j, "balloon");
    }
  }
  if (j.contains("vsock")) {
    const auto& v = j.at("vsock");
    if (v.is_null()) {
      c.vsock_cid.reset();
    } else {
      if (!v.is_object()) throw ConfigError("config: 'vsock' must be an object like {\"cid\": 3}");
      check_known_keys(v, {"cid"}, "vsock");
      if (!v.contains("cid") || !v.at("cid").is_number_unsigned())
        throw ConfigError("config: vsock 'cid' must be a number");
      c.vsock_cid = parse_vsock(fmt::format("cid={}", v.at("cid").get<uint64_t>()));
    }
  }
  if (j.contains("disks")) {
    if (!j.at("disks").is_array()) throw ConfigError("config: 'disks' must be an array");
    c.disks.clear();
    for (const auto& d : j.at("disks")) {
      if (!d.is_object()) throw ConfigError("config: each disk must be an object");
      check_known_keys(d, {"path", "format", "readonly", "cache", "serial"}, "a disk");
      std::string text = "path=" + get_field<std::string>(d, "path");
      if (d.contains("format")) text += ",format=" + get_field<std::string>(d, "format");
      if (d.contains("readonly"))
        text += get_field<bool>(d, "readonly") ? ",readonly=on" : ",readonly=off";
      if (d.contains("cache")) text += ",cache=" + get_field<std::string>(d, "cache");
      DiskConfig disk = parse_disk(text);
      if (d.contains("serial")) disk.serial = get_field<std::string>(d, "serial");
      c.disks.push_back(disk);
    }
  }
  if (j.contains("nets")) {
    if (!j.at("nets").is_array()) throw ConfigError("config: 'nets' must be an array");
    c.nets.clear();
    for (const auto& n : j.at("nets")) {
      if (!n.is_object()) throw ConfigError("config: each net must be an object");
      check_known_keys(n, {"tap", "mac", "vhost"}, "a net");
      std::string text = "tap=" + get_field<std::string>(n, "tap");
      if (n.contains("mac")) text += ",mac=" + get_field<std::string>(n, "mac");
      if (n.contains("vhost")) text += get_field<bool>(n, "vhost") ? ",vhost=on" : ",vhost=off";
      c.nets.push_back(parse_net(text));
    }
  }
}

VmConfig load_config_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw ConfigError(fmt::format("cannot read config file '{}'", path));
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {  // parse_error, or out_of_range for 1e999
    throw ConfigError(fmt::format("config file '{}' is not valid JSON: {}", path, e.what()));
  }
  VmConfig config;
  from_json(j, config);
  return config;
}

std::optional<VmConfig> parse_command_line(int argc, char** argv) {
  CLI::App app{"kiln: a virtual machine monitor on Linux KVM", "kiln"};
  app.set_version_flag("--version", kVersion);
  std::string config_path, memory, serial, cmdline, console, vsock;
  std::vector<std::string> disks;
  VmConfig c;
  app.add_option("--config", config_path, "VM config document (JSON); flags override it");
  auto* kernel = app.add_option("--kernel", c.kernel, "Linux kernel (bzImage)");
  auto* initramfs = app.add_option("--initramfs", c.initramfs, "initramfs image");
  auto* kcache =
      app.add_option("--kernel-cache", c.kernel_cache,
                     "keep the bzImage's unpacked vmlinux in DIR and boot that (no KASLR)");
  auto* cmd = app.add_option("--cmdline", cmdline, "kernel command line");
  auto* cpus = app.add_option("--cpus", c.cpus, "number of vCPUs");
  auto* mem = app.add_option("--memory", memory, "guest RAM, e.g. 512M, 3G");
  auto* ser = app.add_option("--serial", serial, "stdio|pty|file:PATH|socket:PATH|off");
  auto* name = app.add_option("--name", c.name, "VM name (process title)");
  auto* huge = app.add_flag("--hugepages", c.hugepages, "back RAM with 2 MiB hugepages");
  auto* pre = app.add_flag("--prealloc", c.prealloc, "allocate all RAM up front");
  auto* noreboot = app.add_flag("--no-reboot", c.no_reboot, "exit instead of rebooting");
  auto* disk = app.add_option(
      "--disk", disks, "path=F[,format=raw|qcow2][,readonly=on][,cache=none|writeback][,serial=S]");
  std::vector<std::string> nets;
  auto* net = app.add_option("--net", nets,
                             "tap=NAME[,mac=52:54:00:xx:xx:xx][,vhost=on|off] (virtio-net; vhost: "
                             "the data path in the kernel's vhost-net, used by default where "
                             "/dev/vhost-net opens)");
  auto* rng = app.add_flag("--rng", c.rng, "virtio-rng device");
  auto* con = app.add_option("--console", console,
                             "virtio console (hvc0): pty (bare flag)|stdio|file:PATH|socket:PATH")
                  ->expected(0, 1);
  std::string balloon_text;
  auto* balloon = app.add_option("--balloon", balloon_text,
                                 "virtio-balloon device (QMP balloon) [deflate-on-oom=on]")
                      ->expected(0, 1);
  auto* vsk = app.add_option("--vsock", vsock, "virtio-vsock over vhost-vsock: cid=N");
  auto* qmp = app.add_option("--qmp", c.qmp, "QMP socket: unix:PATH[,server]");
  auto* qmpfd = app.add_option("--qmp-fd", c.qmp_fd, "QMP on an inherited socket fd");
  auto* kvmdev = app.add_option("--kvm-device", c.kvm_device, "KVM device node (default /dev/kvm)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    app.exit(e);
    return std::nullopt;
  } catch (const CLI::CallForVersion& e) {
    app.exit(e);
    return std::nullopt;
  } catch (const CLI::ParseError& e) {
    throw ConfigError(e.what());
  }
  VmConfig result = config_path.empty() ? VmConfig{} : load_config_file(config_path);
  // Flags given on the command line override the document.
  if (kernel->count()) result.kernel = c.kernel;
  if (initramfs->count()) result.initramfs = c.initramfs;
  if (kcache->count()) result.kernel_cache = c.kernel_cache;
  if (cmd->count()) result.cmdline = cmdline;
  if (cpus->count()) result.cpus = c.cpus;
  if (mem->count()) result.memory_bytes = parse_memory_size(memory);
  if (ser->count()) result.serial = parse_serial(serial);
  if (name->count()) result.name = c.name;
  if (huge->count()) result.hugepages = true;
  if (pre->count()) result.prealloc = true;
  if (noreboot->count()) result.no_reboot = true;
  if (rng->count()) result.rng = true;
  if (con->count()) result.console = parse_console(console);
  if (balloon->count()) parse_balloon(balloon_text, result);
  if (vsk->count()) result.vsock_cid = parse_vsock(vsock);
  if (qmp->count()) result.qmp = c.qmp;
  if (qmpfd->count()) result.qmp_fd = c.qmp_fd;
  if (kvmdev->count()) result.kvm_device = c.kvm_device;
  if (disk->count()) {
    result.disks.clear();
    for (const auto& d : disks) result.disks.push_back(parse_disk(d));
  }
  if (net->count()) {
    result.nets.clear();
    for (const auto& n : nets) result.nets.push_back(parse_net(n));
  }
  result.validate();
  return result;
}

}  // namespace kiln::vmm
