#include "arch/x86/cpuid.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>

namespace kiln::x86 {
namespace {

uint32_t chars(const char* text) {
  uint32_t value;
  std::memcpy(&value, text, 4);
  return value;
}

constexpr uint32_t kSig = kCpuidFlagSignificantIndex;

// Roughly what KVM_GET_SUPPORTED_CPUID returns on an Intel host, host topology included.
std::vector<CpuidEntry> intel_host() {
  return {
      {0x0, 0, 0, 0x1F, chars("Genu"), chars("ntel"), chars("ineI")},
      {0x1, 0, 0, 0x000906EA, 0x0F100800, 0xF7FA3203 & ~(1u << 31), 0x178BFBFF},
      {0x4, 0, kSig, 0x1C004121, 0x01C0003F, 0x3F, 0},    // L1d
      {0x4, 1, kSig, 0x1C004122, 0x01C0003F, 0x3F, 0},    // L1i
      {0x4, 2, kSig, 0x1C004143, 0x00C0003F, 0x3FF, 0},   // L2
      {0x4, 3, kSig, 0x1C03C163, 0x02C0003F, 0x3FFF, 6},  // L3, shared by 16
      {0x4, 4, kSig, 0, 0, 0, 0},
      {0x7, 0, kSig, 0, 0x029C6FBF, 0x40000000, 0xBC000400},
      {0xB, 0, kSig, 1, 2, 0x100, 0},
      {0xB, 1, kSig, 4, 16, 0x201, 0},
      {0x1F, 0, kSig, 1, 2, 0x100, 0},
      {0x1F, 1, kSig, 4, 16, 0x201, 0},
      {0x40000000, 0, 0, 0x40000001, chars("KVMK"), chars("VMKV"), chars("M\0\0\0")},
      {0x40000001, 0, 0, 0x01007AFB, 0, 0, 0},
      {0x80000000, 0, 0, 0x80000008, 0, 0, 0},
      {0x80000001, 0, 0, 0, 0, 0x121, 0x2C100800},
      {0x80000008, 0, 0, 0x3027, 0, 0, 0},
  };
}

std::vector<CpuidEntry> amd_host() {
  return {
      {0x0, 0, 0, 0x10, chars("Auth"), chars("cAMD"), chars("enti")},
      {0x1, 0, 0, 0x00A50F00, 0x00100800, 0x7ED8320B, 0x178BFBFF},
      {0x80000000, 0, 0, 0x80000021, 0, 0, 0},
      {0x80000001, 0, 0, 0x00A50F00, 0, 0x75C237FF, 0x2FD3FBFF},
      {0x80000008, 0, 0, 0x3030, 0, 0x0001700F, 0},
      {0x8000001D, 0, kSig, 0x00004121, 0x01C0003F, 0x3F, 0},    // L1d, shared by 2
      {0x8000001D, 3, kSig, 0x0003C163, 0x03C0003F, 0x7FFF, 1},  // L3, shared by 16
      {0x8000001E, 0, 0, 0x0000000E, 0x00000107, 0x00000000, 0},
  };
}

std::vector<CpuidEntry> subleaves(const std::vector<CpuidEntry>& table, uint32_t function) {
  std::vector<CpuidEntry> out;
  for (const CpuidEntry& e : table)
    if (e.function == function) out.push_back(e);
  return out;
}

CpuidEntry leaf(const std::vector<CpuidEntry>& table, uint32_t function, uint32_t index = 0) {
  for (const CpuidEntry& e : table)
    if (e.function == function && e.index == index) return e;
  ADD_FAILURE() << "no leaf " << std::hex << function << "." << index;
  return {};
}

uint32_t bits(uint32_t value, int low, int width) { return (value >> low) & ((1u << width) - 1); }

TEST(Cpuid, SingleVcpu) {
  auto host = intel_host();
  auto table = build_vcpu_cpuid(host, {0, 1}, kDefaultKvmFeatures);
  CpuidEntry l1 = leaf(table, 1);
  EXPECT_EQ(bits(l1.ebx, 24, 8), 0u) << "initial APIC ID";
  EXPECT_EQ(bits(l1.ebx, 16, 8), 1u) << "logical processors";
  EXPECT_EQ(bits(l1.ebx, 0, 16), 0x0800u) << "CLFLUSH size and brand index kept";
  EXPECT_EQ(l1.edx & (1u << 28), 0u) << "no HTT with one vCPU";
  EXPECT_NE(l1.ecx & (1u << 31), 0u) << "hypervisor bit";
  EXPECT_EQ(l1.ecx & ~(1u << 31), host[1].ecx) << "host features pass through";
  EXPECT_EQ(l1.eax, host[1].eax);

  auto topo = subleaves(table, 0xB);
  ASSERT_EQ(topo.size(), 3u);
  EXPECT_EQ(topo[0], (CpuidEntry{0xB, 0, kSig, 0, 1, 0x100, 0}));
  EXPECT_EQ(topo[1], (CpuidEntry{0xB, 1, kSig, 0, 1, 0x201, 0}));
  EXPECT_EQ(topo[2], (CpuidEntry{0xB, 2, kSig, 0, 0, 0x002, 0}));
  EXPECT_EQ(bits(leaf(table, 4, 0).eax, 26, 6), 0u);
  EXPECT_EQ(bits(leaf(table, 4, 3).eax, 14, 12), 0u);
}

TEST(Cpuid, FourVcpusAreFourCoresOfOnePackage) {
  auto host = intel_host();
  for (uint32_t i = 0; i < 4; ++i) {
    SCOPED_TRACE("vCPU " + std::to_string(i));
    auto table = build_vcpu_cpuid(host, {i, 4}, kDefaultKvmFeatures);
    CpuidEntry l1 = leaf(table, 1);
    EXPECT_EQ(bits(l1.ebx, 24, 8), i);
    EXPECT_EQ(bits(l1.ebx, 16, 8), 4u);
    EXPECT_NE(l1.edx & (1u << 28), 0u) << "HTT";
    for (uint32_t function : {0xBu, 0x1Fu}) {
      auto topo = subleaves(table, function);
      ASSERT_EQ(topo.size(), 3u);
      for (const CpuidEntry& sub : topo) EXPECT_EQ(sub.edx, i) << "x2APIC ID";
      EXPECT_EQ(topo[0].ebx, 1u) << "one thread per core";
      EXPECT_EQ(bits(topo[0].ecx, 8, 8), 1u) << "SMT level";
      EXPECT_EQ(topo[1].eax, 2u) << "APIC ID shift to the package";
      EXPECT_EQ(topo[1].ebx, 4u) << "logical processors in the package";
      EXPECT_EQ(bits(topo[1].ecx, 8, 8), 2u) << "core level";
      EXPECT_EQ(bits(topo[2].ecx, 8, 8), 0u) << "terminator";
    }
    // Leaf 4: 4 core IDs per package; L1/L2 private, L3 shared by all four.
    for (uint32_t sub = 0; sub < 4; ++sub) EXPECT_EQ(bits(leaf(table, 4, sub).eax, 26, 6), 3u);
    EXPECT_EQ(bits(leaf(table, 4, 0).eax, 14, 12), 0u);
    EXPECT_EQ(bits(leaf(table, 4, 2).eax, 14, 12), 0u);
    EXPECT_EQ(bits(leaf(table, 4, 3).eax, 14, 12), 3u);
    EXPECT_EQ(bits(leaf(table, 4, 3).eax, 0, 14), bits(host[5].eax, 0, 14)) << "cache kept";
    EXPECT_EQ(leaf(table, 4, 4), host[6]);
    // Intel's 0x80000008 ECX is reserved: untouched.
    EXPECT_EQ(leaf(table, 0x80000008), host.back());
  }
}

TEST(Cpuid, NonPowerOfTwoCountRoundsTheApicIdSpaceUp) {
  auto table = build_vcpu_cpuid(intel_host(), {2, 3}, 0);
  EXPECT_EQ(bits(leaf(table, 1).ebx, 16, 8), 4u);
  EXPECT_EQ(leaf(table, 0xB, 1).eax, 2u);
  EXPECT_EQ(leaf(table, 0xB, 1).ebx, 3u);
}

TEST(Cpuid, OtherLeavesPassThrough) {
  auto host = intel_host();
  auto table = build_vcpu_cpuid(host, {1, 4}, 0);
  EXPECT_EQ(leaf(table, 0), host[0]);
  EXPECT_EQ(leaf(table, 7), host[7]);
  EXPECT_EQ(leaf(table, 0x80000001), host[15]);
}

TEST(Cpuid, KvmLeaves) {
  auto host = intel_host();
  uint32_t wanted = kKvmFeatureClocksource2 | kKvmFeaturePvEoi | kKvmFeaturePvUnhalt |
                    (1u << 20);  // a bit this host does not offer
  auto table = build_vcpu_cpuid(host, {0, 2}, wanted);
  auto sig = subleaves(table, 0x40000000);
  ASSERT_EQ(sig.size(), 1u);
  EXPECT_EQ(sig[0].eax, 0x40000001u) << "max hypervisor leaf";
  char name[13] = {};
  std::memcpy(name, &sig[0].ebx, 4);
  std::memcpy(name + 4, &sig[0].ecx, 4);
  std::memcpy(name + 8, &sig[0].edx, 4);
  EXPECT_EQ(std::string(name, 12), std::string("KVMKVMKVM\0\0\0", 12));
  auto features = subleaves(table, 0x40000001);
  ASSERT_EQ(features.size(), 1u);
  EXPECT_EQ(features[0].eax, kKvmFeatureClocksource2 | kKvmFeaturePvEoi | kKvmFeaturePvUnhalt);
  EXPECT_EQ(features[0].edx, 0u);
}

TEST(Cpuid, KvmLeavesAppearEvenIfTheHostListDoesNotHaveThem) {
  auto table = build_vcpu_cpuid(amd_host(), {0, 1}, kDefaultKvmFeatures);
  EXPECT_EQ(leaf(table, 0x40000001).eax, kDefaultKvmFeatures);
  EXPECT_EQ(leaf(table, 0x40000000).eax, 0x40000001u);
  EXPECT_TRUE(subleaves(table, 0xB).empty()) << "no topology leaf the host does not have";
}

TEST(Cpuid, AmdTopology) {
  auto host = amd_host();
  for (uint32_t i = 0; i < 4; ++i) {
    auto table = build_vcpu_cpuid(host, {i, 4}, 0);
    CpuidEntry sizes = leaf(table, 0x80000008);
    EXPECT_EQ(bits(sizes.ecx, 0, 8), 3u) << "NC = cores - 1";
    EXPECT_EQ(bits(sizes.ecx, 12, 4), 2u) << "ApicIdCoreIdSize";
    EXPECT_EQ(bits(sizes.ecx, 16, 2), 1u) << "other fields kept";
    EXPECT_EQ(sizes.eax, host[4].eax);
    CpuidEntry ext = leaf(table, 0x8000001E);
    EXPECT_EQ(ext.eax, i) << "extended APIC ID";
    EXPECT_EQ(bits(ext.ebx, 0, 8), i) << "core ID";
    EXPECT_EQ(bits(ext.ebx, 8, 8), 0u) << "one thread per core";
    EXPECT_EQ(bits(ext.ecx, 0, 11), 0u) << "one node";
    EXPECT_NE(leaf(table, 0x80000001).ecx & 2, 0u) << "CmpLegacy";
    EXPECT_EQ(bits(leaf(table, 0x8000001D, 0).eax, 14, 12), 0u) << "L1 private";
    EXPECT_EQ(bits(leaf(table, 0x8000001D, 3).eax, 14, 12), 3u) << "L3 shared by 4";
    EXPECT_EQ(bits(leaf(table, 0x8000001D, 3).eax, 0, 14), 0x0163u) << "cache kept";
    EXPECT_EQ(bits(leaf(table, 1).ebx, 24, 8), i);
  }
  auto single = build_vcpu_cpuid(host, {0, 1}, 0);
  EXPECT_EQ(leaf(single, 0x80000001).ecx & 2, 0u);
  EXPECT_EQ(bits(leaf(single, 0x80000008).ecx, 0, 8), 0u);
}

TEST(Cpuid, BadTopologyIsRefused) {
  auto host = intel_host();
  EXPECT_THROW(build_vcpu_cpuid(host, {0, 0}, 0), std::invalid_argument);
  EXPECT_THROW(build_vcpu_cpuid(host, {4, 4}, 0), std::invalid_argument);
  EXPECT_THROW(build_vcpu_cpuid(host, {0, 256}, 0), std::invalid_argument);
}

}  // namespace
}  // namespace kiln::x86
