// The cuda:N backend (see include/instinfer/backend/cuda_backend.hpp for the contract):
// configuration, the VRAM chunk pool, writes and reads. Attention and imports: cuda_attend.cpp.
#include "instinfer/backend/cuda_backend.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "cuda_backend_impl.hpp"
#include "instinfer/cuda/decode.cuh"

namespace instinfer {

using cuda::cuda_status;
using namespace cuda_backend_detail;

int cuda_device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

cuda_backend::cuda_backend(cuda_backend_options options) : impl_(std::make_unique<impl>()) {
  impl_->options = options;
}
cuda_backend::~cuda_backend() = default;

int cuda_backend::device() const noexcept {
  return impl_->options.device;
}

status cuda_backend::configure(const backend_config& config) {
  impl& s = *impl_;
  if (s.configured) return {errc::kInvalidArgument, "cuda backend: configure() may be called only once"};
  INSTINFER_TRY(config.shape.validate());
  if (config.int8_query_dot)
    return {errc::kUnsupported, "cuda backend: int8_query_dot is a CPU kernel option (host and ssd only)"};
  if (config.page.head_dim != config.shape.head_dim || config.page.kv_dtype != config.shape.kv_dtype ||
      page_geometry::check(config.page.page_bytes, config.page.head_dim, config.page.kv_dtype) != errc::kOk ||
      config.page.tokens_per_page != config.page.page_bytes / config.page.row_bytes())
    return {errc::kInvalidArgument, "cuda backend: page geometry does not match the KV shape"};
  const int count = cuda_device_count();
  if (count == 0) return {errc::kUnsupported, "cuda backend: no CUDA device (or no driver) on this machine"};
  if (s.options.device < 0 || s.options.device >= count)
    return {errc::kInvalidArgument, "cuda backend: device " + std::to_string(s.options.device) + " does not exist (" +
                                        std::to_string(count) + " visible)"};
  if (const cudaError_t e = cudaSetDevice(s.options.device); e != cudaSuccess) {
    (void)cudaGetLastError();
    return cuda_status(e, "cudaSetDevice");
  }

  const chunk_layout layout = config.layout();
  uint64_t bytes = config.capacity_bytes ? config.capacity_bytes : s.options.capacity_bytes;
  if (bytes == 0) {
    size_t free_b = 0, total_b = 0;
    if (const cudaError_t e = cudaMemGetInfo(&free_b, &total_b); e != cudaSuccess) {
      (void)cudaGetLastError();
      return cuda_status(e, "cudaMemGetInfo");
    }
    bytes = free_b / 2;
  }
  uint64_t chunks = bytes / layout.chunk_bytes();
  chunks = std::min<uint64_t>(chunks, kInvalidChunk - 1);
  if (chunks == 0)
    return {errc::kInvalidArgument, "cuda backend: capacity of " + std::to_string(bytes) + " bytes holds no chunk of " +
                                        std::to_string(layout.chunk_bytes()) + " bytes"};

  cudaStream_t stream = nullptr;
  if (const cudaError_t e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking); e != cudaSuccess) {
    (void)cudaGetLastError();
    return cuda_status(e, "cudaStreamCreate");
  }
  void* pool = nullptr;
  const uint64_t pool_bytes = chunks * layout.chunk_bytes();
  if (const cudaError_t e = cudaMalloc(&pool, pool_bytes); e != cudaSuccess) {
    (void)cudaGetLastError();
    (void)cudaStreamDestroy(stream);
    return cuda_status(e, ("cudaMalloc of a " + std::to_string(pool_bytes) + "-byte KV page pool").c_str());
  }
  s.config = config;
  s.layout = layout;
  s.stream = stream;
  s.pool = static_cast<std::byte*>(pool);
  s.capacity = chunks;
  s.desc = cuda::paged_kv_desc{s.pool,
                               layout.chunk_bytes(),
                               layout.page.page_bytes,
                               layout.n_kv_heads,
                               layout.page.head_dim,
                               layout.page.kv_dtype,
                               layout.tokens()};
  s.free_list.resize(chunks);
  for (uint64_t i = 0; i < chunks; ++i) s.free_list[i] = static_cast<chunk_id>(chunks - 1 - i);  // low ids first
  s.filled.assign(chunks, 0);
  s.in_use.assign(chunks, 0);
  s.counters.capacity_chunks = chunks;
  s.configured = true;
  return {};
}

uint64_t cuda_backend::capacity_chunks() const noexcept {
  return impl_->capacity;
}
uint64_t cuda_backend::free_chunks() const noexcept {
  return impl_->free_list.size();
}

std::byte* cuda_backend::chunk_device_ptr(chunk_id id) const noexcept {
  if (!impl_->configured || id >= impl_->capacity) return nullptr;
  return impl_->pool + uint64_t{id} * impl_->layout.chunk_bytes();
}

result<chunk_id> cuda_backend::allocate_chunk(const chunk_hint& /*hint*/) noexcept {
  impl& s = *impl_;
  if (!s.configured) return status{errc::kInvalidArgument, "cuda backend: configure() was not called"};
  if (s.free_list.empty())
    return status{errc::kOutOfPages, "cuda backend: pool of " + std::to_string(s.capacity) + " chunks is exhausted"};
  const chunk_id id = s.free_list.back();
  s.free_list.pop_back();
  s.in_use[id] = 1;
  s.filled[id] = 0;
  return id;
}

void cuda_backend::release_chunk(chunk_id id) noexcept {
  impl& s = *impl_;
  if (!s.configured || id >= s.capacity || !s.in_use[id]) return;
  s.in_use[id] = 0;
  s.filled[id] = 0;
  s.free_list.push_back(id);
}

status cuda_backend::write_tokens(chunk_id id, const chunk_hint& /*hint*/, uint32_t first, uint32_t n,
                                  const std::byte* k, const std::byte* v) noexcept {
  impl& s = *impl_;
  INSTINFER_TRY(s.ready());
  INSTINFER_TRY(s.append_checks(id, first, n, k, v));
  if (n == 0) return {};
  const size_t half = uint64_t{n} * s.layout.n_kv_heads * s.layout.page.row_bytes();
  const size_t v_off = align_up(half, 256);
  INSTINFER_TRY(s.rows.reserve(v_off + half));
  std::byte* dk = s.rows.data();
  std::byte* dv = dk + v_off;
  cudaError_t e = cudaMemcpyAsync(dk, k, half, cudaMemcpyHostToDevice, s.stream);
  if (e == cudaSuccess) e = cudaMemcpyAsync(dv, v, half, cudaMemcpyHostToDevice, s.stream);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return cuda_status(e, "cudaMemcpyAsync (K/V rows to the device)");
  }
  INSTINFER_TRY(cuda::launch_write_rows(s.desc, id, first, n, dk, dv, s.stream));
  INSTINFER_TRY(s.sync("write_tokens"));
  s.filled[id] = first + n;
  s.count_append(n);
  s.counters.link_bytes_host_to_device += 2 * half;
  return {};
}

status cuda_backend::write_tokens_device(chunk_id id, uint32_t first, uint32_t n, const void* k_device,
                                         const void* v_device) noexcept {
  impl& s = *impl_;
  INSTINFER_TRY(s.ready());
  INSTINFER_TRY(s.append_checks(id, first, n, k_device, v_device));
  if (n == 0) return {};
  INSTINFER_TRY(cuda::launch_write_rows(s.desc, id, first, n, k_device, v_device, s.stream));
  INSTINFER_TRY(s.sync("write_tokens_device"));
  s.filled[id] = first + n;
  s.count_append(n);
  return {};
}

status cuda_backend::write_chunk(chunk_id id, const chunk_hint& /*hint*/, const std::byte* chunk) noexcept {
  impl& s = *impl_;
  INSTINFER_TRY(s.ready());
  INSTINFER_TRY(s.check_chunk(id, "write_chunk"));
  if (chunk == nullptr) return {errc::kInvalidArgument, "cuda backend: write_chunk of null bytes"};
  if (s.filled[id] != 0) return {errc::kInvalidArgument, "cuda backend: write_chunk needs a fresh chunk"};
  const size_t bytes = s.layout.chunk_bytes();
  const cudaError_t e = cudaMemcpyAsync(chunk_device_ptr(id), chunk, bytes, cudaMemcpyHostToDevice, s.stream);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return cuda_status(e, "cudaMemcpyAsync (write_chunk)");
  }
  INSTINFER_TRY(s.sync("write_chunk"));
  s.filled[id] = s.layout.tokens();
  s.counters.device_bytes_written += bytes;
  s.counters.link_bytes_host_to_device += bytes;
  return {};
}

status cuda_backend::copy_tokens(chunk_id dst, const chunk_hint& /*dst_hint*/, chunk_id src, uint32_t n) noexcept {
  impl& s = *impl_;
  INSTINFER_TRY(s.ready());
  INSTINFER_TRY(s.check_chunk(dst, "copy_tokens (destination)"));
  INSTINFER_TRY(s.check_chunk(src, "copy_tokens (source)"));
  if (dst == src) return {errc::kInvalidArgument, "cuda backend: copy_tokens with dst == src"};
  if (s.filled[dst] != 0) return {errc::kInvalidArgument, "cuda backend: copy_tokens needs a fresh destination chunk"};
  if (n > s.filled[src])
    return {errc::kInvalidArgument, "cuda backend: copy_tokens of " + std::to_string(n) +
                                        " tokens from a chunk holding " + std::to_string(s.filled[src])};
  if (n == 0) return {};
  const size_t pitch = s.layout.page.page_bytes;
  const cudaError_t e = cudaMemcpy2DAsync(chunk_device_ptr(dst), pitch, chunk_device_ptr(src), pitch,
                                          size_t{n} * s.layout.page.row_bytes(), s.layout.pages_per_chunk(),
                                          cudaMemcpyDeviceToDevice, s.stream);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return cuda_status(e, "cudaMemcpy2DAsync (copy_tokens)");
  }
  INSTINFER_TRY(s.sync("copy_tokens"));
  s.filled[dst] = n;
  s.counters.device_bytes_read += s.page_rows_bytes(n);
  s.counters.device_bytes_written += s.page_rows_bytes(n);
  return {};
}

status cuda_backend::read_chunk(chunk_id id, uint32_t n_tokens, std::byte* dst) noexcept {
  impl& s = *impl_;
  INSTINFER_TRY(s.ready());
  INSTINFER_TRY(s.check_chunk(id, "read_chunk"));
  if (n_tokens > s.filled[id])
    return {errc::kInvalidArgument, "cuda backend: read_chunk of " + std::to_string(n_tokens) +
                                        " tokens from a chunk holding " + std::to_string(s.filled[id])};
  if (n_tokens == 0) return {};
  if (dst == nullptr) return {errc::kInvalidArgument, "cuda backend: read_chunk into a null buffer"};
  const size_t pitch = s.layout.page.page_bytes;
  // A full chunk whole, page tails included (a chunk from write_chunk), else the rows only.
  const bool whole = n_tokens == s.layout.tokens();
  const cudaError_t e =
      whole ? cudaMemcpyAsync(dst, chunk_device_ptr(id), s.layout.chunk_bytes(), cudaMemcpyDeviceToHost, s.stream)
            : cudaMemcpy2DAsync(dst, pitch, chunk_device_ptr(id), pitch, size_t{n_tokens} * s.layout.page.row_bytes(),
                                s.layout.pages_per_chunk(), cudaMemcpyDeviceToHost, s.stream);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return cuda_status(e, "cudaMemcpy2DAsync (read_chunk)");
  }
  INSTINFER_TRY(s.sync("read_chunk"));
  const uint64_t moved = whole ? s.layout.chunk_bytes() : s.page_rows_bytes(n_tokens);
  s.counters.device_bytes_read += moved;
  s.counters.link_bytes_device_to_host += moved;
  return {};
}

backend_stats cuda_backend::stats() const noexcept {
  backend_stats st = impl_->counters;
  st.capacity_chunks = impl_->capacity;
  st.used_chunks = impl_->capacity - impl_->free_list.size();
  return st;
}

result<std::unique_ptr<backend>> make_cuda_backend(const backend_uri& uri) {
  if (uri.scheme != cuda_backend::kScheme)
    return status{errc::kInvalidArgument, "make_cuda_backend: scheme '" + uri.scheme + "' is not 'cuda'"};
  cuda_backend_options options;
  if (!uri.path.empty()) {
    int dev = -1;
    const char* b = uri.path.data();
    const char* e = b + uri.path.size();
    auto [p, ec] = std::from_chars(b, e, dev);
    if (ec != std::errc{} || p != e || dev < 0)
      return status{errc::kInvalidArgument,
                    "cuda backend: device must be a non-negative integer, got '" + uri.path + "'"};
    options.device = dev;
  }
  for (const auto& [key, value] : uri.options)
    if (key != "capacity")
      return status{errc::kInvalidArgument, "cuda backend: unknown option '" + key + "' (known: capacity)"};
  auto cap = uri.option_u64("capacity", 0);
  if (!cap.ok()) return cap.error();
  options.capacity_bytes = *cap;
  const int count = cuda_device_count();
  if (count == 0) return status{errc::kUnsupported, "cuda backend: no CUDA device (or no driver) on this machine"};
  if (options.device >= count)
    return status{errc::kInvalidArgument, "cuda backend: device " + std::to_string(options.device) +
                                              " does not exist (" + std::to_string(count) + " visible)"};
  return std::unique_ptr<backend>(std::make_unique<cuda_backend>(options));
}

}  // namespace instinfer
