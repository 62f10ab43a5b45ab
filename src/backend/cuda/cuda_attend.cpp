// The cuda:N backend's attention (the paged decode kernel over CSR tables) and its imports of
// chunks from another backend.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "cuda_backend_impl.hpp"
#include "instinfer/backend/cuda_backend.hpp"
#include "instinfer/cuda/decode.cuh"

namespace instinfer {

using cuda::cuda_status;
using namespace cuda_backend_detail;

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

}  // namespace instinfer
