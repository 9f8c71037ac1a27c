// Unpacks the ELF vmlinux a bzImage carries as its compressed payload (boot.rst: payload_offset /
// payload_length, protocol 2.08+), so that the VMM can boot it directly and skip the in-guest
// decompressor: under nested or emulated virtualization that decompressor is most of a boot's
// cost before the kernel's clock starts. The image bytes are untrusted; a bad payload ends in a
// BootError that says what.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "arch/x86/boot_error.h"

namespace kiln::x86 {

// Largest vmlinux accepted (a decompression bomb stops here).
inline constexpr uint64_t kMaxVmlinuxSize = 512ull << 20;

// The bzImage's payload, decompressed (xz, zstd or gzip: what distribution kernels use). Throws
// BootError when the image is not a bzImage, its payload is out of bounds, uses another
// compression, is corrupt, or does not decompress to an x86-64 ELF file.
std::vector<uint8_t> extract_vmlinux(std::span<const uint8_t> bzimage);

// The same kernel with only what a loader reads: each PT_LOAD segment's trailing zeros (.bss,
// .brk and friends, which a stripped vmlinux still carries as file bytes) move from p_filesz into
// p_memsz, which loaders zero-fill, and the segments are packed page-aligned instead of at the
// linker's 2 MiB file alignment. Other program headers and all sections are dropped. Debian's
// 6.1 kernel shrinks from 66 MB to 35 MB: half the bytes to read on every cached boot. Throws
// BootError for an ELF file parse_elf refuses.
std::vector<uint8_t> compact_vmlinux(std::span<const uint8_t> elf);

}  // namespace kiln::x86
