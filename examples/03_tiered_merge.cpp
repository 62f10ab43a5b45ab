// 03: one attention over two tiers, merged exactly.
//
//   build/bin/instinfer-example-03_tiered_merge [COLD_URI]      (default: host)
//
// A long context keeps its old tokens in a cold cache (an SSD or a CSD in a real deployment:
// pass ssd:/path or csd:/path) and its recent window in a hot host cache. Each tier returns a
// normalised partial (output, lse) over its own tokens; merge_normalized combines them into the
// attention over all tokens, exactly, as if one cache had held everything. The example checks
// that against a single cache holding the whole context.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "instinfer/attention/state.hpp"
#include "instinfer/kv/kv_cache.hpp"

using namespace instinfer;

int main(int argc, char** argv) {
  const std::string cold_uri = argc > 1 ? argv[1] : "host";
  cache_options o;
  o.shape = kv_shape{1, 8, 2, 128, dtype::kF32};
  o.capacity_bytes = 64ull << 20;
  auto make = [&](const std::string& uri) {
    cache_options c = o;
    c.backend_uri = uri;
    auto r = kv_cache::create(c);
    if (!r.ok()) {
      std::fprintf(stderr, "cannot create a cache on %s: %s\n", uri.c_str(), r.error().to_string().c_str());
      std::exit(1);
    }
    return std::move(r).value();
  };
  auto cold = make(cold_uri), hot = make("host"), whole = make("host");

  const uint32_t n_cold = 20000, n_hot = 256;
  const size_t row = size_t{o.shape.n_kv_heads} * o.shape.head_dim;
  std::mt19937 rng(3);
  std::normal_distribution<float> dist;
  std::vector<float> k((n_cold + n_hot) * row), v(k.size()), q(size_t{o.shape.n_q_heads} * o.shape.head_dim);
  for (auto& x : k) x = dist(rng);
  for (auto& x : v) x = dist(rng);
  for (auto& x : q) x = dist(rng);

  const seq_id sc = cold->create_sequence().value(), sh = hot->create_sequence().value(),
               sw = whole->create_sequence().value();
  if (!cold->append(sc, 0, n_cold, k.data(), v.data(), dtype::kF32).ok() ||
      !hot->append(sh, 0, n_hot, k.data() + n_cold * row, v.data() + n_cold * row, dtype::kF32).ok() ||
      !whole->append(sw, 0, n_cold + n_hot, k.data(), v.data(), dtype::kF32).ok()) {
    std::fprintf(stderr, "append failed\n");
    return 1;
  }
  const size_t n_out = q.size();
  std::vector<float> out_cold(n_out), out_hot(n_out), out_whole(n_out), merged(n_out);
  std::vector<float> lse_cold(o.shape.n_q_heads), lse_hot(o.shape.n_q_heads), lse_whole(o.shape.n_q_heads),
      lse_merged(o.shape.n_q_heads);
  (void)cold->attend(0, std::span<const seq_id>(&sc, 1), q.data(), out_cold.data(), lse_cold.data());
  (void)hot->attend(0, std::span<const seq_id>(&sh, 1), q.data(), out_hot.data(), lse_hot.data());
  (void)whole->attend(0, std::span<const seq_id>(&sw, 1), q.data(), out_whole.data(), lse_whole.data());
  for (uint32_t h = 0; h < o.shape.n_q_heads; ++h) {
    const size_t off = size_t{h} * o.shape.head_dim;
    merge_normalized(out_cold.data() + off, lse_cold[h], out_hot.data() + off, lse_hot[h], merged.data() + off,
                     &lse_merged[h], o.shape.head_dim);
  }
  double err = 0.0, mag = 0.0;
  for (size_t i = 0; i < n_out; ++i) {
    err = std::max(err, std::fabs(double(merged[i]) - out_whole[i]));
    mag = std::max(mag, std::fabs(double(out_whole[i])));
  }
  std::printf("cold tier (%s): %u tokens, hot tier (host): %u tokens\n", cold_uri.c_str(), n_cold, n_hot);
  std::printf("merged vs single cache: max relative difference %.2e, lse %.5f vs %.5f\n", err / mag, lse_merged[0],
              lse_whole[0]);
  return err / mag < 1e-5 ? 0 : 1;
}
