// Loads a Linux kernel into guest memory following the x86 boot protocol
// (Documentation/arch/x86/boot.rst) and returns the vCPU state for its 64-bit entry point.
// Kernel and initramfs bytes are untrusted: every size and offset is checked, and anything
// wrong ends in a BootError that says what.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "arch/x86/boot_error.h"
#include "arch/x86/cpu_state.h"
#include "base/file_bytes.h"
#include "memory/guest_memory.h"

namespace kiln::x86 {

// Where the loader puts things (docs/MACHINE.md).
inline constexpr uint64_t kBootParamsAddr = 0x7000;
inline constexpr uint64_t kCmdlineAddr = 0x20000;
inline constexpr uint64_t kCmdlineMax = 0x10000;  // buffer size, terminating NUL included
inline constexpr uint64_t kKernelLoadAddr = 0x10'0000;
inline constexpr uint64_t kBootParamsSize = 0x1000;

// setup_header bits (boot.rst).
inline constexpr uint8_t kLoadedHigh = 1 << 0;          // loadflags: bzImage, loaded at 1 MiB+
inline constexpr uint16_t kXlfKernel64 = 1 << 0;        // xloadflags: has the 64-bit entry point
inline constexpr uint16_t kMinProtocolVersion = 0x20C;  // 2.12: first with xloadflags

// The setup header fields the loader uses, decoded from a bzImage.
struct SetupHeader {
  uint8_t setup_sects = 0;  // as interpreted: 0 in the file means 4
  uint32_t syssize = 0;     // protected-mode code size in 16-byte units
  uint16_t version = 0;
  uint8_t loadflags = 0;
  uint32_t initrd_addr_max = 0;
  uint32_t kernel_alignment = 0;
  bool relocatable = false;
  uint16_t xloadflags = 0;
  uint32_t cmdline_size = 0;  // longest command line, terminating NUL excluded
  uint64_t pref_address = 0;
  uint32_t init_size = 0;
  uint32_t header_end = 0;  // file offset just past the setup header: 0x202 + byte at 0x201

  uint64_t setup_size() const { return (uint64_t{setup_sects} + 1) * 512; }
  uint64_t kernel_size() const { return uint64_t{syssize} * 16; }
};

// Decodes and validates the bzImage setup header; throws BootError for a truncated file, bad
// magic, a protocol older than 2.12, a kernel without a 64-bit entry point, or sizes that point
// past the end of the file.
SetupHeader parse_setup_header(std::span<const uint8_t> image);

// What load_linux placed where, plus the vCPU state to start from.
struct LoadedKernel {
  BootCpuState cpu;
  uint64_t kernel_addr = 0;
  uint64_t kernel_reserved_end = 0;  // first byte the kernel does not need while booting
  uint64_t initramfs_addr = 0;       // 0 when there is no initramfs
  uint64_t initramfs_size = 0;
};

// Loads `kernel` (a bzImage, or an uncompressed ELF vmlinux entered at e_entry), the optional
// initramfs and the command line, and writes boot_params (with the e820 map and `rsdp_addr`),
// the GDT and the identity page tables. Throws BootError if anything does not fit.
LoadedKernel load_linux(const memory::GuestMemory& mem, std::span<const uint8_t> kernel,
                        std::span<const uint8_t> initramfs, std::string_view cmdline,
                        uint64_t rsdp_addr);

// One PT_LOAD segment of an ELF vmlinux: file bytes [offset, offset + filesz) go to guest-physical
// paddr, and the segment's memory runs on, zero-filled, to paddr + memsz.
struct ElfSegment {
  uint64_t offset = 0;
  uint64_t paddr = 0;
  uint64_t filesz = 0;
  uint64_t memsz = 0;
};

struct ElfLayout {
  uint64_t entry = 0;  // physical
  std::vector<ElfSegment> segments;
};

// The entry point and loadable segments of an x86-64 ELF vmlinux, each checked to lie within
// `image`. Throws BootError for anything else.
ElfLayout parse_elf(std::span<const uint8_t> image);

// A whole kernel or initramfs file, mapped (see base/file_bytes.h); throws BootError naming the
// file on failure.
FileBytes map_boot_file(const std::string& path);
// The same, copied into a vector the caller may change.
std::vector<uint8_t> read_boot_file(const std::string& path);

}  // namespace kiln::x86
