# The one version number of instinfer lives in the C header, beside the API it numbers:
# INSTINFER_VERSION_MAJOR/MINOR/PATCH in include/instinfer/instinfer.h. The top CMakeLists.txt
# reads it here, before project(), so project(VERSION), the library's VERSION/SOVERSION, the
# package version file and instinfer.pc all follow the header (xsimd reads its version the same
# way). The header stays self-contained: a plain C compiler needs nothing generated.
# tests/capi/check_version.cmake fails if any of them disagree.
#
# instinfer_read_header_version(<header> <out_var>): sets <out_var> to "MAJOR.MINOR.PATCH".
function(instinfer_read_header_version header out_var)
  file(STRINGS "${header}" defines REGEX "^#define INSTINFER_VERSION_(MAJOR|MINOR|PATCH) ")
  foreach(part MAJOR MINOR PATCH)
    set(value_${part} "")
    foreach(line IN LISTS defines)
      if(line MATCHES "^#define INSTINFER_VERSION_${part} +([0-9]+)$")
        if(NOT value_${part} STREQUAL "")
          message(FATAL_ERROR "${header} defines INSTINFER_VERSION_${part} twice")
        endif()
        set(value_${part} "${CMAKE_MATCH_1}")
      endif()
    endforeach()
    if(value_${part} STREQUAL "")
      message(FATAL_ERROR "${header} has no '#define INSTINFER_VERSION_${part} <number>'")
    endif()
  endforeach()
  set(${out_var} "${value_MAJOR}.${value_MINOR}.${value_PATCH}" PARENT_SCOPE)
endfunction()
