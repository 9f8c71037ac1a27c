// hv: the KVM API behind a small C++ interface. The only code in kiln that includes <linux/kvm.h>;
// everything else sees file-descriptor-owning objects and plain structs.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "arch/x86/cpu_state.h"
#include "arch/x86/cpuid.h"
#include "base/unique_fd.h"

struct kvm_run;

namespace kiln::hv {

// A KVM capability kiln cannot run without; `name` is KVM's (e.g. "KVM_CAP_IRQFD").
struct Capability {
  int id;
  const char* name;
};

// The system: /dev/kvm.
class Kvm {
 public:
  // Opens /dev/kvm; throws HvError with a user-facing message if it is missing, not accessible,
  // or speaks another API version.
  static Kvm open(const std::string& path = "/dev/kvm");

  int check_extension(int capability) const;
  // Throws HvError naming every capability kiln needs that this KVM lacks.
  void require_capabilities() const;
  int max_vcpus() const;
  size_t vcpu_mmap_size() const;
  std::vector<x86::CpuidEntry> supported_cpuid() const;
  int fd() const { return fd_.get(); }

 private:
  explicit Kvm(UniqueFd fd) : fd_(std::move(fd)) {}
  UniqueFd fd_;
};

class HvError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Why a vCPU left KVM_RUN, decoded from the shared kvm_run page.
struct VcpuExit {
  enum class Kind {
    kIo,
    kMmio,
    kHalt,
    kShutdown,  // triple fault
    kSystemEvent,
    kInterrupted,  // a signal or immediate_exit kicked us out
    kInternalError,
    kFailEntry,
    kUnknown,
  };
  Kind kind = Kind::kUnknown;
  // kIo / kMmio: address (port or guest-physical), size of one access, repeat count (I/O strings),
  // and the data: for writes what the guest wrote, for reads where to put the result.
  bool is_write = false;
  uint64_t address = 0;
  uint32_t size = 0;
  uint32_t count = 1;
  std::span<uint8_t> data;
  // kSystemEvent type, kInternalError suberror, kFailEntry hardware reason, or the raw exit reason.
  uint64_t code = 0;
};

class Vcpu {
 public:
  Vcpu(UniqueFd fd, int index, size_t mmap_size);
  Vcpu(Vcpu&&) = delete;
  ~Vcpu();

  int index() const { return index_; }
  // Enters the guest until the next exit; returns it decoded. Must be called on the vCPU thread.
  VcpuExit run();
  // Makes the next (or current, with a signal) KVM_RUN return at once with kInterrupted.
  void set_immediate_exit(bool on);

  void set_cpuid(std::span<const x86::CpuidEntry> entries);
  void set_boot_state(const x86::BootCpuState& state);
  // Real mode with CS base 0 and IP `rip` (tests and, later, firmware entry).
  void set_real_mode_entry(uint16_t rip);
  void set_msrs(std::span<const x86::MsrEntry> msrs);
  // The general registers and control state, for the crash report on a fatal exit.
  std::string describe_registers() const;

 private:
  UniqueFd fd_;
  int index_;
  size_t mmap_size_;
  kvm_run* run_ = nullptr;
};

class Vm {
 public:
  static std::unique_ptr<Vm> create(const Kvm& kvm);

  // Maps host memory at a guest-physical address (one KVM memory slot).
  void map_memory(uint32_t slot, uint64_t gpa, uint64_t size, void* host, bool log_dirty = false);
  // In-kernel PIC + IOAPIC + LAPICs, and the PIT; call before creating vCPUs.
  void create_irqchip();
  void create_pit();
  void set_tss_address(uint64_t gpa);
  void set_identity_map_address(uint64_t gpa);
  std::unique_ptr<Vcpu> create_vcpu(int index);

  // Level of an IOAPIC/PIC input pin.
  void set_irq_line(uint32_t gsi, bool level);
  // GSI routing: the default IRQCHIP routes for pins 0-23 plus the MSI routes set here.
  void set_msi_route(uint32_t gsi, uint64_t address, uint32_t data);
  void remove_msi_route(uint32_t gsi);
  uint32_t allocate_gsi();
  void signal_msi(uint64_t address, uint32_t data);
  void add_irqfd(int eventfd, uint32_t gsi);
  void remove_irqfd(int eventfd, uint32_t gsi);
  // Writes of `len` bytes at `address` (MMIO, or port I/O if `pio`) signal `eventfd` in the kernel.
  void add_ioeventfd(int eventfd, uint64_t address, uint32_t len, bool pio);
  void remove_ioeventfd(int eventfd, uint64_t address, uint32_t len, bool pio);
  // The guest's kvmclock base (ns). Saved at pause and restored at resume, it keeps the guest's
  // clock from jumping over the time the VM was stopped, as QEMU does.
  uint64_t get_clock() const;
  void set_clock(uint64_t ns);
  // Returns and clears the dirty bitmap of a slot mapped with log_dirty.
  std::vector<uint64_t> take_dirty_log(uint32_t slot, uint64_t size);

  int fd() const { return fd_.get(); }

 private:
  Vm(UniqueFd fd, size_t mmap_size) : fd_(std::move(fd)), mmap_size_(mmap_size) {}
  void commit_routes();

  struct Route {
    uint32_t gsi;
    uint64_t address;
    uint32_t data;
  };
  UniqueFd fd_;
  size_t mmap_size_;
  std::mutex routes_mutex_;  // vCPU threads reprogram MSI-X vectors concurrently
  std::vector<Route> msi_routes_;
  uint32_t next_gsi_ = 24;
};

}  // namespace kiln::hv
