// SparF on attention captured from the real SmolLM2-135M-Instruct (examples/generate/sparf_eval.hpp;
// the full measurement is instinfer-sparf-model, docs/experiment.md). After a dense prefill of
// the long built-in prompt (~1.4K tokens), the first decode step's queries of every layer are
// captured with the model's attention observer and SparF is run on the stored K/V:
//   - compression 1 is dense attention: within 1e-5 relative of the float64 reference on every
//     layer and query head, and greedy tokens through kv_cache::attend_sparse (what
//     `instinfer-generate --sparf 1` runs) equal the dense ones;
//   - compression 1/8 (the default): every error finite, the mean below 0.6 and every layer's
//     mean below 1.2, and at most 1/4 of the dense pages read. Measured on this prompt: first step
//     mean 0.43, worst layer mean 0.82, pages 0.18 (4 steps, docs/experiment.md: 0.40, 0.79);
//     the bounds leave room for another kernel ISA or a changed prompt tokenisation without
//     accepting a broken selection, which drives the mean towards 1 and beyond (1/16 measures
//     0.64 here, unstructured random inputs 1.4 at 1/8).
//   - the offline SparF (public API, dual-step loading) equals kv_cache::attend_sparse exactly.
// Exits 77 (skipped) when the model file is absent (scripts/fetch-model fetches it).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>

#include "gguf.hpp"
#include "llama_model.hpp"
#include "model_test_util.hpp"
#include "sparf_eval.hpp"
#include "tokenizer.hpp"

using namespace instinfer;
using namespace instinfer::model;
namespace se = instinfer::model::sparf_eval;

namespace {

using model_test::model_path;

// The model and one cache holding the prefilled prompt; each test forks the prompt's sequence.
struct fixture {
  std::unique_ptr<gguf_file> file;
  std::unique_ptr<tokenizer> tok;
  std::unique_ptr<llama_model> model;
  std::unique_ptr<kv_cache> cache;
  seq_id prompt = 0;
  uint32_t prompt_len = 0;
  std::vector<float> logits;  // after the prompt
};

fixture& the_model() {
  static fixture f = [] {
    fixture x;
    model_test::loaded_model loaded = model_test::load_model();
    x.file = std::move(loaded.file);
    x.tok = std::move(loaded.tok);
    x.model = std::move(loaded.model);
    auto c = kv_cache::create(x.model->kv_options("host", dtype::kF16, true));
    REQUIRE_MESSAGE(c.ok(), c.error().to_string());
    x.cache = std::move(*c);
    const std::vector<int32_t> ids = x.tok->encode(x.tok->apply_chat_template({{"user", se::user_message()}}));
    // Long enough that SparF has something to skip: k = n / 16 tokens at 1/8, and column pages of
    // 512 tokens are written only past the first 512.
    REQUIRE(ids.size() >= 1024);
    x.prompt = x.cache->create_sequence().value();
    const status s = x.model->prefill(*x.cache, x.prompt, ids, 0, x.logits);
    REQUIRE_MESSAGE(s.ok(), s.to_string());
    x.prompt_len = static_cast<uint32_t>(ids.size());
    return x;
  }();
  return f;
}

// Greedy continuation of a fork of the prompt (end-of-text ignored).
std::vector<int32_t> continue_greedy(fixture& f, uint32_t n) {
  auto seq = f.cache->fork_sequence(f.prompt);
  REQUIRE(seq.ok());
  std::vector<int32_t> out;
  std::vector<float> logits = f.logits;
  uint32_t pos = f.prompt_len;
  for (uint32_t i = 0; i < n; ++i) {
    out.push_back(sampler::argmax(logits));
    if (i + 1 == n) break;
    const forward_item item{*seq, pos++, out.back(), true};
    const status s = f.model->forward(*f.cache, {&item, 1}, logits);
    REQUIRE_MESSAGE(s.ok(), s.to_string());
  }
  REQUIRE(f.cache->free_sequence(*seq).ok());
  return out;
}

}  // namespace

TEST_CASE("captured real attention: SparF at 1 equals dense, at 1/8 bounded error and <= 1/4 of the pages") {
  fixture& f = the_model();
  kv_cache& cache = *f.cache;
  const kv_shape& shape = cache.shape();
  REQUIRE(shape.group_size() == 3);  // SmolLM2-135M: 9 query heads on 3 kv heads
  auto cfg = se::config_for(cache, se::selection_scope::kGroup);
  REQUIRE_MESSAGE(cfg.ok(), cfg.error().to_string());
  // Plain SparF (no sinks or window): the bounds below were measured for it.
  const auto plain = [](double c) {
    sparf_params p = sparf_params::with_compression(c);
    p.sink_tokens = p.window_tokens = 0;
    return p;
  };
  const std::vector<sparf_params> settings{plain(1.0), plain(0.125)};

  // Capture the first decode step of every layer (the observer runs right before the attend).
  std::vector<std::vector<se::call_metrics>> per_layer;
  status failure;
  double library_diff = 0.0;
  sparf_workspace ws;
  std::vector<std::vector<float>> offline;
  std::vector<float> library(size_t{shape.n_q_heads} * shape.head_dim);
  f.model->set_attention_observer([&](const attention_call& call) {
    if (!failure.ok()) return;
    REQUIRE(call.seqs.size() == 1);
    CHECK_FALSE(call.sparse);
    auto cap = se::capture(cache, call.seqs[0], call.layer, call.q);
    if (!cap.ok()) {
      failure = cap.error();
      return;
    }
    CHECK(cap->n_tokens == f.prompt_len + 1);  // the decode token's own K/V is already stored
    const se::dense_reference ref = se::dense_reference::make(*cap, shape, cfg->effective_scale());
    auto m = se::evaluate(*cap, shape, ref, *cfg, se::selection_scope::kGroup, settings, ws, &offline);
    if (!m.ok()) {
      failure = m.error();
      return;
    }
    per_layer.push_back(*m);
    for (size_t i = 0; i < settings.size(); ++i) {
      if (status s = cache.attend_sparse(call.layer, call.seqs, call.q, library.data(), nullptr, settings[i]);
          !s.ok()) {
        failure = s;
        return;
      }
      for (size_t j = 0; j < library.size(); ++j)
        library_diff = std::max(library_diff, static_cast<double>(std::fabs(library[j] - offline[i][j])));
    }
  });
  (void)continue_greedy(f, 2);  // one decode forward pass
  f.model->set_attention_observer({});
  REQUIRE_MESSAGE(failure.ok(), failure.to_string());
  REQUIRE(per_layer.size() == f.model->hparams().n_layers);
  CHECK(library_diff == 0.0);

  double worst_dense = 0.0, sum = 0.0, worst_layer_mean = 0.0;
  size_t n = 0;
  sparf_counters counters;
  for (size_t l = 0; l < per_layer.size(); ++l) {
    CAPTURE(l);
    const se::call_metrics& dense = per_layer[l][0];
    const se::call_metrics& sparse = per_layer[l][1];
    REQUIRE(dense.heads.size() == shape.n_q_heads);
    CHECK(dense.k == dense.n_tokens);
    for (const auto& h : dense.heads) {
      CHECK(h.rel_err < 1e-5);
      CHECK(h.recall == 1.0);
      worst_dense = std::max(worst_dense, h.rel_err);
    }
    double layer_sum = 0.0;
    for (const auto& h : sparse.heads) {
      REQUIRE(std::isfinite(h.rel_err));
      layer_sum += h.rel_err;
    }
    const double layer_mean = layer_sum / static_cast<double>(sparse.heads.size());
    CHECK(layer_mean < 1.2);
    worst_layer_mean = std::max(worst_layer_mean, layer_mean);
    sum += layer_sum;
    n += sparse.heads.size();
    counters.add(sparse.counters);
  }
  const double mean = sum / static_cast<double>(n);
  // Measured (docs/experiment.md): mean 0.43, worst layer mean 0.82 at 1/8. Bounds: the measured
  // value plus a margin of 0.05 (mean) and 0.10 (worst layer) for other ISAs' rounding.
  CHECK(mean < 0.43 + 0.05);
  CHECK(worst_layer_mean < 0.82 + 0.10);
  CHECK(counters.page_fraction() <= 0.25);
  CHECK(counters.byte_fraction() <= 0.14);  // 1/8 of the dense bytes, plus the buffered tail's rounding
  MESSAGE("compression 1: worst relative error " << worst_dense << "; 1/8: mean " << mean << ", worst layer mean "
                                                 << worst_layer_mean << ", pages " << counters.page_fraction()
                                                 << ", bytes " << counters.byte_fraction());
}

TEST_CASE("greedy tokens through attend_sparse at compression 1 (--sparf 1) equal dense") {
  fixture& f = the_model();
  const std::vector<int32_t> dense = continue_greedy(f, 16);
  f.model->set_sparse_attention(sparf_params::with_compression(1.0));
  const sparf_counters before = f.cache->stats().sparf;
  const std::vector<int32_t> sparse = continue_greedy(f, 16);
  f.model->set_sparse_attention(std::nullopt);
  CHECK(f.cache->stats().sparf.items > before.items);  // attend_sparse really ran
  CHECK(sparse == dense);
}

int main(int argc, char** argv) {
  return model_test::run_with_model(argc, argv);
}
