# kiln_add_unit_test(NAME SOURCES src... LIBS lib...)
#   A GoogleTest binary registered with CTest (label "unit"). Unit tests need no KVM and run
#   in the sanitizer build as well.
function(kiln_add_unit_test name)
  cmake_parse_arguments(ARG "" "" "SOURCES;LIBS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_LIBS} GTest::gtest GTest::gtest_main GTest::gmock Threads::Threads)
  add_test(NAME ${name} COMMAND ${name})
  set_tests_properties(${name} PROPERTIES LABELS unit TIMEOUT 300)
endfunction()

# kiln_add_e2e_test(NAME COMMAND cmd... [TIMEOUT s])
#   An end-to-end test that needs /dev/kvm: it runs inside the shared harness machine
#   (tools/kvm-sandbox) that the "kvm" fixture boots once for all of them. Label "e2e".
function(kiln_add_e2e_test name)
  cmake_parse_arguments(ARG "" "TIMEOUT" "COMMAND" ${ARGN})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 600)
  endif()
  add_test(NAME ${name}
           COMMAND ${PROJECT_SOURCE_DIR}/tools/kvm-sandbox --in ${KILN_E2E_DIR} -t ${ARG_TIMEOUT} --
                   env KILN_E2E_DIR=${KILN_E2E_DIR} KILN_SOURCE_DIR=${PROJECT_SOURCE_DIR}
                       KILN_BUILD_DIR=${PROJECT_BINARY_DIR} ${ARG_COMMAND})
  set_tests_properties(${name} PROPERTIES LABELS e2e TIMEOUT ${ARG_TIMEOUT}
                       FIXTURES_REQUIRED kvm RESOURCE_LOCK kvm_guest)
endfunction()
