# The consumer test (ctest, `cmake -P`): installs shadowkv_core from BUILD_DIR into
# WORK_DIR/prefix, copies SOURCE_DIR (examples/cpp_consumer) to WORK_DIR/src, out of the
# source tree, then configures, builds and runs it with that prefix as its only hint. Fails
# when the installed package or the consumer's compile commands reach for torch, pybind11 or
# Python.
#
# -D variables: BUILD_DIR, SOURCE_DIR, WORK_DIR, GENERATOR, MAKE_PROGRAM, CXX_COMPILER, CONFIG,
# and optional SANITIZE (the -fsanitize list the library was built with; the consumer must
# link the same runtime).
cmake_minimum_required(VERSION 3.26)

foreach(_var BUILD_DIR SOURCE_DIR WORK_DIR GENERATOR CXX_COMPILER CONFIG)
  if(NOT DEFINED ${_var} OR "${${_var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer_test.cmake: -D${_var}=... is required")
  endif()
endforeach()

function(_step what)
  message(STATUS "consumer test: ${what}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "consumer test: ${what} failed (${_rc})")
  endif()
endfunction()

set(_prefix "${WORK_DIR}/prefix")
set(_src "${WORK_DIR}/src")
set(_build "${WORK_DIR}/build")
file(REMOVE_RECURSE "${WORK_DIR}")
file(COPY "${SOURCE_DIR}/" DESTINATION "${_src}")

_step("install into ${_prefix}" ${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${_prefix}" --config "${CONFIG}")

# What was installed must stand on its own: no header includes torch/pybind11/Python, and the
# package files do not name them.
file(GLOB_RECURSE _installed LIST_DIRECTORIES false "${_prefix}/*.h" "${_prefix}/*.cmake")
foreach(_f IN LISTS _installed)
  if(_f MATCHES "\\.h$")
    file(STRINGS "${_f}" _bad REGEX "^[ \t]*#[ \t]*include.*(torch|ATen|c10/|pybind11|Python\\.h)")
  else()
    file(STRINGS "${_f}" _bad REGEX "[Tt]orch|pybind11|Python")
  endif()
  if(_bad)
    message(FATAL_ERROR "consumer test: ${_f} needs torch/Python: ${_bad}")
  endif()
endforeach()
if(NOT EXISTS "${_prefix}/include/shadowkv/shadowkv.h")
  message(FATAL_ERROR "consumer test: the umbrella header include/shadowkv/shadowkv.h was not installed")
endif()

set(_args -S "${_src}" -B "${_build}" -G "${GENERATOR}" "-DCMAKE_PREFIX_PATH=${_prefix}"
  "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" "-DCMAKE_BUILD_TYPE=${CONFIG}" -DCMAKE_EXPORT_COMPILE_COMMANDS=ON)
if(MAKE_PROGRAM)
  list(APPEND _args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(SANITIZE)
  list(APPEND _args "-DCMAKE_CXX_FLAGS=-fsanitize=${SANITIZE} -fno-sanitize-recover=all"
    "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=${SANITIZE}")
endif()
_step("configure ${_src} (a copy of ${SOURCE_DIR})" ${CMAKE_COMMAND} ${_args})

# find_package(shadowkv) must have taken the package from the prefix, not from elsewhere.
file(STRINGS "${_build}/CMakeCache.txt" _dir REGEX "^shadowkv_DIR:")
string(REGEX REPLACE "^shadowkv_DIR:[A-Z]+=" "" _dir "${_dir}")
file(REAL_PATH "${_prefix}" _real_prefix)
if(EXISTS "${_dir}")
  file(REAL_PATH "${_dir}" _dir)
endif()
string(FIND "${_dir}" "${_real_prefix}/" _at)
if(NOT _at EQUAL 0)
  message(FATAL_ERROR "consumer test: find_package(shadowkv) found '${_dir}', not the package under ${_prefix}")
endif()

_step("build" ${CMAKE_COMMAND} --build "${_build}" --config "${CONFIG}")

if(EXISTS "${_build}/compile_commands.json")
  file(READ "${_build}/compile_commands.json" _commands)
  if(_commands MATCHES "torch/include|site-packages|pybind11")
    message(FATAL_ERROR "consumer test: the consumer's compile commands reach for torch/Python:\n${_commands}")
  endif()
endif()

set(_exe "${_build}/shadowkv_consumer")
if(NOT EXISTS "${_exe}")
  set(_exe "${_build}/${CONFIG}/shadowkv_consumer")  # multi-config generators
endif()
_step("run ${_exe}" "${_exe}")
