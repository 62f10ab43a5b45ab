// The top-k selection SparF and the page policy share: an order-preserving key of a float
// score and a radix select of the k-th largest, written out in ascending index order (the order
// the exact pass and the page reads want). No allocation: the caller passes scratch.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace instinfer::sparf_detail {

// f(i) for the candidates i in [lo, hi), ascending: all of them, or (pick given) those whose page
// i / per is picked, walked page by page (no division per token).
template <class F>
inline void for_each_candidate(uint32_t lo, uint32_t hi, const uint8_t* pick, uint32_t per, F&& f) noexcept {
  if (pick == nullptr) {
    for (uint32_t i = lo; i < hi; ++i) f(i);
    return;
  }
  for (uint32_t pg = lo / per; uint64_t{pg} * per < hi; ++pg) {
    if (!pick[pg]) continue;
    const uint32_t e = static_cast<uint32_t>(std::min<uint64_t>(hi, uint64_t{pg} * per + per));
    for (uint32_t i = std::max(lo, pg * per); i < e; ++i) f(i);
  }
}

// Order-preserving unsigned key of a ranking score: a larger float gets a larger key, -0 the key
// of +0 (they compare equal), NaN (from a non-finite query) the key of -inf, so NaNs rank last.
inline uint32_t rank_key(float x) noexcept {
  if (std::isnan(x)) x = -std::numeric_limits<float>::infinity();
  x += 0.0f;  // -0 + 0 = +0
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The top `want` of score over the candidates [lo, hi) (those whose pick[i / per] is set, when pick
// is given), in the ranking order of by_score (higher first, lower index on ties), written to
// out in ascending index order; returns how many (min(want, candidates)). A radix select on
// rank_key finds the threshold (11, 11 and 10 bits from the top, each level keeping only the keys
// of the bin that holds the want-th largest: about 4x faster than nth_element at 8192 logits on
// Zen 3; the counting and filtering loops do not branch on the keys), and one ascending scan
// takes what passes it: no sort. scratch: room for 2 x (hi - lo) keys.
inline uint32_t top_ascending(const float* score, uint32_t lo, uint32_t hi, const uint8_t* pick, uint32_t per,
                              uint32_t want, uint32_t* out, uint32_t* scratch) noexcept {
  uint32_t n_cand = 0;
  for_each_candidate(lo, hi, pick, per, [&](uint32_t i) { scratch[n_cand++] = rank_key(score[i]); });
  if (want == 0) return 0;
  uint32_t j = 0;
  if (want >= n_cand) {
    for_each_candidate(lo, hi, pick, per, [&](uint32_t i) { out[j++] = i; });
    return j;
  }
  constexpr uint32_t kShift[3] = {21, 10, 0}, kBits[3] = {11, 11, 10};
  uint32_t count[1u << 11];
  uint32_t* cur = scratch;
  uint32_t* next = scratch + n_cand;
  uint32_t m = n_cand, above = 0, thr = 0;  // above: keys greater than the bins kept so far
  for (uint32_t level = 0; level < 3; ++level) {
    const uint32_t bins = 1u << kBits[level], sh = kShift[level], mask = bins - 1;
    std::fill(count, count + bins, 0u);
    for (uint32_t i = 0; i < m; ++i) ++count[(cur[i] >> sh) & mask];
    // The bin holding the want-th largest: m >= want - above keys remain, so one is found.
    uint32_t b = mask;
    while (above + count[b] < want) above += count[b--];
    thr |= b << sh;
    uint32_t kept = 0;
    for (uint32_t i = 0; i < m; ++i) {
      next[kept] = cur[i];
      kept += ((cur[i] >> sh) & mask) == b ? 1u : 0u;
    }
    std::swap(cur, next);
    m = kept;
  }
  uint32_t ties = want - above;  // keys equal to thr that make the cut, lowest index first
  for_each_candidate(lo, hi, pick, per, [&](uint32_t i) {
    if (j == want) return;  // never more than want, whatever the scores
    const uint32_t x = rank_key(score[i]);
    if (x > thr) {
      out[j++] = i;
    } else if (x == thr && ties > 0) {
      out[j++] = i;
      --ties;
    }
  });
  return j;
}

}  // namespace instinfer::sparf_detail
