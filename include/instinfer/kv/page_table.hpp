// CSR page tables: a batch of (sequence, layer) page tables as three arrays, FlashInfer-style.
//
//   indptr[b] .. indptr[b+1]   the range of `indices` holding sequence b's chunk ids, in token order
//   last_page_len[b]           tokens in sequence b's last chunk (0 when it has none)
//
// The view is trivially copyable and can be handed to kernels (host, CSD, CUDA); the owner holds
// the vectors.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

namespace instinfer {

struct page_table_view {
  const uint32_t* indptr = nullptr;         // [batch + 1]
  const uint32_t* indices = nullptr;        // [indptr[batch]]
  const uint32_t* last_page_len = nullptr;  // [batch]
  uint32_t batch = 0;
  uint32_t tokens_per_page = 0;

  constexpr uint32_t n_chunks(uint32_t b) const noexcept { return indptr[b + 1] - indptr[b]; }
  constexpr uint64_t n_tokens(uint32_t b) const noexcept {
    const uint32_t n = n_chunks(b);
    return n == 0 ? 0 : uint64_t{n - 1} * tokens_per_page + last_page_len[b];
  }
};
static_assert(std::is_trivially_copyable_v<page_table_view>);

struct csr_page_table {
  std::vector<uint32_t> indptr;
  std::vector<uint32_t> indices;
  std::vector<uint32_t> last_page_len;
  uint32_t tokens_per_page = 0;

  page_table_view view() const noexcept {
    return {indptr.data(), indices.data(), last_page_len.data(), static_cast<uint32_t>(last_page_len.size()),
            tokens_per_page};
  }
};

}  // namespace instinfer
