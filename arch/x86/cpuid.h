// The CPUID table each vCPU sees, derived from what the host (KVM_GET_SUPPORTED_CPUID) offers.
// kiln only rewrites what describes the virtual machine rather than the CPU: topology (APIC
// IDs, core counts), the hypervisor bit and KVM's paravirtual leaves. Feature bits the host
// reports pass through untouched and nothing the host does not report is invented, so a guest
// never sees a feature KVM cannot give it.
//
// Topology: N vCPUs are N cores of one package, one thread per core; vCPU i has APIC ID i.
// It is described where each vendor looks: leaf 1 (APIC ID, count, HTT), leaves 0xB/0x1F
// (x2APIC topology), Intel leaf 4 and AMD 0x8000_001D (which caches are shared), AMD
// 0x8000_0008 (core count) and 0x8000_001E (core/node IDs). L1/L2 are per core, L3+ shared.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace kiln::x86 {

// Same values as KVM_CPUID_FLAG_* so the VMM can copy flags straight through.
inline constexpr uint32_t kCpuidFlagSignificantIndex = 1 << 0;

struct CpuidEntry {
  uint32_t function = 0;
  uint32_t index = 0;
  uint32_t flags = 0;
  uint32_t eax = 0, ebx = 0, ecx = 0, edx = 0;
  bool operator==(const CpuidEntry&) const = default;
};

// KVM paravirtual feature bits (CPUID 0x40000001 EAX, Documentation/virt/kvm/x86/cpuid.rst).
inline constexpr uint32_t kKvmFeatureClocksource = 1u << 0;
inline constexpr uint32_t kKvmFeatureNopIoDelay = 1u << 1;
inline constexpr uint32_t kKvmFeatureClocksource2 = 1u << 3;
inline constexpr uint32_t kKvmFeatureAsyncPf = 1u << 4;
inline constexpr uint32_t kKvmFeatureStealTime = 1u << 5;
inline constexpr uint32_t kKvmFeaturePvEoi = 1u << 6;
inline constexpr uint32_t kKvmFeaturePvUnhalt = 1u << 7;
inline constexpr uint32_t kKvmFeaturePvTlbFlush = 1u << 9;
inline constexpr uint32_t kKvmFeaturePvSendIpi = 1u << 11;
inline constexpr uint32_t kKvmFeaturePvSchedYield = 1u << 13;
inline constexpr uint32_t kKvmFeatureMsiExtDestId = 1u << 15;
inline constexpr uint32_t kKvmFeatureClocksourceStable = 1u << 24;

// A sensible default: kvmclock (stable), no port-0x80 delays, PV EOI/unhalt/TLB flush/IPIs,
// steal time. Async page faults stay off: they only help when host memory is overcommitted.
inline constexpr uint32_t kDefaultKvmFeatures =
    kKvmFeatureClocksource2 | kKvmFeatureClocksourceStable | kKvmFeatureNopIoDelay |
    kKvmFeaturePvEoi | kKvmFeaturePvUnhalt | kKvmFeaturePvTlbFlush | kKvmFeaturePvSendIpi |
    kKvmFeaturePvSchedYield | kKvmFeatureStealTime;

inline constexpr uint32_t kCpuidKvmSignature = 0x40000000;
inline constexpr uint32_t kCpuidKvmFeatures = 0x40000001;

struct VcpuTopology {
  uint32_t index = 0;  // this vCPU; also its (x2)APIC ID
  uint32_t count = 1;  // vCPUs in the VM, 1..255 (xAPIC IDs are 8 bits; 0xFF is broadcast)
};

// vCPU `topology.index`'s table. `kvm_features` is the 0x40000001 EAX the caller wants; if the
// host lists that leaf, bits it does not offer are dropped. Throws std::invalid_argument for a
// bad topology.
std::vector<CpuidEntry> build_vcpu_cpuid(std::span<const CpuidEntry> host,
                                         const VcpuTopology& topology, uint32_t kvm_features);

}  // namespace kiln::x86
