# Cross-build for aarch64 (the emulated CSD's ARM cores) with Debian's g++-aarch64-linux-gnu and
# multiarch arm64 libraries (dpkg --add-architecture arm64; apt-get install liburing-dev:arm64).
# Binaries run under qemu-aarch64(-static): ctest uses CMAKE_CROSSCOMPILING_EMULATOR.
#
#   cmake -S . -B build-aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/toolchains/aarch64-linux-gnu.cmake \
#         -DINSTINFER_CUDA=OFF -DINSTINFER_BUILD_BENCH=OFF -DINSTINFER_BUILD_EXAMPLES=OFF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_LIBRARY_ARCHITECTURE aarch64-linux-gnu)

# Debian's cross compiler already searches /usr/include/aarch64-linux-gnu, /usr/include and
# /usr/lib/aarch64-linux-gnu (multiarch), so arm64 -dev packages need no sysroot.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(ENV{PKG_CONFIG_LIBDIR} "/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig")
set(ENV{PKG_CONFIG_PATH} "")
# xsimd and doctest are header-only and architecture-independent: use the host's CMake packages.
if(EXISTS /usr/lib/x86_64-linux-gnu/cmake/xsimd)
  set(xsimd_DIR /usr/lib/x86_64-linux-gnu/cmake/xsimd CACHE PATH "xsimd (header-only)")
endif()

# Run with the multiarch arm64 loader and libc (libc6:arm64, pulled in by liburing-dev:arm64).
# libstdc++ and libgcc are linked statically: the cross toolchain's copies live beside its own
# (older) libc under /usr/aarch64-linux-gnu, and mixing that loader with the multiarch libc hangs
# the first pthread_create under qemu.
set(CMAKE_EXE_LINKER_FLAGS_INIT "-static-libstdc++ -static-libgcc")
find_program(INSTINFER_QEMU_AARCH64 NAMES qemu-aarch64-static qemu-aarch64 REQUIRED)
set(CMAKE_CROSSCOMPILING_EMULATOR ${INSTINFER_QEMU_AARCH64})
