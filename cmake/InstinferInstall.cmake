# Installed export set: find_package(instinfer) gives instinfer::instinfer (headers),
# instinfer::core (static C++ library) and instinfer::c (shared C API).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(DIRECTORY include/instinfer DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(TARGETS instinfer_headers instinfer_core instinfer EXPORT instinferTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
set_target_properties(instinfer_headers PROPERTIES EXPORT_NAME instinfer)
set_target_properties(instinfer_core PROPERTIES EXPORT_NAME core)
set_target_properties(instinfer PROPERTIES EXPORT_NAME c)
install(EXPORT instinferTargets NAMESPACE instinfer:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/instinfer)
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/instinferConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/instinferConfig.cmake INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/instinfer)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/instinferConfigVersion.cmake
  COMPATIBILITY SameMajorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/instinferConfig.cmake ${CMAKE_CURRENT_BINARY_DIR}/instinferConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/instinfer)
