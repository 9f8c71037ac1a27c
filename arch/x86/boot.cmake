# x86 boot support: Linux boot protocol, e820, GDT/page tables/initial vCPU state, CPUID, MSRs.
# Pure code (no KVM headers): the VMM converts these structs to KVM's.
add_library(kiln_x86
  ${CMAKE_CURRENT_LIST_DIR}/boot.cpp
  ${CMAKE_CURRENT_LIST_DIR}/cpu_state.cpp
  ${CMAKE_CURRENT_LIST_DIR}/cpuid.cpp
  ${CMAKE_CURRENT_LIST_DIR}/e820.cpp
  ${CMAKE_CURRENT_LIST_DIR}/vmlinux.cpp)
target_link_libraries(kiln_x86 PUBLIC kiln_memory kiln_base)
# The bzImage payload decoders (vmlinux.cpp): xz is what Debian's kernels use, zstd and gzip others.
find_package(PkgConfig REQUIRED)
pkg_check_modules(LZMA REQUIRED IMPORTED_TARGET liblzma)
target_link_libraries(kiln_x86 PRIVATE PkgConfig::LZMA ZLIB::ZLIB PkgConfig::ZSTD)

kiln_add_unit_test(x86_boot_test
  SOURCES
    ${CMAKE_CURRENT_LIST_DIR}/boot_test.cpp
    ${CMAKE_CURRENT_LIST_DIR}/cpu_state_test.cpp
    ${CMAKE_CURRENT_LIST_DIR}/cpuid_test.cpp
    ${CMAKE_CURRENT_LIST_DIR}/e820_test.cpp
    ${CMAKE_CURRENT_LIST_DIR}/vmlinux_test.cpp
  LIBS kiln_x86 ZLIB::ZLIB PkgConfig::ZSTD)
