// Test scaffolding for SparF: token-indexed chunks and a sparf_index built from float rows, and
// float64 references (dense attention and SparF) over the *stored* (cache dtype) values.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <new>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "instinfer/attention/sparf.hpp"
#include "instinfer/attention/sparf/page_summary.hpp"
#include "instinfer/testing/reference.hpp"
#include "instinfer/testing/sparf_synthetic.hpp"

namespace sparf_test {

using namespace instinfer;

// max |a - b| / max |b|: how far one backend's output is from another's (or from dense).
inline double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double e = 0, m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    e = std::max(e, std::fabs(double(a[i]) - b[i]));
    m = std::max(m, std::fabs(double(b[i])));
  }
  return m > 0 ? e / m : e;
}

// 64-byte aligned bytes, like the backends' pages.
template <class T>
struct aligned_allocator {
  using value_type = T;
  aligned_allocator() = default;
  template <class U>
  aligned_allocator(const aligned_allocator<U>&) noexcept {}  // NOLINT
  T* allocate(size_t n) { return static_cast<T*>(::operator new (n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, size_t) noexcept { ::operator delete (p, std::align_val_t{64}); }
  template <class U>
  bool operator==(const aligned_allocator<U>&) const noexcept {
    return true;
  }
};
using page_buffer = std::vector<std::byte, aligned_allocator<std::byte>>;

// One (sequence, layer) stored twice: token-indexed chunks and the channel-indexed index.
struct stored_layer {
  sparf_config cfg{};
  uint32_t n_tokens = 0;
  std::vector<page_buffer> chunks;
  std::vector<const std::byte*> chunk_ptrs;
  sparf_index index;
  std::vector<float> k, v;       // stored values back in f32: [n][H][d]
  std::vector<float> k_columns;  // K as the column copy holds it (f16 of k for a quantized cache)

  sparf_work work(const float* q, float* out, float* lse) const {
    sparf_work w;
    w.chunks = chunk_ptrs.data();
    w.n_chunks = static_cast<uint32_t>(chunk_ptrs.size());
    w.n_tokens = n_tokens;
    w.column_blocks = index.block_pointers();
    w.n_column_blocks = index.n_blocks();
    w.v_mean = index.v_mean();
    w.q = q;
    w.out = out;
    w.lse = lse;
    return w;
  }
};

// Store n tokens (k, v: [n][H][d] f32) converted to the cache dtype, fed to the index in batches
// of the given sizes (cycled); chunk bytes never written are filled with a poison pattern.
inline stored_layer store(const sparf_config& cfg, const std::vector<float>& k, const std::vector<float>& v, uint32_t n,
                          const std::vector<uint32_t>& batches = {}) {
  stored_layer s;
  s.cfg = cfg;
  s.n_tokens = n;
  const uint32_t H = cfg.n_kv_heads(), d = cfg.head_dim();
  const dtype t = cfg.tokens.page.kv_dtype;
  const uint32_t row = cfg.tokens.page.row_bytes();  // bytes of one (token, head) row
  const uint32_t tpp = cfg.tokens.page.tokens_per_page;
  std::vector<std::byte> kb(size_t{n} * H * row), vb(kb.size());
  if (!convert_elements(k.data(), dtype::kF32, kb.data(), t, size_t{n} * H * d) ||
      !convert_elements(v.data(), dtype::kF32, vb.data(), t, size_t{n} * H * d))
    throw std::runtime_error("sparf_test::store: rows do not convert to " + std::string(dtype_name(t)));
  s.k.resize(size_t{n} * H * d);
  s.v.resize(s.k.size());
  convert_elements(kb.data(), t, s.k.data(), dtype::kF32, s.k.size());
  convert_elements(vb.data(), t, s.v.data(), dtype::kF32, s.v.size());
  s.k_columns = s.k;
  if (is_quantized(t))
    for (float& x : s.k_columns) x = f16_to_float(float_to_f16(x));
  const uint32_t n_chunks = (n + tpp - 1) / tpp;
  s.chunks.assign(n_chunks, page_buffer(cfg.tokens.chunk_bytes(), std::byte{0x7b}));
  for (uint32_t tok = 0; tok < n; ++tok)
    for (uint32_t h = 0; h < H; ++h) {
      std::byte* c = s.chunks[tok / tpp].data();
      const size_t src = (size_t{tok} * H + h) * row;
      std::copy_n(kb.data() + src, row, c + cfg.tokens.offset(kv_kind::kKey, h, tok % tpp, 0));
      std::copy_n(vb.data() + src, row, c + cfg.tokens.offset(kv_kind::kValue, h, tok % tpp, 0));
    }
  for (const auto& c : s.chunks) s.chunk_ptrs.push_back(c.data());
  s.index = sparf_index::create(cfg.columns).value();
  uint32_t done = 0;
  size_t bi = 0;
  while (done < n) {
    uint32_t m = batches.empty() ? n : std::max(1u, batches[bi++ % batches.size()]);
    m = std::min(m, n - done);
    const size_t off = size_t{done} * H * row;
    const status st = s.index.append(m, kb.data() + off, vb.data() + off);
    if (!st.ok()) throw std::runtime_error(st.to_string());
    done += m;
  }
  return s;
}

// Float64 dense attention over the stored values: out [Hq][d], lse [Hq].
inline void dense_reference(const stored_layer& s, const float* q, std::vector<double>& out, std::vector<double>& lse) {
  const uint32_t H = s.cfg.n_kv_heads(), G = s.cfg.group_size, d = s.cfg.head_dim(), n = s.n_tokens;
  const double scale = s.cfg.effective_scale();
  out.assign(size_t{H} * G * d, 0.0);
  lse.assign(size_t{H} * G, 0.0);
  std::vector<double> l(n);
  for (uint32_t qh = 0; qh < H * G; ++qh) {
    const uint32_t h = qh / G;
    double m = -INFINITY;
    for (uint32_t t = 0; t < n; ++t) {
      double dot = 0.0;
      for (uint32_t i = 0; i < d; ++i) dot += double{q[size_t{qh} * d + i]} * s.k[(size_t{t} * H + h) * d + i];
      l[t] = dot * scale;
      m = std::max(m, l[t]);
    }
    double den = 0.0;
    for (uint32_t t = 0; t < n; ++t) den += std::exp(l[t] - m);
    for (uint32_t t = 0; t < n; ++t) {
      const double p = std::exp(l[t] - m) / den;
      for (uint32_t i = 0; i < d; ++i) out[size_t{qh} * d + i] += p * s.v[(size_t{t} * H + h) * d + i];
    }
    lse[qh] = m + std::log(den);
  }
}

// Float64 mean of kv head h's V over all stored tokens.
inline std::vector<double> v_mean_reference(const stored_layer& s, uint32_t h) {
  const uint32_t H = s.cfg.n_kv_heads(), d = s.cfg.head_dim(), n = s.n_tokens;
  std::vector<double> mean(d, 0.0);
  for (uint32_t t = 0; t < n; ++t)
    for (uint32_t i = 0; i < d; ++i) mean[i] += s.v[(size_t{t} * H + h) * d + i];
  for (auto& x : mean) x /= n;
  return mean;
}

// SparF's step 4 in float64 for one query head qg of kv head h: o += alpha * softmax over `tokens`
// of the scaled logits, times V, + (1 - alpha) * mean.
inline void blend_reference(const stored_layer& s, uint32_t h, const float* qg, const std::vector<uint32_t>& tokens,
                            double alpha, const std::vector<double>& mean, double* o) {
  const uint32_t H = s.cfg.n_kv_heads(), d = s.cfg.head_dim();
  const double scale = s.cfg.effective_scale();
  std::vector<double> l(tokens.size());
  double m = -INFINITY;
  for (size_t j = 0; j < tokens.size(); ++j) {
    double dot = 0.0;
    for (uint32_t i = 0; i < d; ++i) dot += double{qg[i]} * s.k[(size_t{tokens[j]} * H + h) * d + i];
    l[j] = dot * scale;
    m = std::max(m, l[j]);
  }
  double den = 0.0;
  for (double x : l) den += std::exp(x - m);
  for (size_t j = 0; j < tokens.size(); ++j) {
    const double pj = std::exp(l[j] - m) / den;
    for (uint32_t i = 0; i < d; ++i) o[i] += alpha * pj * s.v[(size_t{tokens[j]} * H + h) * d + i];
  }
  for (uint32_t i = 0; i < d; ++i) o[i] += (1.0 - alpha) * mean[i];
}

// What the float64 SparF chose: each kv head's tokens (ascending) and each query head's alpha.
struct sparf_choice {
  std::vector<std::vector<uint32_t>> tokens;  // [n_kv_heads]
  std::vector<double> alpha;                  // [n_q_heads]
};

// Float64 SparF with the documented selection rules (channel pages or channels, temperature,
// top-k by approximate score or group probability sum, alpha blend with the mean of V).
inline void sparf_reference(const stored_layer& s, const sparf_params& p, const float* q, std::vector<double>& out,
                            std::vector<uint32_t>* selected_head0 = nullptr, sparf_choice* choice = nullptr) {
  const uint32_t H = s.cfg.n_kv_heads(), G = s.cfg.group_size, d = s.cfg.head_dim(), n = s.n_tokens;
  const double scale = s.cfg.effective_scale();
  const sparf_plan plan = sparf_resolve(p, d, n).value();
  const uint32_t cpp = s.cfg.columns.channels_per_page;
  out.assign(size_t{H} * G * d, 0.0);
  if (choice) {
    choice->tokens.assign(H, {});
    choice->alpha.assign(size_t{H} * G, 0.0);
  }
  for (uint32_t h = 0; h < H; ++h) {
    const float* qh = q + size_t{h} * G * d;
    std::vector<double> w(d, 0.0);
    for (uint32_t i = 0; i < d; ++i)
      for (uint32_t g = 0; g < G; ++g) w[i] += std::fabs(double{qh[size_t{g} * d + i]});
    std::vector<uint32_t> ch;
    if (plan.r >= d) {
      ch.resize(d);
      std::iota(ch.begin(), ch.end(), 0u);
    } else if (p.whole_pages) {
      const uint32_t ng = d / cpp, want = std::min(ng, (plan.r + cpp - 1) / cpp);
      std::vector<double> gw(ng, 0.0);
      for (uint32_t i = 0; i < d; ++i) gw[i / cpp] += w[i];
      std::vector<uint32_t> gi(ng);
      std::iota(gi.begin(), gi.end(), 0u);
      std::stable_sort(gi.begin(), gi.end(), [&](uint32_t a, uint32_t b) { return gw[a] > gw[b]; });
      for (uint32_t j = 0; j < want; ++j)
        for (uint32_t c = 0; c < cpp; ++c) ch.push_back(gi[j] * cpp + c);
    } else {
      std::vector<uint32_t> ci(d);
      std::iota(ci.begin(), ci.end(), 0u);
      std::stable_sort(ci.begin(), ci.end(), [&](uint32_t a, uint32_t b) { return w[a] > w[b]; });
      ch.assign(ci.begin(), ci.begin() + plan.r);
    }
    // Approximate probabilities per query head.
    std::vector<std::vector<double>> pa(G, std::vector<double>(n));
    std::vector<double> rank(n, 0.0);
    for (uint32_t g = 0; g < G; ++g) {
      const float* qg = qh + size_t{g} * d;
      double all = 0.0, sel = 0.0;
      for (uint32_t i = 0; i < d; ++i) all += std::fabs(double{qg[i]});
      for (uint32_t c : ch) sel += std::fabs(double{qg[c]});
      const double hs = ch.size() < d && sel > 0.0 ? scale / std::sqrt(sel / all) : scale;
      double m = -INFINITY;
      for (uint32_t t = 0; t < n; ++t) {
        double dot = 0.0;
        for (uint32_t c : ch) dot += double{qg[c]} * s.k_columns[(size_t{t} * H + h) * d + c];
        pa[g][t] = dot * hs;
        m = std::max(m, pa[g][t]);
      }
      if (G == 1) rank = pa[0];
      double den = 0.0;
      for (uint32_t t = 0; t < n; ++t) den += std::exp(pa[g][t] - m);
      for (uint32_t t = 0; t < n; ++t) pa[g][t] = std::exp(pa[g][t] - m) / den;
      if (G > 1)
        for (uint32_t t = 0; t < n; ++t) rank[t] += pa[g][t];
    }
    // Sinks [0, S) and window [n - W, n) always; the top k - S - W of the candidate pages of the
    // middle [S, n - W): the page_spread * ceil(k_mid / tpp) pages of largest approximate mass.
    const uint32_t S = plan.sinks, W = plan.window, lo = S, hi = n - W;
    const uint32_t k_mid = std::min(plan.k - std::min(plan.k, S + W), hi - lo);
    const uint32_t tpp = s.cfg.tokens.page.tokens_per_page;
    const uint32_t first_page = lo / tpp, end_page = hi == lo ? first_page : (hi - 1) / tpp + 1;
    const uint32_t n_pages = end_page - first_page;
    const uint32_t max_pages =
        p.page_spread > 0.0
            ? static_cast<uint32_t>(std::min<double>(n_pages, std::ceil(p.page_spread * ((k_mid + tpp - 1) / tpp))))
            : n_pages;
    std::vector<uint32_t> ti;
    if (k_mid < hi - lo && max_pages < n_pages) {
      std::vector<double> pm(n_pages, 0.0);
      for (uint32_t t = lo; t < hi; ++t) pm[t / tpp - first_page] += G == 1 ? pa[0][t] : rank[t];
      std::vector<uint32_t> po(n_pages);
      std::iota(po.begin(), po.end(), 0u);
      std::stable_sort(po.begin(), po.end(), [&](uint32_t a, uint32_t b) { return pm[a] > pm[b]; });
      std::vector<char> pick(n_pages, 0);
      for (uint32_t j = 0; j < max_pages; ++j) pick[po[j]] = 1;
      for (uint32_t t = lo; t < hi; ++t)
        if (pick[t / tpp - first_page]) ti.push_back(t);
    } else {
      for (uint32_t t = lo; t < hi; ++t) ti.push_back(t);
    }
    std::stable_sort(ti.begin(), ti.end(), [&](uint32_t a, uint32_t b) { return rank[a] > rank[b]; });
    ti.resize(std::min<size_t>(k_mid, ti.size()));
    for (uint32_t t = 0; t < S; ++t) ti.push_back(t);
    for (uint32_t t = hi; t < n; ++t) ti.push_back(t);
    const size_t k = ti.size();
    std::sort(ti.begin(), ti.end());
    if (selected_head0 && h == 0) *selected_head0 = ti;
    if (choice) choice->tokens[h] = ti;
    const std::vector<double> mean = v_mean_reference(s, h);
    for (uint32_t g = 0; g < G; ++g) {
      double alpha = 0.0;
      for (uint32_t t : ti) alpha += pa[g][t];
      if (k == n) alpha = 1.0;
      if (choice) choice->alpha[size_t{h} * G + g] = alpha;
      blend_reference(s, h, qh + size_t{g} * d, ti, alpha, mean, out.data() + (size_t{h} * G + g) * d);
    }
  }
}

// max over query heads of |a - b|_2 / |b|_2.
inline double max_rel_error(const float* a, const double* b, uint32_t heads, uint32_t d) {
  double worst = 0.0;
  for (uint32_t h = 0; h < heads; ++h) {
    double num = 0.0, den = 0.0;
    for (uint32_t i = 0; i < d; ++i) {
      const double e = a[size_t{h} * d + i] - b[size_t{h} * d + i];
      num += e * e;
      den += b[size_t{h} * d + i] * b[size_t{h} * d + i];
    }
    worst = std::max(worst, std::sqrt(num / std::max(den, 1e-300)));
  }
  return worst;
}

// Fresh random (never zero) values in [-1, -0.05] u [0.05, 1].
inline std::vector<float> random_values(size_t n, uint64_t seed) {
  synthetic::rng r(seed);
  std::vector<float> x(n);
  for (auto& e : x) {
    const double u = 0.05 + 0.95 * r.uniform();
    e = static_cast<float>(r.uniform() < 0.5 ? -u : u);
  }
  return x;
}

// The page-summary policy in float64 over rows k, v: [n][H][d] floats. Per kv head each group's
// bound max over the query heads of sum_c max(q_c min_c, q_c max_c) from the rows themselves, the
// mandatory groups and the best others (ties: the lower group), then exact attention over every
// row of the chosen groups. out: [H * G][d].
inline std::vector<double> page_summary_reference_rows(const float* k_rows, const float* v_rows, uint32_t n, uint32_t H,
                                                       uint32_t G, uint32_t d, uint32_t tpp, const sparf_params& p,
                                                       const float* q, double scale, double softcap) {
  const page_summary_plan plan = page_summary_resolve(p, d, tpp, n).value();
  std::vector<double> out(size_t{H} * G * d, 0.0);
  for (uint32_t h = 0; h < H; ++h) {
    std::vector<double> score(plan.n_groups, -INFINITY);
    for (uint32_t g = 0; g < plan.n_groups; ++g)
      for (uint32_t j = 0; j < G; ++j) {
        double sum = 0;
        for (uint32_t c = 0; c < d; ++c) {
          double mn = INFINITY, mx = -INFINITY;
          for (uint32_t t = g * tpp; t < std::min(n, (g + 1) * tpp); ++t) {
            mn = std::min<double>(mn, k_rows[(size_t{t} * H + h) * d + c]);
            mx = std::max<double>(mx, k_rows[(size_t{t} * H + h) * d + c]);
          }
          const double qc = q[(size_t{h} * G + j) * d + c];
          sum += std::max(qc * mn, qc * mx);
        }
        score[g] = std::max(score[g], sum);
      }
    std::vector<uint32_t> others;
    std::vector<uint8_t> keep(plan.n_groups, 0);
    for (uint32_t g = 0; g < plan.n_groups; ++g) {
      if (g < plan.sink_groups || g >= plan.window_first)
        keep[g] = 1;
      else
        others.push_back(g);
    }
    std::sort(others.begin(), others.end(),
              [&](uint32_t a, uint32_t b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
    for (uint32_t j = 0; j < plan.n_select - plan.n_mandatory; ++j) keep[others[j]] = 1;
    std::vector<float> k, v;
    for (uint32_t t = 0; t < n; ++t)
      if (keep[t / tpp])
        for (uint32_t c = 0; c < d; ++c) {
          k.push_back(k_rows[(size_t{t} * H + h) * d + c]);
          v.push_back(v_rows[(size_t{t} * H + h) * d + c]);
        }
    reference::attend_rows(k.data(), v.data(), dtype::kF32, k.size() / d, d, q + size_t{h} * G * d, G, scale, softcap,
                           out.data() + size_t{h} * G * d, nullptr);
  }
  return out;
}

// The same over a stored layer (its scale and soft-cap).
inline void page_summary_reference(const stored_layer& s, const sparf_params& p, const float* q,
                                   std::vector<double>& out) {
  out = page_summary_reference_rows(s.k.data(), s.v.data(), s.n_tokens, s.cfg.n_kv_heads(), s.cfg.group_size,
                                    s.cfg.head_dim(), s.cfg.tokens.page.tokens_per_page, p, q, s.cfg.effective_scale(),
                                    s.cfg.softcap);
}

}  // namespace sparf_test
