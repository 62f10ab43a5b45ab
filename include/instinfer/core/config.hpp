// Build-wide macros shared by host, CSD and CUDA code.
#pragma once

#if defined(__CUDACC__)
#define INSTINFER_HOST_DEVICE __host__ __device__
#define INSTINFER_INLINE __forceinline__
#else
#define INSTINFER_HOST_DEVICE
#define INSTINFER_INLINE inline __attribute__((always_inline))
#endif
