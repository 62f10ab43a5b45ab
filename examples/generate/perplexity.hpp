// Perplexity of a token sequence under the model with its KV in an instinfer cache: the tokens in
// windows of `window` (each a fresh sequence, filled in chunks through the normal forward path
// with logits for every token); every token after a window's first is predicted from the ones
// before it in that window, and -log softmax(logits)[next] is summed in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "llama_model.hpp"

namespace instinfer::model {

struct perplexity_result {
  uint64_t predicted = 0;  // tokens scored
  uint64_t windows = 0;
  double nll = 0.0;  // summed negative log-likelihood, nats
  double mean_nll() const noexcept { return predicted ? nll / static_cast<double>(predicted) : 0.0; }
  double perplexity() const noexcept { return std::exp(mean_nll()); }
};

// chunk: tokens per forward call (at most the model's max_batch).
inline result<perplexity_result> evaluate_perplexity(llama_model& m, kv_cache& cache, std::span<const token_id> ids,
                                                     size_t window, uint32_t chunk) {
  if (ids.size() < 2 || window < 2 || chunk == 0)
    return status{errc::kInvalidArgument, "perplexity: needs at least 2 tokens, a window of 2 and a chunk of 1"};
  const uint32_t n_vocab = m.hparams().n_vocab;
  perplexity_result r;
  std::vector<float> logits;
  std::vector<forward_item> items;
  for (size_t w0 = 0; w0 + 1 < ids.size(); w0 += window) {
    const size_t w1 = std::min(ids.size(), w0 + window);
    auto seq = cache.create_sequence();
    if (!seq.ok()) return seq.error();
    for (size_t c0 = w0; c0 < w1; c0 += chunk) {
      const size_t c1 = std::min(w1, c0 + chunk);
      items.clear();
      for (size_t i = c0; i < c1; ++i) items.push_back({*seq, static_cast<uint32_t>(i - w0), ids[i], true});
      if (status s = m.forward(cache, items, logits); !s.ok()) {
        (void)cache.free_sequence(*seq);
        return s;
      }
      for (size_t i = c0; i < c1 && i + 1 < w1; ++i) {
        const float* row = &logits[(i - c0) * n_vocab];
        const float mx = *std::max_element(row, row + n_vocab);
        double sum = 0.0;
        for (uint32_t v = 0; v < n_vocab; ++v) sum += std::exp(static_cast<double>(row[v]) - mx);
        r.nll += std::log(sum) + mx - row[ids[i + 1]];
        ++r.predicted;
      }
    }
    INSTINFER_TRY(cache.free_sequence(*seq));
    ++r.windows;
  }
  return r;
}

}  // namespace instinfer::model
