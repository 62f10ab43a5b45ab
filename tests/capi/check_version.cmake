# One version number: everything that states instinfer's version agrees with INSTINFER_VERSION_*
# in instinfer.h (the source, cmake/InstinferVersion.cmake).
#   cmake -DHEADER=<instinfer.h> -DMAP=<instinfer.map> -DPROJECT_VERSION=<project()'s version>
#         -DLIB=<libinstinfer.so.X.Y.Z> -DCONFIG_VERSION_FILE=<instinferConfigVersion.cmake>
#         -DPC_FILE=<instinfer.pc> -P check_version.cmake
cmake_minimum_required(VERSION 3.25)
include(${CMAKE_CURRENT_LIST_DIR}/capi_lists.cmake)

set(failures "")
macro(expect what actual expected)
  if(NOT "${actual}" STREQUAL "${expected}")
    string(APPEND failures "\n  ${what} is '${actual}', instinfer.h says '${expected}'")
  endif()
endmacro()

# The header's three numbers, read here independently of the build's own reader.
file(STRINGS "${HEADER}" defines REGEX "^#define INSTINFER_VERSION_")
foreach(part MAJOR MINOR PATCH)
  set(${part} "")
  foreach(line IN LISTS defines)
    if(line MATCHES "^#define INSTINFER_VERSION_${part} +([0-9]+)$")
      set(${part} "${CMAKE_MATCH_1}")
    endif()
  endforeach()
  if(${part} STREQUAL "")
    message(FATAL_ERROR "${HEADER} has no INSTINFER_VERSION_${part}")
  endif()
endforeach()
set(version "${MAJOR}.${MINOR}.${PATCH}")

expect("project(instinfer VERSION)" "${PROJECT_VERSION}" "${version}")

get_filename_component(lib_name "${LIB}" NAME)
expect("the shared library's file name" "${lib_name}" "libinstinfer.so.${version}")
execute_process(COMMAND readelf -d "${LIB}" OUTPUT_VARIABLE dynamic RESULT_VARIABLE rc)
if(NOT rc EQUAL 0 OR NOT dynamic MATCHES "Library soname: \\[([^]]+)\\]")
  message(FATAL_ERROR "readelf found no SONAME in ${LIB}")
endif()
expect("the SONAME" "${CMAKE_MATCH_1}" "libinstinfer.so.${MAJOR}")

instinfer_read_map("${MAP}")
list(GET map_nodes -1 newest)
expect("the newest node of instinfer.map" "${newest}" "INSTINFER_${MAJOR}.${MINOR}")

file(STRINGS "${CONFIG_VERSION_FILE}" package_line REGEX "^set\\(PACKAGE_VERSION ")
if(NOT package_line MATCHES "^set\\(PACKAGE_VERSION \"([^\"]*)\"\\)")
  message(FATAL_ERROR "no PACKAGE_VERSION in ${CONFIG_VERSION_FILE}")
endif()
expect("instinferConfigVersion.cmake's PACKAGE_VERSION" "${CMAKE_MATCH_1}" "${version}")

file(STRINGS "${PC_FILE}" pc_line REGEX "^Version: ")
if(NOT pc_line MATCHES "^Version: (.*)$")
  message(FATAL_ERROR "no Version: line in ${PC_FILE}")
endif()
expect("instinfer.pc's Version" "${CMAKE_MATCH_1}" "${version}")

if(failures)
  message(FATAL_ERROR "the version numbers disagree:${failures}")
endif()
message(STATUS "instinfer ${version}: header, project(), library file and SONAME, map node ${newest}, "
               "package version file and instinfer.pc agree")
