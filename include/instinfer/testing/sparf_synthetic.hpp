// Seeded synthetic decode-attention inputs with the structure SparF relies on, for tests and the
// accuracy bench. Explicit and portable (splitmix64 + Box-Muller, no <random> distributions whose
// output differs between standard libraries).
//
// Per kv head:
//  * channel magnitudes: `dominant_channels` random channels are `dominant_scale` times larger
//    than the rest, in K and in q alike (the outlier channels seen in LLM keys and queries);
//  * topics: `n_topics` random directions u_j; the context is a run of spans of
//    [min_span, max_span] consecutive tokens, each about one topic:
//        K[t][i] = sigma_i * (u_topic(t)[i] + key_noise * z),   V[t][i] = 0.5 * w_topic(t)[i] + z
//    the first `sink_tokens` tokens are attention sinks (their own direction s) and the last
//    `recent_window` tokens continue the current topic;
//  * the query of each query head mixes the `relevant_topics` topics (the current one first) and
//    a little of the sink direction: q[i] = sigma_i * (sum_j c_j u_j[i] + 0.5 s[i] + 0.5 z), then
//    scaled so the dense logits have standard deviation `logit_std` over the tokens (peakedness).
// So attention is peaked on a few spans of consecutive tokens (locality a page-granular reader
// can exploit) and the large-|q| channels carry most of the score.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <vector>

namespace instinfer::synthetic {

class rng {
 public:
  explicit rng(uint64_t seed) noexcept : s_(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
  uint64_t next() noexcept {  // splitmix64
    uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() noexcept { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  uint32_t below(uint32_t n) noexcept { return static_cast<uint32_t>(uniform() * n); }
  double normal() noexcept {  // Box-Muller, one value per call
    const double u1 = 1.0 - uniform();
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
  }

 private:
  uint64_t s_;
};

struct attention_workload_params {
  uint32_t n_tokens = 1024;
  uint32_t n_kv_heads = 1;
  uint32_t group_size = 1;
  uint32_t head_dim = 128;
  uint64_t seed = 1;
  uint32_t dominant_channels = 8;
  float dominant_scale = 6.0f;
  uint32_t n_topics = 32;
  uint32_t relevant_topics = 2;
  uint32_t min_span = 8;
  uint32_t max_span = 64;
  uint32_t sink_tokens = 4;
  uint32_t recent_window = 32;
  float key_noise = 0.7f;
  float logit_std = 3.0f;
};

struct attention_workload {
  std::vector<float> k;  // [n_tokens][n_kv_heads][head_dim]
  std::vector<float> v;  // [n_tokens][n_kv_heads][head_dim]
  std::vector<float> q;  // [n_kv_heads * group_size][head_dim]
};

inline attention_workload make_attention_workload(const attention_workload_params& p) {
  const uint32_t n = p.n_tokens, H = p.n_kv_heads, d = p.head_dim, G = p.group_size;
  const uint32_t T = p.n_topics > 0 ? p.n_topics : 1;
  attention_workload w;
  w.k.assign(size_t{n} * H * d, 0.0f);
  w.v.assign(size_t{n} * H * d, 0.0f);
  w.q.assign(size_t{H} * G * d, 0.0f);
  rng r(p.seed);
  for (uint32_t h = 0; h < H; ++h) {
    std::vector<float> sigma(d, 1.0f);
    for (uint32_t j = 0; j < p.dominant_channels && j < d; ++j) {
      uint32_t c = r.below(d);
      while (sigma[c] != 1.0f) c = (c + 1) % d;
      sigma[c] = p.dominant_scale;
    }
    std::vector<float> u(size_t{T} * d), wv(size_t{T} * d), sink(d);
    for (auto& x : u) x = static_cast<float>(r.normal());
    for (auto& x : wv) x = static_cast<float>(r.normal());
    for (auto& x : sink) x = static_cast<float>(r.normal());
    std::vector<uint32_t> relevant;
    while (relevant.size() < std::min(p.relevant_topics, T)) {
      const uint32_t j = r.below(T);
      bool seen = false;
      for (uint32_t x : relevant) seen = seen || x == j;
      if (!seen) relevant.push_back(j);
    }
    if (relevant.empty()) relevant.push_back(0);
    // Topic of every token: spans, then the recent window on the current topic.
    std::vector<uint32_t> topic(n);
    for (uint32_t t = 0; t < n;) {
      const uint32_t span = p.min_span + (p.max_span > p.min_span ? r.below(p.max_span - p.min_span + 1) : 0);
      const uint32_t j = r.below(T);
      for (uint32_t e = std::min(n, t + std::max(span, 1u)); t < e; ++t) topic[t] = j;
    }
    for (uint32_t t = n > p.recent_window ? n - p.recent_window : 0; t < n; ++t) topic[t] = relevant[0];
    for (uint32_t t = 0; t < n; ++t) {
      float* kr = w.k.data() + (size_t{t} * H + h) * d;
      float* vr = w.v.data() + (size_t{t} * H + h) * d;
      const float* dir = t < p.sink_tokens ? sink.data() : u.data() + size_t{topic[t]} * d;
      const float* val = wv.data() + size_t{topic[t]} * d;
      for (uint32_t i = 0; i < d; ++i) {
        kr[i] = sigma[i] * (dir[i] + p.key_noise * static_cast<float>(r.normal()));
        vr[i] = 0.5f * val[i] + static_cast<float>(r.normal());
      }
    }
    for (uint32_t g = 0; g < G; ++g) {
      float* qr = w.q.data() + (size_t{h} * G + g) * d;
      std::vector<float> c(relevant.size());
      for (auto& x : c) x = static_cast<float>(0.5 + r.uniform());
      for (uint32_t i = 0; i < d; ++i) {
        float x = 0.5f * sink[i] + 0.5f * static_cast<float>(r.normal());
        for (size_t j = 0; j < relevant.size(); ++j) x += c[j] * u[size_t{relevant[j]} * d + i];
        qr[i] = sigma[i] * x;
      }
      // Peakedness: scale q so the dense logits (q.k / sqrt(d)) have std logit_std over tokens.
      if (n > 1 && p.logit_std > 0.0f) {
        double s1 = 0.0, s2 = 0.0;
        for (uint32_t t = 0; t < n; ++t) {
          const float* kr = w.k.data() + (size_t{t} * H + h) * d;
          double dot = 0.0;
          for (uint32_t i = 0; i < d; ++i) dot += double{qr[i]} * kr[i];
          dot /= std::sqrt(static_cast<double>(d));
          s1 += dot;
          s2 += dot * dot;
        }
        const double mean = s1 / n;
        const double sd = std::sqrt(std::max(s2 / n - mean * mean, 1e-30));
        const float f = static_cast<float>(p.logit_std / sd);
        for (uint32_t i = 0; i < d; ++i) qr[i] *= f;
      }
    }
  }
  return w;
}

}  // namespace instinfer::synthetic
