#include "arch/x86/cpuid.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace kiln::x86 {
namespace {

enum class Vendor { kIntel, kAmd, kOther };

constexpr uint32_t kLeafVendor = 0x0;
constexpr uint32_t kLeafFeatures = 0x1;
constexpr uint32_t kLeafCacheParams = 0x4;
constexpr uint32_t kLeafTopology = 0xB;
constexpr uint32_t kLeafTopologyV2 = 0x1F;
constexpr uint32_t kLeafExtFeatures = 0x8000'0001;
constexpr uint32_t kLeafAmdSizes = 0x8000'0008;
constexpr uint32_t kLeafAmdCache = 0x8000'001D;
constexpr uint32_t kLeafAmdTopology = 0x8000'001E;
constexpr uint32_t kHypervisorLeavesFirst = 0x4000'0000;
constexpr uint32_t kHypervisorLeavesLast = 0x4000'00FF;

constexpr uint32_t kLeaf1EdxHtt = 1u << 28;
constexpr uint32_t kLeaf1EcxHypervisor = 1u << 31;
constexpr uint32_t kExtEcxCmpLegacy = 1u << 1;

// Leaf 0xB / 0x1F level types.
constexpr uint32_t kLevelInvalid = 0;
constexpr uint32_t kLevelSmt = 1;
constexpr uint32_t kLevelCore = 2;

uint32_t fourcc(const char* text) {
  uint32_t value;
  std::memcpy(&value, text, 4);
  return value;
}

const CpuidEntry* find_leaf(std::span<const CpuidEntry> table, uint32_t function) {
  for (const CpuidEntry& entry : table)
    if (entry.function == function) return &entry;
  return nullptr;
}

Vendor vendor_of(std::span<const CpuidEntry> host) {
  const CpuidEntry* leaf0 = find_leaf(host, kLeafVendor);
  if (!leaf0) return Vendor::kOther;
  auto is = [&](const char* name) {  // vendor string order is EBX, EDX, ECX
    return leaf0->ebx == fourcc(name) && leaf0->edx == fourcc(name + 4) &&
           leaf0->ecx == fourcc(name + 8);
  };
  if (is("GenuineIntel")) return Vendor::kIntel;
  if (is("AuthenticAMD") || is("HygonGenuine")) return Vendor::kAmd;
  return Vendor::kOther;
}

// APIC ID bits that number the cores of a package: the smallest b with 2^b >= count.
uint32_t core_id_bits(uint32_t count) {
  uint32_t bits = 0;
  while ((1u << bits) < count) ++bits;
  return bits;
}

uint32_t set_bits(uint32_t value, int low, int width, uint32_t field) {
  uint32_t mask = ((width == 32 ? 0 : (1u << width)) - 1) << low;
  return (value & ~mask) | ((field << low) & mask);
}

// Leaf 1: initial APIC ID, addressable logical processors in the package, HTT (which on this
// leaf means "the package has more than one logical processor"), and the hypervisor bit so
// the guest knows to look at 0x40000000.
void patch_leaf1(CpuidEntry& e, const VcpuTopology& topo) {
  uint32_t addressable = std::min(1u << core_id_bits(topo.count), 0xFFu);
  e.ebx = set_bits(e.ebx, 24, 8, topo.index);
  e.ebx = set_bits(e.ebx, 16, 8, addressable);
  e.edx = topo.count > 1 ? e.edx | kLeaf1EdxHtt : e.edx & ~kLeaf1EdxHtt;
  e.ecx |= kLeaf1EcxHypervisor;
}

// Intel leaf 4: core IDs per package, and which caches are shared. With one thread per core,
// L1/L2 belong to one logical processor; L3 and beyond are shared by the whole package.
void patch_cache_params(CpuidEntry& e, const VcpuTopology& topo) {
  uint32_t cache_type = e.eax & 0x1F;
  if (cache_type == 0) return;  // "no more caches" terminator
  uint32_t ids = 1u << core_id_bits(topo.count);
  uint32_t level = (e.eax >> 5) & 0x7;
  e.eax = set_bits(e.eax, 26, 6, std::min(ids, 64u) - 1);
  e.eax = set_bits(e.eax, 14, 12, level >= 3 ? std::min(ids, 4096u) - 1 : 0);
}

// AMD 0x8000_001D has the same cache sharing field as Intel's leaf 4.
void patch_amd_cache(CpuidEntry& e, const VcpuTopology& topo) {
  if ((e.eax & 0x1F) == 0) return;
  uint32_t level = (e.eax >> 5) & 0x7;
  e.eax = set_bits(e.eax, 14, 12, level >= 3 ? std::min(topo.count, 4096u) - 1 : 0);
}

// AMD 0x8000_0008 ECX: NC (cores - 1) and ApicIdCoreIdSize (bits of APIC ID that number them).
void patch_amd_sizes(CpuidEntry& e, const VcpuTopology& topo) {
  e.ecx = set_bits(e.ecx, 0, 8, topo.count - 1);
  e.ecx = set_bits(e.ecx, 12, 4, core_id_bits(topo.count));
}

// AMD 0x8000_001E: extended APIC ID, core ID (one thread per core), one node per package.
void patch_amd_topology(CpuidEntry& e, const VcpuTopology& topo) {
  e.eax = topo.index;
  e.ebx = set_bits(e.ebx, 0, 16, topo.index & 0xFF);  // core ID; threads per core - 1 = 0
  e.ecx = set_bits(e.ecx, 0, 11, 0);                  // node 0; nodes per package - 1 = 0
  e.edx = 0;
}

// Leaf 0xB/0x1F subleaves: SMT level (1 thread), core level (all N cores), terminator.
std::vector<CpuidEntry> topology_leaf(uint32_t function, const VcpuTopology& topo) {
  auto subleaf = [&](uint32_t index, uint32_t shift, uint32_t count, uint32_t type) {
    return CpuidEntry{
        function, index, kCpuidFlagSignificantIndex, shift, count, index | (type << 8), topo.index};
  };
  return {subleaf(0, 0, 1, kLevelSmt), subleaf(1, core_id_bits(topo.count), topo.count, kLevelCore),
          subleaf(2, 0, 0, kLevelInvalid)};
}

// Replaces every subleaf of `function` with `replacement`, but only if the host lists it.
void replace_leaf(std::vector<CpuidEntry>& table, uint32_t function,
                  const std::vector<CpuidEntry>& replacement) {
  auto first = std::find_if(table.begin(), table.end(),
                            [&](const CpuidEntry& e) { return e.function == function; });
  if (first == table.end()) return;
  size_t position = first - table.begin();
  std::erase_if(table, [&](const CpuidEntry& e) { return e.function == function; });
  table.insert(table.begin() + position, replacement.begin(), replacement.end());
}

// KVM's signature leaf and feature leaf, replacing whatever hypervisor leaves the host listed.
void set_kvm_leaves(std::vector<CpuidEntry>& table, std::span<const CpuidEntry> host,
                    uint32_t kvm_features) {
  if (const CpuidEntry* offered = find_leaf(host, kCpuidKvmFeatures)) kvm_features &= offered->eax;
  std::erase_if(table, [](const CpuidEntry& e) {
    return e.function >= kHypervisorLeavesFirst && e.function <= kHypervisorLeavesLast;
  });
  table.push_back({kCpuidKvmSignature, 0, 0, kCpuidKvmFeatures, fourcc("KVMK"), fourcc("VMKV"),
                   fourcc("M\0\0\0")});
  table.push_back({kCpuidKvmFeatures, 0, 0, kvm_features, 0, 0, 0});
}

}  // namespace

std::vector<CpuidEntry> build_vcpu_cpuid(std::span<const CpuidEntry> host,
                                         const VcpuTopology& topology, uint32_t kvm_features) {
  if (topology.count == 0 || topology.count > 255 || topology.index >= topology.count)
    throw std::invalid_argument("vCPU topology needs 1..255 vCPUs and index < count");
  Vendor vendor = vendor_of(host);
  std::vector<CpuidEntry> table(host.begin(), host.end());
  for (CpuidEntry& e : table) {
    if (e.function == kLeafFeatures) {
      patch_leaf1(e, topology);
    } else if (e.function == kLeafCacheParams && vendor == Vendor::kIntel) {
      patch_cache_params(e, topology);
    } else if (e.function == kLeafExtFeatures && vendor == Vendor::kAmd) {
      // CmpLegacy: the HTT count of leaf 1 counts cores, not threads.
      e.ecx = topology.count > 1 ? e.ecx | kExtEcxCmpLegacy : e.ecx & ~kExtEcxCmpLegacy;
    } else if (e.function == kLeafAmdSizes && vendor == Vendor::kAmd) {
      patch_amd_sizes(e, topology);
    } else if (e.function == kLeafAmdCache && vendor == Vendor::kAmd) {
      patch_amd_cache(e, topology);
    } else if (e.function == kLeafAmdTopology && vendor == Vendor::kAmd) {
      patch_amd_topology(e, topology);
    }
  }
  replace_leaf(table, kLeafTopology, topology_leaf(kLeafTopology, topology));
  replace_leaf(table, kLeafTopologyV2, topology_leaf(kLeafTopologyV2, topology));
  set_kvm_leaves(table, host, kvm_features);
  return table;
}

}  // namespace kiln::x86
