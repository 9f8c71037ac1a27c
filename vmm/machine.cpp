#include "vmm/machine.h"

#include <fmt/format.h>
#include <pthread.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <chrono>
#include <fstream>

#include "arch/x86/acpi/acpi.h"
#include "arch/x86/boot.h"
#include "arch/x86/cpuid.h"
#include "base/event_loop.h"
#include "base/unique_fd.h"
#include "block/qcow2/qcow2_device.h"
#include "block/raw/raw.h"
#include "devices/bus.h"
#include "devices/legacy/acpi_pm.h"
#include "devices/legacy/debug_exit.h"
#include "devices/legacy/i8042.h"
#include "devices/legacy/rtc.h"
#include "devices/legacy/serial.h"
#include "devices/legacy/sink.h"
#include "devices/pci/pci_root.h"
#include "devices/virtio/virtio_balloon.h"
#include "devices/virtio/virtio_blk.h"
#include "devices/virtio/virtio_console.h"
#include "devices/virtio/virtio_net.h"
#include "devices/virtio/virtio_pci.h"
#include "devices/virtio/virtio_rng.h"
#include "devices/virtio/virtio_vsock.h"
#include "hv/kvm.h"
#include "hv/vhost.h"
#include "memory/guest_memory.h"
#include "vmm/kernel_cache.h"

namespace kiln::vmm {
namespace {

// KVM needs three pages for the TSS and one for the identity map of real mode under EPT/NPT;
// they sit at the top of the 32-bit hole, below the BIOS area, where nothing else lives.
constexpr uint64_t kTssAddress = 0xfffb'd000;
constexpr uint64_t kIdentityMapAddress = 0xfffb'c000;
constexpr uint32_t kSerialIrq = 4;
constexpr uint32_t kSciIrq = 9;
// The signal that kicks a vCPU thread out of KVM_RUN; its handler does nothing.
const int kKickSignal = SIGUSR1;

// An ISA interrupt line into KVM's in-kernel PIC and IOAPIC.
class KvmIrqLine : public devices::IrqLine {
 public:
  KvmIrqLine(hv::Vm& vm, uint32_t gsi) : vm_(vm), gsi_(gsi) {}
  void set_level(bool asserted) override { vm_.set_irq_line(gsi_, asserted); }

 private:
  hv::Vm& vm_;
  uint32_t gsi_;
};

// One MSI-X vector: a GSI routed to the address/data the guest programmed, and an irqfd on it,
// so a device thread (or vhost in the kernel) raises the interrupt with one eventfd write and no
// trip through kiln. While the guest masks the vector the irqfd is detached: signals then stay
// in the eventfd's counter, and attaching it again on unmask makes KVM deliver them (KVM_IRQFD
// injects at once when the eventfd is already signalled). The route is only rewritten on
// unmask, so a guest rewriting a masked entry field by field never has half of it live.
class KvmMsiVector : public devices::MsiVector {
 public:
  explicit KvmMsiVector(hv::Vm& vm) : vm_(vm), gsi_(vm.allocate_gsi()) {
    fd_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!fd_) throw std::system_error(errno, std::generic_category(), "eventfd for an MSI vector");
  }
  ~KvmMsiVector() override {
    try {
      if (attached_) vm_.remove_irqfd(fd_.get(), gsi_);
      if (routed_) vm_.remove_msi_route(gsi_);
    } catch (const std::exception& e) {
      spdlog::warn("releasing MSI vector (gsi {}): {}", gsi_, e.what());
    }
  }
  void configure(uint64_t address, uint32_t data, bool masked) override {
    if (masked) {
      if (attached_) vm_.remove_irqfd(fd_.get(), gsi_);
      attached_ = false;
      return;
    }
    if (!routed_ || address != address_ || data != data_) {
      vm_.set_msi_route(gsi_, address, data);  // rebuilds KVM's whole table: only on change
      routed_ = true;
      address_ = address;
      data_ = data;
    }
    if (!attached_) vm_.add_irqfd(fd_.get(), gsi_);
    attached_ = true;
  }
  void trigger() override {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(fd_.get(), &one, sizeof(one));
  }
  int eventfd() const override { return fd_.get(); }
  bool take_pending() override {
    uint64_t count = 0;
    return !attached_ && ::read(fd_.get(), &count, sizeof(count)) == ssize_t(sizeof(count));
  }

 private:
  hv::Vm& vm_;
  uint32_t gsi_;
  UniqueFd fd_;
  // Guarded by the MSI-X model's lock, which every configure()/take_pending() runs under.
  bool attached_ = false;
  bool routed_ = false;
  uint64_t address_ = 0;
  uint32_t data_ = 0;
};

class KvmMsiAllocator : public devices::MsiAllocator {
 public:
  explicit KvmMsiAllocator(hv::Vm& vm) : vm_(vm) {}
  std::unique_ptr<devices::MsiVector> allocate() override {
    return std::make_unique<KvmMsiVector>(vm_);
  }

 private:
  hv::Vm& vm_;
};

// Queue notifications as KVM ioeventfds: the guest's write to a notify address signals the
// queue's eventfd in the kernel, and the device thread wakes without a vCPU exit.
class KvmNotifyRegistrar : public devices::virtio::NotifyRegistrar {
 public:
  explicit KvmNotifyRegistrar(hv::Vm& vm) : vm_(vm) {}
  void add(uint64_t gpa, uint32_t len, int eventfd) override {
    vm_.add_ioeventfd(eventfd, gpa, len, false);
  }
  void remove(uint64_t gpa, uint32_t len, int eventfd) override {
    vm_.remove_ioeventfd(eventfd, gpa, len, false);
  }

 private:
  hv::Vm& vm_;
};

// virtio-vsock's rx and tx queues run in the host kernel's vhost-vsock.
// What every vhost device needs before it runs, vsock and net alike: the negotiated features,
// where guest memory is, and each ring's size, position, addresses and eventfds.
void program_vhost(hv::VhostDevice& vhost, uint64_t features, const memory::GuestMemory& memory,
                   std::span<const devices::virtio::KernelRing> rings) {
  vhost.set_features(features);
  std::vector<hv::VhostMemoryRegion> regions;
  for (const memory::Region& r : memory.regions())
    regions.push_back({r.gpa, r.size, reinterpret_cast<uint64_t>(r.host)});
  vhost.set_memory_table(regions);
  for (const auto& ring : rings) {
    vhost.set_vring_num(ring.index, ring.size);
    vhost.set_vring_base(ring.index, ring.next_avail);
    vhost.set_vring_addresses(ring.index, {ring.desc_host, ring.avail_host, ring.used_host});
    vhost.set_vring_kick(ring.index, ring.kick_fd);
    vhost.set_vring_call(ring.index, ring.call_fd);
  }
}

class VhostVsockBackend : public devices::virtio::VsockBackend {
 public:
  explicit VhostVsockBackend(uint64_t cid) {
    vhost_.set_guest_cid(cid);
    features_ = vhost_.features();
  }
  uint64_t features() const override { return features_; }
  void start(const devices::virtio::VsockStart& start) override {
    program_vhost(vhost_, start.features & features_, *start.memory, start.rings);
    vhost_.set_running(true);
  }
  std::vector<uint16_t> stop() override {
    vhost_.set_running(false);
    std::vector<uint16_t> next_avail;  // getting a ring's base also stops it
    for (uint32_t index : {devices::virtio::kVsockRxQueue, devices::virtio::kVsockTxQueue})
      next_avail.push_back(uint16_t(vhost_.get_vring_base(index)));
    return next_avail;
  }

 private:
  hv::VhostVsock vhost_;
  uint64_t features_ = 0;
};

// virtio-net's receive and transmit rings run in the host kernel's vhost-net, on the tap.
class VhostNetDatapath : public devices::virtio::NetKernelDatapath {
 public:
  VhostNetDatapath() : features_(vhost_.features()) {}
  uint64_t features() const override { return features_; }
  void start(const devices::virtio::NetKernelStart& start) override {
    program_vhost(vhost_, start.features & features_, *start.memory, start.rings);
    rings_.clear();
    for (const auto& ring : start.rings) rings_.push_back(ring.index);
    // The tap last: from here on the kernel moves frames.
    for (uint16_t index : rings_) vhost_.set_backend(index, start.tap_fd);
  }
  std::vector<uint16_t> stop() override {
    for (uint16_t index : rings_) vhost_.set_backend(index, -1);
    std::vector<uint16_t> next_avail;
    for (uint16_t index : rings_) next_avail.push_back(uint16_t(vhost_.get_vring_base(index)));
    rings_.clear();
    return next_avail;
  }

 private:
  hv::VhostNet vhost_;
  uint64_t features_ = 0;
  std::vector<uint16_t> rings_;
};

// vhost=on must work; by default vhost-net is used when the host has it.
std::unique_ptr<devices::virtio::NetKernelDatapath> open_vhost_net(const NetConfig& net) {
  if (!net.vhost.value_or(kNetVhostByDefault)) return nullptr;
  try {
    auto datapath = std::make_unique<VhostNetDatapath>();
    if (!(datapath->features() & devices::virtio::kFeatureVersion1))
      throw std::runtime_error("this kernel's vhost-net lacks VIRTIO_F_VERSION_1");
    return datapath;
  } catch (const std::exception& e) {
    std::string why = e.what();
    if (const auto* error = dynamic_cast<const std::system_error*>(&e);
        error && error->code().value() == ENOENT)
      why =
          fmt::format("{} does not exist (load the vhost_net module)", hv::VhostNet::kDefaultPath);
    if (net.vhost) throw ConfigError(fmt::format("--net tap={},vhost=on: {}", net.tap, why));
    spdlog::info("virtio-net on tap {}: vhost-net unavailable ({}); using the userspace data path",
                 net.tap, why);
    return nullptr;
  }
}

std::unique_ptr<VhostVsockBackend> open_vhost_vsock(uint64_t cid) {
  try {
    return std::make_unique<VhostVsockBackend>(cid);
  } catch (const std::system_error& e) {
    if (e.code().value() == EADDRINUSE)
      throw ConfigError(
          fmt::format("--vsock cid={}: the CID is already in use by another VM", cid));
    if (e.code().value() == ENOENT)
      throw ConfigError(fmt::format("--vsock: {} does not exist (load the vhost_vsock module)",
                                    hv::VhostVsock::kDefaultPath));
    throw ConfigError(fmt::format("--vsock cid={}: {}", cid, e.what()));
  }
}

std::shared_ptr<block::BlockDevice> open_disk(const DiskConfig& disk) {
  const auto cache = disk.cache == "none" ? block::CacheMode::kNone : block::CacheMode::kWriteback;
  try {
    if (disk.format == "qcow2") {
      block::qcow2::OpenOptions options;
      options.read_only = disk.read_only;
      options.cache = cache;
      options.format = "qcow2";
      return block::qcow2::open_qcow2_device(disk.path, options);
    }
    block::RawOptions options;
    options.read_only = disk.read_only;
    options.cache = cache;
    return block::open_raw(disk.path, options);
  } catch (const std::exception& e) {
    throw ConfigError(fmt::format("--disk {}: {}", disk.path, e.what()));
  }
}

void install_kick_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action {};
    action.sa_handler = [](int) {};
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0;  // no SA_RESTART: KVM_RUN must return EINTR
    sigaction(kKickSignal, &action, nullptr);
  });
}

uint64_t host_memory_limit() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  uint64_t value = 0, total = 0;
  std::string unit;
  while (meminfo >> key >> value >> unit)
    if (key == "MemTotal:" || key == "SwapTotal:") total += value * 1024;
  return total;
}

// Logs at debug level (KILN_LOG=debug) how long each step took: startup time is a product figure
// (bench/boot_bench.py), and this is how to see where it goes.
class StepTimer {
 public:
  void operator()(const char* step) {
    auto now = std::chrono::steady_clock::now();
    spdlog::debug("startup: {} took {} ms", step,
                  std::chrono::duration_cast<std::chrono::milliseconds>(now - mark_).count());
    mark_ = now;
  }

 private:
  std::chrono::steady_clock::time_point mark_ = std::chrono::steady_clock::now();
};

FileBytes map_file_or_config_error(const std::string& path, const char* what) {
  try {
    return x86::map_boot_file(path);
  } catch (const std::exception& e) {
    throw ConfigError(fmt::format("{}: {}", what, e.what()));
  }
}

// QMP names of the i-th disk, shared by query-block and query-blockstats.
std::string disk_device_name(size_t index) { return fmt::format("disk{}", index); }
std::string disk_qdev_path(size_t index) {
  return fmt::format("/machine/peripheral-anon/device[{}]/virtio-backend", index);
}

std::shared_ptr<devices::virtio::VirtioNet> open_net(const NetConfig& net, EventLoop& loop) {
  using namespace devices::virtio;
  std::unique_ptr<Tap> tap;
  try {
    tap = Tap::open(net.tap);
  } catch (const TapError& e) {
    throw ConfigError(fmt::format("--net tap={}: {}", net.tap, e.what()));
  }
  auto mac = net.mac.empty() ? default_mac(net.tap) : parse_mac(net.mac);
  if (!mac) throw ConfigError(fmt::format("--net: malformed MAC address '{}'", net.mac));
  auto kernel = open_vhost_net(net);
  spdlog::debug("virtio-net on tap {} with MAC {}, {} data path", net.tap, format_mac(*mac),
                kernel ? "vhost-net" : "userspace");
  return std::make_shared<VirtioNet>(std::move(tap), *mac, loop, std::move(kernel));
}

}  // namespace

struct Machine::Impl {
  const VmConfig& config;
  ConsoleIo console;
  hv::Kvm kvm;
  std::unique_ptr<hv::Vm> vm;
  std::optional<memory::GuestMemory> memory;
  devices::Bus pio;
  devices::Bus mmio;
  std::shared_ptr<devices::legacy::Serial> serial;
  std::shared_ptr<devices::legacy::AcpiPm> acpi_pm;
  // PCI and virtio. The event loop is declared before the devices so it outlives them.
  EventLoop device_loop;
  std::unique_ptr<KvmMsiAllocator> msi;
  std::unique_ptr<KvmNotifyRegistrar> notify;
  std::unique_ptr<devices::pci::BusBarMapper> bar_mapper;
  std::unique_ptr<devices::pci::PciRoot> pci;
  std::vector<std::shared_ptr<devices::virtio::VirtioPciDevice>> virtio_devices;
  struct AttachedDisk {
    DiskConfig config;
    std::shared_ptr<block::BlockDevice> backend;
    std::shared_ptr<devices::virtio::VirtioBlock> device;
  };
  std::vector<AttachedDisk> disks;
  std::shared_ptr<devices::virtio::VirtioConsole> virtio_console;
  std::shared_ptr<devices::virtio::VirtioBalloon> balloon;
  // Fires every guest-stats-polling-interval seconds on the device loop: ask for statistics.
  UniqueFd balloon_stats_timer;
  std::vector<std::unique_ptr<hv::Vcpu>> vcpus;
  std::vector<std::thread> threads;

  std::mutex mutex;
  std::condition_variable changed;
  std::optional<StopEvent> stop;
  bool paused = false;
  std::atomic<bool> stopping{false};
  std::atomic<int> paused_vcpus{0};
  std::vector<std::atomic<int>> thread_ids;
  uint64_t paused_clock = 0;

  Impl(const VmConfig& c, ConsoleIo io)
      : config(c), console(std::move(io)), kvm(hv::Kvm::open(c.kvm_device)) {}

  void build();
  void check_host_limits();
  void create_memory();
  void create_devices();
  void create_pci_devices();
  void add_virtio(std::shared_ptr<devices::virtio::VirtioDevice> model);
  void watch_balloon_stats_timer();
  x86::LoadedKernel load_kernel();
  void create_vcpus(const x86::LoadedKernel& kernel);
  void vcpu_loop(hv::Vcpu& vcpu);
  bool handle_exit(hv::Vcpu& vcpu, const hv::VcpuExit& exit);
  void dispatch_io(const devices::Bus& bus, const hv::VcpuExit& exit);
  void wait_while_paused();
  void post_stop(StopEvent event);
  void kick_all();
};

void Machine::Impl::check_host_limits() {
  kvm.require_capabilities();
  int max_vcpus = kvm.max_vcpus();
  if (max_vcpus > 0 && config.cpus > uint32_t(max_vcpus))
    throw ConfigError(
        fmt::format("--cpus {}: this host's KVM allows at most {} vCPUs", config.cpus, max_vcpus));
  uint64_t limit = host_memory_limit();
  if (limit && config.memory_bytes > limit)
    throw ConfigError(fmt::format("--memory {}M is more than this host has ({}M of RAM and swap)",
                                  config.memory_bytes >> 20, limit >> 20));
}

void Machine::Impl::create_memory() {
  memory::Options options{config.hugepages, config.prealloc};
  memory = memory::GuestMemory::create_ram(config.memory_bytes, options);
  uint32_t slot = 0;
  for (const memory::Region& region : memory->regions())
    vm->map_memory(slot++, region.gpa, region.size, region.host);
}

void Machine::Impl::create_devices() {
  using namespace devices::legacy;
  auto serial_irq = std::make_shared<KvmIrqLine>(*vm, kSerialIrq);
  serial = std::make_shared<Serial>(serial_irq, console.write);
  pio.insert(serial, Serial::kCom1Base, Serial::kLength);

  auto reset = [this] { post_stop({StopReason::kReset, 0, "guest reset"}); };
  auto i8042 = std::make_shared<I8042>(reset);
  I8042::insert(pio, i8042);
  pio.insert(std::make_shared<Rtc>(), Rtc::kBase, Rtc::kLength);
  pio.insert(std::make_shared<DebugExit>([this](uint8_t code) {
               post_stop({StopReason::kDebugExit, code, "guest wrote the debug-exit port"});
             }),
             DebugExit::kPort, DebugExit::kLength);
  AcpiPm::Callbacks power{[this] {
                            post_stop({StopReason::kPowerOff, 0, "guest powered off"});
                          },
                          reset};
  acpi_pm = std::make_shared<AcpiPm>(std::make_shared<KvmIrqLine>(*vm, kSciIrq), power);
  pio.insert(acpi_pm, AcpiPm::kBase, AcpiPm::kLength);
  insert_quiet_ports(pio);
}

void Machine::Impl::add_virtio(std::shared_ptr<devices::virtio::VirtioDevice> model) {
  auto device = std::make_shared<devices::virtio::VirtioPciDevice>(std::move(model), *memory, *msi,
                                                                   device_loop, notify.get());
  pci->add(device);
  virtio_devices.push_back(std::move(device));
}

void Machine::Impl::create_pci_devices() {
  using namespace devices;
  msi = std::make_unique<KvmMsiAllocator>(*vm);
  notify = std::make_unique<KvmNotifyRegistrar>(*vm);
  bar_mapper = std::make_unique<pci::BusBarMapper>(mmio, pio);
  pci = std::make_unique<pci::PciRoot>(*bar_mapper);
  pio.insert(std::make_shared<pci::PciConfigIo>(*pci), pci::kConfigIoBase, 8);
  mmio.insert(std::make_shared<pci::PciConfigMmio>(*pci), pci::kEcamBase, pci::kEcamSize);
  for (const DiskConfig& disk : config.disks) {
    auto backend = open_disk(disk);
    virtio::BlockConfig block;
    block.serial = disk.serial;
    block.read_only = disk.read_only;
    block.num_queues = uint16_t(config.cpus);  // one queue per vCPU
    auto device = std::make_shared<virtio::VirtioBlock>(backend, block);
    add_virtio(device);
    disks.push_back({disk, backend, device});
  }
  for (const NetConfig& net : config.nets) add_virtio(open_net(net, device_loop));
  if (config.rng) add_virtio(std::make_shared<virtio::VirtioRng>());
  if (config.console.mode != SerialConfig::Mode::kOff) {
    virtio_console = std::make_shared<virtio::VirtioConsole>(console.virtio_write);
    add_virtio(virtio_console);
  }
  if (config.balloon) {
    balloon =
        std::make_shared<virtio::VirtioBalloon>(config.memory_bytes, config.balloon_deflate_on_oom);
    add_virtio(balloon);
    watch_balloon_stats_timer();
  }
  if (config.vsock_cid)
    add_virtio(std::make_shared<virtio::VirtioVsock>(
        *config.vsock_cid, open_vhost_vsock(*config.vsock_cid), device_loop));
  device_loop.start_thread();
}

void Machine::Impl::watch_balloon_stats_timer() {
  balloon_stats_timer.reset(timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK));
  if (!balloon_stats_timer)
    throw std::system_error(errno, std::generic_category(), "timerfd for balloon statistics");
  device_loop.add(balloon_stats_timer.get(), [this](uint32_t) {
    uint64_t expirations;
    if (::read(balloon_stats_timer.get(), &expirations, sizeof(expirations)) > 0)
      balloon->request_stats();  // false while the guest still holds the last request
  });
}

x86::LoadedKernel Machine::Impl::load_kernel() {
  StepTimer step_done;
  FileBytes kernel = map_file_or_config_error(config.kernel, "--kernel");
  step_done("mapping the kernel");
  bool is_elf = kernel.size() >= 4 && kernel.bytes()[0] == 0x7F && kernel.bytes()[1] == 'E';
  if (!config.kernel_cache.empty() && !is_elf) {
    try {
      kernel = cached_vmlinux(config.kernel_cache, kernel.bytes());
    } catch (const x86::BootError& e) {
      throw ConfigError(fmt::format("cannot boot {}: {}", config.kernel, e.what()));
    }
    step_done("the kernel cache");
  }
  FileBytes initramfs;
  if (!config.initramfs.empty())
    initramfs = map_file_or_config_error(config.initramfs, "--initramfs");
  uint64_t rsdp = acpi::write_acpi_tables(*memory, {config.cpus, true});
  try {
    auto loaded = x86::load_linux(*memory, kernel.bytes(), initramfs.bytes(), config.cmdline, rsdp);
    step_done("placing kernel, initramfs and ACPI tables in guest memory");
    return loaded;
  } catch (const x86::BootError& e) {
    throw ConfigError(fmt::format("cannot boot {}: {}", config.kernel, e.what()));
  }
}

void Machine::Impl::create_vcpus(const x86::LoadedKernel& kernel) {
  auto host_cpuid = kvm.supported_cpuid();
  auto msrs = x86::boot_msrs();
  for (uint32_t i = 0; i < config.cpus; ++i) {
    auto vcpu = vm->create_vcpu(int(i));
    auto cpuid = x86::build_vcpu_cpuid(host_cpuid, {i, config.cpus}, x86::kDefaultKvmFeatures);
    vcpu->set_cpuid(cpuid);
    vcpu->set_msrs(msrs);
    // The application processors wait for INIT/SIPI in KVM's in-kernel LAPIC.
    if (i == 0) vcpu->set_boot_state(kernel.cpu);
    vcpus.push_back(std::move(vcpu));
  }
  thread_ids = std::vector<std::atomic<int>>(vcpus.size());
}

void Machine::Impl::build() {
  StepTimer step_done;
  check_host_limits();
  vm = hv::Vm::create(kvm);
  vm->set_tss_address(kTssAddress);
  vm->set_identity_map_address(kIdentityMapAddress);
  vm->create_irqchip();
  vm->create_pit();
  create_memory();
  step_done("vm, irqchip and memory");
  create_devices();
  create_pci_devices();
  step_done("devices");
  auto kernel = load_kernel();
  step_done("kernel, initramfs and ACPI tables");
  create_vcpus(kernel);
  step_done("vcpus");
}

void Machine::Impl::dispatch_io(const devices::Bus& bus, const hv::VcpuExit& exit) {
  for (uint32_t i = 0; i < exit.count; ++i) {
    auto item = exit.data.subspan(size_t(i) * exit.size, exit.size);
    bool claimed = exit.is_write ? bus.write(exit.address, item) : bus.read(exit.address, item);
    SPDLOG_LOGGER_TRACE(spdlog::default_logger(), "{} {} {:#x}/{} = {:#x}{}",
                        exit.kind == hv::VcpuExit::Kind::kIo ? "pio" : "mmio",
                        exit.is_write ? "write" : "read", exit.address, exit.size,
                        devices::load_le(item), claimed ? "" : " (unclaimed)");
    if (!claimed)
      spdlog::debug("unclaimed {} {} at {:#x}", exit.is_write ? "write" : "read",
                    exit.kind == hv::VcpuExit::Kind::kIo ? "port" : "address", exit.address);
  }
}

// Returns false when the vCPU must stop running.
bool Machine::Impl::handle_exit(hv::Vcpu& vcpu, const hv::VcpuExit& exit) {
  using Kind = hv::VcpuExit::Kind;
  switch (exit.kind) {
    case Kind::kIo:
      dispatch_io(pio, exit);
      return true;
    case Kind::kMmio:
      dispatch_io(mmio, exit);
      return true;
    case Kind::kInterrupted:
      vcpu.set_immediate_exit(false);
      return true;
    case Kind::kSystemEvent:
      if (exit.code == 1)
        post_stop({StopReason::kPowerOff, 0, "guest powered off"});
      else if (exit.code == 2)
        post_stop({StopReason::kReset, 0, "guest reset"});
      else
        post_stop(
            {StopReason::kFatal, 0, fmt::format("guest crashed (system event {})", exit.code)});
      return false;
    case Kind::kShutdown:
      post_stop({StopReason::kFatal, 0, "triple fault\n" + vcpu.describe_registers()});
      return false;
    case Kind::kHalt:
      post_stop(
          {StopReason::kFatal, 0, "vCPU halted with interrupts off\n" + vcpu.describe_registers()});
      return false;
    default:
      post_stop({StopReason::kFatal, 0,
                 fmt::format("KVM exit {} (code {:#x})\n{}", int(exit.kind), exit.code,
                             vcpu.describe_registers())});
      return false;
  }
}

void Machine::Impl::wait_while_paused() {
  std::unique_lock lock(mutex);
  if (!paused) return;
  ++paused_vcpus;
  changed.notify_all();
  changed.wait(lock, [this] { return !paused || stopping.load(); });
  --paused_vcpus;
}

void Machine::Impl::vcpu_loop(hv::Vcpu& vcpu) {
  pthread_setname_np(pthread_self(), fmt::format("vcpu{}", vcpu.index()).c_str());
  thread_ids[vcpu.index()] = int(gettid());
  try {
    while (!stopping.load()) {
      wait_while_paused();  // also before the first entry: a VM can be paused before it runs
      if (stopping.load() || !handle_exit(vcpu, vcpu.run())) break;
    }
  } catch (const std::exception& e) {
    post_stop({StopReason::kFatal, 0, fmt::format("vcpu{}: {}", vcpu.index(), e.what())});
  }
}

void Machine::Impl::post_stop(StopEvent event) {
  {
    std::lock_guard lock(mutex);
    if (stop) return;  // the first reason wins
    stop = std::move(event);
    stopping = true;
  }
  changed.notify_all();
}

void Machine::Impl::kick_all() {
  for (size_t i = 0; i < vcpus.size(); ++i) {
    vcpus[i]->set_immediate_exit(true);
    if (i < threads.size()) pthread_kill(threads[i].native_handle(), kKickSignal);
  }
}

Machine::Machine(const VmConfig& config, ConsoleIo console) : config_(config) {
  install_kick_handler();
  impl_ = std::make_unique<Impl>(config_, std::move(console));
  impl_->build();
}

Machine::~Machine() {
  if (!impl_) return;
  impl_->stopping = true;
  impl_->changed.notify_all();
  impl_->kick_all();
  for (auto& t : impl_->threads)
    if (t.joinable()) t.join();
  // Requests in flight complete into guest memory and device queues: let them land, then stop
  // the device thread before the devices go away.
  for (auto& disk : impl_->disks) disk.backend->drain();
  impl_->device_loop.join_thread();
  // The buses hold devices (PCI BARs hold virtio devices) that use the MSI allocator, the event
  // loop and the VM: drop them first, while all of those still exist.
  impl_->pio.clear();
  impl_->mmio.clear();
  impl_->virtio_devices.clear();
  impl_->pci.reset();
}

StopEvent Machine::run() {
  for (auto& vcpu : impl_->vcpus)
    impl_->threads.emplace_back([this, v = vcpu.get()] { impl_->vcpu_loop(*v); });
  std::unique_lock lock(impl_->mutex);
  impl_->changed.wait(lock, [this] { return impl_->stop.has_value(); });
  StopEvent event = *impl_->stop;
  lock.unlock();
  // Kick until every vCPU has left KVM_RUN: a kick that lands just before KVM_RUN is entered is
  // still seen through immediate_exit.
  impl_->kick_all();
  for (auto& t : impl_->threads) t.join();
  impl_->threads.clear();
  return event;
}

void Machine::press_power_button() { impl_->acpi_pm->press_power_button(); }

void Machine::request_stop(StopEvent event) { impl_->post_stop(std::move(event)); }

void Machine::pause() {
  std::unique_lock lock(impl_->mutex);
  if (impl_->paused) return;
  impl_->paused = true;
  lock.unlock();
  impl_->kick_all();
  lock.lock();
  impl_->changed.wait(lock, [this] {
    return impl_->stopping.load() || impl_->paused_vcpus.load() == int(impl_->vcpus.size());
  });
  impl_->paused_clock = impl_->vm->get_clock();
}

void Machine::resume() {
  {
    std::lock_guard lock(impl_->mutex);
    if (!impl_->paused) return;
    impl_->vm->set_clock(impl_->paused_clock);
    impl_->paused = false;
  }
  impl_->changed.notify_all();
}

std::vector<int> Machine::vcpu_thread_ids() const {
  std::vector<int> ids;
  for (const auto& id : impl_->thread_ids) ids.push_back(id.load());
  return ids;
}

bool Machine::paused() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->paused;
}

std::vector<control::BlockInfo> Machine::block_info() const {
  std::vector<control::BlockInfo> blocks;
  for (size_t i = 0; i < impl_->disks.size(); ++i) {
    const DiskConfig& disk = impl_->disks[i].config;
    const auto& backend = impl_->disks[i].backend;
    control::BlockInfo info;
    info.device = disk_device_name(i);
    info.qdev = disk_qdev_path(i);
    info.io_status = "ok";
    control::BlockMedium medium;
    medium.file = disk.path;
    medium.read_only = disk.read_only;
    medium.driver = disk.format;
    medium.virtual_size = backend->size();
    medium.cache_direct = disk.cache == "none";
    info.inserted = medium;
    blocks.push_back(std::move(info));
  }
  return blocks;
}

std::vector<control::BlockStats> Machine::block_stats() const {
  std::vector<control::BlockStats> list;
  for (size_t i = 0; i < impl_->disks.size(); ++i) {
    const auto& m = impl_->disks[i].device->metrics();
    control::BlockStats stats;
    stats.device = disk_device_name(i);
    stats.qdev = disk_qdev_path(i);
    stats.rd_bytes = m.read_acct.bytes;
    stats.wr_bytes = m.write_acct.bytes;
    stats.unmap_bytes = m.unmap_acct.bytes;
    stats.rd_operations = m.read_acct.operations;
    stats.wr_operations = m.write_acct.operations;
    stats.flush_operations = m.flush_acct.operations;
    stats.unmap_operations = m.unmap_acct.operations;
    stats.rd_total_time_ns = m.read_acct.total_time_ns;
    stats.wr_total_time_ns = m.write_acct.total_time_ns;
    stats.flush_total_time_ns = m.flush_acct.total_time_ns;
    stats.unmap_total_time_ns = m.unmap_acct.total_time_ns;
    stats.wr_highest_offset = m.wr_highest_offset;
    stats.failed_rd_operations = m.read_acct.failed;
    stats.failed_wr_operations = m.write_acct.failed;
    stats.failed_flush_operations = m.flush_acct.failed;
    stats.failed_unmap_operations = m.unmap_acct.failed;
    stats.invalid_rd_operations = m.read_acct.invalid;
    stats.invalid_wr_operations = m.write_acct.invalid;
    stats.invalid_flush_operations = m.flush_acct.invalid;
    stats.invalid_unmap_operations = m.unmap_acct.invalid;
    list.push_back(std::move(stats));
  }
  return list;
}

bool Machine::send_console_input(std::span<const uint8_t> bytes) {
  return impl_->serial->enqueue_input(bytes);
}

bool Machine::set_balloon_target(uint64_t bytes) {
  if (!impl_->balloon) return false;
  impl_->balloon->set_target(bytes);
  return true;
}

std::optional<uint64_t> Machine::balloon_actual() const {
  if (!impl_->balloon) return std::nullopt;
  return impl_->balloon->actual_bytes();
}

std::optional<control::BalloonStats> Machine::balloon_stats() const {
  if (!impl_->balloon) return std::nullopt;
  auto report = impl_->balloon->stats();
  return control::BalloonStats{report.updated_at, std::move(report.values)};
}

bool Machine::set_balloon_stats_interval(uint32_t seconds) {
  if (!impl_->balloon) return false;
  itimerspec period{};
  period.it_interval.tv_sec = seconds;
  period.it_value.tv_sec = seconds;  // 0 disarms
  if (timerfd_settime(impl_->balloon_stats_timer.get(), 0, &period, nullptr) != 0)
    throw std::system_error(errno, std::generic_category(), "arming the balloon statistics timer");
  return true;
}

void Machine::set_balloon_listener(std::function<void(uint64_t)> listener) {
  if (impl_->balloon) impl_->balloon->set_actual_listener(std::move(listener));
}

bool Machine::send_virtio_console_input(std::span<const uint8_t> bytes) {
  if (!impl_->virtio_console) return false;
  impl_->virtio_console->enqueue_input(bytes);
  return true;
}

}  // namespace kiln::vmm
