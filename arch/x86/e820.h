// The BIOS-style e820 memory map kiln hands to the guest (docs/MACHINE.md).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "memory/guest_memory.h"

namespace kiln::x86 {

enum class E820Type : uint32_t {
  kRam = 1,
  kReserved = 2,
  kAcpi = 3,
  kNvs = 4,
};

struct E820Entry {
  uint64_t addr = 0;
  uint64_t size = 0;
  E820Type type = E820Type::kRam;
  uint64_t end() const { return addr + size; }
  bool operator==(const E820Entry&) const = default;
};

// Legacy area below 1 MiB that is not RAM: EBDA, VGA, option ROMs, BIOS (and the ACPI tables).
inline constexpr uint64_t kLowReservedStart = 0x9FC00;
inline constexpr uint64_t kLowReservedEnd = 0x10'0000;
// PCIe ECAM for buses 0-255. Linux only trusts MCFG if e820 reserves this range.
inline constexpr uint64_t kEcamBase = 0xE000'0000;
inline constexpr uint64_t kEcamSize = 0x1000'0000;

// The map for a guest whose RAM is `ram`: every RAM byte outside the legacy area, the legacy
// area and ECAM as reserved. Sorted by address, no overlaps.
std::vector<E820Entry> build_e820(std::span<const memory::RegionSpec> ram);
std::vector<E820Entry> build_e820(const memory::GuestMemory& mem);

}  // namespace kiln::x86
