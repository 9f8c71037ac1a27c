#include "arch/x86/boot.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <filesystem>

#include "arch/x86/e820.h"

namespace kiln::x86 {
namespace {

constexpr uint64_t kPageSize = 0x1000;

// Offsets into a bzImage / boot_params (boot.rst "THE REAL-MODE KERNEL HEADER", zero-page.rst).
constexpr size_t kOffSetupSects = 0x1F1;
constexpr size_t kOffSyssize = 0x1F4;
constexpr size_t kOffBootFlag = 0x1FE;
constexpr size_t kOffJump = 0x200;
constexpr size_t kOffHeaderMagic = 0x202;
constexpr size_t kOffVersion = 0x206;
constexpr size_t kOffTypeOfLoader = 0x210;
constexpr size_t kOffLoadflags = 0x211;
constexpr size_t kOffCode32Start = 0x214;
constexpr size_t kOffRamdiskImage = 0x218;
constexpr size_t kOffRamdiskSize = 0x21C;
constexpr size_t kOffCmdLinePtr = 0x228;
constexpr size_t kOffInitrdAddrMax = 0x22C;
constexpr size_t kOffKernelAlignment = 0x230;
constexpr size_t kOffRelocatable = 0x234;
constexpr size_t kOffXloadflags = 0x236;
constexpr size_t kOffCmdlineSize = 0x238;
constexpr size_t kOffPrefAddress = 0x258;
constexpr size_t kOffInitSize = 0x260;
constexpr size_t kHeaderMinEnd = 0x264;  // through init_size: every 2.12 header has it

constexpr size_t kOffAcpiRsdpAddr = 0x070;
constexpr size_t kOffE820Entries = 0x1E8;
constexpr size_t kOffE820Table = 0x2D0;
constexpr size_t kE820MaxEntries = 128;
constexpr size_t kE820EntrySize = 20;

constexpr uint16_t kBootFlagMagic = 0xAA55;
constexpr uint32_t kHeaderMagic = 0x53726448;  // "HdrS"
constexpr uint8_t kLoaderTypeUndefined = 0xFF;
constexpr uint64_t kEntry64Offset = 0x200;  // 64-bit entry: load address + 0x200

// Used when the image carries no setup header (ELF vmlinux): Linux's COMMAND_LINE_SIZE on
// x86 and the initrd limit boot.rst gives for kernels that do not state one.
constexpr uint32_t kDefaultCmdlineSize = 2047;
constexpr uint32_t kDefaultInitrdAddrMax = 0x37FF'FFFF;

uint64_t align_up(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}
uint64_t align_down(uint64_t value, uint64_t alignment) { return value / alignment * alignment; }

// Little-endian field access with bounds checks (kiln only runs on x86 hosts, so host order
// is the file's order).
template <class T>
T load_field(std::span<const uint8_t> bytes, uint64_t offset, const char* what) {
  if (offset > bytes.size() || bytes.size() - offset < sizeof(T))
    throw BootError(std::string("kernel image truncated: no room for ") + what);
  T value;
  std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

template <class T>
void store_field(std::span<uint8_t> bytes, size_t offset, T value) {
  std::memcpy(bytes.data() + offset, &value, sizeof(T));
}

std::string hex(uint64_t value) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%#llx", static_cast<unsigned long long>(value));
  return buf;
}

void write_or_throw(const memory::GuestMemory& mem, uint64_t gpa, std::span<const uint8_t> data,
                    const std::string& what) {
  if (!mem.write(gpa, data))
    throw BootError("guest memory too small: cannot place " + what + " (" +
                    std::to_string(data.size()) + " bytes) at " + hex(gpa));
}

// ---- bzImage ----

void validate_sizes(const SetupHeader& hdr, uint64_t file_size) {
  if (hdr.header_end < kHeaderMinEnd || hdr.header_end > hdr.setup_size())
    throw BootError("kernel setup header has an impossible length");
  if (hdr.setup_size() > file_size)
    throw BootError("kernel image truncated: setup code claims " +
                    std::to_string(hdr.setup_size()) + " bytes, file has " +
                    std::to_string(file_size));
  if (hdr.syssize == 0) throw BootError("kernel image has no protected-mode code (syssize 0)");
  if (hdr.kernel_size() > file_size - hdr.setup_size())
    throw BootError("kernel image truncated: protected-mode code needs " +
                    std::to_string(hdr.kernel_size()) + " bytes after the setup code, file has " +
                    std::to_string(file_size - hdr.setup_size()));
  if (hdr.relocatable &&
      (hdr.kernel_alignment == 0 || (hdr.kernel_alignment & (hdr.kernel_alignment - 1))))
    throw BootError("kernel_alignment " + hex(hdr.kernel_alignment) + " is not a power of two");
}

// Where the protected-mode code goes. A relocatable kernel may sit anywhere aligned, and its
// preferred address is where it would run anyway, so it goes there; otherwise boot.rst's
// classic 1 MiB.
uint64_t choose_load_address(const SetupHeader& hdr) {
  if (hdr.relocatable && hdr.pref_address >= kKernelLoadAddr &&
      hdr.pref_address % hdr.kernel_alignment == 0)
    return hdr.pref_address;
  return kKernelLoadAddr;
}

// The end of what the kernel uses before it reads the memory map. The decompressor never runs
// below pref_address (LOAD_PHYSICAL_ADDR), and needs init_size bytes from there.
uint64_t kernel_reserved_end(const SetupHeader& hdr, uint64_t load_addr) {
  uint64_t runtime_start = std::max(load_addr, hdr.pref_address);
  uint64_t size = std::max<uint64_t>(hdr.init_size, hdr.kernel_size());
  if (runtime_start > UINT64_MAX - size)
    throw BootError("kernel pref_address " + hex(hdr.pref_address) + " is out of range");
  return runtime_start + size;
}

// ---- ELF vmlinux ----

constexpr uint32_t kElfMagic = 0x464C457F;  // "\x7fELF"
constexpr uint8_t kElfClass64 = 2;
constexpr uint8_t kElfDataLittle = 1;
constexpr uint16_t kElfMachineX86_64 = 62;
constexpr uint32_t kPtLoad = 1;
constexpr size_t kElfHeaderSize = 64;
constexpr size_t kElfPhdrSize = 56;

bool is_elf(std::span<const uint8_t> image) {
  return image.size() >= 4 && load_field<uint32_t>(image, 0, "ELF magic") == kElfMagic;
}

struct ElfImage {
  uint64_t entry = 0;
  uint64_t lowest = UINT64_MAX;
  uint64_t highest = 0;
};

// Copies every PT_LOAD segment to its physical address and zero-fills the rest of its memsz.
ElfImage load_elf(const memory::GuestMemory& mem, std::span<const uint8_t> image) {
  ElfLayout layout = parse_elf(image);
  ElfImage elf;
  elf.entry = layout.entry;
  for (const ElfSegment& seg : layout.segments) {
    auto dest = mem.slice(seg.paddr, seg.memsz);
    if (!dest)
      throw BootError("guest memory too small: ELF segment at " + hex(seg.paddr) + " of " +
                      std::to_string(seg.memsz) + " bytes");
    std::memcpy(dest->data(), image.data() + seg.offset, seg.filesz);
    std::memset(dest->data() + seg.filesz, 0, seg.memsz - seg.filesz);
    mem.mark_dirty(seg.paddr, seg.memsz);
    elf.lowest = std::min(elf.lowest, seg.paddr);
    elf.highest = std::max(elf.highest, seg.paddr + seg.memsz);
  }
  if (elf.entry < elf.lowest || elf.entry >= elf.highest)
    throw BootError("ELF kernel entry point " + hex(elf.entry) + " is outside its segments");
  return elf;
}

// A setup header for a kernel that came without one: just the magic and what the kernel reads.
SetupHeader synthetic_header() {
  SetupHeader hdr;
  hdr.version = kMinProtocolVersion;
  hdr.loadflags = kLoadedHigh;
  hdr.cmdline_size = kDefaultCmdlineSize;
  hdr.initrd_addr_max = kDefaultInitrdAddrMax;
  hdr.header_end = kHeaderMinEnd;
  return hdr;
}

// ---- shared ----

// The guest RAM region the kernel lives in (below the MMIO hole): initramfs goes there too.
const memory::Region& low_region(const memory::GuestMemory& mem, uint64_t kernel_addr) {
  const memory::Region* region = mem.find(kernel_addr);
  if (!region) throw BootError("guest memory too small: no RAM at " + hex(kernel_addr));
  return *region;
}

void check_kernel_fits(const memory::Region& region, uint64_t reserved_end) {
  if (reserved_end > region.end())
    throw BootError("guest memory too small for this kernel: it needs RAM up to " +
                    hex(reserved_end) + " (" + std::to_string(reserved_end >> 20) +
                    " MiB) to boot");
}

// Puts the initramfs as high as both the kernel (initrd_addr_max) and RAM allow, page aligned,
// above everything the kernel needs while booting. Returns its address.
uint64_t place_initramfs(const memory::GuestMemory& mem, const memory::Region& region,
                         const SetupHeader& hdr, uint64_t reserved_end,
                         std::span<const uint8_t> initramfs) {
  uint64_t limit = std::min(region.end(), uint64_t{hdr.initrd_addr_max} + 1);
  uint64_t size = initramfs.size();
  if (size > limit || align_down(limit - size, kPageSize) < align_up(reserved_end, kPageSize))
    throw BootError("initramfs of " + std::to_string(size) + " bytes does not fit between the " +
                    "kernel (ending at " + hex(reserved_end) + ") and " + hex(limit) +
                    "; give the guest more memory");
  uint64_t addr = align_down(limit - size, kPageSize);
  write_or_throw(mem, addr, initramfs, "initramfs");
  return addr;
}

void write_cmdline(const memory::GuestMemory& mem, const SetupHeader& hdr,
                   std::string_view cmdline) {
  uint64_t max_len = std::min<uint64_t>(hdr.cmdline_size, kCmdlineMax - 1);
  if (cmdline.size() > max_len)
    throw BootError("kernel command line is " + std::to_string(cmdline.size()) +
                    " bytes; this kernel accepts at most " + std::to_string(max_len));
  if (cmdline.find('\0') != std::string_view::npos)
    throw BootError("kernel command line contains a NUL byte");
  std::vector<uint8_t> bytes(cmdline.begin(), cmdline.end());
  bytes.push_back(0);
  write_or_throw(mem, kCmdlineAddr, bytes, "kernel command line");
}

void write_e820(std::span<uint8_t> params, const memory::GuestMemory& mem) {
  std::vector<E820Entry> map = build_e820(mem);
  if (map.size() > kE820MaxEntries) throw BootError("e820 map has too many entries");
  params[kOffE820Entries] = static_cast<uint8_t>(map.size());
  for (size_t i = 0; i < map.size(); ++i) {
    size_t off = kOffE820Table + i * kE820EntrySize;
    store_field<uint64_t>(params, off, map[i].addr);
    store_field<uint64_t>(params, off + 8, map[i].size);
    store_field<uint32_t>(params, off + 16, static_cast<uint32_t>(map[i].type));
  }
}

struct Placement {
  uint64_t kernel_addr = 0;
  uint64_t initramfs_addr = 0;
  uint64_t initramfs_size = 0;
};

// boot_params: the file's setup header (if any) with the loader's fields filled in, plus the
// zero-page fields the 64-bit protocol needs.
void write_boot_params(const memory::GuestMemory& mem, std::span<const uint8_t> image,
                       const SetupHeader& hdr, const Placement& placed, uint64_t rsdp_addr) {
  std::array<uint8_t, kBootParamsSize> params{};
  if (hdr.header_end > kOffSetupSects && image.size() >= hdr.header_end) {
    std::copy(image.begin() + kOffSetupSects, image.begin() + hdr.header_end,
              params.begin() + kOffSetupSects);
  } else {
    store_field<uint16_t>(params, kOffBootFlag, kBootFlagMagic);
    store_field<uint32_t>(params, kOffHeaderMagic, kHeaderMagic);
    store_field<uint16_t>(params, kOffVersion, hdr.version);
    params[kOffJump + 1] = static_cast<uint8_t>(hdr.header_end - kOffHeaderMagic);
    params[kOffLoadflags] = hdr.loadflags;
    store_field<uint32_t>(params, kOffCmdlineSize, hdr.cmdline_size);
    store_field<uint32_t>(params, kOffInitrdAddrMax, hdr.initrd_addr_max);
  }
  params[kOffTypeOfLoader] = kLoaderTypeUndefined;
  store_field<uint32_t>(params, kOffCode32Start, static_cast<uint32_t>(placed.kernel_addr));
  store_field<uint32_t>(params, kOffCmdLinePtr, static_cast<uint32_t>(kCmdlineAddr));
  store_field<uint32_t>(params, kOffRamdiskImage, static_cast<uint32_t>(placed.initramfs_addr));
  store_field<uint32_t>(params, kOffRamdiskSize, static_cast<uint32_t>(placed.initramfs_size));
  store_field<uint64_t>(params, kOffAcpiRsdpAddr, rsdp_addr);
  write_e820(params, mem);
  write_or_throw(mem, kBootParamsAddr, params, "boot_params");
}

LoadedKernel finish_load(const memory::GuestMemory& mem, std::span<const uint8_t> image,
                         const SetupHeader& hdr, uint64_t kernel_addr, uint64_t reserved_end,
                         uint64_t entry, std::span<const uint8_t> initramfs,
                         std::string_view cmdline, uint64_t rsdp_addr) {
  const memory::Region& region = low_region(mem, kernel_addr);
  check_kernel_fits(region, reserved_end);
  Placement placed{kernel_addr, 0, 0};
  if (!initramfs.empty()) {
    placed.initramfs_addr = place_initramfs(mem, region, hdr, reserved_end, initramfs);
    placed.initramfs_size = initramfs.size();
  }
  write_cmdline(mem, hdr, cmdline);
  write_boot_params(mem, image, hdr, placed, rsdp_addr);

  LoadedKernel loaded;
  loaded.cpu = setup_long_mode(mem, entry, kBootParamsAddr);
  loaded.kernel_addr = kernel_addr;
  loaded.kernel_reserved_end = reserved_end;
  loaded.initramfs_addr = placed.initramfs_addr;
  loaded.initramfs_size = placed.initramfs_size;
  return loaded;
}

}  // namespace

SetupHeader parse_setup_header(std::span<const uint8_t> image) {
  if (image.size() < kHeaderMinEnd)
    throw BootError("kernel image truncated: " + std::to_string(image.size()) +
                    " bytes is too short for a setup header");
  if (load_field<uint16_t>(image, kOffBootFlag, "boot_flag") != kBootFlagMagic ||
      load_field<uint32_t>(image, kOffHeaderMagic, "header") != kHeaderMagic)
    throw BootError("not a bzImage: bad boot sector or \"HdrS\" magic");

  SetupHeader hdr;
  hdr.version = load_field<uint16_t>(image, kOffVersion, "version");
  if (hdr.version < kMinProtocolVersion)
    throw BootError("kernel boot protocol " + std::to_string(hdr.version >> 8) + "." +
                    std::to_string(hdr.version & 0xFF) + " is too old: 64-bit boot needs 2.12+");
  hdr.setup_sects = image[kOffSetupSects] == 0 ? 4 : image[kOffSetupSects];
  hdr.syssize = load_field<uint32_t>(image, kOffSyssize, "syssize");
  hdr.loadflags = image[kOffLoadflags];
  hdr.initrd_addr_max = load_field<uint32_t>(image, kOffInitrdAddrMax, "initrd_addr_max");
  hdr.kernel_alignment = load_field<uint32_t>(image, kOffKernelAlignment, "kernel_alignment");
  hdr.relocatable = image[kOffRelocatable] != 0;
  hdr.xloadflags = load_field<uint16_t>(image, kOffXloadflags, "xloadflags");
  hdr.cmdline_size = load_field<uint32_t>(image, kOffCmdlineSize, "cmdline_size");
  hdr.pref_address = load_field<uint64_t>(image, kOffPrefAddress, "pref_address");
  hdr.init_size = load_field<uint32_t>(image, kOffInitSize, "init_size");
  hdr.header_end = kOffHeaderMagic + image[kOffJump + 1];

  if (!(hdr.loadflags & kLoadedHigh))
    throw BootError("kernel is a zImage (not LOADED_HIGH); only bzImage is supported");
  if (!(hdr.xloadflags & kXlfKernel64))
    throw BootError("kernel has no 64-bit entry point (XLF_KERNEL_64 clear)");
  validate_sizes(hdr, image.size());
  return hdr;
}

LoadedKernel load_linux(const memory::GuestMemory& mem, std::span<const uint8_t> kernel,
                        std::span<const uint8_t> initramfs, std::string_view cmdline,
                        uint64_t rsdp_addr) {
  if (is_elf(kernel)) {
    ElfImage elf = load_elf(mem, kernel);
    return finish_load(mem, {}, synthetic_header(), elf.lowest, elf.highest, elf.entry, initramfs,
                       cmdline, rsdp_addr);
  }
  SetupHeader hdr = parse_setup_header(kernel);
  uint64_t load_addr = choose_load_address(hdr);
  uint64_t reserved_end = kernel_reserved_end(hdr, load_addr);
  // Check the whole boot footprint before writing anything big.
  check_kernel_fits(low_region(mem, load_addr), reserved_end);
  write_or_throw(mem, load_addr, kernel.subspan(hdr.setup_size(), hdr.kernel_size()), "kernel");
  return finish_load(mem, kernel, hdr, load_addr, reserved_end, load_addr + kEntry64Offset,
                     initramfs, cmdline, rsdp_addr);
}

FileBytes map_boot_file(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) throw BootError("no such file: " + path);
  try {
    return FileBytes::map(path);
  } catch (const std::system_error& e) {
    throw BootError(e.what());
  }
}

std::vector<uint8_t> read_boot_file(const std::string& path) {
  auto file = map_boot_file(path);
  return {file.bytes().begin(), file.bytes().end()};
}

// Linux links vmlinux with ENTRY(phys_startup_64), so e_entry is already physical.
ElfLayout parse_elf(std::span<const uint8_t> image) {
  if (image.size() < kElfHeaderSize) throw BootError("ELF kernel truncated: no ELF header");
  if (!is_elf(image) || image[4] != kElfClass64 || image[5] != kElfDataLittle ||
      load_field<uint16_t>(image, 18, "e_machine") != kElfMachineX86_64)
    throw BootError("ELF kernel is not a little-endian x86-64 image");
  ElfLayout layout;
  layout.entry = load_field<uint64_t>(image, 24, "e_entry");
  uint64_t phoff = load_field<uint64_t>(image, 32, "e_phoff");
  uint16_t phentsize = load_field<uint16_t>(image, 54, "e_phentsize");
  uint16_t phnum = load_field<uint16_t>(image, 56, "e_phnum");
  if (phentsize < kElfPhdrSize) throw BootError("ELF kernel has malformed program headers");
  for (uint16_t i = 0; i < phnum; ++i) {
    if (phoff > image.size()) throw BootError("ELF kernel truncated: program headers");
    uint64_t ph = phoff + uint64_t{i} * phentsize;
    if (load_field<uint32_t>(image, ph, "p_type") != kPtLoad) continue;
    ElfSegment seg;
    seg.offset = load_field<uint64_t>(image, ph + 8, "p_offset");
    seg.paddr = load_field<uint64_t>(image, ph + 24, "p_paddr");
    seg.filesz = load_field<uint64_t>(image, ph + 32, "p_filesz");
    seg.memsz = load_field<uint64_t>(image, ph + 40, "p_memsz");
    if (seg.filesz > seg.memsz || seg.offset > image.size() ||
        seg.filesz > image.size() - seg.offset)
      throw BootError("ELF kernel truncated: segment " + std::to_string(i) + " past end of file");
    if (seg.paddr > UINT64_MAX - seg.memsz)
      throw BootError("ELF kernel segment " + std::to_string(i) + " wraps around");
    layout.segments.push_back(seg);
  }
  if (layout.segments.empty()) throw BootError("ELF kernel has no loadable segments");
  return layout;
}

}  // namespace kiln::x86
