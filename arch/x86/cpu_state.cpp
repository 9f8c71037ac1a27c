#include "arch/x86/cpu_state.h"

#include <array>
#include <string>

#include "arch/x86/boot_error.h"

namespace kiln::x86 {
namespace {

constexpr uint64_t kPageSize = 0x1000;
constexpr uint64_t kTwoMiB = 0x20'0000;
constexpr uint64_t kOneGiB = 0x4000'0000;
constexpr int kPageDirectories = 4;  // 4 GiB identity map
constexpr int kEntriesPerTable = 512;

constexpr uint64_t kPtePresent = 1ull << 0;
constexpr uint64_t kPteWritable = 1ull << 1;
constexpr uint64_t kPteLargePage = 1ull << 7;

// Descriptor access/flags words (bytes 5-6 of the descriptor, limit bits masked out).
constexpr uint16_t kFlagsCode32 = 0xC09B;  // G, D/B, present, code execute/read, accessed
constexpr uint16_t kFlagsCode64 = 0xA09B;  // G, L, present, code execute/read, accessed
constexpr uint16_t kFlagsData = 0xC093;    // G, D/B, present, data read/write, accessed
constexpr uint16_t kFlagsTss = 0x008B;     // present, 64-bit TSS (busy, as VM entry demands)
constexpr uint32_t kTssLimit = 0x67;       // size of the 64-bit TSS minus one
constexpr uint8_t kLdtType = 0x2;

template <class T>
void write_or_throw(const memory::GuestMemory& mem, uint64_t gpa, const T& value,
                    const char* what) {
  if (!mem.write_obj(gpa, value))
    throw BootError(std::string("guest memory too small for the ") + what);
}

void write_gdt(const memory::GuestMemory& mem) {
  std::array<uint64_t, kGdtEntries> gdt{};
  gdt[kCode32Selector / 8] = gdt_entry(kFlagsCode32, 0, 0xFFFFF);
  gdt[kCode64Selector / 8] = gdt_entry(kFlagsCode64, 0, 0xFFFFF);
  gdt[kDataSelector / 8] = gdt_entry(kFlagsData, 0, 0xFFFFF);
  gdt[kTssSelector / 8] = gdt_entry(kFlagsTss, 0, kTssLimit);
  gdt[kTssSelector / 8 + 1] = 0;  // upper half of the 16-byte TSS descriptor: base[63:32] = 0
  write_or_throw(mem, kGdtAddr, gdt, "GDT");
}

void write_identity_page_tables(const memory::GuestMemory& mem) {
  using Table = std::array<uint64_t, kEntriesPerTable>;
  Table pml4{};
  pml4[0] = kPdptAddr | kPtePresent | kPteWritable;
  write_or_throw(mem, kPml4Addr, pml4, "page tables");

  Table pdpt{};
  for (int i = 0; i < kPageDirectories; ++i)
    pdpt[i] = (kPdAddr + i * kPageSize) | kPtePresent | kPteWritable;
  write_or_throw(mem, kPdptAddr, pdpt, "page tables");

  for (int i = 0; i < kPageDirectories; ++i) {
    Table pd{};
    for (int j = 0; j < kEntriesPerTable; ++j)
      pd[j] = (i * kOneGiB + j * kTwoMiB) | kPtePresent | kPteWritable | kPteLargePage;
    write_or_throw(mem, kPdAddr + i * kPageSize, pd, "page tables");
  }
}

}  // namespace

uint64_t gdt_entry(uint16_t flags, uint32_t base, uint32_t limit) {
  uint64_t entry = limit & 0xFFFF;
  entry |= uint64_t{base & 0xFF'FFFF} << 16;
  entry |= uint64_t(flags & 0xFF) << 40;         // access byte
  entry |= uint64_t{(limit >> 16) & 0xF} << 48;  // limit[19:16]
  entry |= uint64_t((flags >> 12) & 0xF) << 52;  // AVL, L, D/B, G
  entry |= uint64_t{(base >> 24) & 0xFF} << 56;
  return entry;
}

Segment segment_from_gdt_entry(uint64_t entry, uint16_t selector) {
  Segment seg;
  seg.selector = selector;
  seg.base = ((entry >> 16) & 0xFF'FFFF) | (((entry >> 56) & 0xFF) << 24);
  uint32_t raw_limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16);
  seg.type = (entry >> 40) & 0xF;
  seg.s = (entry >> 44) & 1;
  seg.dpl = (entry >> 45) & 3;
  seg.present = (entry >> 47) & 1;
  seg.avl = (entry >> 52) & 1;
  seg.l = (entry >> 53) & 1;
  seg.db = (entry >> 54) & 1;
  seg.g = (entry >> 55) & 1;
  // With 4 KiB granularity the CPU scales the limit and fills the low bits with ones.
  seg.limit = seg.g ? (raw_limit << 12) | 0xFFF : raw_limit;
  return seg;
}

BootCpuState setup_long_mode(const memory::GuestMemory& mem, uint64_t entry, uint64_t rsi) {
  write_gdt(mem);
  write_identity_page_tables(mem);

  BootCpuState state;
  state.rip = entry;
  state.rsp = kStackTop;
  state.rsi = rsi;
  // Interrupts stay off: the boot protocol requires IF = 0 on entry.
  state.rflags = kRflagsReserved;
  state.cr0 = kCr0Pe | kCr0Et | kCr0Ne | kCr0Pg;
  state.cr3 = kPml4Addr;
  state.cr4 = kCr4Pae;
  state.efer = kEferLme | kEferLma;
  state.gdt_base = kGdtAddr;
  state.gdt_limit = kGdtEntries * 8 - 1;

  state.cs = segment_from_gdt_entry(gdt_entry(kFlagsCode64, 0, 0xFFFFF), kCode64Selector);
  Segment data = segment_from_gdt_entry(gdt_entry(kFlagsData, 0, 0xFFFFF), kDataSelector);
  state.ds = state.es = state.fs = state.gs = state.ss = data;
  state.tr = segment_from_gdt_entry(gdt_entry(kFlagsTss, 0, kTssLimit), kTssSelector);
  // No LDT: a null selector with present = false (KVM: unusable).
  state.ldt.type = kLdtType;
  return state;
}

std::vector<MsrEntry> boot_msrs() {
  constexpr uint64_t kMiscEnableFastStrings = 1ull << 0;
  constexpr uint64_t kMtrrDefTypeEnable = 1ull << 11;
  constexpr uint64_t kMemTypeWriteBack = 6;
  return {
      {kMsrSysenterCs, 0},
      {kMsrSysenterEsp, 0},
      {kMsrSysenterEip, 0},
      {kMsrStar, 0},
      {kMsrLstar, 0},
      {kMsrCstar, 0},
      {kMsrSyscallMask, 0},
      {kMsrKernelGsBase, 0},
      {kMsrIa32Tsc, 0},
      {kMsrMiscEnable, kMiscEnableFastStrings},
      {kMsrMtrrDefType, kMtrrDefTypeEnable | kMemTypeWriteBack},
  };
}

}  // namespace kiln::x86
