// SparF over a storage backend whose chunks are not host-addressable: the manager stores sealed
// column blocks as chunks of the backend and reads back only the chosen column pages (here through
// the read_chunk fallback: this backend has no read_pages). Checked against the host backend on the
// same values through forks and truncations, with column-block stores failing and recovering, and
// for leaks of column chunks.
#include <doctest/doctest.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "instinfer/backend/host_backend.hpp"
#include "instinfer/kv/kv_cache.hpp"
#include "sparf_test_util.hpp"
#include "support/forwarding_backend.hpp"
#include "support/kv_test_util.hpp"

using namespace instinfer;

namespace {

const auto rel = sparf_test::max_rel_diff;

}  // namespace

TEST_CASE("SparF with column blocks stored on an opaque backend equals the host's, through failures") {
  const kv_shape shape{1, 4, 2, 128, dtype::kF16};
  const auto work = test_support::workload(shape, 4000, 5);
  const size_t row = size_t{shape.n_kv_heads} * shape.head_dim, nq = size_t{shape.n_q_heads} * shape.head_dim;

  auto host = kv_cache::create(test_support::sparf_cache_options(shape)).value();
  // A host backend seen through an opaque interface (no chunk addresses, no read_pages), whose
  // writes into column chunks (chunk_stream::kColumns in the hint) can be made to fail.
  test_support::hidden_capabilities opaque_view;
  opaque_view.host_view = true;
  opaque_view.read_pages = true;
  auto owned =
      std::make_unique<test_support::forwarding_backend>(std::make_unique<host_backend>(), opaque_view, "opaque");
  test_support::forwarding_backend& opaque = *owned;
  bool fail_column_writes = false;
  uint64_t column_writes = 0;
  opaque.set_hook([&](test_support::call c, const chunk_hint* h) -> status {
    if (c != test_support::call::kWrite || h->stream != chunk_stream::kColumns) return {};
    if (fail_column_writes) return {errc::kIoError, "injected column write failure"};
    ++column_writes;
    return {};
  });
  auto cache = kv_cache::create(test_support::sparf_cache_options(shape), std::move(owned)).value();
  CHECK_FALSE(cache->storage().host_view());
  const uint64_t capacity = opaque.free_chunks();
  const uint64_t block = channel_layout::make(4096, 128, dtype::kF16, 0, shape.n_kv_heads)->block_bytes();

  auto append = [&](seq_id hs, seq_id cs, uint32_t from, uint32_t n) {
    REQUIRE(host->append(hs, 0, n, work.k.data() + from * row, work.v.data() + from * row, dtype::kF32).ok());
    REQUIRE(cache->append(cs, 0, n, work.k.data() + from * row, work.v.data() + from * row, dtype::kF32).ok());
  };
  auto compare = [&](seq_id hs, seq_id cs, double c) {
    std::vector<float> ho(nq), co(nq), hl(shape.n_q_heads), cl(shape.n_q_heads);
    REQUIRE(host->attend_sparse(0, std::span<const seq_id>(&hs, 1), work.q.data(), ho.data(), hl.data(),
                                sparf_params::with_compression(c))
                .ok());
    REQUIRE(cache
                ->attend_sparse(0, std::span<const seq_id>(&cs, 1), work.q.data(), co.data(), cl.data(),
                                sparf_params::with_compression(c))
                .ok());
    CHECK(rel(co, ho) <= 1e-6);
    CHECK(rel(cl, hl) <= 1e-6);
  };

  const seq_id hs = host->create_sequence().value(), cs = cache->create_sequence().value();
  append(hs, cs, 0, 1500);
  append(hs, cs, 1500, 1);
  append(hs, cs, 1501, 1100);  // 2601 tokens: 5 sealed column blocks of 512, tail of 41
  CHECK(column_writes > 0);
  CHECK(cache->stats().sparf_column_bytes == block);  // only the tail block is in host memory
  CHECK(host->stats().sparf_column_bytes == 6 * block);
  const uint64_t reads_before = opaque.calls(test_support::call::kReadChunk);
  compare(hs, cs, 0.125);
  CHECK(opaque.calls(test_support::call::kReadChunk) > reads_before);  // column pages came from the backend
  compare(hs, cs, 0.25);
  compare(hs, cs, 1.0);

  // Forks share the stored blocks; truncation and interior removal keep what still holds.
  const seq_id hf = host->fork_sequence(hs).value(), cf = cache->fork_sequence(cs).value();
  compare(hf, cf, 0.125);
  REQUIRE(host->remove_range(hf, 1300, UINT64_MAX).ok());
  REQUIRE(cache->remove_range(cf, 1300, UINT64_MAX).ok());  // block 2 becomes the tail again
  compare(hf, cf, 0.125);
  append(hf, cf, 3000, 700);
  REQUIRE(host->remove_range(hf, 200, 900).ok());
  REQUIRE(cache->remove_range(cf, 200, 900).ok());
  compare(hf, cf, 0.125);
  compare(hs, cs, 0.125);  // the parent is untouched

  // Column stores failing: appends still succeed, the blocks stay in host memory, results hold.
  fail_column_writes = true;
  append(hs, cs, 2601, 1100);
  // 3701 tokens: blocks 5 and 6 could not be stored; with both tails (the fork's too): 4 blocks.
  CHECK(cache->stats().sparf_column_bytes == 4 * block);
  compare(hs, cs, 0.125);
  fail_column_writes = false;
  append(hs, cs, 3701, 1);  // the pending blocks are stored now
  CHECK(cache->stats().sparf_column_bytes == 2 * block);
  compare(hs, cs, 0.125);

  // Nothing leaks: freeing every sequence returns every chunk, column chunks included.
  REQUIRE(cache->free_sequence(cf).ok());
  REQUIRE(cache->free_sequence(cs).ok());
  CHECK(opaque.free_chunks() == capacity);
}
