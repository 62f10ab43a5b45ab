// Tests that call a backend directly describe a batch as attend_items; batch_of turns them into the
// CSR attend_batch backends take. The items' rows must be consecutive [n][n_q_heads][head_dim]
// blocks starting at items[0] (checked), as the manager lays them out.
#pragma once

#include <doctest/doctest.h>

#include <cstddef>
#include <span>

#include "instinfer/backend/attend_batch.hpp"

namespace test_support {

struct owned_batch {
  instinfer::attend_batch_builder builder;
  instinfer::attend_batch view;
  operator const instinfer::attend_batch&() const noexcept { return view; }
};

inline owned_batch batch_of(std::span<const instinfer::attend_item> items, uint32_t tokens_per_page, uint32_t n_q_heads,
                            uint32_t head_dim) {
  owned_batch b;
  b.builder.clear(tokens_per_page);
  const size_t row = size_t{n_q_heads} * head_dim;
  for (size_t i = 0; i < items.size(); ++i) {
    const instinfer::attend_item& it = items[i];
    b.builder.add(it.seq, it.chunks, it.n_tokens);
    if (i > 0) {
      REQUIRE(((it.q == nullptr && items[0].q == nullptr) || it.q == items[0].q + i * row));
      REQUIRE(it.out == items[0].out + i * row);
      REQUIRE(((it.lse == nullptr && items[0].lse == nullptr) || it.lse == items[0].lse + i * n_q_heads));
    }
  }
  const instinfer::attend_item first = items.empty() ? instinfer::attend_item{} : items[0];
  b.view = b.builder.view(first.q, first.out, first.lse, n_q_heads, head_dim);
  return b;
}

}  // namespace test_support
