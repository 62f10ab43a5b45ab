// The real SmolLM2-135M-Instruct (Q4_1 GGUF) against golden data from an independent
// implementation (tests/data/model/README.md): tokenizer ids, and the greedy token ids and logits
// of the first 32 generated tokens for four prompts, single and batched, on every KV backend.
// Exits 77 (skipped) when the model file is absent (scripts/fetch-model fetches it).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "gguf.hpp"
#include "llama_model.hpp"
#include "model_test_util.hpp"
#include "perplexity.hpp"
#include "sparf_eval.hpp"
#include "tokenizer.hpp"

using namespace instinfer;
using namespace instinfer::model;

namespace {

using model_test::model_path;

std::string unhex(const std::string& h) {
  if (h == "-") return {};
  std::string s;
  for (size_t i = 0; i + 1 < h.size(); i += 2) s += static_cast<char>(std::stoi(h.substr(i, 2), nullptr, 16));
  return s;
}

struct golden_step {
  int32_t next = 0;
  std::vector<std::pair<int32_t, double>> top;  // reference top-k (id, logit)
  std::vector<double> fixed;                    // logits of the fixed id subset
};
struct golden_prompt {
  std::string text;
  std::vector<int32_t> ids;
  std::vector<golden_step> steps;
};
struct golden {
  std::vector<int32_t> fixed_ids;
  std::vector<golden_prompt> prompts;
};

golden read_golden() {
  golden g;
  std::ifstream in(std::string(INSTINFER_GOLDEN_DIR) + "/greedy_golden.txt");
  REQUIRE_MESSAGE(in.good(), "cannot read " INSTINFER_GOLDEN_DIR "/greedy_golden.txt");
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ss(line);
    std::string kind;
    ss >> kind;
    if (kind == "steps") {
      std::string w;
      int n_steps, n_top, n_fixed;
      ss >> n_steps >> w >> n_top >> w >> n_fixed;
      g.fixed_ids.resize(static_cast<size_t>(n_fixed));
      for (auto& id : g.fixed_ids) ss >> id;
    } else if (kind == "prompt") {
      golden_prompt p;
      std::string hex;
      size_t n = 0;
      ss >> hex >> n;
      p.text = unhex(hex);
      p.ids.resize(n);
      for (auto& id : p.ids) ss >> id;
      g.prompts.push_back(std::move(p));
    } else if (kind == "step") {
      golden_step s;
      int idx;
      ss >> idx >> s.next;
      std::string tok;
      while (ss >> tok && tok != "|") {
        const size_t c = tok.find(':');
        s.top.emplace_back(std::stoi(tok.substr(0, c)), std::stod(tok.substr(c + 1)));
      }
      for (double v; ss >> v;) s.fixed.push_back(v);
      REQUIRE(s.fixed.size() == g.fixed_ids.size());
      g.prompts.back().steps.push_back(std::move(s));
    }
  }
  REQUIRE(g.prompts.size() >= 3);
  return g;
}

struct fixture {
  std::unique_ptr<gguf_file> file;
  std::unique_ptr<tokenizer> tok;
  std::unique_ptr<llama_model> model;
};
// The golden data is exact float64 math, so the model runs the f32-unpacking matmuls here; the
// default integer-dot path (8-bit activations) is checked against this one at the end.
fixture& the_model() {
  static fixture f = [] {
    fixture x;
    model_options mo;
    mo.q8_activations = false;
    model_test::loaded_model loaded = model_test::load_model(mo);
    x.file = std::move(loaded.file);
    x.tok = std::move(loaded.tok);
    x.model = std::move(loaded.model);
    return x;
  }();
  return f;
}

// Compare one step's logits with the golden ones; returns the worst relative error.
double check_step(const std::vector<float>& logits, const golden_step& s, const std::vector<int32_t>& fixed_ids,
                  const std::string& where) {
  double worst = 0.0;
  auto one = [&](int32_t id, double ref) {
    const double got = logits[static_cast<size_t>(id)];
    worst = std::max(worst, std::fabs(got - ref) / std::max(std::fabs(ref), 1.0));
    if (!model_test::close(got, ref, 1e-3)) FAIL(where << " token " << id << ": logit " << got << ", golden " << ref);
  };
  for (const auto& [id, ref] : s.top) one(id, ref);
  for (size_t i = 0; i < fixed_ids.size(); ++i) one(fixed_ids[i], s.fixed[i]);
  return worst;
}

}  // namespace

TEST_CASE("golden: tokenizer ids match the independent tokenizer; decode(encode(s)) == s") {
  const tokenizer& t = *the_model().tok;
  std::ifstream in(std::string(INSTINFER_GOLDEN_DIR) + "/tokenizer_golden.txt");
  REQUIRE(in.good());
  int cases = 0;
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ss(line);
    std::string hex;
    size_t n = 0;
    ss >> hex >> n;
    std::vector<int32_t> want(n);
    for (auto& id : want) ss >> id;
    const std::string text = unhex(hex);
    CAPTURE(text);
    CHECK(t.encode(text) == want);
    CHECK(t.decode(t.encode(text)) == text);
    ++cases;
  }
  CHECK(cases >= 15);
}

TEST_CASE("golden: greedy ids and logits of 32 steps, one sequence at a time (f32 KV)") {
  fixture& f = the_model();
  const golden g = read_golden();
  double worst = 0.0;
  for (size_t p = 0; p < g.prompts.size(); ++p) {
    const golden_prompt& gp = g.prompts[p];
    CHECK(f.tok->encode(gp.text) == gp.ids);
    auto c = kv_cache::create(f.model->kv_options("host", dtype::kF32));
    REQUIRE_MESSAGE(c.ok(), c.error().to_string());
    std::vector<int32_t> out;
    std::vector<std::vector<float>> logits;
    REQUIRE(model_test::greedy(*f.model, **c, gp.ids, static_cast<uint32_t>(gp.steps.size()), out, &logits).ok());
    for (size_t s = 0; s < gp.steps.size(); ++s) {
      const std::string where = "prompt " + std::to_string(p) + " step " + std::to_string(s);
      REQUIRE_MESSAGE(out[s] == gp.steps[s].next, where << ": generated " << out[s] << ", golden " << gp.steps[s].next);
      worst = std::max(worst, check_step(logits[s], gp.steps[s], g.fixed_ids, where));
    }
  }
  MESSAGE("worst relative logit error vs golden: " << worst);
}

TEST_CASE("golden: the prompts decoded together as one batch give the golden ids") {
  fixture& f = the_model();
  const golden g = read_golden();
  auto c = kv_cache::create(f.model->kv_options("host", dtype::kF32));
  REQUIRE(c.ok());
  kv_cache& cache = **c;
  const size_t n = g.prompts.size();
  std::vector<seq_id> seqs;
  std::vector<int32_t> next;
  std::vector<uint32_t> pos;
  std::vector<float> logits;
  for (const auto& gp : g.prompts) {
    seqs.push_back(cache.create_sequence().value());
    REQUIRE(f.model->prefill(cache, seqs.back(), gp.ids, 0, logits).ok());
    next.push_back(sampler::argmax(logits));
    pos.push_back(static_cast<uint32_t>(gp.ids.size()));
  }
  const uint32_t V = f.model->hparams().n_vocab;
  double worst = 0.0;
  for (size_t s = 0; s < g.prompts[0].steps.size(); ++s) {
    std::vector<forward_item> items;
    for (size_t i = 0; i < n; ++i) {
      REQUIRE_MESSAGE(next[i] == g.prompts[i].steps[s].next, "batched prompt " << i << " step " << s);
      items.push_back({seqs[i], pos[i]++, next[i], true});
    }
    if (s + 1 == g.prompts[0].steps.size()) break;
    REQUIRE(f.model->forward(cache, items, logits).ok());
    for (size_t i = 0; i < n; ++i) {
      std::vector<float> row(logits.begin() + static_cast<std::ptrdiff_t>(i * V),
                             logits.begin() + static_cast<std::ptrdiff_t>((i + 1) * V));
      worst = std::max(worst,
                       check_step(row, g.prompts[i].steps[s + 1], g.fixed_ids, "batched prompt " + std::to_string(i)));
      next[i] = sampler::argmax(row);
    }
  }
  MESSAGE("batched: worst relative logit error vs golden: " << worst);
}

TEST_CASE("golden: every available KV backend (f16 and f32) gives the same greedy tokens") {
  fixture& f = the_model();
  const golden g = read_golden();
  const auto& prompt = g.prompts[0].ids;
  // 16 steps keep this affordable under ASan (a Debug build runs the model ~20x slower).
  std::vector<int32_t> want;
  for (size_t s = 0; s < 16 && s < g.prompts[0].steps.size(); ++s) want.push_back(g.prompts[0].steps[s].next);
  int ran = 0;
  for (dtype d : {dtype::kF32, dtype::kF16}) {
    // f32 KV must give the golden ids; f16 KV rounds K and V, so its backends are compared with
    // each other (host first).
    std::vector<int32_t> base = d == dtype::kF32 ? want : std::vector<int32_t>{};
    for (const std::string& uri : model_test::backend_uris()) {
      if (uri.find("hugepages") != std::string::npos)
        continue;  // host with and without huge pages: test_model covers it
      CAPTURE(uri);
      auto c = kv_cache::create(f.model->kv_options(uri, d));
      if (!c.ok()) {
        CHECK_MESSAGE(!model_test::backend_required(uri), "required backend '" << uri << "' did not start");
        MESSAGE("backend '" << uri << "' skipped: " << c.error().to_string());
        model_test::remove_backend_files(uri);
        continue;
      }
      std::vector<int32_t> out;
      const status s = model_test::greedy(*f.model, **c, prompt, static_cast<uint32_t>(want.size()), out);
      c.value().reset();
      model_test::remove_backend_files(uri);
      REQUIRE_MESSAGE(s.ok(), s.to_string());
      if (base.empty()) base = out;
      CHECK_MESSAGE(out == base, "backend " << uri << " kv " << dtype_name(d));
      ++ran;
    }
  }
  CHECK(ran >= 2);
}

// Quantized KV on the real model: perplexity of the first 384 tokens of the lighthouse text
// (examples/generate/sparf_eval.hpp) with f16, q8_0 and q4_0 KV, through the generator's
// --perplexity code. Over the whole text q8_0 is 0.05 % above f16 and q4_0 13 % (docs/generate.md).
TEST_CASE("quantized KV: q8_0 perplexity within 1 % of f16's, q4_0 within 30 %") {
  fixture& f = the_model();
  std::vector<int32_t> ids = f.tok->encode(sparf_eval::kLongText, false);
  REQUIRE(ids.size() > 384);
  ids.resize(384);
  double ppl[3] = {};
  const dtype types[3] = {dtype::kF16, dtype::kQ8_0, dtype::kQ4_0};
  for (int i = 0; i < 3; ++i) {
    auto cache = kv_cache::create(f.model->kv_options("host", types[i]));
    REQUIRE_MESSAGE(cache.ok(), cache.error().to_string());
    auto r = evaluate_perplexity(*f.model, **cache, ids, ids.size(), 64);
    REQUIRE_MESSAGE(r.ok(), r.error().to_string());
    CHECK(r->predicted == ids.size() - 1);
    ppl[i] = r->perplexity();
    MESSAGE(dtype_name(types[i]) << " KV: perplexity " << ppl[i] << " over " << r->predicted << " tokens");
  }
  CHECK(ppl[0] > 2.0);
  CHECK(ppl[0] < 40.0);  // the model reads English: f16 measured 19 over the whole text
  CHECK(std::fabs(ppl[1] / ppl[0] - 1.0) < 0.01);
  CHECK(std::fabs(ppl[2] / ppl[0] - 1.0) < 0.30);
}

// The default matmuls quantize activations to 8 bits per 32-block (as llama.cpp's q8_1 / q8_0
// dots do): perplexity on the same 384 tokens stays within 2 % of the exact path's (measured
// +1.0 %). Greedy ids are reported, not pinned: the first golden prompt's first step is already
// a near-tie (ids 504 vs 60; the q8 top-2 gap there measured 0.31), and docs/llama-cpp.md finds
// that stock llama.cpp's own q8_1 rounding moves logits by ~1 as well. Where the ids part, the
// top-2 gap must be that small.
TEST_CASE("q8 activations: perplexity within 2 % of the exact matmuls; greedy ids part only at a near-tie") {
  fixture& exact = the_model();
  model_test::loaded_model q8 = model_test::load_model();
  std::vector<int32_t> ids = exact.tok->encode(sparf_eval::kLongText, false);
  REQUIRE(ids.size() > 384);
  ids.resize(384);
  double ppl[2] = {};
  llama_model* models[2] = {exact.model.get(), q8.model.get()};
  for (int i = 0; i < 2; ++i) {
    auto cache = kv_cache::create(models[i]->kv_options("host", dtype::kF16));
    REQUIRE_MESSAGE(cache.ok(), cache.error().to_string());
    auto r = evaluate_perplexity(*models[i], **cache, ids, ids.size(), 64);
    REQUIRE_MESSAGE(r.ok(), r.error().to_string());
    ppl[i] = r->perplexity();
  }
  MESSAGE("perplexity over 383 tokens: exact matmuls " << ppl[0] << ", q8 activations " << ppl[1]);
  CHECK(std::fabs(ppl[1] / ppl[0] - 1.0) < 0.02);

  const golden g = read_golden();
  const golden_prompt& gp = g.prompts[0];
  auto c = kv_cache::create(q8.model->kv_options("host", dtype::kF32));
  REQUIRE(c.ok());
  std::vector<int32_t> out;
  std::vector<std::vector<float>> logits;
  REQUIRE(model_test::greedy(*q8.model, **c, gp.ids, static_cast<uint32_t>(gp.steps.size()), out, &logits).ok());
  size_t same = 0;
  while (same < out.size() && out[same] == gp.steps[same].next) ++same;
  MESSAGE("q8 activations: greedy ids equal the golden ones for " << same << " of " << out.size() << " steps");
  if (same < out.size()) {
    const std::vector<float>& l = logits[same];
    std::vector<float> sorted(l);
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<>());
    MESSAGE("first divergence at step " << same << ": q8 top-2 gap " << sorted[0] - sorted[1]);
    CHECK(sorted[0] - sorted[1] < 0.5f);
  }
}

int main(int argc, char** argv) {
  return model_test::run_with_model(argc, argv);
}
