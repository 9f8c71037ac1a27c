// --kernel-cache DIR: the ELF vmlinux unpacked from a bzImage, kept in DIR across boots so that the
// guest skips its own decompressor (seconds under nested virtualization). Like booting a vmlinux
// directly (Firecracker's way), the kernel then runs at its link address, without KASLR.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/file_bytes.h"

namespace kiln::vmm {

// The vmlinux inside `bzimage`, from DIR when an earlier boot left it there, else unpacked now
// and stored (atomically; a DIR that cannot be written only costs the next boot the unpacking).
// Throws x86::BootError for a payload that cannot be unpacked.
FileBytes cached_vmlinux(const std::string& dir, std::span<const uint8_t> bzimage);

}  // namespace kiln::vmm
