// The uapi headers declare flexible arrays through __DECLARE_FLEX_ARRAY, which in C++ adds an
// empty struct member of size 1: sizeof(kvm_cpuid2) becomes 12 instead of 8, and with it the
// ioctl numbers that encode the size (KVM then answers EINVAL). Declare them as plain C
// flexible arrays instead, before <linux/kvm.h> is seen.
#include <linux/stddef.h>
#undef __DECLARE_FLEX_ARRAY
#define __DECLARE_FLEX_ARRAY(TYPE, NAME) TYPE NAME[]
#include <fcntl.h>
#include <fmt/format.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstring>

#include "base/errors.h"
#include "hv/kvm.h"

static_assert(sizeof(kvm_cpuid2) == 8 && sizeof(kvm_msrs) == 8 && sizeof(kvm_irq_routing) == 8,
              "kvm uapi structs must have their C layout");

namespace kiln::hv {
namespace {

// What kiln relies on; checked once so a missing one is reported by name, not as a later EINVAL.
constexpr Capability kRequired[] = {
    {KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"},
    {KVM_CAP_PIT2, "KVM_CAP_PIT2"},
    {KVM_CAP_IRQ_ROUTING, "KVM_CAP_IRQ_ROUTING"},
    {KVM_CAP_IRQFD, "KVM_CAP_IRQFD"},
    {KVM_CAP_IOEVENTFD, "KVM_CAP_IOEVENTFD"},
    {KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"},
    {KVM_CAP_SET_TSS_ADDR, "KVM_CAP_SET_TSS_ADDR"},
    {KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID"},
    {KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"},
    {KVM_CAP_SIGNAL_MSI, "KVM_CAP_SIGNAL_MSI"},
};

constexpr int kMaxCpuidEntries = 256;

// ioctl that retries on EINTR and throws with `what` on failure.
template <class Arg>
int checked_ioctl(int fd, unsigned long request, Arg arg, const char* what) {
  int ret;
  do {
    ret = ::ioctl(fd, request, arg);
  } while (ret < 0 && errno == EINTR);
  if (ret < 0) throw HvError(fmt::format("{} failed: {}", what, std::strerror(errno)));
  return ret;
}

kvm_segment to_kvm(const x86::Segment& s) {
  kvm_segment k{};
  k.base = s.base;
  k.limit = s.limit;
  k.selector = s.selector;
  k.type = s.type;
  k.present = s.present;
  k.dpl = s.dpl;
  k.db = s.db;
  k.s = s.s;
  k.l = s.l;
  k.g = s.g;
  k.avl = s.avl;
  k.unusable = s.present ? 0 : 1;
  return k;
}

}  // namespace

Kvm Kvm::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT)
      throw HvError(
          fmt::format("{} does not exist: this host has no KVM (is the kvm module "
                      "loaded and virtualization enabled in the firmware?)",
                      path));
    if (err == EACCES || err == EPERM)
      throw HvError(
          fmt::format("no permission to open {} (add yourself to the 'kvm' group)", path));
    throw HvError(fmt::format("cannot open {}: {}", path, std::strerror(err)));
  }
  Kvm kvm{UniqueFd(fd)};
  int version = ::ioctl(fd, KVM_GET_API_VERSION, 0);
  if (version != KVM_API_VERSION)
    throw HvError(
        fmt::format("{} speaks KVM API version {}, kiln needs {}", path, version, KVM_API_VERSION));
  return kvm;
}

int Kvm::check_extension(int capability) const {
  int ret = ::ioctl(fd_.get(), KVM_CHECK_EXTENSION, capability);
  return ret < 0 ? 0 : ret;
}

void Kvm::require_capabilities() const {
  std::string missing;
  for (const Capability& cap : kRequired)
    if (check_extension(cap.id) <= 0)
      missing += (missing.empty() ? "" : ", ") + std::string(cap.name);
  if (!missing.empty()) throw HvError("this KVM lacks capabilities kiln needs: " + missing);
}

int Kvm::max_vcpus() const {
  int max = check_extension(KVM_CAP_MAX_VCPUS);
  return max > 0 ? max : check_extension(KVM_CAP_NR_VCPUS);
}

size_t Kvm::vcpu_mmap_size() const {
  return checked_ioctl(fd_.get(), KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
}

std::vector<x86::CpuidEntry> Kvm::supported_cpuid() const {
  std::vector<uint8_t> buffer(sizeof(kvm_cpuid2) + kMaxCpuidEntries * sizeof(kvm_cpuid_entry2));
  auto* cpuid = reinterpret_cast<kvm_cpuid2*>(buffer.data());
  cpuid->nent = kMaxCpuidEntries;
  checked_ioctl(fd_.get(), KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID");
  // KVM emulates the TSC-deadline LAPIC timer but leaves it out of KVM_GET_SUPPORTED_CPUID and
  // reports it as a capability instead (api.rst). Offering it matters: without it Linux must
  // calibrate the LAPIC timer against the PIT, which fails on a slow (nested) host and leaves the
  // guest without a working timer.
  const bool tsc_deadline = check_extension(KVM_CAP_TSC_DEADLINE_TIMER) > 0;
  constexpr uint32_t kTscDeadlineBit = 1u << 24;  // CPUID.01H:ECX[24]
  std::vector<x86::CpuidEntry> entries;
  for (uint32_t i = 0; i < cpuid->nent; ++i) {
    const kvm_cpuid_entry2& e = cpuid->entries[i];
    x86::CpuidEntry entry{e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx};
    if (entry.function == 1 && tsc_deadline) entry.ecx |= kTscDeadlineBit;
    entries.push_back(entry);
  }
  return entries;
}

// --- Vm ---------------------------------------------------------------------------------------

std::unique_ptr<Vm> Vm::create(const Kvm& kvm) {
  int fd = checked_ioctl(kvm.fd(), KVM_CREATE_VM, 0, "KVM_CREATE_VM");
  return std::unique_ptr<Vm>(new Vm(UniqueFd(fd), kvm.vcpu_mmap_size()));
}

void Vm::map_memory(uint32_t slot, uint64_t gpa, uint64_t size, void* host, bool log_dirty) {
  kvm_userspace_memory_region region{};
  region.slot = slot;
  region.flags = log_dirty ? KVM_MEM_LOG_DIRTY_PAGES : 0;
  region.guest_phys_addr = gpa;
  region.memory_size = size;
  region.userspace_addr = reinterpret_cast<uint64_t>(host);
  checked_ioctl(fd_.get(), KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");
}

void Vm::create_irqchip() { checked_ioctl(fd_.get(), KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP"); }

void Vm::create_pit() {
  kvm_pit_config config{};
  config.flags = KVM_PIT_SPEAKER_DUMMY;
  checked_ioctl(fd_.get(), KVM_CREATE_PIT2, &config, "KVM_CREATE_PIT2");
}

void Vm::set_tss_address(uint64_t gpa) {
  checked_ioctl(fd_.get(), KVM_SET_TSS_ADDR, static_cast<unsigned long>(gpa), "KVM_SET_TSS_ADDR");
}

void Vm::set_identity_map_address(uint64_t gpa) {
  checked_ioctl(fd_.get(), KVM_SET_IDENTITY_MAP_ADDR, &gpa, "KVM_SET_IDENTITY_MAP_ADDR");
}

std::unique_ptr<Vcpu> Vm::create_vcpu(int index) {
  int fd = checked_ioctl(fd_.get(), KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU");
  return std::make_unique<Vcpu>(UniqueFd(fd), index, mmap_size_);
}

void Vm::set_irq_line(uint32_t gsi, bool level) {
  kvm_irq_level irq{};
  irq.irq = gsi;
  irq.level = level ? 1 : 0;
  checked_ioctl(fd_.get(), KVM_IRQ_LINE, &irq, "KVM_IRQ_LINE");
}

uint32_t Vm::allocate_gsi() {
  std::lock_guard lock(routes_mutex_);
  return next_gsi_++;
}

void Vm::set_msi_route(uint32_t gsi, uint64_t address, uint32_t data) {
  std::lock_guard lock(routes_mutex_);
  for (Route& route : msi_routes_) {
    if (route.gsi == gsi) {
      route.address = address;
      route.data = data;
      commit_routes();
      return;
    }
  }
  msi_routes_.push_back({gsi, address, data});
  commit_routes();
}

void Vm::remove_msi_route(uint32_t gsi) {
  std::lock_guard lock(routes_mutex_);
  std::erase_if(msi_routes_, [gsi](const Route& r) { return r.gsi == gsi; });
  commit_routes();
}

// KVM replaces the whole routing table at once, so it is rebuilt from the default IRQCHIP pins
// (PIC 0-15 and IOAPIC 0-23, as KVM sets them up by default) plus the MSI routes.
void Vm::commit_routes() {
  std::vector<kvm_irq_routing_entry> entries;
  for (uint32_t pin = 0; pin < 24; ++pin) {
    if (pin < 16 && pin != 2) {
      kvm_irq_routing_entry pic{};
      pic.gsi = pin;
      pic.type = KVM_IRQ_ROUTING_IRQCHIP;
      pic.u.irqchip.irqchip = pin < 8 ? KVM_IRQCHIP_PIC_MASTER : KVM_IRQCHIP_PIC_SLAVE;
      pic.u.irqchip.pin = pin % 8;
      entries.push_back(pic);
    }
    kvm_irq_routing_entry ioapic{};
    ioapic.gsi = pin;
    ioapic.type = KVM_IRQ_ROUTING_IRQCHIP;
    ioapic.u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
    ioapic.u.irqchip.pin = pin;
    entries.push_back(ioapic);
  }
  for (const Route& route : msi_routes_) {
    kvm_irq_routing_entry msi{};
    msi.gsi = route.gsi;
    msi.type = KVM_IRQ_ROUTING_MSI;
    msi.u.msi.address_lo = static_cast<uint32_t>(route.address);
    msi.u.msi.address_hi = static_cast<uint32_t>(route.address >> 32);
    msi.u.msi.data = route.data;
    entries.push_back(msi);
  }
  std::vector<uint8_t> buffer(sizeof(kvm_irq_routing) + entries.size() * sizeof(entries[0]));
  auto* routing = reinterpret_cast<kvm_irq_routing*>(buffer.data());
  routing->nr = entries.size();
  std::memcpy(routing->entries, entries.data(), entries.size() * sizeof(entries[0]));
  checked_ioctl(fd_.get(), KVM_SET_GSI_ROUTING, routing, "KVM_SET_GSI_ROUTING");
}

void Vm::signal_msi(uint64_t address, uint32_t data) {
  kvm_msi msi{};
  msi.address_lo = static_cast<uint32_t>(address);
  msi.address_hi = static_cast<uint32_t>(address >> 32);
  msi.data = data;
  checked_ioctl(fd_.get(), KVM_SIGNAL_MSI, &msi, "KVM_SIGNAL_MSI");
}

void Vm::add_irqfd(int eventfd, uint32_t gsi) {
  kvm_irqfd irqfd{};
  irqfd.fd = eventfd;
  irqfd.gsi = gsi;
  checked_ioctl(fd_.get(), KVM_IRQFD, &irqfd, "KVM_IRQFD");
}

void Vm::remove_irqfd(int eventfd, uint32_t gsi) {
  kvm_irqfd irqfd{};
  irqfd.fd = eventfd;
  irqfd.gsi = gsi;
  irqfd.flags = KVM_IRQFD_FLAG_DEASSIGN;
  checked_ioctl(fd_.get(), KVM_IRQFD, &irqfd, "KVM_IRQFD (deassign)");
}

static kvm_ioeventfd make_ioeventfd(int eventfd, uint64_t address, uint32_t len, bool pio) {
  kvm_ioeventfd io{};
  io.addr = address;
  io.len = len;
  io.fd = eventfd;
  io.flags = pio ? KVM_IOEVENTFD_FLAG_PIO : 0;
  return io;
}

void Vm::add_ioeventfd(int eventfd, uint64_t address, uint32_t len, bool pio) {
  kvm_ioeventfd io = make_ioeventfd(eventfd, address, len, pio);
  checked_ioctl(fd_.get(), KVM_IOEVENTFD, &io, "KVM_IOEVENTFD");
}

void Vm::remove_ioeventfd(int eventfd, uint64_t address, uint32_t len, bool pio) {
  kvm_ioeventfd io = make_ioeventfd(eventfd, address, len, pio);
  io.flags |= KVM_IOEVENTFD_FLAG_DEASSIGN;
  checked_ioctl(fd_.get(), KVM_IOEVENTFD, &io, "KVM_IOEVENTFD (deassign)");
}

uint64_t Vm::get_clock() const {
  kvm_clock_data data{};
  checked_ioctl(fd_.get(), KVM_GET_CLOCK, &data, "KVM_GET_CLOCK");
  return data.clock;
}

void Vm::set_clock(uint64_t ns) {
  kvm_clock_data data{};
  data.clock = ns;
  checked_ioctl(fd_.get(), KVM_SET_CLOCK, &data, "KVM_SET_CLOCK");
}

std::vector<uint64_t> Vm::take_dirty_log(uint32_t slot, uint64_t size) {
  std::vector<uint64_t> bitmap((size / 4096 + 63) / 64);
  kvm_dirty_log log{};
  log.slot = slot;
  log.dirty_bitmap = bitmap.data();
  checked_ioctl(fd_.get(), KVM_GET_DIRTY_LOG, &log, "KVM_GET_DIRTY_LOG");
  return bitmap;
}

// --- Vcpu -------------------------------------------------------------------------------------

Vcpu::Vcpu(UniqueFd fd, int index, size_t mmap_size)
    : fd_(std::move(fd)), index_(index), mmap_size_(mmap_size) {
  void* run = mmap(nullptr, mmap_size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0);
  if (run == MAP_FAILED) throw HvError(fmt::format("mmap of vcpu{}'s kvm_run failed", index));
  run_ = static_cast<kvm_run*>(run);
}

Vcpu::~Vcpu() {
  if (run_) munmap(run_, mmap_size_);
}

void Vcpu::set_immediate_exit(bool on) {
  __atomic_store_n(&run_->immediate_exit, on ? 1 : 0, __ATOMIC_SEQ_CST);
}

VcpuExit Vcpu::run() {
  VcpuExit exit;
  if (::ioctl(fd_.get(), KVM_RUN, 0) < 0) {
    if (errno == EINTR || errno == EAGAIN) {
      exit.kind = VcpuExit::Kind::kInterrupted;
      return exit;
    }
    throw HvError(fmt::format("KVM_RUN on vcpu{} failed: {}", index_, std::strerror(errno)));
  }
  auto* base = reinterpret_cast<uint8_t*>(run_);
  switch (run_->exit_reason) {
    case KVM_EXIT_IO:
      exit.kind = VcpuExit::Kind::kIo;
      exit.is_write = run_->io.direction == KVM_EXIT_IO_OUT;
      exit.address = run_->io.port;
      exit.size = run_->io.size;
      exit.count = run_->io.count;
      // The data offset comes from the kernel, but bound it by the mapping all the same.
      if (run_->io.data_offset < mmap_size_ &&
          uint64_t(run_->io.size) * run_->io.count <= mmap_size_ - run_->io.data_offset)
        exit.data = {base + run_->io.data_offset, size_t(run_->io.size) * run_->io.count};
      else
        exit.kind = VcpuExit::Kind::kUnknown;
      break;
    case KVM_EXIT_MMIO:
      exit.kind = VcpuExit::Kind::kMmio;
      exit.is_write = run_->mmio.is_write;
      exit.address = run_->mmio.phys_addr;
      exit.size = std::min<uint32_t>(run_->mmio.len, sizeof(run_->mmio.data));
      exit.data = {run_->mmio.data, exit.size};
      break;
    case KVM_EXIT_HLT:
      exit.kind = VcpuExit::Kind::kHalt;
      break;
    case KVM_EXIT_SHUTDOWN:
      exit.kind = VcpuExit::Kind::kShutdown;
      break;
    case KVM_EXIT_SYSTEM_EVENT:
      exit.kind = VcpuExit::Kind::kSystemEvent;
      exit.code = run_->system_event.type;
      break;
    case KVM_EXIT_INTR:
      exit.kind = VcpuExit::Kind::kInterrupted;
      break;
    case KVM_EXIT_INTERNAL_ERROR:
      exit.kind = VcpuExit::Kind::kInternalError;
      exit.code = run_->internal.suberror;
      break;
    case KVM_EXIT_FAIL_ENTRY:
      exit.kind = VcpuExit::Kind::kFailEntry;
      exit.code = run_->fail_entry.hardware_entry_failure_reason;
      break;
    default:
      exit.kind = VcpuExit::Kind::kUnknown;
      exit.code = run_->exit_reason;
  }
  return exit;
}

void Vcpu::set_cpuid(std::span<const x86::CpuidEntry> entries) {
  std::vector<uint8_t> buffer(sizeof(kvm_cpuid2) + entries.size() * sizeof(kvm_cpuid_entry2));
  auto* cpuid = reinterpret_cast<kvm_cpuid2*>(buffer.data());
  cpuid->nent = entries.size();
  for (size_t i = 0; i < entries.size(); ++i) {
    const x86::CpuidEntry& e = entries[i];
    cpuid->entries[i] = kvm_cpuid_entry2{};
    cpuid->entries[i].function = e.function;
    cpuid->entries[i].index = e.index;
    cpuid->entries[i].flags = e.flags;
    cpuid->entries[i].eax = e.eax;
    cpuid->entries[i].ebx = e.ebx;
    cpuid->entries[i].ecx = e.ecx;
    cpuid->entries[i].edx = e.edx;
  }
  checked_ioctl(fd_.get(), KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2");
}

void Vcpu::set_msrs(std::span<const x86::MsrEntry> msrs) {
  std::vector<uint8_t> buffer(sizeof(kvm_msrs) + msrs.size() * sizeof(kvm_msr_entry));
  auto* list = reinterpret_cast<kvm_msrs*>(buffer.data());
  list->nmsrs = msrs.size();
  for (size_t i = 0; i < msrs.size(); ++i) {
    list->entries[i] = kvm_msr_entry{};
    list->entries[i].index = msrs[i].index;
    list->entries[i].data = msrs[i].value;
  }
  int set = checked_ioctl(fd_.get(), KVM_SET_MSRS, list, "KVM_SET_MSRS");
  if (size_t(set) != msrs.size())
    throw HvError(fmt::format("KVM_SET_MSRS: MSR {:#x} was refused", msrs[set].index));
}

void Vcpu::set_boot_state(const x86::BootCpuState& state) {
  kvm_sregs sregs{};
  checked_ioctl(fd_.get(), KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
  sregs.cs = to_kvm(state.cs);
  sregs.ds = to_kvm(state.ds);
  sregs.es = to_kvm(state.es);
  sregs.fs = to_kvm(state.fs);
  sregs.gs = to_kvm(state.gs);
  sregs.ss = to_kvm(state.ss);
  sregs.tr = to_kvm(state.tr);
  sregs.ldt = to_kvm(state.ldt);
  sregs.gdt.base = state.gdt_base;
  sregs.gdt.limit = state.gdt_limit;
  sregs.idt.base = 0;
  sregs.idt.limit = 0;
  sregs.cr0 = state.cr0;
  sregs.cr3 = state.cr3;
  sregs.cr4 = state.cr4;
  sregs.efer = state.efer;
  checked_ioctl(fd_.get(), KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");

  kvm_regs regs{};
  regs.rip = state.rip;
  regs.rsp = state.rsp;
  regs.rbp = state.rsp;
  regs.rsi = state.rsi;
  regs.rflags = state.rflags;
  checked_ioctl(fd_.get(), KVM_SET_REGS, &regs, "KVM_SET_REGS");

  kvm_fpu fpu{};
  fpu.fcw = 0x37f;     // x87 default control word, as after FNINIT
  fpu.mxcsr = 0x1f80;  // SSE default: all exceptions masked
  checked_ioctl(fd_.get(), KVM_SET_FPU, &fpu, "KVM_SET_FPU");
}

void Vcpu::set_real_mode_entry(uint16_t rip) {
  kvm_sregs sregs{};
  checked_ioctl(fd_.get(), KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
  sregs.cs.base = 0;
  sregs.cs.selector = 0;
  checked_ioctl(fd_.get(), KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
  kvm_regs regs{};
  regs.rip = rip;
  regs.rflags = 0x2;  // bit 1 is reserved and always set
  checked_ioctl(fd_.get(), KVM_SET_REGS, &regs, "KVM_SET_REGS");
}

std::string Vcpu::describe_registers() const {
  kvm_regs r{};
  kvm_sregs s{};
  if (::ioctl(fd_.get(), KVM_GET_REGS, &r) < 0 || ::ioctl(fd_.get(), KVM_GET_SREGS, &s) < 0)
    return fmt::format("vcpu{}: registers unavailable: {}", index_, std::strerror(errno));
  return fmt::format(
      "vcpu{}: rip={:#018x} rsp={:#018x} rflags={:#x}\n"
      "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n"
      "  rsi={:#018x} rdi={:#018x} rbp={:#018x}\n"
      "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
      index_, r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, s.cr0, s.cr2,
      s.cr3, s.cr4, s.efer, s.cs.selector);
}

}  // namespace kiln::hv
