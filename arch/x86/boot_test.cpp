#include "arch/x86/boot.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>

#include "arch/x86/e820.h"

namespace kiln::x86 {
namespace {

constexpr uint64_t kMiB = 1ull << 20;

template <class T>
void put(std::vector<uint8_t>& bytes, size_t offset, T value) {
  std::memcpy(bytes.data() + offset, &value, sizeof(T));
}

template <class T>
T get(const memory::GuestMemory& mem, uint64_t gpa) {
  auto value = mem.read_obj<T>(gpa);
  EXPECT_TRUE(value.has_value()) << std::hex << gpa;
  return value.value_or(T{});
}

std::vector<uint8_t> guest_bytes(const memory::GuestMemory& mem, uint64_t gpa, size_t len) {
  std::vector<uint8_t> out(len);
  EXPECT_TRUE(mem.read(gpa, out));
  return out;
}

// A minimal but well-formed bzImage: the setup header and a protected-mode part filled with
// a recognizable pattern.
struct FakeKernel {
  uint8_t setup_sects = 3;
  uint16_t version = 0x20F;
  uint32_t payload_size = 64 * 1024;
  uint32_t init_size = 4 * kMiB;
  uint64_t pref_address = 16 * kMiB;
  bool relocatable = true;
  uint32_t initrd_addr_max = 0x7FFFFFFF;
  uint32_t cmdline_size = 2047;
  uint16_t xloadflags = 0x7F;

  uint64_t setup_size() const { return (uint64_t{setup_sects ? setup_sects : 4u} + 1) * 512; }

  std::vector<uint8_t> build() const {
    std::vector<uint8_t> image(setup_size() + payload_size);
    image[0x1F1] = setup_sects;
    put<uint32_t>(image, 0x1F4, payload_size / 16);
    put<uint16_t>(image, 0x1FE, 0xAA55);
    image[0x200] = 0xEB;  // jmp short
    image[0x201] = 0x6A;  // header ends at 0x26C
    std::memcpy(&image[0x202], "HdrS", 4);
    put<uint16_t>(image, 0x206, version);
    image[0x211] = 0x01;  // LOADED_HIGH
    put<uint32_t>(image, 0x214, 0x100000);
    put<uint32_t>(image, 0x22C, initrd_addr_max);
    put<uint32_t>(image, 0x230, 0x200000);
    image[0x234] = relocatable;
    image[0x235] = 21;
    put<uint16_t>(image, 0x236, xloadflags);
    put<uint32_t>(image, 0x238, cmdline_size);
    put<uint64_t>(image, 0x258, pref_address);
    put<uint32_t>(image, 0x260, init_size);
    for (uint32_t i = 0; i < payload_size; ++i) image[setup_size() + i] = uint8_t(i * 7 + 3);
    return image;
  }
};

std::string boot_error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const BootError& e) {
    return e.what();
  }
  return "(no BootError)";
}

TEST(SetupHeader, ParsesAWellFormedImage) {
  FakeKernel fake;
  SetupHeader hdr = parse_setup_header(fake.build());
  EXPECT_EQ(hdr.version, 0x20F);
  EXPECT_EQ(hdr.setup_sects, 3);
  EXPECT_EQ(hdr.setup_size(), 4u * 512);
  EXPECT_EQ(hdr.kernel_size(), fake.payload_size);
  EXPECT_EQ(hdr.header_end, 0x26Cu);
  EXPECT_EQ(hdr.pref_address, 16 * kMiB);
  EXPECT_EQ(hdr.init_size, 4 * kMiB);
  EXPECT_TRUE(hdr.relocatable);
}

TEST(SetupHeader, ZeroSetupSectsMeansFour) {
  FakeKernel fake;
  fake.setup_sects = 0;
  auto image = fake.build();
  SetupHeader hdr = parse_setup_header(image);
  EXPECT_EQ(hdr.setup_sects, 4);
  EXPECT_EQ(hdr.setup_size(), 5u * 512);
  // And the loader takes the protected-mode code from offset 5 * 512.
  auto mem = memory::GuestMemory::create_ram(64 * kMiB);
  LoadedKernel loaded = load_linux(mem, image, {}, "", 0);
  std::vector<uint8_t> payload(image.begin() + 5 * 512, image.end());
  EXPECT_EQ(guest_bytes(mem, loaded.kernel_addr, payload.size()), payload);
}

TEST(SetupHeader, RejectsBadImages) {
  auto image = FakeKernel{}.build();
  auto message = [](std::vector<uint8_t> bytes) {
    return boot_error_of([&] { parse_setup_header(bytes); });
  };
  EXPECT_THAT(message({}), testing::HasSubstr("truncated"));
  EXPECT_THAT(message({image.begin(), image.begin() + 0x240}), testing::HasSubstr("truncated"));
  // Setup code ends inside the file but the protected-mode code is cut short.
  EXPECT_THAT(message({image.begin(), image.end() - 1}), testing::HasSubstr("truncated"));
  {
    FakeKernel huge_setup;
    huge_setup.setup_sects = 0xFF;
    auto bytes = huge_setup.build();
    bytes.resize(0x1000);
    EXPECT_THAT(message(bytes), testing::HasSubstr("truncated"));
  }
  auto bad_magic = image;
  bad_magic[0x202] = 'X';
  EXPECT_THAT(message(bad_magic), testing::HasSubstr("magic"));
  auto bad_boot_flag = image;
  put<uint16_t>(bad_boot_flag, 0x1FE, 0);
  EXPECT_THAT(message(bad_boot_flag), testing::HasSubstr("magic"));
  FakeKernel old;
  old.version = 0x20B;
  EXPECT_THAT(message(old.build()), testing::HasSubstr("2.11 is too old"));
  FakeKernel no64;
  no64.xloadflags = 0x2;
  EXPECT_THAT(message(no64.build()), testing::HasSubstr("64-bit"));
  auto zimage = image;
  zimage[0x211] = 0;
  EXPECT_THAT(message(zimage), testing::HasSubstr("zImage"));
  auto no_code = image;
  put<uint32_t>(no_code, 0x1F4, 0);
  EXPECT_THAT(message(no_code), testing::HasSubstr("syssize"));
  auto huge_syssize = image;
  put<uint32_t>(huge_syssize, 0x1F4, 0xFFFFFFFF);
  EXPECT_THAT(message(huge_syssize), testing::HasSubstr("truncated"));
  auto short_header = image;
  short_header[0x201] = 0x10;
  EXPECT_THAT(message(short_header), testing::HasSubstr("header"));
}

TEST(LoadLinux, PlacesEverythingAndFillsBootParams) {
  FakeKernel fake;
  auto image = fake.build();
  std::vector<uint8_t> initramfs(3 * kMiB + 123, 0xA5);
  auto mem = memory::GuestMemory::create_ram(256 * kMiB);
  LoadedKernel loaded = load_linux(mem, image, initramfs, "console=ttyS0 quiet", 0xE0000);

  // Relocatable: loaded at its preferred address, entered at +0x200 with RSI = boot_params.
  EXPECT_EQ(loaded.kernel_addr, 16 * kMiB);
  EXPECT_EQ(loaded.cpu.rip, 16 * kMiB + 0x200);
  EXPECT_EQ(loaded.cpu.rsi, kBootParamsAddr);
  std::vector<uint8_t> payload(image.begin() + fake.setup_size(), image.end());
  EXPECT_EQ(guest_bytes(mem, 16 * kMiB, payload.size()), payload);

  // boot_params: the file's setup header with the loader fields filled in.
  auto params = guest_bytes(mem, kBootParamsAddr, 0x1000);
  EXPECT_EQ(std::vector<uint8_t>(params.begin() + 0x1F1, params.begin() + 0x210),
            std::vector<uint8_t>(image.begin() + 0x1F1, image.begin() + 0x210));
  EXPECT_EQ(get<uint8_t>(mem, kBootParamsAddr + 0x210), 0xFF) << "type_of_loader";
  EXPECT_EQ(get<uint32_t>(mem, kBootParamsAddr + 0x228), kCmdlineAddr);
  EXPECT_EQ(get<uint64_t>(mem, kBootParamsAddr + 0x070), 0xE0000u) << "acpi_rsdp_addr";
  EXPECT_EQ(get<uint32_t>(mem, kBootParamsAddr + 0x260), fake.init_size);
  std::string cmdline = "console=ttyS0 quiet";
  auto stored = guest_bytes(mem, kCmdlineAddr, cmdline.size() + 1);
  EXPECT_EQ(std::string(stored.begin(), stored.end()), cmdline + '\0');

  // Initramfs: page aligned, at the top of RAM, above the kernel's init_size.
  uint32_t rd_addr = get<uint32_t>(mem, kBootParamsAddr + 0x218);
  uint32_t rd_size = get<uint32_t>(mem, kBootParamsAddr + 0x21C);
  EXPECT_EQ(rd_addr, loaded.initramfs_addr);
  EXPECT_EQ(rd_size, initramfs.size());
  EXPECT_EQ(rd_addr % 4096, 0u);
  EXPECT_LE(rd_addr + rd_size, 256 * kMiB);
  EXPECT_GT(rd_addr + rd_size, 256 * kMiB - 4096);
  EXPECT_GE(rd_addr, 16 * kMiB + fake.init_size);
  EXPECT_EQ(guest_bytes(mem, rd_addr, rd_size), initramfs);

  // e820 in the zero page matches build_e820.
  auto expected = build_e820(mem);
  ASSERT_EQ(get<uint8_t>(mem, kBootParamsAddr + 0x1E8), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    uint64_t entry = kBootParamsAddr + 0x2D0 + i * 20;
    EXPECT_EQ(get<uint64_t>(mem, entry), expected[i].addr);
    EXPECT_EQ(get<uint64_t>(mem, entry + 8), expected[i].size);
    EXPECT_EQ(get<uint32_t>(mem, entry + 16), static_cast<uint32_t>(expected[i].type));
  }
}

TEST(LoadLinux, InitramfsRespectsInitrdAddrMax) {
  FakeKernel fake;
  fake.initrd_addr_max = 0x37FFFFFF;  // 896 MiB - 1
  auto mem = memory::GuestMemory::create_ram(1024 * kMiB);
  std::vector<uint8_t> initramfs(5000, 1);
  LoadedKernel loaded = load_linux(mem, fake.build(), initramfs, "", 0);
  EXPECT_EQ(loaded.initramfs_addr, 0x38000000u - 8192);
}

TEST(LoadLinux, NonRelocatableKernelGoesToOneMiB) {
  FakeKernel fake;
  fake.relocatable = false;
  auto mem = memory::GuestMemory::create_ram(64 * kMiB);
  LoadedKernel loaded = load_linux(mem, fake.build(), {}, "", 0);
  EXPECT_EQ(loaded.kernel_addr, kKernelLoadAddr);
  EXPECT_EQ(loaded.cpu.rip, kKernelLoadAddr + 0x200);
  // It still runs at pref_address, so that much RAM must stay free of the initramfs.
  EXPECT_EQ(loaded.kernel_reserved_end, 16 * kMiB + fake.init_size);
  EXPECT_EQ(get<uint32_t>(mem, kBootParamsAddr + 0x218), 0u) << "no initramfs";
}

TEST(LoadLinux, CommandLineLimit) {
  FakeKernel fake;
  fake.cmdline_size = 16;
  auto image = fake.build();
  auto mem = memory::GuestMemory::create_ram(64 * kMiB);
  EXPECT_NO_THROW(load_linux(mem, image, {}, std::string(16, 'a'), 0));
  std::string error = boot_error_of([&] { load_linux(mem, image, {}, std::string(17, 'a'), 0); });
  EXPECT_THAT(error, testing::HasSubstr("command line is 17 bytes"));
  EXPECT_THAT(error, testing::HasSubstr("at most 16"));
  EXPECT_THAT(boot_error_of([&] { load_linux(mem, image, {}, std::string("a\0b", 3), 0); }),
              testing::HasSubstr("NUL"));
}

TEST(LoadLinux, InitramfsTooLargeForRam) {
  auto mem = memory::GuestMemory::create_ram(64 * kMiB);
  std::vector<uint8_t> initramfs(48 * kMiB);
  EXPECT_THAT(boot_error_of([&] { load_linux(mem, FakeKernel{}.build(), initramfs, "", 0); }),
              testing::HasSubstr("initramfs of"));
  std::vector<uint8_t> larger_than_ram(65 * kMiB);
  EXPECT_THAT(boot_error_of([&] { load_linux(mem, FakeKernel{}.build(), larger_than_ram, "", 0); }),
              testing::HasSubstr("initramfs of"));
}

TEST(LoadLinux, OutOfRangePrefAddressIsRefused) {
  FakeKernel fake;
  fake.relocatable = false;
  fake.pref_address = UINT64_MAX - 0x1000;
  auto mem = memory::GuestMemory::create_ram(64 * kMiB);
  EXPECT_THAT(boot_error_of([&] { load_linux(mem, fake.build(), {}, "", 0); }),
              testing::HasSubstr("out of range"));
}

TEST(LoadLinux, TinyGuestIsRefused) {
  for (uint64_t size : {uint64_t{0x8000}, uint64_t{1 * kMiB}, uint64_t{18 * kMiB}}) {
    auto mem = memory::GuestMemory::create_ram(size);
    EXPECT_THAT(boot_error_of([&] { load_linux(mem, FakeKernel{}.build(), {}, "", 0); }),
                testing::HasSubstr("guest memory too small"))
        << size;
  }
}

// ---- ELF vmlinux ----

std::vector<uint8_t> fake_elf(uint64_t entry, uint64_t seg_offset, uint64_t filesz) {
  std::vector<uint8_t> elf(0x2000);
  std::memcpy(elf.data(),
              "\x7f"
              "ELF",
              4);
  elf[4] = 2;  // 64-bit
  elf[5] = 1;  // little endian
  elf[6] = 1;
  put<uint16_t>(elf, 16, 2);   // ET_EXEC
  put<uint16_t>(elf, 18, 62);  // x86-64
  put<uint64_t>(elf, 24, entry);
  put<uint64_t>(elf, 32, 64);  // e_phoff
  put<uint16_t>(elf, 54, 56);
  put<uint16_t>(elf, 56, 2);
  auto phdr = [&](size_t at, uint64_t offset, uint64_t paddr, uint64_t file, uint64_t memsz) {
    put<uint32_t>(elf, at, 1);  // PT_LOAD
    put<uint64_t>(elf, at + 8, offset);
    put<uint64_t>(elf, at + 16, 0xFFFFFFFF80000000ull + paddr);
    put<uint64_t>(elf, at + 24, paddr);
    put<uint64_t>(elf, at + 32, file);
    put<uint64_t>(elf, at + 40, memsz);
  };
  phdr(64, seg_offset, 16 * kMiB, filesz, 0x1000);
  phdr(64 + 56, 0x1800, 16 * kMiB + 0x1000, 0x100, 0x3000);  // data + bss
  for (size_t i = 0x1000; i < elf.size(); ++i) elf[i] = 0xCC;
  return elf;
}

TEST(LoadLinux, ElfVmlinux) {
  auto mem = memory::GuestMemory::create_ram(64 * kMiB);
  // Dirty the bss so the test sees the loader clearing it.
  std::vector<uint8_t> garbage(0x3000, 0x55);
  ASSERT_TRUE(mem.write(16 * kMiB + 0x1000, garbage));
  std::vector<uint8_t> initramfs(4096, 9);
  LoadedKernel loaded =
      load_linux(mem, fake_elf(16 * kMiB + 0x40, 0x1000, 0x800), initramfs, "root=/dev/vda", 0);
  EXPECT_EQ(loaded.cpu.rip, 16 * kMiB + 0x40);
  EXPECT_EQ(loaded.cpu.rsi, kBootParamsAddr);
  EXPECT_EQ(get<uint8_t>(mem, 16 * kMiB), 0xCC);
  EXPECT_EQ(get<uint8_t>(mem, 16 * kMiB + 0x7FF), 0xCC);
  EXPECT_EQ(get<uint8_t>(mem, 16 * kMiB + 0x800), 0u) << "memsz beyond filesz is zeroed";
  EXPECT_EQ(get<uint8_t>(mem, 16 * kMiB + 0x10FF), 0xCC);
  EXPECT_EQ(get<uint8_t>(mem, 16 * kMiB + 0x1100), 0u);
  EXPECT_EQ(get<uint8_t>(mem, 16 * kMiB + 0x3FFF), 0u);
  EXPECT_EQ(get<uint32_t>(mem, kBootParamsAddr + 0x202), 0x53726448u) << "HdrS";
  EXPECT_EQ(get<uint16_t>(mem, kBootParamsAddr + 0x1FE), 0xAA55u);
  EXPECT_EQ(get<uint8_t>(mem, kBootParamsAddr + 0x210), 0xFF);
  EXPECT_EQ(get<uint32_t>(mem, kBootParamsAddr + 0x218), loaded.initramfs_addr);
  EXPECT_GE(loaded.initramfs_addr, 16 * kMiB + 0x4000);
}

TEST(LoadLinux, BadElfIsRefused) {
  auto mem = memory::GuestMemory::create_ram(64 * kMiB);
  auto load = [&](std::vector<uint8_t> elf) {
    return boot_error_of([&] { load_linux(mem, elf, {}, "", 0); });
  };
  EXPECT_THAT(load(fake_elf(16 * kMiB, 0x1F00, 0x800)), testing::HasSubstr("past end"));
  EXPECT_THAT(load(fake_elf(16 * kMiB, UINT64_MAX - 4, 0x800)), testing::HasSubstr("past end"));
  EXPECT_THAT(load(fake_elf(8 * kMiB, 0x1000, 0x800)), testing::HasSubstr("entry point"));
  auto truncated = fake_elf(16 * kMiB, 0x1000, 0x800);
  truncated.resize(100);
  EXPECT_THAT(load(truncated), testing::HasSubstr("truncated"));
  auto wrong_machine = fake_elf(16 * kMiB, 0x1000, 0x800);
  put<uint16_t>(wrong_machine, 18, 183);  // aarch64
  EXPECT_THAT(load(wrong_machine), testing::HasSubstr("x86-64"));
  auto many_phdrs = fake_elf(16 * kMiB, 0x1000, 0x800);
  put<uint16_t>(many_phdrs, 56, 0xFFFF);
  EXPECT_THAT(load(many_phdrs), testing::HasSubstr("truncated"));
  auto small = memory::GuestMemory::create_ram(8 * kMiB);
  EXPECT_THAT(
      boot_error_of([&] { load_linux(small, fake_elf(16 * kMiB, 0x1000, 0x800), {}, "", 0); }),
      testing::HasSubstr("too small"));
}

// ---- the real Debian kernel scripts/setup downloads ----

std::filesystem::path find_real_kernel() {
  const char* home = std::getenv("HOME");
  if (!home) return {};
  std::filesystem::path dir = std::filesystem::path(home) / ".cache/kiln/kernel/current/boot";
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec))
    if (entry.path().filename().string().starts_with("vmlinuz-")) return entry.path();
  return {};
}

TEST(RealKernel, ParsesAndLoadsTheDebianBzImage) {
  std::filesystem::path path = find_real_kernel();
  ASSERT_FALSE(path.empty())
      << "no ~/.cache/kiln/kernel/current/boot/vmlinuz-*: run scripts/setup to fetch the test "
         "kernel";
  std::vector<uint8_t> image = read_boot_file(path.string());
  SetupHeader hdr = parse_setup_header(image);
  EXPECT_GE(hdr.version, 0x20C);
  EXPECT_TRUE(hdr.xloadflags & kXlfKernel64);
  EXPECT_TRUE(hdr.relocatable);
  EXPECT_GE(hdr.cmdline_size, 255u);
  EXPECT_GE(hdr.init_size, hdr.kernel_size());
  EXPECT_LE(hdr.setup_size() + hdr.kernel_size(), image.size());
  EXPECT_EQ(hdr.pref_address % hdr.kernel_alignment, 0u);

  auto mem = memory::GuestMemory::create_ram(512 * kMiB);
  std::vector<uint8_t> initramfs(2 * kMiB, 0x42);
  LoadedKernel loaded = load_linux(mem, image, initramfs, "console=ttyS0 panic=-1", 0xE0000);
  EXPECT_EQ(loaded.kernel_addr, hdr.pref_address);
  EXPECT_EQ(loaded.cpu.rip, hdr.pref_address + 0x200);
  std::vector<uint8_t> code(image.begin() + hdr.setup_size(),
                            image.begin() + hdr.setup_size() + hdr.kernel_size());
  EXPECT_EQ(guest_bytes(mem, loaded.kernel_addr, code.size()), code);
  EXPECT_GE(loaded.initramfs_addr, hdr.pref_address + hdr.init_size);
  EXPECT_LE(loaded.initramfs_addr + initramfs.size(), 512 * kMiB);
  EXPECT_EQ(get<uint32_t>(mem, kBootParamsAddr + 0x202), 0x53726448u);

  // Too little RAM for the kernel's init_size.
  auto small = memory::GuestMemory::create_ram(32 * kMiB);
  EXPECT_THROW(load_linux(small, image, {}, "", 0), BootError);
}

TEST(ReadBootFile, MissingFileNamesThePath) {
  EXPECT_THAT(boot_error_of([] { read_boot_file("/nonexistent/kiln-kernel"); }),
              testing::HasSubstr("/nonexistent/kiln-kernel"));
}

}  // namespace
}  // namespace kiln::x86
