// The forward pass on a seeded synthetic model (mixed tensor types, GQA, untied and tied output)
// against a float64 reference; chunked prefill, batched decode and every KV backend must agree.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>

#include "gguf.hpp"
#include "llama_model.hpp"
#include "model_test_util.hpp"
#include "synthetic_model.hpp"
#include "tokenizer.hpp"

using namespace instinfer;
using namespace instinfer::model;

namespace {

struct loaded {
  synth::model m;
  std::unique_ptr<gguf_file> file;
  std::unique_ptr<llama_model> model;
  std::unique_ptr<tokenizer> tok;
};

std::unique_ptr<loaded> load(const synth::config& cfg, model_options mo = {}) {
  auto l = std::make_unique<loaded>();
  l->m = synth::make_model(cfg);
  auto f = gguf_file::parse({l->m.image.data(), l->m.image.size()});
  REQUIRE_MESSAGE(f.ok(), f.error().to_string());
  l->file = std::move(*f);
  auto m = llama_model::load(*l->file, mo);
  REQUIRE_MESSAGE(m.ok(), m.error().to_string());
  l->model = std::move(*m);
  auto t = tokenizer::from_gguf(*l->file);
  REQUIRE_MESSAGE(t.ok(), t.error().to_string());
  l->tok = std::move(*t);
  return l;
}

std::unique_ptr<kv_cache> make_cache(const llama_model& m, const std::string& uri, dtype d) {
  auto c = kv_cache::create(m.kv_options(uri, d));
  REQUIRE_MESSAGE(c.ok(), c.error().to_string());
  return std::move(*c);
}

const std::vector<int32_t> kPrompt = {1,   3 + 't', 3 + 'h', 3 + 'e', 270, 5,        9, 261, 3 + ' ', 3 + 'w',
                                      100, 101,     102,     103,     2,   3 + '\n', 1, 44,  45,      46};

}  // namespace

TEST_CASE("forward: logits match the float64 reference (untied and tied output)") {
  // q8: the Q4/Q8 matmuls take activations quantized to 8 bits per 32-block (quant.hpp), which
  // moves every matmul input by up to max|x|/254 per element. Through this random (untrained)
  // model's layers that measured 0.036 (untied) and 0.11 (tied) of a logit at worst, hence 0.25,
  // against 1e-3 for the f32-unpacking kernels; the kernels themselves are bounded in test_quant.
  for (bool q8 : {false, true})
    for (bool tied : {false, true}) {
      CAPTURE(q8);
      CAPTURE(tied);
      synth::config cfg;
      cfg.tied = tied;
      model_options mo;
      mo.max_batch = 8;  // the 20-token prompt takes three chunks
      mo.q8_activations = q8;
      auto l = load(cfg, mo);
      CHECK(l->model->hparams().tied_output == tied);
      auto cache = make_cache(*l->model, "host", dtype::kF32);
      std::vector<int32_t> out;
      std::vector<std::vector<float>> logits;
      REQUIRE(model_test::greedy(*l->model, *cache, kPrompt, 12, out, &logits).ok());
      synth::reference ref(l->m);
      std::vector<double> r;
      for (int32_t t : kPrompt) r = ref.step(t);
      const double tol = q8 ? 2.5e-1 : 1e-3;
      double worst = 0.0;
      for (size_t s = 0; s < out.size(); ++s) {
        REQUIRE(logits[s].size() == l->m.vocab());
        size_t best = 0, second = 1;
        for (size_t i = 0; i < r.size(); ++i) {
          if (r[i] > r[best]) {
            second = best;
            best = i;
          } else if (i != best && r[i] > r[second]) {
            second = i;
          }
          worst = std::max(worst, std::fabs(logits[s][i] - r[i]) / std::max(std::fabs(r[i]), 1.0));
          if (!model_test::close(logits[s][i], r[i], tol))
            FAIL("step " << s << " logit " << i << ": " << logits[s][i] << " vs " << r[i]);
        }
        // The greedy token is the reference's unless the top two are closer than the error bound.
        if (r[best] - r[second] > 2 * tol * std::max(std::fabs(r[best]), 1.0))
          CHECK(static_cast<size_t>(out[s]) == best);
        r = ref.step(out[s]);
      }
      MESSAGE("synthetic model, q8 activations=" << q8 << ", tied=" << tied << ": worst relative logit error "
                                                 << worst);
    }
}

TEST_CASE("forward: chunk size, thread count and ISA do not change the result") {
  std::vector<int32_t> base;
  std::vector<std::vector<float>> base_logits;
  struct variant {
    uint32_t batch, threads;
    kernel_isa isa;
  };
  for (variant v : {variant{64, 0, best_kernel_isa()}, variant{1, 1, best_kernel_isa()},
                    variant{5, 2, best_kernel_isa()}, variant{7, 2, kernel_isa::kScalar}}) {
    model_options mo;
    mo.max_batch = v.batch;
    mo.n_threads = v.threads;
    mo.isa = v.isa;
    auto l = load({}, mo);
    auto cache = make_cache(*l->model, "host", dtype::kF32);
    std::vector<int32_t> out;
    std::vector<std::vector<float>> logits;
    REQUIRE(model_test::greedy(*l->model, *cache, kPrompt, 8, out, &logits).ok());
    if (base.empty()) {
      base = out;
      base_logits = logits;
      continue;
    }
    CHECK(out == base);
    for (size_t s = 0; s < logits.size(); ++s)
      for (size_t i = 0; i < logits[s].size(); ++i) REQUIRE(model_test::close(logits[s][i], base_logits[s][i], 1e-4));
  }
}

TEST_CASE("forward: a decode batch equals the sequences decoded one by one") {
  auto l = load({});
  const std::vector<std::vector<int32_t>> prompts = {
      kPrompt, {1, 50, 60, 70}, {3 + 'x', 3 + 'y', 3 + 'z', 3 + '1', 3 + '2', 3 + '3', 3 + '4'}};
  const uint32_t steps = 10;
  std::vector<std::vector<int32_t>> alone(prompts.size());
  std::vector<std::vector<std::vector<float>>> alone_logits(prompts.size());
  {
    auto cache = make_cache(*l->model, "host", dtype::kF16);
    for (size_t p = 0; p < prompts.size(); ++p)
      REQUIRE(model_test::greedy(*l->model, *cache, prompts[p], steps, alone[p], &alone_logits[p]).ok());
  }
  auto cache = make_cache(*l->model, "host", dtype::kF16);
  std::vector<seq_id> seqs;
  std::vector<int32_t> next;
  std::vector<uint32_t> pos;
  std::vector<std::vector<int32_t>> got(prompts.size());
  std::vector<float> logits;
  for (const auto& p : prompts) {
    seqs.push_back(cache->create_sequence().value());
    REQUIRE(l->model->prefill(*cache, seqs.back(), p, 0, logits).ok());
    next.push_back(sampler::argmax(logits));
    pos.push_back(static_cast<uint32_t>(p.size()));
  }
  for (uint32_t s = 0; s < steps; ++s) {
    std::vector<forward_item> items;
    for (size_t i = 0; i < seqs.size(); ++i) {
      got[i].push_back(next[i]);
      items.push_back({seqs[i], pos[i]++, next[i], true});
    }
    if (s + 1 == steps) break;
    REQUIRE(l->model->forward(*cache, items, logits).ok());
    const uint32_t V = l->model->hparams().n_vocab;
    for (size_t i = 0; i < seqs.size(); ++i) {
      std::span<const float> row(logits.data() + i * V, V);
      for (uint32_t k = 0; k < V; ++k) REQUIRE(model_test::close(row[k], alone_logits[i][s + 1][k], 1e-4));
      next[i] = sampler::argmax(row);
    }
  }
  for (size_t i = 0; i < prompts.size(); ++i) CHECK(got[i] == alone[i]);
}

TEST_CASE("forward: every available KV backend gives the same greedy tokens") {
  auto l = load({});
  std::vector<int32_t> host;
  int ran = 0;
  for (const std::string& uri : model_test::backend_uris()) {
    CAPTURE(uri);
    auto c = kv_cache::create(l->model->kv_options(uri, dtype::kF16));
    if (!c.ok()) {
      CHECK_MESSAGE(!model_test::backend_required(uri), "required backend '" << uri << "' did not start");
      MESSAGE("backend '" << uri << "' skipped: " << c.error().to_string());
      model_test::remove_backend_files(uri);
      continue;
    }
    std::vector<int32_t> out;
    const status s = model_test::greedy(*l->model, **c, kPrompt, 24, out);
    c.value().reset();
    model_test::remove_backend_files(uri);
    REQUIRE_MESSAGE(s.ok(), s.to_string());
    if (host.empty()) host = out;
    CHECK(out == host);
    ++ran;
  }
  CHECK(ran >= 1);
}

TEST_CASE("forward: a q8_0 / q4_0 KV cache (quantized on append) stays close to f16") {
  auto l = load({});
  std::vector<int32_t> ref_tokens;
  std::vector<std::vector<float>> ref_logits;
  {
    auto cache = make_cache(*l->model, "host", dtype::kF16);
    REQUIRE(model_test::greedy(*l->model, *cache, kPrompt, 6, ref_tokens, &ref_logits).ok());
  }
  for (dtype t : {dtype::kQ8_0, dtype::kQ4_0}) {
    CAPTURE(dtype_name(t));
    auto cache = make_cache(*l->model, "host", t);
    std::vector<int32_t> tokens;
    std::vector<std::vector<float>> logits;
    const status s = model_test::greedy(*l->model, *cache, kPrompt, 6, tokens, &logits);
    REQUIRE_MESSAGE(s.ok(), s.to_string());
    // The prompt's logits: relative L2 distance to f16's within the format's error.
    double num = 0.0, den = 0.0;
    for (size_t k = 0; k < logits[0].size(); ++k) {
      num += (logits[0][k] - ref_logits[0][k]) * (logits[0][k] - ref_logits[0][k]);
      den += ref_logits[0][k] * ref_logits[0][k];
    }
    const double rel = std::sqrt(num / den);
    MESSAGE(dtype_name(t) << " KV: prompt logits vs f16 KV, relative L2 " << rel);
    CHECK(rel <= (t == dtype::kQ8_0 ? 0.02 : 0.2));
    if (t == dtype::kQ8_0) CHECK(tokens.front() == ref_tokens.front());
  }
}

TEST_CASE("forward: bad inputs get clear errors") {
  auto l = load({}, model_options{1, 4, best_kernel_isa()});
  auto cache = make_cache(*l->model, "host", dtype::kF32);
  const seq_id s = cache->create_sequence().value();
  std::vector<float> logits;
  forward_item bad_tok{s, 0, static_cast<int32_t>(l->m.vocab()), true};
  status st = l->model->forward(*cache, {&bad_tok, 1}, logits);
  CHECK(st.code() == errc::kInvalidArgument);
  CHECK(st.message().find("vocabulary") != std::string::npos);
  forward_item bad_pos{s, 3, 5, true};
  st = l->model->forward(*cache, {&bad_pos, 1}, logits);
  CHECK(st.code() == errc::kInvalidArgument);
  CHECK(st.message().find("position") != std::string::npos);
  std::vector<forward_item> many(5, forward_item{s, 0, 5, false});
  st = l->model->forward(*cache, many, logits);
  CHECK(st.code() == errc::kInvalidArgument);
  forward_item unknown{s + 1000, 0, 5, true};
  st = l->model->forward(*cache, {&unknown, 1}, logits);
  CHECK(st.code() == errc::kUnknownSequence);
  CHECK(!l->model->prefill(*cache, s, {}, 0, logits).ok());
  // Nothing was appended by the failed calls.
  CHECK(cache->length(s, 0).value() == 0);
}

TEST_CASE("tokenizer: synthetic vocabulary, pre-tokenizer boundaries and round trips") {
  auto l = load({});
  const tokenizer& t = *l->tok;
  auto id = [&](const std::string& s) {
    for (uint32_t i = 0; i < l->m.vocab(); ++i)
      if (l->m.tokens[i] == s) return static_cast<int32_t>(i);
    FAIL("no token " << s);
    return -1;
  };
  const std::string G = "\xc4\xa0";  // GPT-2's stand-in for ' '
  CHECK(t.encode("the") == std::vector<int32_t>{id("t"), id("he")});
  CHECK(t.encode(" the") == std::vector<int32_t>{id(G + "the")});
  CHECK(t.encode("  the") == std::vector<int32_t>{id(G), id(G + "the")});             // \s+(?!\S) leaves one space
  CHECK(t.encode("a1") == std::vector<int32_t>{id("a"), id("1")});                    // digits are split off
  CHECK(t.encode("12") == std::vector<int32_t>{id("1"), id("2")});                    // one digit per piece
  CHECK(t.encode("it's") == std::vector<int32_t>{id("i"), id("t"), id("'s")});        // contraction piece
  CHECK(t.encode("x. y") == std::vector<int32_t>{id("x"), id("."), id(G), id("y")});  // no ". " merge across pieces
  CHECK(t.encode(" world") == std::vector<int32_t>{id(G + "w"), id("or"), id("ld")});
  CHECK(t.encode("<|im_start|>the<|im_end|>") == std::vector<int32_t>{1, id("t"), id("he"), 2});
  CHECK(t.encode("<|im_start|>", false).size() == 12);  // plain text when specials are not parsed
  CHECK(t.is_end_of_generation(2));
  CHECK(t.apply_chat_template({{"user", "hi"}}) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
  // Round trips over random UTF-8, including invalid sequences (bytes are carried one by one).
  std::mt19937_64 rng(9);
  const char* pieces[] = {"a",  " ", "  ", "\n",   "\t",   "1",          "é",   "中",          "😀",
                          "'s", "'", ".",  "\xff", "\xc3", "<|im_end|>", "the", "\xe2\x80\x83"};
  for (int trial = 0; trial < 500; ++trial) {
    std::string s;
    const int n = static_cast<int>(rng() % 12);
    for (int k = 0; k < n; ++k) s += pieces[rng() % std::size(pieces)];
    const auto ids = t.encode(s);
    for (int32_t i : ids) REQUIRE((i >= 0 && static_cast<uint32_t>(i) < l->m.vocab()));
    REQUIRE_MESSAGE(t.decode(ids) == s, "round trip of '" << s << "'");
  }
}

TEST_CASE("tokenizer: the SentencePiece (llama) variant merges by score and falls back to bytes") {
  const std::string sp = "\xe2\x96\x81";  // U+2581, SentencePiece's space
  std::vector<std::string> toks = {"<unk>", "<s>", "</s>"};
  std::vector<int32_t> types = {2, 3, 3};
  std::vector<float> scores = {0, 0, 0};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    toks.push_back(name);
    types.push_back(6);
    scores.push_back(0);
  }
  const std::pair<std::string, float> pieces[] = {{sp, -1},       {"t", -10}, {"h", -10},       {"e", -10}, {"x", -10},
                                                  {sp + "t", -3}, {"he", -2}, {sp + "the", -1}, {"th", -20}};
  for (const auto& [p, s] : pieces) {
    toks.push_back(p);
    types.push_back(1);
    scores.push_back(s);
  }
  synth::writer w;
  w.out.insert(w.out.end(), {std::byte('G'), std::byte('G'), std::byte('U'), std::byte('F')});
  w.put<uint32_t>(3);
  w.put<uint64_t>(0);
  w.put<uint64_t>(5);
  w.str("tokenizer.ggml.model");
  w.put<uint32_t>(synth::kString);
  w.str("llama");
  w.str("tokenizer.ggml.tokens");
  w.put<uint32_t>(synth::kArray);
  w.put<uint32_t>(synth::kString);
  w.put<uint64_t>(toks.size());
  for (auto& t : toks) w.str(t);
  w.str("tokenizer.ggml.token_type");
  w.put<uint32_t>(synth::kArray);
  w.put<uint32_t>(synth::kI32);
  w.put<uint64_t>(types.size());
  for (auto t : types) w.put<int32_t>(t);
  w.str("tokenizer.ggml.scores");
  w.put<uint32_t>(synth::kArray);
  w.put<uint32_t>(synth::kF32);
  w.put<uint64_t>(scores.size());
  for (auto s : scores) w.put<float>(s);
  w.str("tokenizer.ggml.bos_token_id");
  w.put<uint32_t>(synth::kU32);
  w.put<uint32_t>(1);
  auto f = gguf_file::parse({w.out.data(), w.out.size()});
  REQUIRE_MESSAGE(f.ok(), f.error().to_string());
  auto tk = tokenizer::from_gguf(**f);
  REQUIRE_MESSAGE(tk.ok(), tk.error().to_string());
  const tokenizer& t = **tk;
  CHECK(t.model() == tokenizer::kind::kSentencePiece);
  auto id = [&](const std::string& s) {
    return static_cast<int32_t>(std::find(toks.begin(), toks.end(), s) - toks.begin());
  };
  CHECK(t.encode("the") == std::vector<int32_t>{1, id(sp + "the")});  // he, then ▁t + he
  CHECK(t.encode("the the") == std::vector<int32_t>{1, id(sp + "the"), id(sp + "the")});
  CHECK(t.encode("\xc3\xa9") == std::vector<int32_t>{1, id(sp), id("<0xC3>"), id("<0xA9>")});  // byte fallback
  for (const char* s : {"the", "the the", "x\xc3\xa9 th", "  x", "\xe4\xb8\xad"}) CHECK(t.decode(t.encode(s)) == s);
}
