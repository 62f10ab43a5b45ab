// The cuda:N backend (see include/instinfer/backend/cuda_backend.hpp for the contract).
#include "instinfer/backend/cuda_backend.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "instinfer/cuda/decode.cuh"

namespace instinfer {
namespace {

using cuda::cuda_status;

constexpr size_t align_up(size_t x, size_t a) noexcept {
  return (x + a - 1) / a * a;
}

// Grow-only CUDA allocation (device memory or pinned host memory, by the allocator pair): the
// hot path reuses it once it has reached the largest batch seen; pinned host buffers make uploads
// and downloads single DMA transfers.
struct device_memory {
  static cudaError_t allocate(void** p, size_t bytes) noexcept { return cudaMalloc(p, bytes); }
  static void release(void* p) noexcept { (void)cudaFree(p); }
  static constexpr const char* kWhat = "cudaMalloc";
};
struct pinned_memory {
  static cudaError_t allocate(void** p, size_t bytes) noexcept { return cudaMallocHost(p, bytes); }
  static void release(void* p) noexcept { (void)cudaFreeHost(p); }
  static constexpr const char* kWhat = "cudaMallocHost";
};

template <class Memory>
class grow_buffer {
 public:
  grow_buffer() = default;
  grow_buffer(const grow_buffer&) = delete;
  grow_buffer& operator=(const grow_buffer&) = delete;
  ~grow_buffer() { reset(); }

  status reserve(size_t bytes) noexcept {
    if (bytes <= size_) return {};
    reset();
    void* p = nullptr;
    if (const cudaError_t e = Memory::allocate(&p, bytes); e != cudaSuccess) {
      (void)cudaGetLastError();
      return cuda_status(e, (std::string(Memory::kWhat) + "(" + std::to_string(bytes) + " bytes)").c_str());
    }
    data_ = static_cast<std::byte*>(p);
    size_ = bytes;
    return {};
  }
  void reset() noexcept {
    if (data_ != nullptr) Memory::release(data_);
    data_ = nullptr;
    size_ = 0;
  }
  std::byte* data() const noexcept { return data_; }

 private:
  std::byte* data_ = nullptr;
  size_t size_ = 0;
};
using device_buffer = grow_buffer<device_memory>;
using pinned_buffer = grow_buffer<pinned_memory>;

}  // namespace

int cuda_device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

struct cuda_backend::impl {
  cuda_backend_options options;
  bool configured = false;
  backend_config config{};
  chunk_layout layout{};
  cuda::paged_kv_desc desc{};
  cudaStream_t stream = nullptr;
  std::byte* pool = nullptr;
  uint64_t capacity = 0;
  std::vector<chunk_id> free_list;
  std::vector<uint32_t> filled;  // tokens written per chunk
  std::vector<uint8_t> in_use;
  device_buffer rows;       // write_tokens staging: K rows, then V rows
  device_buffer in;         // attend: CSR tables, then queries
  device_buffer out;        // attend: outputs, then lse
  device_buffer workspace;  // attend: split partials
  pinned_buffer host_in;
  pinned_buffer host_out;
  backend_stats counters{};

  ~impl() {
    if (!configured) return;
    (void)cudaSetDevice(options.device);
    if (stream != nullptr) (void)cudaStreamSynchronize(stream);
    rows.reset();
    in.reset();
    out.reset();
    workspace.reset();
    host_in.reset();
    host_out.reset();
    if (pool != nullptr) (void)cudaFree(pool);
    if (stream != nullptr) (void)cudaStreamDestroy(stream);
  }

  status ready() const {
    if (!configured) return {errc::kInvalidArgument, "cuda backend: configure() was not called"};
    if (const cudaError_t e = cudaSetDevice(options.device); e != cudaSuccess) {
      (void)cudaGetLastError();
      return cuda_status(e, "cudaSetDevice");
    }
    return {};
  }
  status check_chunk(chunk_id id, const char* what) const {
    if (id >= capacity || !in_use[id])
      return {errc::kInvalidArgument,
              std::string("cuda backend: ") + what + ": chunk " + std::to_string(id) + " is not an allocated chunk"};
    return {};
  }
  // Wait for the stream; a kernel fault surfaces here.
  status sync(const char* what) const {
    if (const cudaError_t e = cudaStreamSynchronize(stream); e != cudaSuccess) {
      (void)cudaGetLastError();
      return cuda_status(e, what);
    }
    return {};
  }
  uint64_t page_rows_bytes(uint32_t n_tokens) const noexcept {
    return uint64_t{n_tokens} * layout.page.row_bytes() * layout.pages_per_chunk();
  }
  status append_checks(chunk_id id, uint32_t first, uint32_t n, const void* k, const void* v) const {
    INSTINFER_TRY(check_chunk(id, "write_tokens"));
    if (first != filled[id])
      return {errc::kInvalidArgument, "cuda backend: chunks are append-only: write at token " + std::to_string(first) +
                                          " but chunk " + std::to_string(id) + " holds " + std::to_string(filled[id]) +
                                          " tokens"};
    if (n > layout.tokens() - first)
      return {errc::kInvalidArgument, "cuda backend: writing " + std::to_string(n) + " tokens at " +
                                          std::to_string(first) + " overflows a chunk of " +
                                          std::to_string(layout.tokens()) + " tokens"};
    if (n > 0 && (k == nullptr || v == nullptr)) return {errc::kInvalidArgument, "cuda backend: null k or v rows"};
    return {};
  }
  void count_append(uint32_t n) noexcept {
    const uint64_t bytes = page_rows_bytes(n);
    counters.kv_bytes_appended += bytes;
    counters.device_bytes_written += bytes;
  }
};

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

status cuda_backend::attend(uint32_t /*layer*/, const attend_batch& batch) noexcept {
  impl& s = *impl_;
  INSTINFER_TRY(s.ready());
  if (batch.empty()) return {};
  const uint32_t tpp = s.layout.tokens();
  const uint32_t head_dim = s.layout.page.head_dim;
  const uint32_t group = s.config.shape.group_size();
  const uint32_t n_q = s.config.shape.n_q_heads;
  if (batch.size() > 65535) return {errc::kInvalidArgument, "cuda backend: attend batch is limited to 65535"};
  if (batch.n_q_heads != n_q || batch.head_dim != head_dim)
    return {errc::kInvalidArgument, "cuda backend: attend batch rows are not [n_q_heads][head_dim] of this cache"};
  const auto n_batch = static_cast<uint32_t>(batch.size());

  // Validate everything before touching the device.
  uint64_t total_chunks = 0;
  uint32_t max_tokens = 0;
  uint64_t kv_bytes = 0;
  for (uint32_t b = 0; b < n_batch; ++b) {
    const attend_item& it = batch[b];
    const std::string where = "cuda backend: attend item " + std::to_string(b) + ": ";
    if (it.q == nullptr || it.out == nullptr) return {errc::kInvalidArgument, where + "null q or out"};
    const uint64_t n_chunks = it.chunks.size();
    const uint64_t need = (uint64_t{it.n_tokens} + tpp - 1) / tpp;
    if (n_chunks != need)
      return {errc::kInvalidArgument, where + std::to_string(it.n_tokens) + " tokens need " + std::to_string(need) +
                                          " chunks of " + std::to_string(tpp) + ", got " + std::to_string(n_chunks)};
    for (uint64_t c = 0; c < n_chunks; ++c) {
      const chunk_id id = it.chunks[c];
      INSTINFER_TRY(s.check_chunk(id, "attend"));
      const uint32_t want = c + 1 < n_chunks ? tpp : it.n_tokens - static_cast<uint32_t>(c) * tpp;
      if (s.filled[id] < want)
        return {errc::kInvalidArgument, where + "chunk " + std::to_string(id) + " holds " +
                                            std::to_string(s.filled[id]) + " tokens, " + std::to_string(want) +
                                            " are attended"};
    }
    total_chunks += n_chunks;
    max_tokens = std::max(max_tokens, it.n_tokens);
    kv_bytes += s.page_rows_bytes(it.n_tokens);  // K and V rows of every kv head
  }
  if (total_chunks > UINT32_MAX) return {errc::kInvalidArgument, "cuda backend: attend batch has too many chunks"};

  auto plan = cuda::plan_decode(s.desc, group, n_batch, max_tokens, s.options.device);
  if (!plan.ok()) return plan.error();

  // One upload: [indptr][indices][last_page_len] u32, then q; one download: out, then lse.
  const size_t table_bytes = (size_t{n_batch} + 1 + total_chunks + n_batch) * sizeof(uint32_t);
  const size_t q_off = align_up(table_bytes, 256);
  const size_t q_bytes = size_t{n_batch} * n_q * head_dim * sizeof(float);
  const size_t lse_off = align_up(q_bytes, 256);
  const size_t lse_bytes = size_t{n_batch} * n_q * sizeof(float);
  INSTINFER_TRY(s.host_in.reserve(q_off + q_bytes));
  INSTINFER_TRY(s.in.reserve(q_off + q_bytes));
  INSTINFER_TRY(s.host_out.reserve(lse_off + lse_bytes));
  INSTINFER_TRY(s.out.reserve(lse_off + lse_bytes));
  if (plan->workspace_bytes > 0) INSTINFER_TRY(s.workspace.reserve(plan->workspace_bytes));

  auto* h_indptr = reinterpret_cast<uint32_t*>(s.host_in.data());
  uint32_t* h_indices = h_indptr + n_batch + 1;
  uint32_t* h_last = h_indices + total_chunks;
  auto* h_q = reinterpret_cast<float*>(s.host_in.data() + q_off);
  // The batch's CSR view goes up as it is (rebased when it is a window of a larger table).
  const page_table_view& pt = batch.pages;
  for (uint32_t b = 0; b <= n_batch; ++b) h_indptr[b] = pt.indptr[b] - pt.indptr[0];
  std::memcpy(h_indices, pt.indices + pt.indptr[0], total_chunks * sizeof(uint32_t));
  std::memcpy(h_last, pt.last_page_len, size_t{n_batch} * sizeof(uint32_t));
  std::memcpy(h_q, batch.q, q_bytes);

  const auto* d_indptr = reinterpret_cast<const uint32_t*>(s.in.data());
  cuda::decode_launch args;
  args.kv = s.desc;
  args.table = page_table_view{d_indptr, d_indptr + n_batch + 1, d_indptr + n_batch + 1 + total_chunks, n_batch, tpp};
  args.group_size = group;
  args.scale = s.config.scale != 0.0f ? s.config.scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
  args.softcap = s.config.softcap;
  args.q = reinterpret_cast<const float*>(s.in.data() + q_off);
  args.out = reinterpret_cast<float*>(s.out.data());
  args.lse = reinterpret_cast<float*>(s.out.data() + lse_off);

  cudaError_t e = cudaMemcpyAsync(s.in.data(), s.host_in.data(), q_off + q_bytes, cudaMemcpyHostToDevice, s.stream);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return cuda_status(e, "cudaMemcpyAsync (attend tables and queries)");
  }
  INSTINFER_TRY(cuda::launch_decode(args, *plan, s.workspace.data(), s.stream));
  e = cudaMemcpyAsync(s.host_out.data(), s.out.data(), lse_off + lse_bytes, cudaMemcpyDeviceToHost, s.stream);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return cuda_status(e, "cudaMemcpyAsync (attend outputs)");
  }
  INSTINFER_TRY(s.sync("attend"));

  const auto* h_out = reinterpret_cast<const float*>(s.host_out.data());
  const auto* h_lse = reinterpret_cast<const float*>(s.host_out.data() + lse_off);
  std::memcpy(batch.out, h_out, q_bytes);
  if (batch.lse != nullptr) std::memcpy(batch.lse, h_lse, lse_bytes);
  s.counters.link_bytes_host_to_device += q_off + q_bytes;
  s.counters.link_bytes_device_to_host += lse_off + lse_bytes;
  s.counters.device_bytes_read += kv_bytes;
  return {};
}

status cuda_backend::import_chunks(backend& src, std::span<const chunk_id> src_ids, std::span<const uint32_t> n_tokens,
                                   std::span<const chunk_id> dst_ids) noexcept {
  impl& s = *impl_;
  INSTINFER_TRY(s.ready());
  if (src_ids.size() != n_tokens.size() || src_ids.size() != dst_ids.size())
    return {errc::kInvalidArgument,
            "cuda backend: import_chunks needs as many source ids, token counts and "
            "destination ids"};
  if (static_cast<const backend*>(&src) == this)
    return {errc::kInvalidArgument, "cuda backend: import_chunks from itself (use copy_tokens)"};
  for (size_t i = 0; i < dst_ids.size(); ++i) {
    INSTINFER_TRY(s.check_chunk(dst_ids[i], "import_chunks"));
    if (s.filled[dst_ids[i]] != 0)
      return {errc::kInvalidArgument, "cuda backend: import_chunks needs fresh destination chunks (chunk " +
                                          std::to_string(dst_ids[i]) + " holds tokens)"};
    if (n_tokens[i] > s.layout.tokens())
      return {errc::kInvalidArgument, "cuda backend: import_chunks of " + std::to_string(n_tokens[i]) +
                                          " tokens into a chunk of " + std::to_string(s.layout.tokens())};
    for (size_t j = 0; j < i; ++j)
      if (dst_ids[j] == dst_ids[i])
        return {errc::kInvalidArgument,
                "cuda backend: import_chunks names destination chunk " + std::to_string(dst_ids[i]) + " twice"};
  }
  if (dst_ids.empty()) return {};

  // Two pinned bounce slots of up to kGroup chunks: slot g % 2 is refilled only after its previous
  // uploads completed. A source with read_pages (ssd) reads a whole group as one batch of page
  // reads (one io_uring submission); others fall back to read_chunk per chunk.
  constexpr size_t kGroup = 8;
  const size_t chunk = s.layout.chunk_bytes();
  INSTINFER_TRY(s.host_in.reserve(2 * kGroup * chunk));
  std::vector<page_read> reads;
  try {
    reads.reserve(kGroup * s.layout.pages_per_chunk());
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "cuda backend: import_chunks read plan"};
  }
  cudaEvent_t done[2] = {nullptr, nullptr};
  for (auto& e : done)
    if (const cudaError_t err = cudaEventCreateWithFlags(&e, cudaEventDisableTiming); err != cudaSuccess) {
      (void)cudaGetLastError();
      for (auto& x : done)
        if (x != nullptr) (void)cudaEventDestroy(x);
      return cuda_status(err, "cudaEventCreate");
    }
  status failed;
  size_t enqueued = 0;  // chunks whose upload is on the stream
  const size_t pitch = s.layout.page.page_bytes;
  for (size_t g0 = 0, g = 0; g0 < dst_ids.size(); g0 += kGroup, ++g) {
    const size_t g1 = std::min(dst_ids.size(), g0 + kGroup);
    std::byte* slot = s.host_in.data() + (g % 2) * kGroup * chunk;
    if (g >= 2) {
      if (const cudaError_t err = cudaEventSynchronize(done[g % 2]); err != cudaSuccess) {
        (void)cudaGetLastError();
        failed = cuda_status(err, "import_chunks (upload)");
        break;
      }
    }
    reads.clear();
    for (size_t i = g0; i < g1; ++i)
      if (n_tokens[i] > 0)
        for (uint32_t p = 0; p < s.layout.pages_per_chunk(); ++p)
          reads.push_back({src_ids[i], n_tokens[i], p, slot + (i - g0) * chunk + size_t{p} * pitch});
    failed = reads.empty() ? status{} : src.read_pages(reads);
    if (failed.code() == errc::kUnsupported) {
      failed = {};
      for (size_t i = g0; i < g1 && failed.ok(); ++i)
        if (n_tokens[i] > 0) failed = src.read_chunk(src_ids[i], n_tokens[i], slot + (i - g0) * chunk);
    }
    if (!failed.ok()) break;
    cudaError_t err = cudaSuccess;
    for (size_t i = g0; i < g1 && err == cudaSuccess; ++i)
      if (n_tokens[i] > 0)
        err = cudaMemcpy2DAsync(chunk_device_ptr(dst_ids[i]), pitch, slot + (i - g0) * chunk, pitch,
                                size_t{n_tokens[i]} * s.layout.page.row_bytes(), s.layout.pages_per_chunk(),
                                cudaMemcpyHostToDevice, s.stream);
    if (err == cudaSuccess) err = cudaEventRecord(done[g % 2], s.stream);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      failed = cuda_status(err, "import_chunks (upload)");
      break;
    }
    enqueued = g1;
  }
  // Drain: every enqueued upload completes before the bounce slots can be reused; only then do
  // the imported chunks count as written.
  const status drained = s.sync("import_chunks");
  if (drained.ok())
    for (size_t i = 0; i < enqueued; ++i) {
      s.filled[dst_ids[i]] = n_tokens[i];
      s.count_append(n_tokens[i]);
      s.counters.link_bytes_host_to_device += s.page_rows_bytes(n_tokens[i]);
    }
  for (auto& e : done) (void)cudaEventDestroy(e);
  if (!failed.ok()) return failed;
  return drained;
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
