#include "arch/x86/acpi/acpi.h"

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace kiln::acpi {
namespace {

// Tables are built with the host's byte order; ACPI is little-endian like the x86 guest.
static_assert(std::endian::native == std::endian::little, "ACPI tables are little-endian");

// ---- Machine constants (docs/MACHINE.md) -------------------------------------------------------

constexpr uint16_t kSciIrq = 9;
constexpr uint16_t kPm1aEventBlock = 0x600;
constexpr uint8_t kPm1EventLength = 4;
constexpr uint16_t kPm1aControlBlock = 0x604;
constexpr uint8_t kPm1ControlLength = 2;
constexpr uint16_t kResetPort = 0x608;
constexpr uint8_t kResetValue = 0x01;
constexpr uint32_t kLocalApicAddress = 0xFEE0'0000;
constexpr uint32_t kIoApicAddress = 0xFEC0'0000;
constexpr uint64_t kEcamAddress = 0xE000'0000;
constexpr uint8_t kEcamLastBus = 255;

// ---- Identification ----------------------------------------------------------------------------

constexpr std::string_view kOemId = "KILN  ";         // 6 characters
constexpr std::string_view kOemTableId = "KILNVM  ";  // 8 characters
constexpr std::string_view kCreatorId = "KILN";
constexpr uint32_t kOemRevision = 1;
constexpr uint32_t kCreatorRevision = 1;

template <size_t N>
void copy_id(char (&field)[N], std::string_view id) {
  static_assert(N > 0);
  std::memset(field, ' ', N);
  std::memcpy(field, id.data(), std::min(N, id.size()));
}

// ---- Table layouts (ACPI 6.3, chapter 5.2) -----------------------------------------------------

#pragma pack(push, 1)

struct Rsdp {  // 5.2.5.3
  char signature[8];
  uint8_t checksum;  // over the first 20 bytes (the ACPI 1.0 structure)
  char oem_id[6];
  uint8_t revision;
  uint32_t rsdt_address;
  uint32_t length;
  uint64_t xsdt_address;
  uint8_t extended_checksum;  // over the whole structure
  uint8_t reserved[3];
};
static_assert(sizeof(Rsdp) == 36);

struct SdtHeader {  // 5.2.6
  char signature[4];
  uint32_t length;
  uint8_t revision;
  uint8_t checksum;
  char oem_id[6];
  char oem_table_id[8];
  uint32_t oem_revision;
  char creator_id[4];
  uint32_t creator_revision;
};
static_assert(sizeof(SdtHeader) == 36);

struct GenericAddress {  // 5.2.3.2
  uint8_t space_id;
  uint8_t bit_width;
  uint8_t bit_offset;
  uint8_t access_size;
  uint64_t address;
};
static_assert(sizeof(GenericAddress) == 12);

struct Fadt {  // 5.2.9, revision 6
  SdtHeader header;
  uint32_t firmware_ctrl;
  uint32_t dsdt;
  uint8_t reserved0;
  uint8_t preferred_pm_profile;
  uint16_t sci_int;
  uint32_t smi_cmd;
  uint8_t acpi_enable;
  uint8_t acpi_disable;
  uint8_t s4bios_req;
  uint8_t pstate_cnt;
  uint32_t pm1a_evt_blk;
  uint32_t pm1b_evt_blk;
  uint32_t pm1a_cnt_blk;
  uint32_t pm1b_cnt_blk;
  uint32_t pm2_cnt_blk;
  uint32_t pm_tmr_blk;
  uint32_t gpe0_blk;
  uint32_t gpe1_blk;
  uint8_t pm1_evt_len;
  uint8_t pm1_cnt_len;
  uint8_t pm2_cnt_len;
  uint8_t pm_tmr_len;
  uint8_t gpe0_blk_len;
  uint8_t gpe1_blk_len;
  uint8_t gpe1_base;
  uint8_t cst_cnt;
  uint16_t p_lvl2_lat;
  uint16_t p_lvl3_lat;
  uint16_t flush_size;
  uint16_t flush_stride;
  uint8_t duty_offset;
  uint8_t duty_width;
  uint8_t day_alrm;
  uint8_t mon_alrm;
  uint8_t century;
  uint16_t iapc_boot_arch;
  uint8_t reserved1;
  uint32_t flags;
  GenericAddress reset_reg;
  uint8_t reset_value;
  uint16_t arm_boot_arch;
  uint8_t fadt_minor_version;
  uint64_t x_firmware_ctrl;
  uint64_t x_dsdt;
  GenericAddress x_pm1a_evt_blk;
  GenericAddress x_pm1b_evt_blk;
  GenericAddress x_pm1a_cnt_blk;
  GenericAddress x_pm1b_cnt_blk;
  GenericAddress x_pm2_cnt_blk;
  GenericAddress x_pm_tmr_blk;
  GenericAddress x_gpe0_blk;
  GenericAddress x_gpe1_blk;
  GenericAddress sleep_control_reg;
  GenericAddress sleep_status_reg;
  char hypervisor_vendor_identity[8];
};
static_assert(sizeof(Fadt) == 276);
static_assert(offsetof(Fadt, iapc_boot_arch) == 109);
static_assert(offsetof(Fadt, flags) == 112);
static_assert(offsetof(Fadt, x_dsdt) == 140);
static_assert(offsetof(Fadt, x_pm1a_evt_blk) == 148);

struct Facs {  // 5.2.10
  char signature[4];
  uint32_t length;
  uint32_t hardware_signature;
  uint32_t firmware_waking_vector;
  uint32_t global_lock;
  uint32_t flags;
  uint64_t x_firmware_waking_vector;
  uint8_t version;
  uint8_t reserved0[3];
  uint32_t ospm_flags;
  uint8_t reserved1[24];
};
static_assert(sizeof(Facs) == 64);

struct MadtHeader {  // 5.2.12
  SdtHeader header;
  uint32_t local_apic_address;
  uint32_t flags;
};

struct MadtLocalApic {  // 5.2.12.2, type 0
  uint8_t type;
  uint8_t length;
  uint8_t processor_uid;
  uint8_t apic_id;
  uint32_t flags;
};
static_assert(sizeof(MadtLocalApic) == 8);

struct MadtIoApic {  // 5.2.12.3, type 1
  uint8_t type;
  uint8_t length;
  uint8_t io_apic_id;
  uint8_t reserved;
  uint32_t address;
  uint32_t gsi_base;
};
static_assert(sizeof(MadtIoApic) == 12);

struct MadtInterruptOverride {  // 5.2.12.5, type 2
  uint8_t type;
  uint8_t length;
  uint8_t bus;
  uint8_t source;
  uint32_t gsi;
  uint16_t flags;
};
static_assert(sizeof(MadtInterruptOverride) == 10);

struct MadtLocalApicNmi {  // 5.2.12.7, type 4
  uint8_t type;
  uint8_t length;
  uint8_t processor_uid;
  uint16_t flags;
  uint8_t lint;
};
static_assert(sizeof(MadtLocalApicNmi) == 6);

struct McfgAllocation {  // PCI Firmware Specification 3.2, 4.1.2
  uint64_t base_address;
  uint16_t segment;
  uint8_t start_bus;
  uint8_t end_bus;
  uint32_t reserved;
};
static_assert(sizeof(McfgAllocation) == 16);

#pragma pack(pop)

// GAS address space IDs and access sizes.
constexpr uint8_t kSystemIo = 1;
constexpr uint8_t kAccessByte = 1;
constexpr uint8_t kAccessWord = 2;

// FADT fixed feature flags (table 5.35).
constexpr uint32_t kFadtWbinvd = 1u << 0;
constexpr uint32_t kFadtProcC1 = 1u << 2;
constexpr uint32_t kFadtSlpButton = 1u << 5;  // set: no fixed-feature sleep button
constexpr uint32_t kFadtFixRtc = 1u << 6;     // set: no RTC wake status in PM1
constexpr uint32_t kFadtResetRegSup = 1u << 10;

// IA-PC boot architecture flags (table 5.36).
constexpr uint16_t kBootArch8042 = 1u << 1;
constexpr uint16_t kBootArchVgaNotPresent = 1u << 2;

// MADT (table 5.43, 5.45, 5.50).
constexpr uint32_t kMadtPcatCompat = 1u << 0;
constexpr uint32_t kLocalApicEnabled = 1u << 0;
constexpr uint16_t kMpsActiveHigh = 0b01;
constexpr uint16_t kMpsEdge = 0b01 << 2;
constexpr uint16_t kMpsLevel = 0b11 << 2;
constexpr uint8_t kAllProcessors = 0xFF;

// ---- Byte helpers ------------------------------------------------------------------------------

uint8_t checksum_of(std::span<const uint8_t> bytes) {
  uint8_t sum = 0;
  for (uint8_t byte : bytes) sum = static_cast<uint8_t>(sum + byte);
  return static_cast<uint8_t>(-sum);
}

template <class T>
void append(std::vector<uint8_t>& out, const T& value) {
  static_assert(std::is_trivially_copyable_v<T>);
  const auto* bytes = reinterpret_cast<const uint8_t*>(&value);
  out.insert(out.end(), bytes, bytes + sizeof(T));
}

SdtHeader make_header(std::string_view signature, uint8_t revision) {
  SdtHeader header{};
  std::memcpy(header.signature, signature.data(), sizeof(header.signature));
  header.revision = revision;
  copy_id(header.oem_id, kOemId);
  copy_id(header.oem_table_id, kOemTableId);
  header.oem_revision = kOemRevision;
  copy_id(header.creator_id, kCreatorId);
  header.creator_revision = kCreatorRevision;
  return header;
}

// Sets the length and checksum of a table whose bytes start with an SdtHeader.
std::vector<uint8_t> seal(std::vector<uint8_t> table) {
  uint32_t length = static_cast<uint32_t>(table.size());
  std::memcpy(table.data() + offsetof(SdtHeader, length), &length, sizeof(length));
  table[offsetof(SdtHeader, checksum)] = 0;
  table[offsetof(SdtHeader, checksum)] = checksum_of(table);
  return table;
}

template <class T>
std::vector<uint8_t> bytes_of(const T& value) {
  std::vector<uint8_t> out;
  append(out, value);
  return out;
}

GenericAddress io_register(uint16_t port, uint8_t bytes, uint8_t access_size) {
  return {kSystemIo, static_cast<uint8_t>(bytes * 8), 0, access_size, port};
}

// ---- Tables ------------------------------------------------------------------------------------

std::vector<uint8_t> make_facs() {
  Facs facs{};
  std::memcpy(facs.signature, "FACS", 4);
  facs.length = sizeof(Facs);
  facs.version = 2;
  return bytes_of(facs);
}

std::vector<uint8_t> make_fadt(uint64_t facs_address, uint64_t dsdt_address) {
  Fadt fadt{};
  fadt.header = make_header("FACP", 6);
  fadt.fadt_minor_version = 3;  // ACPI 6.3
  // Only the 64-bit pointers are set: the spec requires FIRMWARE_CTRL to be zero when
  // X_FIRMWARE_CTRL is used, and OSPM ignores DSDT when X_DSDT is present.
  fadt.x_firmware_ctrl = facs_address;
  fadt.x_dsdt = dsdt_address;

  fadt.sci_int = kSciIrq;
  // SMI_CMD 0: the machine is always in ACPI mode (SCI_EN reads as 1); there is no SMM handover.
  fadt.smi_cmd = 0;
  fadt.pm1a_evt_blk = kPm1aEventBlock;
  fadt.pm1_evt_len = kPm1EventLength;
  fadt.pm1a_cnt_blk = kPm1aControlBlock;
  fadt.pm1_cnt_len = kPm1ControlLength;
  fadt.x_pm1a_evt_blk = io_register(kPm1aEventBlock, kPm1EventLength, kAccessWord);
  fadt.x_pm1a_cnt_blk = io_register(kPm1aControlBlock, kPm1ControlLength, kAccessWord);
  // No PM timer and no GPE blocks (their fields stay zero); the guest uses the TSC/HPET/kvmclock.

  // Values above 100 / 1000 mean "C2 / C3 not supported": a vCPU only halts.
  fadt.p_lvl2_lat = 101;
  fadt.p_lvl3_lat = 1001;
  // No RTC century register is promised: CENTURY 0 keeps the guest from reading a CMOS index
  // that kiln's RTC may not implement.
  fadt.century = 0;

  fadt.iapc_boot_arch = kBootArch8042 | kBootArchVgaNotPresent;
  fadt.flags = kFadtWbinvd | kFadtProcC1 | kFadtSlpButton | kFadtFixRtc | kFadtResetRegSup;
  fadt.reset_reg = io_register(kResetPort, 1, kAccessByte);
  fadt.reset_value = kResetValue;
  std::memcpy(fadt.hypervisor_vendor_identity, "KILN_VMM", 8);
  return seal(bytes_of(fadt));
}

std::vector<uint8_t> make_madt(uint32_t cpu_count) {
  std::vector<uint8_t> madt;
  append(madt, MadtHeader{make_header("APIC", 5), kLocalApicAddress, kMadtPcatCompat});
  for (uint32_t cpu = 0; cpu < cpu_count; ++cpu) {
    auto id = static_cast<uint8_t>(cpu);
    append(madt, MadtLocalApic{0, sizeof(MadtLocalApic), id, id, kLocalApicEnabled});
  }
  // The IOAPIC takes the first ID after the vCPUs: xAPIC-era guests expect IOAPIC and local APIC
  // IDs to be distinct, and Linux does not compare it with the IOAPIC's ID register.
  auto io_apic_id = static_cast<uint8_t>(cpu_count);
  append(madt, MadtIoApic{1, sizeof(MadtIoApic), io_apic_id, 0, kIoApicAddress, 0});
  // The PIT's IRQ 0 arrives on IOAPIC pin 2 (the in-kernel PIT/IOAPIC wiring); flags 0 = ISA
  // defaults (edge, active high).
  append(madt, MadtInterruptOverride{2, sizeof(MadtInterruptOverride), 0, 0, 2, 0});
  // The SCI is level triggered, active high (docs/MACHINE.md), unlike an ISA IRQ.
  append(madt, MadtInterruptOverride{2, sizeof(MadtInterruptOverride), 0, kSciIrq, kSciIrq,
                                     kMpsActiveHigh | kMpsLevel});
  append(madt, MadtLocalApicNmi{4, sizeof(MadtLocalApicNmi), kAllProcessors,
                                kMpsActiveHigh | kMpsEdge, 1});
  return seal(std::move(madt));
}

std::vector<uint8_t> make_mcfg() {
  std::vector<uint8_t> mcfg;
  append(mcfg, make_header("MCFG", 1));
  append(mcfg, uint64_t{0});  // reserved
  append(mcfg, McfgAllocation{kEcamAddress, 0, 0, kEcamLastBus, 0});
  return seal(std::move(mcfg));
}

std::vector<uint8_t> make_xsdt(const std::vector<uint64_t>& tables) {
  std::vector<uint8_t> xsdt;
  append(xsdt, make_header("XSDT", 1));
  for (uint64_t address : tables) append(xsdt, address);
  return seal(std::move(xsdt));
}

Rsdp make_rsdp(uint64_t xsdt_address) {
  Rsdp rsdp{};
  std::memcpy(rsdp.signature, "RSD PTR ", 8);
  copy_id(rsdp.oem_id, kOemId);
  rsdp.revision = 2;
  rsdp.rsdt_address = 0;  // no RSDT: every ACPI 2.0+ OS uses the XSDT
  rsdp.length = sizeof(Rsdp);
  rsdp.xsdt_address = xsdt_address;
  const auto* bytes = reinterpret_cast<const uint8_t*>(&rsdp);
  rsdp.checksum = checksum_of({bytes, 20});
  rsdp.extended_checksum = checksum_of({bytes, sizeof(Rsdp)});
  return rsdp;
}

std::string hex(uint64_t value) {
  char text[17];
  snprintf(text, sizeof(text), "%llx", static_cast<unsigned long long>(value));
  return text;
}

// ---- Placement ---------------------------------------------------------------------------------

// The table area as one host buffer: tables are placed one after another (aligned), then the whole
// area is copied into guest memory in one write.
class TableArea {
 public:
  TableArea(uint64_t start, uint64_t end) : start_(start), end_(end) {}

  // Reserves `size` bytes aligned to `align` and returns their guest-physical address.
  uint64_t reserve(size_t size, uint64_t align) {
    uint64_t address = (start_ + bytes_.size() + align - 1) / align * align;
    if (address + size > end_) {
      throw std::runtime_error("ACPI tables do not fit in guest memory 0x" + hex(start_) + "-0x" +
                               hex(end_ - 1));
    }
    bytes_.resize(address + size - start_);
    return address;
  }

  uint64_t add(std::span<const uint8_t> table, uint64_t align) {
    uint64_t address = reserve(table.size(), align);
    fill(address, table);
    return address;
  }

  void fill(uint64_t address, std::span<const uint8_t> bytes) {
    std::memcpy(bytes_.data() + (address - start_), bytes.data(), bytes.size());
  }

  uint64_t start() const { return start_; }
  std::span<const uint8_t> bytes() const { return bytes_; }

 private:
  uint64_t start_;
  uint64_t end_;
  std::vector<uint8_t> bytes_;
};

constexpr uint64_t kTableAlign = 16;
constexpr uint64_t kFacsAlign = 64;  // 5.2.10: the FACS is 64-byte aligned

void check_config(const AcpiConfig& config) {
  if (config.cpu_count == 0 || config.cpu_count > kMaxCpus) {
    throw std::invalid_argument("ACPI: unsupported vCPU count " + std::to_string(config.cpu_count) +
                                " (1.." + std::to_string(kMaxCpus) + " supported)");
  }
}

}  // namespace

uint64_t write_acpi_tables(const memory::GuestMemory& mem, const AcpiConfig& config) {
  check_config(config);

  TableArea area(kRsdpAddress, kTablesEnd);
  // The RSDP must sit at kRsdpAddress (the guest may scan for it there); it is filled in last,
  // once the XSDT's address is known.
  uint64_t rsdp = area.reserve(sizeof(Rsdp), kTableAlign);
  uint64_t facs = area.add(make_facs(), kFacsAlign);
  uint64_t dsdt = area.add(dsdt_aml(), kTableAlign);
  std::vector<uint64_t> tables;
  tables.push_back(area.add(make_fadt(facs, dsdt), kTableAlign));
  tables.push_back(area.add(make_madt(config.cpu_count), kTableAlign));
  if (config.pci) tables.push_back(area.add(make_mcfg(), kTableAlign));
  uint64_t xsdt = area.add(make_xsdt(tables), kTableAlign);
  area.fill(rsdp, bytes_of(make_rsdp(xsdt)));

  if (!mem.write(area.start(), area.bytes())) {
    throw std::runtime_error("ACPI: guest RAM does not cover the table area 0x" +
                             hex(area.start()) + "-0x" +
                             hex(area.start() + area.bytes().size() - 1));
  }
  return rsdp;
}

}  // namespace kiln::acpi
