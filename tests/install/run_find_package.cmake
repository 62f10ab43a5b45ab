# CMake consumer: configure, build and run tests/install/consumer against the installed tree
# with find_package(instinfer) (C target on instinfer::c, C++ target on instinfer::core).
#   cmake -DPREFIX=<installed tree> -DSOURCE_DIR=<consumer> -DWORK_DIR=<scratch> -P run_find_package.cmake
cmake_minimum_required(VERSION 3.25)
file(REMOVE_RECURSE "${WORK_DIR}")
execute_process(COMMAND "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK_DIR}" "-DCMAKE_PREFIX_PATH=${PREFIX}"
  RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "consumer configure (find_package(instinfer)) failed")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --build "${WORK_DIR}" RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "consumer build failed")
endif()
foreach(exe consumer_c consumer_cpp)
  execute_process(COMMAND "${WORK_DIR}/${exe}" RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${exe} failed (${rc})")
  endif()
endforeach()
