// Next-token choice: greedy (temperature <= 0) or temperature + nucleus (top-p) sampling from a
// seeded generator, so a given seed always gives the same text.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <span>
#include <vector>

namespace instinfer::model {

struct sampler_options {
  float temperature = 0.0f;  // <= 0: greedy
  float top_p = 1.0f;        // keep the smallest set of tokens whose probability reaches top_p
  uint64_t seed = 42;
};

class sampler {
 public:
  explicit sampler(const sampler_options& o) : o_(o), rng_(o.seed) {}

  // Index of the largest logit (the lowest index among equals).
  static int32_t argmax(std::span<const float> logits) noexcept {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }

  int32_t sample(std::span<const float> logits) {
    if (o_.temperature <= 0.0f || logits.size() < 2) return argmax(logits);
    const float mx = *std::max_element(logits.begin(), logits.end());
    probs_.resize(logits.size());
    double sum = 0.0;
    for (size_t i = 0; i < logits.size(); ++i) {
      probs_[i] = std::exp((logits[i] - mx) / o_.temperature);
      sum += probs_[i];
    }
    order_.resize(logits.size());
    std::iota(order_.begin(), order_.end(), 0);
    // Only the head of the distribution matters for top-p: sort lazily in growing prefixes.
    size_t keep = order_.size();
    if (o_.top_p < 1.0f) {
      size_t k = std::min<size_t>(64, order_.size());
      for (;;) {
        std::partial_sort(
            order_.begin(), order_.begin() + static_cast<std::ptrdiff_t>(k), order_.end(),
            [&](int32_t a, int32_t b) { return probs_[a] > probs_[b] || (probs_[a] == probs_[b] && a < b); });
        double acc = 0.0;
        size_t i = 0;
        for (; i < k && acc < o_.top_p * sum; ++i) acc += probs_[order_[i]];
        if (acc >= o_.top_p * sum || k == order_.size()) {
          keep = std::max<size_t>(1, i);
          break;
        }
        k = std::min(order_.size(), k * 4);
      }
    }
    double kept = 0.0;
    for (size_t i = 0; i < keep; ++i) kept += probs_[order_[i]];
    std::uniform_real_distribution<double> u(0.0, kept);
    double r = u(rng_);
    for (size_t i = 0; i < keep; ++i) {
      r -= probs_[order_[i]];
      if (r <= 0.0) return order_[i];
    }
    return order_[keep - 1];
  }

 private:
  sampler_options o_;
  std::mt19937_64 rng_;
  std::vector<double> probs_;
  std::vector<int32_t> order_;
};

}  // namespace instinfer::model
