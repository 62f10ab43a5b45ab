// SparF over the chunks a real KV backend stored gives the same result as over chunks built by
// hand from the same values: kv_cache (host, and ssd:<file> where io_uring works) is fed in
// uneven appends, its chunks are read back through backend::read_chunk, and the SparF index is
// fed from kv_cache::read_tokens. Until backends run SparF themselves (the attend_sparse hook
// proposed for the backends), this pins the data SparF sees on every backend.
#include <doctest/doctest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include <unistd.h>

#include "instinfer/kv/kv_cache.hpp"
#include "sparf_test_util.hpp"

using namespace instinfer;
using namespace sparf_test;

namespace {

std::string scratch(const char* name) {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir ? dir : "/tmp") + "/instinfer-sparf-" + std::to_string(::getpid()) + "-" + name;
}

}  // namespace

TEST_CASE("sparf: the same stored values give the same result on every backend") {
  const uint32_t H = 2, G = 2, d = 128, n = 1100, layer = 1;
  synthetic::attention_workload_params wp;
  wp.n_tokens = n;
  wp.n_kv_heads = H;
  wp.group_size = G;
  wp.head_dim = d;
  wp.seed = 21;
  const auto wl = synthetic::make_attention_workload(wp);
  const auto g = page_geometry::make(4096, d, dtype::kF16).value();
  const sparf_config cfg = sparf_config::make(chunk_layout::make(g, H), 4, G).value();
  const stored_layer ref = store(cfg, wl.k, wl.v, n);

  for (const std::string& uri : {std::string("host"), "ssd:" + scratch("cache.kv")}) {
    CAPTURE(uri);
    cache_options o;
    o.shape = kv_shape{2, H * G, H, d, dtype::kF16};
    o.page_bytes = 4096;
    o.capacity_bytes = 64ull << 20;
    o.backend_uri = uri;
    auto cache = kv_cache::create(o);
    if (!cache.ok()) {
      const errc e = cache.error().code();
      if (uri != "host" && (e == errc::kUnsupported || e == errc::kIoError)) {
        MESSAGE("skipping " << uri << ": " << cache.error().to_string());
        continue;
      }
      FAIL(cache.error().to_string());
    }
    kv_cache& c = *cache.value();
    const seq_id s = c.create_sequence().value();
    // Uneven appends of f32 rows (converted by the cache to f16, as `store` does).
    uint32_t done = 0;
    for (uint32_t step : {1u, 15u, 300u, 17u, 512u, 255u}) {
      const uint32_t m = std::min(step, n - done);
      const size_t off = size_t{done} * H * d;
      REQUIRE(c.append(s, layer, m, wl.k.data() + off, wl.v.data() + off, dtype::kF32).ok());
      done += m;
    }
    REQUIRE(done == n);
    // The chunks as the backend stored them.
    csr_page_table pt;
    const seq_id seqs[1] = {s};
    REQUIRE(c.page_table(layer, seqs, pt).ok());
    const uint32_t tpp = g.tokens_per_page;
    std::vector<page_buffer> chunks;
    std::vector<const std::byte*> ptrs;
    for (uint32_t i = pt.indptr[0]; i < pt.indptr[1]; ++i) {
      const uint32_t j = i - pt.indptr[0];
      const uint32_t tokens = std::min(tpp, n - j * tpp);
      chunks.emplace_back(cfg.tokens.chunk_bytes(), std::byte{0});
      REQUIRE(c.storage().read_chunk(pt.indices[i], tokens, chunks.back().data()).ok());
    }
    for (const auto& ch : chunks) ptrs.push_back(ch.data());
    // The index from the stored rows.
    std::vector<std::byte> kb, vb;
    REQUIRE(c.read_tokens(s, layer, kb, vb).ok());
    REQUIRE(kb.size() == size_t{n} * H * d * 2);
    auto index = sparf_index::create(cfg.columns).value();
    REQUIRE(index.append(n, kb.data(), vb.data()).ok());
    for (double comp : {1.0, 0.125}) {
      CAPTURE(comp);
      const auto p = sparf_params::with_compression(comp);
      std::vector<float> out_ref(size_t{H} * G * d), out(out_ref.size()), lse_ref(H * G), lse(H * G);
      sparf_workspace ws;
      const sparf_work wr = ref.work(wl.q.data(), out_ref.data(), lse_ref.data());
      REQUIRE(sparf_attend(cfg, p, std::span<const sparf_work>(&wr, 1), ws).ok());
      sparf_work w = wr;
      w.chunks = ptrs.data();
      w.n_chunks = static_cast<uint32_t>(ptrs.size());
      w.column_blocks = index.block_pointers();
      w.n_column_blocks = index.n_blocks();
      w.v_mean = index.v_mean();
      w.out = out.data();
      w.lse = lse.data();
      REQUIRE(sparf_attend(cfg, p, std::span<const sparf_work>(&w, 1), ws).ok());
      CHECK(std::memcmp(out.data(), out_ref.data(), out.size() * sizeof(float)) == 0);
      CHECK(std::memcmp(lse.data(), lse_ref.data(), lse.size() * sizeof(float)) == 0);
      if (comp == 1.0) {
        // And compression 1 equals the backend's own dense attend on its stored values.
        std::vector<float> dense(out.size()), dense_lse(H * G);
        REQUIRE(c.attend(layer, seqs, wl.q.data(), dense.data(), dense_lse.data()).ok());
        std::vector<double> dd(dense.begin(), dense.end());
        CHECK(max_rel_error(out.data(), dd.data(), H * G, d) < 1e-5);
      }
    }
    REQUIRE(c.free_sequence(s).ok());
    cache.value().reset();
    if (uri.rfind("ssd:", 0) == 0) std::filesystem::remove(uri.substr(4));
  }
}
