// The initial x86 vCPU state for Linux's 64-bit boot protocol, as plain structs. Nothing here
// includes KVM headers: the VMM converts these to kvm_sregs/kvm_regs/kvm_msrs itself, which
// keeps this code testable without /dev/kvm.
#pragma once

#include <cstdint>
#include <vector>

#include "memory/guest_memory.h"

namespace kiln::x86 {

// Where the boot structures live (docs/MACHINE.md).
inline constexpr uint64_t kGdtAddr = 0x500;
inline constexpr uint64_t kPml4Addr = 0x9000;
inline constexpr uint64_t kPdptAddr = 0xA000;
inline constexpr uint64_t kPdAddr = 0xB000;  // four page directories, 0xB000-0xEFFF
inline constexpr uint64_t kStackTop = 0x8FF0;

// GDT layout. Linux's 64-bit boot protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18 (the
// same selectors as the kernel's own boot GDT); 0x08 holds a flat 32-bit code segment for the
// same reason, and 0x20 a 64-bit TSS because VM entry on Intel refuses an unusable TR.
inline constexpr uint16_t kCode32Selector = 0x08;
inline constexpr uint16_t kCode64Selector = 0x10;
inline constexpr uint16_t kDataSelector = 0x18;
inline constexpr uint16_t kTssSelector = 0x20;
inline constexpr int kGdtEntries = 6;  // null, code32, code64, data, 16-byte TSS descriptor

// A segment register as the CPU caches it (what KVM calls kvm_segment). A segment with
// present == false is "unusable" (KVM's unusable flag).
struct Segment {
  uint64_t base = 0;
  uint32_t limit = 0;  // in bytes (already scaled when g is set)
  uint16_t selector = 0;
  uint8_t type = 0;  // 4-bit descriptor type
  bool present = false;
  uint8_t dpl = 0;
  bool db = false;  // default operand size 32-bit
  bool s = false;   // code/data (true) versus system (false)
  bool l = false;   // 64-bit code
  bool g = false;   // 4 KiB limit granularity
  bool avl = false;
  bool operator==(const Segment&) const = default;
};

struct BootCpuState {
  uint64_t rip = 0;
  uint64_t rsp = 0;
  uint64_t rsi = 0;  // boot_params address for the Linux 64-bit entry
  uint64_t rflags = 0;
  uint64_t cr0 = 0;
  uint64_t cr3 = 0;
  uint64_t cr4 = 0;
  uint64_t efer = 0;
  uint64_t gdt_base = 0;
  uint16_t gdt_limit = 0;
  Segment cs, ds, es, fs, gs, ss, tr, ldt;
};

// Control register and EFER bits used here.
inline constexpr uint64_t kCr0Pe = 1ull << 0;
inline constexpr uint64_t kCr0Et = 1ull << 4;
inline constexpr uint64_t kCr0Ne = 1ull << 5;
inline constexpr uint64_t kCr0Pg = 1ull << 31;
inline constexpr uint64_t kCr4Pae = 1ull << 5;
inline constexpr uint64_t kEferLme = 1ull << 8;
inline constexpr uint64_t kEferLma = 1ull << 10;
inline constexpr uint64_t kRflagsReserved = 1ull << 1;  // bit 1 always reads as one

// Encodes a segment descriptor from its base, limit and the access/flags bits laid out as in
// the descriptor's bytes 5-6 (e.g. 0xA09B for flat 64-bit code).
uint64_t gdt_entry(uint16_t flags, uint32_t base, uint32_t limit);
// Decodes an 8-byte code/data/system descriptor into what the CPU loads into a segment register.
Segment segment_from_gdt_entry(uint64_t entry, uint16_t selector);

// Writes the GDT at kGdtAddr and the identity page tables (4 GiB with 2 MiB pages) at
// kPml4Addr.., and returns the state of a vCPU in long mode at `entry` with RSI = `rsi`.
// Throws BootError if the guest has no RAM there.
BootCpuState setup_long_mode(const memory::GuestMemory& mem, uint64_t entry, uint64_t rsi);

struct MsrEntry {
  uint32_t index = 0;
  uint64_t value = 0;
  bool operator==(const MsrEntry&) const = default;
};

inline constexpr uint32_t kMsrIa32Tsc = 0x10;
inline constexpr uint32_t kMsrSysenterCs = 0x174;
inline constexpr uint32_t kMsrSysenterEsp = 0x175;
inline constexpr uint32_t kMsrSysenterEip = 0x176;
inline constexpr uint32_t kMsrMiscEnable = 0x1A0;
inline constexpr uint32_t kMsrMtrrDefType = 0x2FF;
inline constexpr uint32_t kMsrStar = 0xC0000081;
inline constexpr uint32_t kMsrLstar = 0xC0000082;
inline constexpr uint32_t kMsrCstar = 0xC0000083;
inline constexpr uint32_t kMsrSyscallMask = 0xC0000084;
inline constexpr uint32_t kMsrKernelGsBase = 0xC0000102;

// The MSR values firmware leaves behind on a real boot: fast strings on, the syscall MSRs
// cleared, TSC at zero and MTRRs enabled with write-back as the default type (without it
// every access would be uncached, which is very slow under KVM when a device is assigned and
// makes Linux complain).
std::vector<MsrEntry> boot_msrs();

}  // namespace kiln::x86
