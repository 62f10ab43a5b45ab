# Installed export set: find_package(instinfer) gives instinfer::instinfer (headers),
# instinfer::core (static C++ library; links the components instinfer::cpu, ::uring, ::ssd, ::csd,
# ::cuda that were built) and instinfer::c (shared C API); instinfer.pc gives the
# C API to pkg-config users. tests/install/ builds a consumer against the installed tree both ways.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(DIRECTORY include/instinfer DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
set(_instinfer_components instinfer_cpu instinfer_uring)
foreach(component ssd csd cuda)
  if(TARGET instinfer_${component})
    list(APPEND _instinfer_components instinfer_${component})
    set_target_properties(instinfer_${component} PROPERTIES EXPORT_NAME ${component})
  endif()
endforeach()
set_target_properties(instinfer_cpu PROPERTIES EXPORT_NAME cpu)
set_target_properties(instinfer_uring PROPERTIES EXPORT_NAME uring)
install(TARGETS instinfer_headers instinfer_core ${_instinfer_components} instinfer EXPORT instinferTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
# The emulated drive is a helper process of the csd: backend, not a user command: libexec, where
# the backend looks for it (INSTINFER_CSD_LIBEXECDIR in src/backend/csd/CMakeLists.txt).
if(TARGET instinfer-csd)
  install(TARGETS instinfer-csd RUNTIME DESTINATION ${CMAKE_INSTALL_LIBEXECDIR})
endif()
set_target_properties(instinfer_headers PROPERTIES EXPORT_NAME instinfer)
set_target_properties(instinfer_core PROPERTIES EXPORT_NAME core)
set_target_properties(instinfer PROPERTIES EXPORT_NAME c)
install(EXPORT instinferTargets NAMESPACE instinfer:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/instinfer)
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/instinferConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/instinferConfig.cmake INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/instinfer)
# 0.x minor versions only add to the C API (instinfer.map keeps one node per version), so any 0.y
# at or above the one asked for will do.
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/instinferConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMajorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/instinferConfig.cmake ${CMAKE_CURRENT_BINARY_DIR}/instinferConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/instinfer)

# ---- instinfer.pc, beside the CMake package ----------------------------------------------------
# Paths relative to the .pc file's own folder (${pcfiledir}), so the tree can be installed with
# `cmake --install --prefix` anywhere and moved; absolute GNUInstallDirs paths are used as given.
set(_pc_dir "${CMAKE_INSTALL_LIBDIR}/pkgconfig")
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}" OR IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(INSTINFER_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
  set(INSTINFER_PC_LIBDIR "${CMAKE_INSTALL_FULL_LIBDIR}")
  set(INSTINFER_PC_INCLUDEDIR "${CMAKE_INSTALL_FULL_INCLUDEDIR}")
else()
  file(RELATIVE_PATH _pc_up "/instinfer-prefix/${_pc_dir}" "/instinfer-prefix")
  string(REGEX REPLACE "/$" "" _pc_up "${_pc_up}")
  set(INSTINFER_PC_PREFIX "\${pcfiledir}/${_pc_up}")
  set(INSTINFER_PC_LIBDIR "\${prefix}/${CMAKE_INSTALL_LIBDIR}")
  set(INSTINFER_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()
configure_file(${CMAKE_CURRENT_LIST_DIR}/instinfer.pc.in ${CMAKE_CURRENT_BINARY_DIR}/instinfer.pc @ONLY)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/instinfer.pc DESTINATION ${_pc_dir})
