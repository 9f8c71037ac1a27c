# kiln_add_unit_test(NAME SOURCES src... LIBS lib...)
#   A GoogleTest binary registered with CTest (label "unit"). Unit tests need no KVM and run
#   in the sanitizer build as well.
function(kiln_add_unit_test name)
  cmake_parse_arguments(ARG "" "" "SOURCES;LIBS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_LIBS} GTest::gtest GTest::gtest_main GTest::gmock Threads::Threads)
  add_test(NAME ${name} COMMAND ${name})
  set_tests_properties(${name} PROPERTIES LABELS unit TIMEOUT 300)
  set_property(GLOBAL APPEND PROPERTY KILN_UNIT_TESTS ${name})
endfunction()

# kiln_register_fuzzer(TARGET [CORPUS dir])
#   Lists a libFuzzer executable (built only with KILN_FUZZ=ON and clang) so that
#   `ninja fuzzers` builds them all and scripts/test runs each for a bounded time, from its seed
#   corpus when it has one (build-fuzz/fuzzers.txt: one "binary corpus-or-empty" per line).
function(kiln_register_fuzzer target)
  cmake_parse_arguments(ARG "" "CORPUS" "" ${ARGN})
  set_property(GLOBAL APPEND PROPERTY KILN_FUZZERS "$<TARGET_FILE:${target}> ${ARG_CORPUS}")
  set_property(GLOBAL APPEND PROPERTY KILN_FUZZER_TARGETS ${target})
endfunction()

# Called once at the end of the top-level CMakeLists.txt.
function(kiln_finish_targets)
  get_property(unit_tests GLOBAL PROPERTY KILN_UNIT_TESTS)
  add_custom_target(unit_tests DEPENDS ${unit_tests})
  get_property(fuzzers GLOBAL PROPERTY KILN_FUZZERS)
  get_property(fuzzer_targets GLOBAL PROPERTY KILN_FUZZER_TARGETS)
  string(REPLACE ";" "\n" lines "${fuzzers}")
  file(GENERATE OUTPUT ${PROJECT_BINARY_DIR}/fuzzers.txt CONTENT "${lines}\n")
  add_custom_target(fuzzers DEPENDS ${fuzzer_targets})
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
