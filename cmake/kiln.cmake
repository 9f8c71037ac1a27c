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

# kiln_add_e2e_machine(NAME)
#   A nested harness machine (tools/kvm-sandbox, one emulated CPU) serving folder
#   KILN_E2E_DIR/NAME. Fixture kvm_NAME boots it before the first test that uses it; the lock
#   kvm_guest_NAME lets it run one test at a time. Two such machines keep two host cores busy.
function(kiln_add_e2e_machine name)
  set(tool ${PROJECT_SOURCE_DIR}/tools/kvm-sandbox)
  set(dir ${KILN_E2E_DIR}/${name})
  add_test(NAME kvm_machine_${name}_start COMMAND ${tool} --start ${dir} -m 8192 -c 1)
  set_tests_properties(kvm_machine_${name}_start PROPERTIES FIXTURES_SETUP kvm_${name}
                       LABELS e2e TIMEOUT 360 RESOURCE_LOCK kvm_guest_${name})
  add_test(NAME kvm_machine_${name}_stop COMMAND ${tool} --stop ${dir})
  set_tests_properties(kvm_machine_${name}_stop PROPERTIES FIXTURES_CLEANUP kvm_${name}
                       LABELS e2e TIMEOUT 60)
endfunction()

# kiln_add_e2e_test(NAME MACHINE m COMMAND cmd... [TIMEOUT s])
#   An end-to-end test that needs /dev/kvm: it runs inside harness machine m (see
#   kiln_add_e2e_machine), with KILN_E2E_DIR set to that machine's writable folder. Label "e2e".
function(kiln_add_e2e_test name)
  cmake_parse_arguments(ARG "" "TIMEOUT;MACHINE" "COMMAND" ${ARGN})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 600)
  endif()
  if(NOT ARG_MACHINE)
    message(FATAL_ERROR "kiln_add_e2e_test(${name}): name its MACHINE")
  endif()
  set(dir ${KILN_E2E_DIR}/${ARG_MACHINE})
  # -r 1: if the emulated harness machine itself dies or hangs (a TCG/nested-SVM failure, not
  # the test's), the harness boots a fresh one and runs the test once more, saying so on stderr.
  add_test(NAME ${name}
           COMMAND ${PROJECT_SOURCE_DIR}/tools/kvm-sandbox --in ${dir} -t ${ARG_TIMEOUT} -r 1 --
                   env KILN_E2E_DIR=${dir} KILN_SOURCE_DIR=${PROJECT_SOURCE_DIR}
                       KILN_BUILD_DIR=${PROJECT_BINARY_DIR} ${ARG_COMMAND})
  math(EXPR ctest_timeout "2 * ${ARG_TIMEOUT} + 300")  # two attempts and a machine boot
  set_tests_properties(${name} PROPERTIES LABELS e2e TIMEOUT ${ctest_timeout}
                       FIXTURES_REQUIRED kvm_${ARG_MACHINE}
                       RESOURCE_LOCK kvm_guest_${ARG_MACHINE})
endfunction()
