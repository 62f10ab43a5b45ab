# pkg-config consumer: compile tests/install/consumer/main.c with plain `cc` and the flags of
# `pkg-config --cflags --libs instinfer` from the installed tree, run it, and check that it binds
# the C API by version node (instinfer.map).
#   cmake -DPREFIX=<installed tree> -DLIBDIR=<lib dir> -DPKG_CONFIG=<pkg-config> -DSOURCE=<main.c>
#         -DWORK_DIR=<scratch> -P run_pkg_config.cmake
cmake_minimum_required(VERSION 3.25)
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
find_program(CC cc REQUIRED)
set(ENV{PKG_CONFIG_PATH} "${PREFIX}/${LIBDIR}/pkgconfig:$ENV{PKG_CONFIG_PATH}")

execute_process(COMMAND "${PKG_CONFIG}" --modversion instinfer OUTPUT_VARIABLE version
  OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc)
if(NOT rc EQUAL 0 OR NOT version MATCHES "^([0-9]+)\\.([0-9]+)\\.([0-9]+)$")
  message(FATAL_ERROR "pkg-config --modversion instinfer gave '${version}' (${rc})")
endif()
math(EXPR expected "${CMAKE_MATCH_1} * 10000 + ${CMAKE_MATCH_2} * 100 + ${CMAKE_MATCH_3}")

execute_process(COMMAND "${PKG_CONFIG}" --cflags --libs instinfer OUTPUT_VARIABLE flags
  OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "pkg-config --cflags --libs instinfer failed")
endif()
message(STATUS "pkg-config --cflags --libs instinfer: ${flags}")
separate_arguments(flags UNIX_COMMAND "${flags}")

set(exe "${WORK_DIR}/consumer_pc")
execute_process(COMMAND "${CC}" -std=c11 -Wall -Wextra -Wpedantic -Werror -DINSTINFER_EXPECTED_VERSION=${expected}
                        "${SOURCE}" -o "${exe}" ${flags} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cc with pkg-config's flags failed")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" -E env "LD_LIBRARY_PATH=${PREFIX}/${LIBDIR}" "${exe}" RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "consumer_pc failed (${rc})")
endif()

execute_process(COMMAND nm -D --undefined-only --with-symbol-versions "${exe}" OUTPUT_VARIABLE undefined
  RESULT_VARIABLE rc)
foreach(ref "instinfer_cache_create@INSTINFER_0.1" "instinfer_attend_sparse@INSTINFER_0.2")
  string(FIND "${undefined}" "${ref}" at)
  if(NOT rc EQUAL 0 OR at EQUAL -1)
    message(FATAL_ERROR "consumer_pc does not reference ${ref}:\n${undefined}")
  endif()
endforeach()
