# Installs the build tree into a scratch prefix (the ctest fixture both consumer tests use) and
# checks the files a consumer looks for are there.
#   cmake -DBUILD_DIR=<build> -DPREFIX=<scratch prefix> -DLIBDIR=<lib dir> -DINCLUDEDIR=<include dir>
#         [-DDRIVE=<libexec dir>/instinfer-csd] -P install_tree.cmake
cmake_minimum_required(VERSION 3.25)
file(REMOVE_RECURSE "${PREFIX}")
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" RESULT_VARIABLE rc
  OUTPUT_QUIET)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install ${BUILD_DIR} --prefix ${PREFIX} failed")
endif()
foreach(f "${INCLUDEDIR}/instinfer/instinfer.h" "${LIBDIR}/libinstinfer.so" "${LIBDIR}/pkgconfig/instinfer.pc"
          "${LIBDIR}/cmake/instinfer/instinferConfig.cmake" "${LIBDIR}/cmake/instinfer/instinferConfigVersion.cmake"
          ${DRIVE})
  if(NOT EXISTS "${PREFIX}/${f}")
    message(FATAL_ERROR "the installed tree lacks ${f}")
  endif()
endforeach()
message(STATUS "installed into ${PREFIX}")
