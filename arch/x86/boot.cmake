# x86 boot support: Linux boot protocol, e820, GDT/page tables/initial vCPU state, CPUID, MSRs.
# Pure code (no KVM headers): the VMM converts these structs to KVM's.
add_library(kiln_x86
  ${CMAKE_CURRENT_LIST_DIR}/boot.cpp
  ${CMAKE_CURRENT_LIST_DIR}/cpu_state.cpp
  ${CMAKE_CURRENT_LIST_DIR}/cpuid.cpp
  ${CMAKE_CURRENT_LIST_DIR}/e820.cpp)
target_link_libraries(kiln_x86 PUBLIC kiln_memory kiln_base)

kiln_add_unit_test(x86_boot_test
  SOURCES
    ${CMAKE_CURRENT_LIST_DIR}/boot_test.cpp
    ${CMAKE_CURRENT_LIST_DIR}/cpu_state_test.cpp
    ${CMAKE_CURRENT_LIST_DIR}/cpuid_test.cpp
    ${CMAKE_CURRENT_LIST_DIR}/e820_test.cpp
  LIBS kiln_x86)
