#include "arch/x86/acpi/acpi.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace kiln::acpi {
namespace {

using ::testing::HasSubstr;

// ---- A small, independent reader of the tables in guest memory ---------------------------------

std::vector<uint8_t> read_guest(const memory::GuestMemory& mem, uint64_t gpa, uint64_t len) {
  std::vector<uint8_t> out(len);
  if (!mem.read(gpa, out)) throw std::runtime_error("table outside guest memory");
  return out;
}

template <class T>
T load(const std::vector<uint8_t>& bytes, size_t offset) {
  if (offset + sizeof(T) > bytes.size()) throw std::runtime_error("field beyond table end");
  T value;
  std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

uint8_t byte_sum(const std::vector<uint8_t>& bytes, size_t len) {
  uint8_t sum = 0;
  for (size_t i = 0; i < len; ++i) sum = static_cast<uint8_t>(sum + bytes.at(i));
  return sum;
}

struct Table {
  uint64_t address = 0;
  std::vector<uint8_t> bytes;
};

// A table with a standard header: its length comes from the header.
Table read_table(const memory::GuestMemory& mem, uint64_t gpa) {
  auto length = load<uint32_t>(read_guest(mem, gpa, 8), 4);
  if (length < 36) throw std::runtime_error("table shorter than its header");
  return {gpa, read_guest(mem, gpa, length)};
}

struct Tables {
  uint64_t rsdp_address = 0;
  std::vector<uint8_t> rsdp;
  Table xsdt;
  std::vector<uint64_t> xsdt_entries;
  std::map<std::string, Table> by_signature;  // every table, including FACS and DSDT
};

Tables parse(const memory::GuestMemory& mem, uint64_t rsdp_address) {
  Tables tables;
  tables.rsdp_address = rsdp_address;
  tables.rsdp = read_guest(mem, rsdp_address, 36);
  tables.xsdt = read_table(mem, load<uint64_t>(tables.rsdp, 24));
  for (size_t offset = 36; offset + 8 <= tables.xsdt.bytes.size(); offset += 8) {
    uint64_t address = load<uint64_t>(tables.xsdt.bytes, offset);
    tables.xsdt_entries.push_back(address);
    Table table = read_table(mem, address);
    tables.by_signature[std::string(table.bytes.begin(), table.bytes.begin() + 4)] = table;
  }
  const Table& fadt = tables.by_signature.at("FACP");
  uint64_t facs = load<uint64_t>(fadt.bytes, 132);
  tables.by_signature["FACS"] = {facs, read_guest(mem, facs, 64)};
  tables.by_signature["DSDT"] = read_table(mem, load<uint64_t>(fadt.bytes, 140));
  tables.by_signature["XSDT"] = tables.xsdt;
  return tables;
}

class AcpiTest : public ::testing::Test {
 protected:
  Tables write_and_parse(const AcpiConfig& config) {
    uint64_t rsdp = write_acpi_tables(mem_, config);
    return parse(mem_, rsdp);
  }

  memory::GuestMemory mem_ = memory::GuestMemory::create_ram(16 << 20);
};

// ---- RSDP, XSDT, placement, checksums -----------------------------------------------------------

TEST_F(AcpiTest, RsdpIsAtE0000WithBothChecksums) {
  uint64_t rsdp = write_acpi_tables(mem_, {.cpu_count = 2, .pci = true});
  EXPECT_EQ(rsdp, 0xE0000u);
  auto bytes = read_guest(mem_, rsdp, 36);
  EXPECT_EQ(std::string(bytes.begin(), bytes.begin() + 8), "RSD PTR ");
  EXPECT_EQ(byte_sum(bytes, 20), 0) << "ACPI 1.0 checksum";
  EXPECT_EQ(byte_sum(bytes, 36), 0) << "extended checksum";
  EXPECT_EQ(bytes[15], 2) << "revision";
  EXPECT_EQ(load<uint32_t>(bytes, 20), 36u) << "length";
  EXPECT_NE(load<uint64_t>(bytes, 24), 0u) << "XSDT address";
}

TEST_F(AcpiTest, EveryTableChecksumsToZeroAndLiesInsideTheBiosArea) {
  for (bool pci : {false, true}) {
    SCOPED_TRACE(pci ? "with PCI" : "without PCI");
    Tables tables = write_and_parse({.cpu_count = 3, .pci = pci});
    std::vector<std::pair<uint64_t, uint64_t>> ranges = {{tables.rsdp_address, 36}};
    for (const auto& [signature, table] : tables.by_signature) {
      SCOPED_TRACE(signature);
      uint64_t length = load<uint32_t>(table.bytes, 4);
      EXPECT_EQ(length, table.bytes.size());
      if (signature != "FACS") {  // the FACS has no checksum
        EXPECT_EQ(byte_sum(table.bytes, length), 0);
      }
      EXPECT_GE(table.address, kRsdpAddress);
      EXPECT_LE(table.address + length, kTablesEnd);
      EXPECT_EQ(table.address % 4, 0u);
      ranges.emplace_back(table.address, length);
    }
    std::sort(ranges.begin(), ranges.end());
    for (size_t i = 1; i < ranges.size(); ++i) {
      EXPECT_LE(ranges[i - 1].first + ranges[i - 1].second, ranges[i].first) << "tables overlap";
    }
  }
}

TEST_F(AcpiTest, XsdtListsFadtMadtAndMcfgOnlyWithPci) {
  Tables without_pci = write_and_parse({.cpu_count = 1, .pci = false});
  EXPECT_EQ(without_pci.xsdt_entries.size(), 2u);
  EXPECT_TRUE(without_pci.by_signature.contains("FACP"));
  EXPECT_TRUE(without_pci.by_signature.contains("APIC"));
  EXPECT_FALSE(without_pci.by_signature.contains("MCFG"));

  Tables with_pci = write_and_parse({.cpu_count = 1, .pci = true});
  EXPECT_EQ(with_pci.xsdt_entries.size(), 3u);
  EXPECT_TRUE(with_pci.by_signature.contains("FACP"));
  EXPECT_TRUE(with_pci.by_signature.contains("APIC"));
  EXPECT_TRUE(with_pci.by_signature.contains("MCFG"));
  EXPECT_EQ(with_pci.xsdt.bytes[8], 1) << "XSDT revision";
}

// ---- FADT, FACS, DSDT --------------------------------------------------------------------------

struct Gas {
  uint8_t space_id, bit_width, bit_offset, access_size;
  uint64_t address;
};
Gas load_gas(const std::vector<uint8_t>& bytes, size_t offset) {
  return {bytes.at(offset), bytes.at(offset + 1), bytes.at(offset + 2), bytes.at(offset + 3),
          load<uint64_t>(bytes, offset + 4)};
}

TEST_F(AcpiTest, FadtDescribesKilnsFixedHardware) {
  Tables tables = write_and_parse({.cpu_count = 2, .pci = true});
  const auto& fadt = tables.by_signature.at("FACP").bytes;
  ASSERT_EQ(fadt.size(), 276u) << "full ACPI 6 FADT";
  EXPECT_EQ(fadt[8], 6) << "revision";
  EXPECT_EQ(fadt[131], 3) << "minor version";

  EXPECT_EQ(load<uint16_t>(fadt, 46), 9) << "SCI_INT";
  EXPECT_EQ(load<uint32_t>(fadt, 48), 0u) << "SMI_CMD: always in ACPI mode";
  EXPECT_EQ(load<uint32_t>(fadt, 56), 0x600u) << "PM1a_EVT_BLK";
  EXPECT_EQ(load<uint32_t>(fadt, 60), 0u) << "PM1b_EVT_BLK";
  EXPECT_EQ(load<uint32_t>(fadt, 64), 0x604u) << "PM1a_CNT_BLK";
  EXPECT_EQ(load<uint32_t>(fadt, 68), 0u) << "PM1b_CNT_BLK";
  EXPECT_EQ(load<uint32_t>(fadt, 76), 0u) << "PM_TMR_BLK";
  EXPECT_EQ(load<uint32_t>(fadt, 80), 0u) << "GPE0_BLK";
  EXPECT_EQ(fadt[88], 4) << "PM1_EVT_LEN";
  EXPECT_EQ(fadt[89], 2) << "PM1_CNT_LEN";
  EXPECT_EQ(fadt[91], 0) << "PM_TMR_LEN";

  uint16_t boot_arch = load<uint16_t>(fadt, 109);
  EXPECT_TRUE(boot_arch & (1 << 1)) << "8042 present";
  EXPECT_TRUE(boot_arch & (1 << 2)) << "VGA not present";
  EXPECT_FALSE(boot_arch & (1 << 3)) << "MSI supported";
  EXPECT_FALSE(boot_arch & (1 << 5)) << "CMOS RTC present";

  uint32_t flags = load<uint32_t>(fadt, 112);
  EXPECT_TRUE(flags & (1 << 0)) << "WBINVD";
  EXPECT_FALSE(flags & (1 << 4)) << "PWR_BUTTON clear: fixed-feature power button";
  EXPECT_TRUE(flags & (1 << 5)) << "SLP_BUTTON set: no sleep button";
  EXPECT_TRUE(flags & (1 << 10)) << "RESET_REG_SUP";
  EXPECT_FALSE(flags & (1 << 20)) << "not HW_REDUCED_ACPI";

  Gas reset = load_gas(fadt, 116);
  EXPECT_EQ(reset.space_id, 1) << "system I/O";
  EXPECT_EQ(reset.bit_width, 8);
  EXPECT_EQ(reset.address, 0x608u);
  EXPECT_EQ(fadt[128], 0x01) << "RESET_VALUE";

  Gas pm1a_evt = load_gas(fadt, 148);
  EXPECT_EQ(pm1a_evt.space_id, 1);
  EXPECT_EQ(pm1a_evt.bit_width, 32);
  EXPECT_EQ(pm1a_evt.address, 0x600u);
  Gas pm1a_cnt = load_gas(fadt, 172);
  EXPECT_EQ(pm1a_cnt.space_id, 1);
  EXPECT_EQ(pm1a_cnt.bit_width, 16);
  EXPECT_EQ(pm1a_cnt.address, 0x604u);
  EXPECT_EQ(load_gas(fadt, 208).address, 0u) << "X_PM_TMR_BLK";
}

TEST_F(AcpiTest, FadtPointsAtFacsAndTheCompiledDsdt) {
  Tables tables = write_and_parse({.cpu_count = 1, .pci = false});
  const auto& fadt = tables.by_signature.at("FACP").bytes;
  EXPECT_EQ(load<uint32_t>(fadt, 36), 0u) << "FIRMWARE_CTRL must be 0 when X_FIRMWARE_CTRL is set";

  const Table& facs = tables.by_signature.at("FACS");
  EXPECT_EQ(std::string(facs.bytes.begin(), facs.bytes.begin() + 4), "FACS");
  EXPECT_EQ(load<uint32_t>(facs.bytes, 4), 64u);
  EXPECT_EQ(facs.address % 64, 0u) << "FACS must be 64-byte aligned";

  const Table& dsdt = tables.by_signature.at("DSDT");
  auto aml = dsdt_aml();
  EXPECT_EQ(dsdt.bytes, std::vector<uint8_t>(aml.begin(), aml.end()));
}

TEST_F(AcpiTest, DsdtS5PackageMatchesSlpTyp5) {
  auto aml = dsdt_aml();
  std::string text(aml.begin(), aml.end());
  size_t name = text.find("_S5_");
  ASSERT_NE(name, std::string::npos);
  ASSERT_EQ(aml[name - 1], 0x08) << "NameOp";
  ASSERT_EQ(aml[name + 4], 0x12) << "PackageOp";
  // PkgLength (one byte here), NumElements 4, then SLP_TYPa = 5, SLP_TYPb = 5, two reserved zeros.
  std::vector<uint8_t> contents(aml.begin() + name + 6, aml.begin() + name + 13);
  EXPECT_EQ(contents, (std::vector<uint8_t>{0x04, 0x0A, 0x05, 0x0A, 0x05, 0x00, 0x00}));
}

// ---- MADT --------------------------------------------------------------------------------------

struct MadtEntries {
  std::vector<std::vector<uint8_t>> of_type[16];
};

MadtEntries madt_entries(const std::vector<uint8_t>& madt) {
  MadtEntries entries;
  size_t offset = 44;
  while (offset < madt.size()) {
    uint8_t type = madt.at(offset);
    uint8_t length = madt.at(offset + 1);
    if (length < 2 || offset + length > madt.size()) throw std::runtime_error("bad MADT entry");
    if (type < 16) {
      entries.of_type[type].emplace_back(madt.begin() + offset, madt.begin() + offset + length);
    }
    offset += length;
  }
  if (offset != madt.size()) throw std::runtime_error("MADT entries overrun the table");
  return entries;
}

class MadtTest : public AcpiTest, public ::testing::WithParamInterface<uint32_t> {};

TEST_P(MadtTest, OneEnabledLocalApicPerVcpuPlusIoApicOverridesAndNmi) {
  uint32_t cpus = GetParam();
  Tables tables = write_and_parse({.cpu_count = cpus, .pci = false});
  const auto& madt = tables.by_signature.at("APIC").bytes;
  EXPECT_EQ(load<uint32_t>(madt, 36), 0xFEE00000u) << "local APIC address";
  EXPECT_EQ(load<uint32_t>(madt, 40), 1u) << "PCAT_COMPAT";
  MadtEntries entries = madt_entries(madt);

  ASSERT_EQ(entries.of_type[0].size(), cpus);
  for (uint32_t i = 0; i < cpus; ++i) {
    const auto& lapic = entries.of_type[0][i];
    ASSERT_EQ(lapic.size(), 8u);
    EXPECT_EQ(lapic[2], i) << "processor UID";
    EXPECT_EQ(lapic[3], i) << "APIC ID";
    EXPECT_EQ(load<uint32_t>(lapic, 4), 1u) << "enabled";
  }

  ASSERT_EQ(entries.of_type[1].size(), 1u);
  const auto& ioapic = entries.of_type[1][0];
  ASSERT_EQ(ioapic.size(), 12u);
  EXPECT_EQ(ioapic[2], cpus) << "IOAPIC ID follows the vCPUs' APIC IDs";
  EXPECT_EQ(load<uint32_t>(ioapic, 4), 0xFEC00000u);
  EXPECT_EQ(load<uint32_t>(ioapic, 8), 0u) << "GSI base";

  ASSERT_EQ(entries.of_type[2].size(), 2u);
  std::map<uint8_t, std::pair<uint32_t, uint16_t>> overrides;  // IRQ -> (GSI, flags)
  for (const auto& iso : entries.of_type[2]) {
    ASSERT_EQ(iso.size(), 10u);
    EXPECT_EQ(iso[2], 0) << "ISA bus";
    overrides[iso[3]] = {load<uint32_t>(iso, 4), load<uint16_t>(iso, 8)};
  }
  EXPECT_EQ(overrides.at(0), std::make_pair(2u, uint16_t{0})) << "PIT IRQ0 -> GSI 2";
  EXPECT_EQ(overrides.at(9), std::make_pair(9u, uint16_t{0b1101})) << "SCI: level, active high";

  ASSERT_EQ(entries.of_type[4].size(), 1u);
  const auto& nmi = entries.of_type[4][0];
  ASSERT_EQ(nmi.size(), 6u);
  EXPECT_EQ(nmi[2], 0xFF) << "all processors";
  EXPECT_EQ(nmi[5], 1) << "LINT1";
}

INSTANTIATE_TEST_SUITE_P(CpuCounts, MadtTest, ::testing::Values(1u, 2u, 7u, 64u, kMaxCpus));

// ---- MCFG --------------------------------------------------------------------------------------

TEST_F(AcpiTest, McfgDescribesEcamForAllBuses) {
  Tables tables = write_and_parse({.cpu_count = 1, .pci = true});
  const auto& mcfg = tables.by_signature.at("MCFG").bytes;
  ASSERT_EQ(mcfg.size(), 36u + 8u + 16u) << "header, reserved, one allocation";
  EXPECT_EQ(load<uint64_t>(mcfg, 44), 0xE0000000u) << "ECAM base";
  EXPECT_EQ(load<uint16_t>(mcfg, 52), 0) << "segment";
  EXPECT_EQ(mcfg[54], 0) << "start bus";
  EXPECT_EQ(mcfg[55], 255) << "end bus";
}

// ---- Errors ------------------------------------------------------------------------------------

TEST_F(AcpiTest, RejectsUnsupportedVcpuCounts) {
  EXPECT_THROW(write_acpi_tables(mem_, {.cpu_count = 0}), std::invalid_argument);
  EXPECT_THROW(write_acpi_tables(mem_, {.cpu_count = kMaxCpus + 1}), std::invalid_argument);
}

TEST(AcpiErrors, FailsClearlyWhenRamDoesNotCoverTheTableArea) {
  std::vector<memory::RegionSpec> low_only = {{0, 0x80000}};
  auto mem = memory::GuestMemory::create(low_only);
  try {
    write_acpi_tables(mem, {.cpu_count = 1});
    FAIL() << "expected an error";
  } catch (const std::runtime_error& error) {
    EXPECT_THAT(error.what(), HasSubstr("does not cover"));
  }
}

// ---- Decoding with the ACPICA disassembler ------------------------------------------------------

class TempDir {
 public:
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "kiln-acpi-XXXXXX").string();
    if (!mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

int run_iasl(const std::string& arguments, const std::filesystem::path& log) {
  std::string command =
      std::string("'") + KILN_IASL_PATH + "' " + arguments + " > '" + log.string() + "' 2>&1";
  int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

size_t count(const std::string& text, const std::string& needle) {
  size_t found = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) {
    ++found;
  }
  return found;
}

// Disassembles each table with `iasl -d`, checks the decoded fields, then compiles the
// disassembly back and checks iasl reproduces the table byte for byte: a field iasl understood
// differently from us would come back different.
class IaslTest : public AcpiTest {
 protected:
  void SetUp() override {
    // A missing disassembler is a failure: this test is the independent check of the layouts.
    ASSERT_EQ(access(KILN_IASL_PATH, X_OK), 0) << "iasl not found at " << KILN_IASL_PATH;
    tables_ = write_and_parse({.cpu_count = 4, .pci = true});
  }

  std::string disassemble(const std::string& signature) {
    const auto& bytes = tables_.by_signature.at(signature).bytes;
    auto input = dir_.path() / (signature + ".dat");
    std::ofstream(input, std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()),
               static_cast<std::streamsize>(bytes.size()));
    auto log = dir_.path() / (signature + ".log");
    int status = run_iasl("-d '" + input.string() + "'", log);
    std::string messages = read_text(log);
    EXPECT_EQ(status, 0) << messages;
    EXPECT_THAT(messages, ::testing::Not(HasSubstr("Warning"))) << "e.g. a bad checksum";
    EXPECT_THAT(messages, ::testing::Not(HasSubstr("Error")));
    std::string dsl = read_text(dir_.path() / (signature + ".dsl"));
    EXPECT_FALSE(dsl.empty()) << messages;
    check_recompiles_to(signature, bytes);
    return dsl;
  }

  void check_recompiles_to(const std::string& signature, const std::vector<uint8_t>& original) {
    auto prefix = dir_.path() / ("again-" + signature);
    auto log = dir_.path() / ("again-" + signature + ".log");
    auto dsl = dir_.path() / (signature + ".dsl");
    ASSERT_EQ(run_iasl("-vs -p '" + prefix.string() + "' '" + dsl.string() + "'", log), 0)
        << read_text(log);
    std::ifstream in(prefix.string() + ".aml", std::ios::binary);
    std::vector<uint8_t> again{std::istreambuf_iterator<char>(in), {}};
    ASSERT_EQ(again.size(), original.size());
    for (size_t i = 0; i < original.size(); ++i) {
      // The compiler stamps its own creator ID and revision (and so a new checksum) into tables
      // with a standard header; the FACS has none.
      bool compiler_stamp = signature != "FACS" && (i == 9 || (i >= 28 && i < 36));
      if (!compiler_stamp) {
        EXPECT_EQ(again[i], original[i]) << signature << " byte " << i;
      }
    }
  }

  Tables tables_;
  TempDir dir_;
};

TEST_F(IaslTest, DecodesFadt) {
  std::string dsl = disassemble("FACP");
  EXPECT_THAT(dsl, HasSubstr("Revision : 06"));
  EXPECT_THAT(dsl, HasSubstr("SCI Interrupt : 0009"));
  EXPECT_THAT(dsl, HasSubstr("SMI Command Port : 00000000"));
  EXPECT_THAT(dsl, HasSubstr("PM1A Event Block Address : 00000600"));
  EXPECT_THAT(dsl, HasSubstr("PM1A Control Block Address : 00000604"));
  EXPECT_THAT(dsl, HasSubstr("PM Timer Block Address : 00000000"));
  EXPECT_THAT(dsl, HasSubstr("Address : 0000000000000600")) << "X_PM1a_EVT_BLK";
  EXPECT_THAT(dsl, HasSubstr("Address : 0000000000000604")) << "X_PM1a_CNT_BLK";
  EXPECT_THAT(dsl, HasSubstr("Address : 0000000000000608")) << "RESET_REG";
  EXPECT_THAT(dsl, HasSubstr("Value to cause reset : 01"));
  EXPECT_THAT(dsl, HasSubstr("8042 Present on ports 60/64 (V2) : 1"));
  EXPECT_THAT(dsl, HasSubstr("VGA Not Present (V4) : 1"));
  EXPECT_THAT(dsl, HasSubstr("CMOS RTC Not Present (V5) : 0"));
  EXPECT_THAT(dsl, HasSubstr("Control Method Power Button (V1) : 0"));
  EXPECT_THAT(dsl, HasSubstr("Control Method Sleep Button (V1) : 1"));
  EXPECT_THAT(dsl, HasSubstr("Reset Register Supported (V2) : 1"));
  EXPECT_THAT(dsl, HasSubstr("Hardware Reduced (V5) : 0"));
}

TEST_F(IaslTest, DecodesMadt) {
  std::string dsl = disassemble("APIC");
  EXPECT_THAT(dsl, HasSubstr("Local Apic Address : FEE00000"));
  EXPECT_THAT(dsl, HasSubstr("PC-AT Compatibility : 1"));
  EXPECT_EQ(count(dsl, "[Processor Local APIC]"), 4u);
  EXPECT_EQ(count(dsl, "Processor Enabled : 1"), 4u);
  EXPECT_THAT(dsl, HasSubstr("Local Apic ID : 03"));
  EXPECT_EQ(count(dsl, "[I/O APIC]"), 1u);
  EXPECT_THAT(dsl, HasSubstr("I/O Apic ID : 04"));
  EXPECT_THAT(dsl, HasSubstr("Address : FEC00000"));
  EXPECT_EQ(count(dsl, "[Interrupt Source Override]"), 2u);
  EXPECT_THAT(dsl, HasSubstr("[Local APIC NMI]"));
  EXPECT_THAT(dsl, HasSubstr("Interrupt Input LINT : 01"));
}

TEST_F(IaslTest, DecodesMcfg) {
  std::string dsl = disassemble("MCFG");
  EXPECT_THAT(dsl, HasSubstr("Base Address : 00000000E0000000"));
  EXPECT_THAT(dsl, HasSubstr("Segment Group Number : 0000"));
  EXPECT_THAT(dsl, HasSubstr("Start Bus Number : 00"));
  EXPECT_THAT(dsl, HasSubstr("End Bus Number : FF"));
}

TEST_F(IaslTest, DecodesDsdt) {
  std::string dsl = disassemble("DSDT");
  EXPECT_THAT(dsl, HasSubstr("_S5_: S5 System State"));
  EXPECT_THAT(dsl, HasSubstr("PNP0A08"));
  EXPECT_THAT(dsl, HasSubstr("PNP0C02"));
  EXPECT_THAT(dsl, HasSubstr("PNP0501"));
  EXPECT_THAT(dsl, HasSubstr("PNP0303"));
  EXPECT_THAT(dsl, HasSubstr("0x0000008000000000, // Range Minimum"));
}

TEST_F(IaslTest, DecodesFacsAndXsdt) {
  EXPECT_THAT(disassemble("FACS"), HasSubstr("Length : 00000040"));
  std::string xsdt = disassemble("XSDT");
  EXPECT_EQ(count(xsdt, "ACPI Table Address"), 3u);
}

}  // namespace
}  // namespace kiln::acpi
