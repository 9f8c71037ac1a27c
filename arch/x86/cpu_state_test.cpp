#include "arch/x86/cpu_state.h"

#include <gtest/gtest.h>

#include "arch/x86/boot_error.h"

namespace kiln::x86 {
namespace {

constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kGiB = 1ull << 30;

uint64_t read_u64(const memory::GuestMemory& mem, uint64_t gpa) {
  auto value = mem.read_obj<uint64_t>(gpa);
  EXPECT_TRUE(value.has_value()) << std::hex << gpa;
  return value.value_or(0);
}

// Translates `va` the way the MMU does in 4-level paging; nullopt if not mapped.
std::optional<uint64_t> walk(const memory::GuestMemory& mem, uint64_t cr3, uint64_t va) {
  constexpr uint64_t kAddrMask = 0x000F'FFFF'FFFF'F000;
  uint64_t pml4e = read_u64(mem, (cr3 & kAddrMask) + ((va >> 39) & 0x1FF) * 8);
  if (!(pml4e & 1)) return std::nullopt;
  uint64_t pdpte = read_u64(mem, (pml4e & kAddrMask) + ((va >> 30) & 0x1FF) * 8);
  if (!(pdpte & 1)) return std::nullopt;
  if (pdpte & 0x80) return (pdpte & 0x000F'FFFF'C000'0000) | (va & (kGiB - 1));
  uint64_t pde = read_u64(mem, (pdpte & kAddrMask) + ((va >> 21) & 0x1FF) * 8);
  if (!(pde & 1)) return std::nullopt;
  EXPECT_TRUE(pde & 2) << "identity map must be writable";
  if (pde & 0x80) return (pde & 0x000F'FFFF'FFE0'0000) | (va & (2 * kMiB - 1));
  uint64_t pte = read_u64(mem, (pde & kAddrMask) + ((va >> 12) & 0x1FF) * 8);
  if (!(pte & 1)) return std::nullopt;
  return (pte & kAddrMask) | (va & 0xFFF);
}

TEST(LongMode, PageTablesMapTheFirstFourGiBOneToOne) {
  auto mem = memory::GuestMemory::create_ram(16 * kMiB);
  BootCpuState cpu = setup_long_mode(mem, 0x100200, 0x7000);
  EXPECT_EQ(cpu.cr3, kPml4Addr);
  for (uint64_t va = 0; va < 4 * kGiB; va += 2 * kMiB) {
    for (uint64_t offset : {uint64_t{0}, uint64_t{0x1234}, 2 * kMiB - 1}) {
      auto pa = walk(mem, cpu.cr3, va + offset);
      ASSERT_TRUE(pa.has_value()) << std::hex << va + offset;
      ASSERT_EQ(*pa, va + offset);
    }
  }
  EXPECT_FALSE(walk(mem, cpu.cr3, 4 * kGiB).has_value());
  EXPECT_FALSE(walk(mem, cpu.cr3, 0xFFFF'FFFF'8000'0000).has_value());
}

TEST(LongMode, SegmentsAreWhatTheGdtInGuestMemorySays) {
  auto mem = memory::GuestMemory::create_ram(16 * kMiB);
  BootCpuState cpu = setup_long_mode(mem, 0x100200, 0x7000);
  EXPECT_EQ(cpu.gdt_base, kGdtAddr);
  EXPECT_EQ(cpu.gdt_limit, kGdtEntries * 8 - 1);
  auto decode = [&](uint16_t selector) {
    return segment_from_gdt_entry(read_u64(mem, kGdtAddr + selector), selector);
  };
  EXPECT_EQ(read_u64(mem, kGdtAddr), 0u);  // null descriptor
  EXPECT_EQ(cpu.cs, decode(kCode64Selector));
  EXPECT_EQ(cpu.ds, decode(kDataSelector));
  EXPECT_EQ(cpu.ss, decode(kDataSelector));
  EXPECT_EQ(cpu.es, decode(kDataSelector));
  EXPECT_EQ(cpu.tr, decode(kTssSelector));

  // What the 64-bit boot protocol asks for: __BOOT_CS 64-bit flat code, __BOOT_DS flat data.
  EXPECT_EQ(cpu.cs.selector, 0x10);
  EXPECT_TRUE(cpu.cs.l);
  EXPECT_FALSE(cpu.cs.db);  // L and D/B together are reserved
  EXPECT_TRUE(cpu.cs.s && cpu.cs.present);
  EXPECT_EQ(cpu.cs.type & 0x8, 0x8);  // code
  EXPECT_EQ(cpu.ds.selector, 0x18);
  EXPECT_EQ(cpu.ds.base, 0u);
  EXPECT_EQ(cpu.ds.limit, 0xFFFFFFFFu);
  EXPECT_EQ(cpu.ds.type, 0x3);  // read/write, accessed
  EXPECT_TRUE(cpu.ds.db && cpu.ds.g);
  EXPECT_EQ(cpu.tr.type, 0xB);  // busy 64-bit TSS
  EXPECT_FALSE(cpu.tr.s);
  EXPECT_TRUE(cpu.tr.present);
  EXPECT_FALSE(cpu.ldt.present);

  Segment code32 = decode(kCode32Selector);
  EXPECT_TRUE(code32.db);
  EXPECT_FALSE(code32.l);
}

TEST(LongMode, RegistersFollowThe64BitBootProtocol) {
  auto mem = memory::GuestMemory::create_ram(16 * kMiB);
  BootCpuState cpu = setup_long_mode(mem, 0x1000200, 0x7000);
  EXPECT_EQ(cpu.rip, 0x1000200u);
  EXPECT_EQ(cpu.rsi, 0x7000u);
  EXPECT_EQ(cpu.rsp, kStackTop);
  EXPECT_EQ(cpu.rflags & (1 << 9), 0u) << "interrupts must be off";
  EXPECT_EQ(cpu.rflags & 2, 2u);
  EXPECT_TRUE(cpu.cr0 & kCr0Pe);
  EXPECT_TRUE(cpu.cr0 & kCr0Pg);
  EXPECT_TRUE(cpu.cr4 & kCr4Pae);
  EXPECT_EQ(cpu.efer & (kEferLme | kEferLma), kEferLme | kEferLma);
}

TEST(LongMode, TinyGuestIsRefused) {
  auto mem = memory::GuestMemory::create_ram(0x8000);  // ends below the page tables
  EXPECT_THROW(setup_long_mode(mem, 0x100200, 0x7000), BootError);
}

TEST(Gdt, EncodeDecodeRoundTrip) {
  uint64_t entry = gdt_entry(0x4093, 0x12345678, 0xABCDE);
  EXPECT_EQ(entry, 0x124A'9334'5678'BCDEull);
  Segment seg = segment_from_gdt_entry(entry, 0x28);
  EXPECT_EQ(seg.base, 0x12345678u);
  EXPECT_EQ(seg.limit, 0xABCDEu);  // byte granular
  EXPECT_EQ(seg.type, 0x3);
  EXPECT_TRUE(seg.s);
  EXPECT_TRUE(seg.present);
  EXPECT_TRUE(seg.db);
  EXPECT_FALSE(seg.g);
  EXPECT_EQ(seg.selector, 0x28);
}

TEST(Msrs, BootValues) {
  auto msrs = boot_msrs();
  auto value_of = [&](uint32_t index) -> std::optional<uint64_t> {
    for (const MsrEntry& msr : msrs)
      if (msr.index == index) return msr.value;
    return std::nullopt;
  };
  EXPECT_EQ(value_of(kMsrMtrrDefType), 0x806u);
  EXPECT_EQ(value_of(kMsrMiscEnable), 1u);
  for (uint32_t zero : {kMsrSysenterCs, kMsrSysenterEsp, kMsrSysenterEip, kMsrStar, kMsrLstar,
                        kMsrCstar, kMsrSyscallMask, kMsrKernelGsBase, kMsrIa32Tsc})
    EXPECT_EQ(value_of(zero), 0u) << std::hex << zero;
}

}  // namespace
}  // namespace kiln::x86
