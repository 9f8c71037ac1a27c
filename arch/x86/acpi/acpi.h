// ACPI tables for kiln's x86 guest (ACPI 6.3, docs/MACHINE.md): RSDP -> XSDT -> FADT (-> FACS,
// DSDT), MADT and, with PCI, MCFG. The guest finds them through boot_params.acpi_rsdp_addr or by
// scanning 0xE0000-0xFFFFF for the RSDP.
#pragma once

#include <cstdint>
#include <span>

#include "memory/guest_memory.h"

namespace kiln::acpi {

// Where the tables live: the RSDP first, every other table after it, all below 1 MiB.
inline constexpr uint64_t kRsdpAddress = 0xE0000;
inline constexpr uint64_t kTablesEnd = 0x100000;

// One Processor Local APIC entry per vCPU uses 8-bit APIC IDs 0..cpu_count-1 and the IOAPIC takes
// the next ID, so at most 254 vCPUs fit (ID 0xFF is the broadcast ID).
inline constexpr uint32_t kMaxCpus = 254;

struct AcpiConfig {
  uint32_t cpu_count = 1;  // 1..kMaxCpus; vCPU i has APIC ID i
  bool pci = false;        // PCI (ECAM) present: adds the MCFG
};

// Writes every table into guest memory at kRsdpAddress..kTablesEnd and returns the RSDP's
// guest-physical address. Throws std::invalid_argument for an unsupported configuration and
// std::runtime_error if guest RAM does not cover the table area or the tables do not fit in it.
// Call after guest RAM exists and before the first vCPU runs.
uint64_t write_acpi_tables(const memory::GuestMemory& mem, const AcpiConfig& config);

// The DSDT compiled from dsdt.asl at build time (exposed for tests and diagnostics).
std::span<const uint8_t> dsdt_aml();

}  // namespace kiln::acpi
