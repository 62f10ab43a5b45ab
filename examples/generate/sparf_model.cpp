// instinfer-sparf-model: SparF accuracy on attention captured from the mini-generator's real model
// (issue 7, item 4; the synthetic counterpart is `instinfer-bench sparf-accuracy`).
//
// It prefills a long English prompt (about 1.4K tokens, sparf_eval.hpp), then decodes greedily
// with dense attention and, for the first --steps decode tokens, captures every layer's real
// queries, reads the stored K/V back and runs SparF at each compression against a float64 dense
// reference (relative error, top-k recall, pages and bytes read; definitions in sparf_eval.hpp).
// It also checks that the offline SparF equals the library's kv_cache::attend_sparse on the same
// call, and ends with greedy generation through attend_sparse at each compression against dense.
//
//   build/bin/instinfer-sparf-model                   # tables (markdown)
//   build/bin/instinfer-sparf-model --json            # one JSON line per compression
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "cli.hpp"
#include "gguf.hpp"
#include "llama_model.hpp"
#include "sampler.hpp"
#include "sparf_eval.hpp"
#include "tokenizer.hpp"

using namespace instinfer;
using namespace instinfer::model;
namespace se = instinfer::model::sparf_eval;

namespace {

using cli::now_s;
using cli::parse_u32;

constexpr const char* kDefaultModel = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

struct options {
  std::string model;  // empty: kDefaultModel in the working directory, else in the source tree
  std::string text_file;
  uint32_t steps = 4;
  uint32_t gen_tokens = 32;
  std::vector<double> compressions{1.0, 0.5, 0.25, 0.125, 0.0625};
  std::vector<std::string> compression_labels{"1", "1/2", "1/4", "1/8", "1/16"};
  dtype kv_dtype = dtype::kF16;
  uint32_t page_bytes = 0;
  uint32_t threads = 0;
  double page_spread = 2.0;  // sparf_params::page_spread
  bool whole_pages = true;   // sparf_params::whole_pages
  bool json = false;
  bool per_layer = false;
};

void usage(FILE* out) {
  std::fprintf(
      out,
      "usage: instinfer-sparf-model [options]\n"
      "  --model PATH          GGUF file (default %s, in the working directory or the source tree)\n"
      "  --text FILE           prompt text instead of the built-in one (the instruction is appended)\n"
      "  --steps N             decode steps whose attention is captured (default 4)\n"
      "  --gen-tokens N        greedy tokens compared end to end (default 32; 0: skip)\n"
      "  --compression LIST    comma-separated, each in (0, 1], as 0.125 or 1/8 (default 1,1/2,1/4,1/8,1/16)\n"
      "  --kv-dtype T          f16 | bf16 | f32 | q8_0 | q4_0 (default f16)\n"
      "  --page-bytes N        KV page size (default: the host backend's)\n"
      "  --threads N           compute threads (default: all cores)\n"
      "  --page-spread X       token pages that may be read, x the fewest holding k tokens (default 2; 0: no limit)\n"
      "  --whole-pages 0|1     choose whole column pages of channels (default 1) or single channels\n"
      "  --per-layer           also print the mean relative error of every layer\n"
      "  --json                JSON lines (one per compression) instead of tables\n",
      kDefaultModel);
}

int fail(const std::string& msg) {
  std::fprintf(stderr, "instinfer-sparf-model: %s\n", msg.c_str());
  return 1;
}

// "1,1/2,0.25": fractions in (0, 1]; labels keep the spelling for the tables.
bool parse_compressions(const std::string& list, std::vector<double>& values, std::vector<std::string>& labels) {
  values.clear();
  labels.clear();
  std::stringstream ss(list);
  for (std::string item; std::getline(ss, item, ',');) {
    double v = 0.0;
    if (!cli::parse_fraction(item.c_str(), v)) return false;
    values.push_back(v);
    labels.push_back(item);
  }
  return !values.empty();
}

std::string model_path(const options& o) {
  if (!o.model.empty()) return o.model;
  if (std::filesystem::exists(kDefaultModel)) return kDefaultModel;
  return std::string(INSTINFER_SOURCE_DIR) + "/" + kDefaultModel;
}

// Everything measured for one compression.
struct setting_results {
  std::vector<se::call_metrics> group;     // SparF (per-group selection), one per (step, layer)
  std::vector<se::call_metrics> per_head;  // the per-query-head comparison
  std::vector<int32_t> tokens;             // greedy tokens through attend_sparse
  sparf_counters decode_counters;          // what attend_sparse read during that generation
};

struct summary {
  double err_mean = 0, err_max = 0, recall = 0, chosen_mass = 0, topk_mass = 0;
  uint32_t worst_layer = 0;
  double worst_layer_err = 0;
  std::vector<double> layer_err, layer_chosen_mass, layer_topk_mass;  // means per layer
  uint32_t k_min = UINT32_MAX, k_max = 0, r = 0;
  sparf_counters counters;
  uint64_t token_pages_union = 0;
};

summary summarize(const std::vector<se::call_metrics>& calls, uint32_t n_layers) {
  summary s;
  s.layer_err.assign(n_layers, 0.0);
  s.layer_chosen_mass.assign(n_layers, 0.0);
  s.layer_topk_mass.assign(n_layers, 0.0);
  std::vector<uint64_t> layer_n(n_layers, 0);
  uint64_t n = 0;
  for (const auto& c : calls) {
    s.counters.add(c.counters);
    s.token_pages_union += c.token_pages_union;
    s.k_min = std::min(s.k_min, c.k);
    s.k_max = std::max(s.k_max, c.k);
    s.r = c.r;
    for (const auto& h : c.heads) {
      s.err_mean += h.rel_err;
      s.err_max = std::max(s.err_max, h.rel_err);
      s.recall += h.recall;
      s.chosen_mass += h.chosen_mass;
      s.topk_mass += h.topk_mass;
      s.layer_err[c.layer] += h.rel_err;
      s.layer_chosen_mass[c.layer] += h.chosen_mass;
      s.layer_topk_mass[c.layer] += h.topk_mass;
      ++layer_n[c.layer];
      ++n;
    }
  }
  if (n) {
    s.err_mean /= n;
    s.recall /= n;
    s.chosen_mass /= n;
    s.topk_mass /= n;
  }
  for (uint32_t l = 0; l < n_layers; ++l) {
    if (layer_n[l]) {
      s.layer_err[l] /= layer_n[l];
      s.layer_chosen_mass[l] /= layer_n[l];
      s.layer_topk_mass[l] /= layer_n[l];
    }
    if (s.layer_err[l] > s.worst_layer_err) {
      s.worst_layer_err = s.layer_err[l];
      s.worst_layer = l;
    }
  }
  return s;
}

struct agreement {
  double identical = 0.0;     // fraction of positions with the same token
  int first_divergence = -1;  // first differing position, -1: none
};
agreement compare(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  agreement g;
  size_t same = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (a[i] == b[i])
      ++same;
    else if (g.first_divergence < 0)
      g.first_divergence = static_cast<int>(i);
  }
  g.identical = a.empty() ? 1.0 : static_cast<double>(same) / static_cast<double>(a.size());
  return g;
}

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

// Greedy continuation of a fork of `prompt_seq` for n tokens (the first comes from the prefill's
// logits, the same for every mode), end-of-generation ignored so every mode gives n tokens.
// on_step(i) runs before the forward pass of decode step i (0-based).
template <class OnStep>
status generate(llama_model& m, kv_cache& cache, seq_id prompt_seq, uint32_t prompt_len,
                const std::vector<float>& prefill_logits, uint32_t n, std::vector<int32_t>& out, OnStep on_step) {
  auto seq = cache.fork_sequence(prompt_seq);
  if (!seq.ok()) return seq.error();
  out.clear();
  std::vector<float> logits = prefill_logits;
  uint32_t pos = prompt_len;
  for (uint32_t i = 0; i < n; ++i) {
    out.push_back(sampler::argmax(logits));
    if (i + 1 == n) break;
    on_step(i);
    const forward_item item{*seq, pos++, out.back(), true};
    INSTINFER_TRY(m.forward(cache, {&item, 1}, logits));
  }
  return cache.free_sequence(*seq);
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  cli::flags args("instinfer-sparf-model", argc, argv);
  while (args.next()) {
    const std::string& a = args.flag();
    const auto need = [&](const char* what) { return args.need(what); };
    const auto bad = [&](const char* v) { args.bad(v); };
    if (a == "--help" || a == "-h") {
      usage(stdout);
      return 0;
    } else if (a == "--model")
      o.model = need("a path");
    else if (a == "--text")
      o.text_file = need("a file");
    else if (a == "--steps") {
      const char* v = need("a number");
      if (!parse_u32(v, o.steps) || o.steps == 0 || o.steps > 256) bad(v);
    } else if (a == "--gen-tokens") {
      const char* v = need("a number");
      if (!parse_u32(v, o.gen_tokens) || o.gen_tokens > 4096) bad(v);
    } else if (a == "--compression") {
      const char* v = need("a list such as 1,1/2,1/8");
      if (!parse_compressions(v, o.compressions, o.compression_labels)) bad(v);
    } else if (a == "--kv-dtype") {
      const char* v = need("f16, bf16 or f32");
      auto d = parse_dtype(v);
      if (!d) bad(v);
      o.kv_dtype = *d;
    } else if (a == "--page-bytes") {
      const char* v = need("a number");
      if (!parse_u32(v, o.page_bytes)) bad(v);
    } else if (a == "--threads") {
      const char* v = need("a number");
      if (!parse_u32(v, o.threads) || o.threads > 256) bad(v);
    } else if (a == "--page-spread") {
      const char* v = need("0 or a number in [1, 1e6]");
      char* e = nullptr;
      o.page_spread = std::strtod(v, &e);
      if (e == v || *e || !(o.page_spread == 0.0 || (o.page_spread >= 1.0 && o.page_spread <= 1e6))) bad(v);
    } else if (a == "--whole-pages") {
      const std::string v = need("0 or 1");
      if (v != "0" && v != "1") bad(v.c_str());
      o.whole_pages = v == "1";
    } else if (a == "--per-layer")
      o.per_layer = true;
    else if (a == "--json")
      o.json = true;
    else {
      std::fprintf(stderr, "instinfer-sparf-model: unknown option '%s'\n", a.c_str());
      usage(stderr);
      return 2;
    }
  }
  // Every captured step decodes through the model, so the greedy run must be at least that long.
  const uint32_t dense_tokens = std::max(o.gen_tokens, o.steps + 1);

  const std::string path = model_path(o);
  auto file = gguf_file::open(path);
  if (!file.ok())
    return fail(file.error().to_string() + (file.error().code() == errc::kIoError
                                                ? "\n  (fetch it with scripts/fetch-model, or pass --model PATH)"
                                                : ""));
  auto tok = tokenizer::from_gguf(**file);
  if (!tok.ok()) return fail(tok.error().to_string());
  model_options mo;
  mo.n_threads = o.threads;
  mo.max_batch = 32;
  auto loaded = llama_model::load(**file, mo);
  if (!loaded.ok()) return fail(loaded.error().to_string());
  llama_model& m = **loaded;
  const llama_hparams& hp = m.hparams();

  std::string text(se::kLongText);
  if (!o.text_file.empty()) {
    std::ifstream in(o.text_file);
    if (!in) return fail("cannot read --text file '" + o.text_file + "'");
    std::stringstream ss;
    ss << in.rdbuf();
    text = ss.str();
  }
  const std::vector<token_id> ids =
      tok.value()->encode(tok.value()->apply_chat_template({{"user", se::user_message(text)}}));
  if (ids.size() + dense_tokens > hp.n_ctx_train)
    return fail("the prompt (" + std::to_string(ids.size()) + " tokens) is too long for the model's context");

  cache_options co = m.kv_options("host", o.kv_dtype, true);
  co.page_bytes = o.page_bytes;
  auto cache_r = kv_cache::create(co);
  if (!cache_r.ok()) return fail("KV cache: " + cache_r.error().to_string());
  kv_cache& cache = **cache_r;
  const kv_shape& shape = cache.shape();
  auto cfg_group = se::config_for(cache, se::selection_scope::kGroup);
  auto cfg_head = se::config_for(cache, se::selection_scope::kPerHead);
  if (!cfg_group.ok()) return fail(cfg_group.error().to_string());
  if (!cfg_head.ok()) return fail(cfg_head.error().to_string());

  std::vector<sparf_params> settings;
  for (double c : o.compressions) {
    sparf_params p = sparf_params::with_compression(c);
    p.page_spread = o.page_spread;
    p.whole_pages = o.whole_pages;
    p.sink_tokens = p.window_tokens = 0;  // plain SparF, as the paper and docs/experiment.md measure it
    settings.push_back(p);
  }
  std::vector<setting_results> results(settings.size());

  std::fprintf(stderr, "[model] %s: %u layers, %u heads (%u kv, group %u), head %u | kv %s, page %u B, %u threads\n",
               path.c_str(), hp.n_layers, hp.n_head, hp.n_kv_head, shape.group_size(), hp.head_dim,
               std::string(dtype_name(o.kv_dtype)).c_str(), cache.page().page_bytes, m.n_threads());
  auto prompt_seq = cache.create_sequence();
  if (!prompt_seq.ok()) return fail(prompt_seq.error().to_string());
  std::vector<float> prefill_logits;
  double t0 = now_s();
  if (status s = m.prefill(cache, *prompt_seq, ids, 0, prefill_logits); !s.ok())
    return fail("prefill: " + s.to_string());
  const double prefill_s = now_s() - t0;
  const uint32_t prompt_len = static_cast<uint32_t>(ids.size());
  std::fprintf(stderr, "[prompt] %u tokens (chat template: text + instruction), prefilled densely in %.1f s\n",
               prompt_len, prefill_s);

  // Dense greedy run; the observer evaluates SparF on the first o.steps decode steps.
  bool capturing = false;
  status capture_error;
  double library_max_diff = 0.0;
  uint64_t library_checks = 0;
  sparf_workspace ws;
  std::vector<std::vector<float>> offline_out;
  std::vector<float> library_out(size_t{shape.n_q_heads} * shape.head_dim);
  m.set_attention_observer([&](const attention_call& call) {
    if (!capturing || !capture_error.ok()) return;
    if (call.seqs.size() != 1) {
      capture_error = {errc::kInternal, "expected one sequence per attention call"};
      return;
    }
    auto cap = se::capture(cache, call.seqs[0], call.layer, call.q);
    if (!cap.ok()) {
      capture_error = cap.error();
      return;
    }
    const se::dense_reference ref = se::dense_reference::make(*cap, shape, cfg_group->effective_scale());
    auto group = se::evaluate(*cap, shape, ref, *cfg_group, se::selection_scope::kGroup, settings, ws, &offline_out);
    auto head = se::evaluate(*cap, shape, ref, *cfg_head, se::selection_scope::kPerHead, settings, ws);
    if (!group.ok() || !head.ok()) {
      capture_error = group.ok() ? head.error() : group.error();
      return;
    }
    for (size_t i = 0; i < settings.size(); ++i) {
      results[i].group.push_back((*group)[i]);
      results[i].per_head.push_back((*head)[i]);
      // The library's own SparF on the same call must give the same output.
      if (status s = cache.attend_sparse(call.layer, call.seqs, call.q, library_out.data(), nullptr, settings[i]);
          !s.ok()) {
        capture_error = s;
        return;
      }
      for (size_t j = 0; j < library_out.size(); ++j)
        library_max_diff =
            std::max(library_max_diff, static_cast<double>(std::fabs(library_out[j] - offline_out[i][j])));
      ++library_checks;
    }
  });
  std::vector<int32_t> dense_tokens_out;
  t0 = now_s();
  status st = generate(m, cache, *prompt_seq, prompt_len, prefill_logits, dense_tokens, dense_tokens_out,
                       [&](uint32_t step) { capturing = step < o.steps; });
  m.set_attention_observer({});
  if (!capture_error.ok()) return fail("capture: " + capture_error.to_string());
  if (!st.ok()) return fail("dense decode: " + st.to_string());
  const double capture_s = now_s() - t0;
  dense_tokens_out.resize(o.gen_tokens);
  std::fprintf(stderr,
               "[capture] %u decode steps x %u layers evaluated in %.1f s (with the dense decode); "
               "kv_cache::attend_sparse vs offline SparF: max |diff| %.3g over %llu calls\n",
               o.steps, hp.n_layers, capture_s, library_max_diff, static_cast<unsigned long long>(library_checks));

  // End to end: the same greedy continuation with attend_sparse at each compression.
  for (size_t i = 0; i < settings.size() && o.gen_tokens > 0; ++i) {
    m.set_sparse_attention(settings[i]);
    const sparf_counters before = cache.stats().sparf;
    t0 = now_s();
    st = generate(m, cache, *prompt_seq, prompt_len, prefill_logits, o.gen_tokens, results[i].tokens, [](uint32_t) {});
    if (!st.ok()) return fail("SparF decode at compression " + o.compression_labels[i] + ": " + st.to_string());
    results[i].decode_counters = cache.stats().sparf.since(before);
    std::fprintf(stderr, "[generate] compression %s: %u tokens in %.1f s\n", o.compression_labels[i].c_str(),
                 o.gen_tokens, now_s() - t0);
  }
  m.set_sparse_attention(std::nullopt);

  const uint32_t G = shape.group_size();
  const uint32_t ctx_first = prompt_len + 1, ctx_last = prompt_len + o.steps;
  if (!o.json) {
    std::printf(
        "\nSparF on attention captured from %s (measured on this machine): prompt %u tokens, %u decode steps "
        "(context %u..%u), %u layers x %u query heads (%u kv heads, GQA group %u), head_dim %u, %s KV, %u B "
        "pages (%u tokens), column pages %u channels x %u tokens, page spread %g, whole column pages %s; dense "
        "reference in float64.\n\n",
        std::filesystem::path(path).filename().c_str(), prompt_len, o.steps, ctx_first, ctx_last, hp.n_layers,
        hp.n_head, hp.n_kv_head, G, hp.head_dim, std::string(dtype_name(o.kv_dtype)).c_str(), cache.page().page_bytes,
        cache.page().tokens_per_page, cfg_group->columns.channels_per_page, cfg_group->columns.tokens_per_page,
        o.page_spread, o.whole_pages ? "yes" : "no");
    std::printf(
        "| compression | r | k | rel. error mean (max) | worst layer (its mean) | top-k recall | exact mass of "
        "chosen / of true top-k | pages read / dense | bytes used / dense |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|\n");
    for (size_t i = 0; i < settings.size(); ++i) {
      const summary s = summarize(results[i].group, hp.n_layers);
      const std::string k =
          s.k_min == s.k_max ? std::to_string(s.k_min) : std::to_string(s.k_min) + "-" + std::to_string(s.k_max);
      std::printf("| %s | %u | %s | %s (%s) | %u (%s) | %.3f | %.3f / %.3f | %.3f | %.3f |\n",
                  o.compression_labels[i].c_str(), s.r, k.c_str(), fmt("%.2g", s.err_mean).c_str(),
                  fmt("%.2g", s.err_max).c_str(), s.worst_layer, fmt("%.2g", s.worst_layer_err).c_str(), s.recall,
                  s.chosen_mass, s.topk_mass, s.counters.page_fraction(), s.counters.byte_fraction());
    }
    std::printf(
        "\nFor comparison, not SparF: selection per query head (each of the %u heads of a group picks its own "
        "channels and tokens; on flash the group reads the union of their token pages and the sum of their "
        "column pages):\n\n",
        G);
    std::printf(
        "| compression | rel. error mean (max) | top-k recall | exact mass of chosen | pages read / dense (union) |\n");
    std::printf("|---|---|---|---|---|\n");
    for (size_t i = 0; i < settings.size(); ++i) {
      const summary s = summarize(results[i].per_head, hp.n_layers);
      // Dense pages of the replicated rows are G times the real ones.
      const double dense = static_cast<double>(s.counters.dense_pages) / G;
      const double pages = static_cast<double>(s.token_pages_union + s.counters.channel_pages_read);
      std::printf("| %s | %s (%s) | %.3f | %.3f | %.3f |\n", o.compression_labels[i].c_str(),
                  fmt("%.2g", s.err_mean).c_str(), fmt("%.2g", s.err_max).c_str(), s.recall, s.chosen_mass,
                  dense > 0 ? pages / dense : 0.0);
    }
    if (o.gen_tokens > 0) {
      std::printf(
          "\nGreedy generation of %u tokens after the prompt (end-of-text ignored; prefill dense), "
          "kv_cache::attend_sparse vs dense kv_cache::attend:\n\n",
          o.gen_tokens);
      std::printf("| compression | identical tokens | first divergence | pages read / dense while decoding |\n");
      std::printf("|---|---|---|---|\n");
      for (size_t i = 0; i < settings.size(); ++i) {
        const agreement g = compare(dense_tokens_out, results[i].tokens);
        std::printf("| %s | %.3f | %s | %.3f |\n", o.compression_labels[i].c_str(), g.identical,
                    g.first_divergence < 0 ? "none" : std::to_string(g.first_divergence).c_str(),
                    results[i].decode_counters.page_fraction());
      }
      std::printf("\ndense: %s\n", tok.value()->decode(dense_tokens_out).c_str());
      for (size_t i = 0; i < settings.size(); ++i)
        std::printf("%s: %s\n", o.compression_labels[i].c_str(), tok.value()->decode(results[i].tokens).c_str());
    }
    if (o.per_layer) {
      std::printf("\nMean relative error per layer:\n\n| layer |");
      for (const auto& l : o.compression_labels) std::printf(" %s |", l.c_str());
      std::printf("\n|---|");
      for (size_t i = 0; i < settings.size(); ++i) std::printf("---|");
      std::printf("\n");
      std::vector<summary> all;
      for (const auto& r : results) all.push_back(summarize(r.group, hp.n_layers));
      for (uint32_t l = 0; l < hp.n_layers; ++l) {
        std::printf("| %u |", l);
        for (const auto& s : all) std::printf(" %s |", fmt("%.2g", s.layer_err[l]).c_str());
        std::printf("\n");
      }
    }
    return 0;
  }

  for (size_t i = 0; i < settings.size(); ++i) {
    const summary s = summarize(results[i].group, hp.n_layers);
    const summary h = summarize(results[i].per_head, hp.n_layers);
    const double dense_h = static_cast<double>(h.counters.dense_pages) / G;
    const agreement g = compare(dense_tokens_out, results[i].tokens);
    std::printf(
        "{\"bench\":\"sparf-model\",\"kind\":\"measured\",\"model\":\"%s\",\"prompt_tokens\":%u,\"steps\":%u,"
        "\"layers\":%u,\"q_heads\":%u,\"kv_heads\":%u,\"group\":%u,\"head_dim\":%u,\"dtype\":\"%s\","
        "\"page_bytes\":%u,\"channels_per_page\":%u,\"column_tokens_per_page\":%u,\"page_spread\":%g,\"whole_pages\":%"
        "s,\"compression\":%.17g,"
        "\"r\":%u,\"k_min\":%u,\"k_max\":%u,\"rel_err_mean\":%.6g,\"rel_err_max\":%.6g,\"worst_layer\":%u,"
        "\"worst_layer_rel_err_mean\":%.6g,\"recall_mean\":%.6g,\"chosen_exact_mass_mean\":%.6g,"
        "\"true_topk_mass_mean\":%.6g,\"page_frac\":%.6g,\"byte_frac\":%.6g,\"library_max_abs_diff\":%.3g,"
        "\"per_head_rel_err_mean\":%.6g,\"per_head_recall_mean\":%.6g,\"per_head_page_frac_union\":%.6g,"
        "\"gen_tokens\":%u,\"greedy_identical_frac\":%.6g,\"greedy_first_divergence\":%d,\"decode_page_frac\":%.6g,",
        std::filesystem::path(path).filename().c_str(), prompt_len, o.steps, hp.n_layers, hp.n_head, hp.n_kv_head, G,
        hp.head_dim, std::string(dtype_name(o.kv_dtype)).c_str(), cache.page().page_bytes,
        cfg_group->columns.channels_per_page, cfg_group->columns.tokens_per_page, o.page_spread,
        o.whole_pages ? "true" : "false", o.compressions[i], s.r, s.k_min, s.k_max, s.err_mean, s.err_max,
        s.worst_layer, s.worst_layer_err, s.recall, s.chosen_mass, s.topk_mass, s.counters.page_fraction(),
        s.counters.byte_fraction(), library_max_diff, h.err_mean, h.recall,
        dense_h > 0 ? static_cast<double>(h.token_pages_union + h.counters.channel_pages_read) / dense_h : 0.0,
        o.gen_tokens, g.identical, g.first_divergence, results[i].decode_counters.page_fraction());
    auto print_layers = [&](const char* key, const std::vector<double>& v, const char* end) {
      std::printf("\"%s\":[", key);
      for (uint32_t l = 0; l < hp.n_layers; ++l) std::printf("%s%.4g", l ? "," : "", v[l]);
      std::printf("]%s", end);
    };
    print_layers("layer_rel_err_mean", s.layer_err, ",");
    print_layers("layer_chosen_exact_mass_mean", s.layer_chosen_mass, ",");
    print_layers("layer_true_topk_mass_mean", s.layer_topk_mass, "}\n");
  }
  return 0;
}
