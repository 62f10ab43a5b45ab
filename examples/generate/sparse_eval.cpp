// instinfer-sparse-eval: long-context quality of sparse decode on the real model (issue 16 item 5).
//
// For prompts of 2K-8K tokens built from text the project ships (tests/data/text and the lighthouse
// text of sparf_eval.hpp, cycled by paragraph), it compares dense decode with SparF and the
// page-summary policy at several budgets, each with and without attention sinks + a recent window:
//   needle     a line "The secret code for <word> is <5 digits>." buried at 10 / 50 / 90 % depth of
//              the filler, then a question; correct when the greedy answer (at most --needle-tokens
//              tokens, stopping at end of turn) contains the number;
//   agreement  greedy tokens after "<filler> Summarize ..." (end-of-text ignored) against dense's:
//              identical positions among the first 32 and 64, and the first divergence;
//   kl         KL(dense || sparse) of the next-token distribution, mean over the first --kl-steps
//              decode steps, teacher-forced on dense's tokens so every step sees the same context.
// Every prompt is prefilled once, densely (causal chunk attention); each configuration decodes on
// a fork of it (the needles of one depth also share the filler before the needle). Reads are the
// cache's sparf counters (pages read / pages dense attention reads); storage is the SparF column
// copy and the page summaries over the KV bytes of one prefilled prompt.
//
//   build/bin/instinfer-sparse-eval                      # 2K and 4K tokens, markdown tables
//   build/bin/instinfer-sparse-eval --lengths 2048,4096,8192 --json
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cli.hpp"
#include "gguf.hpp"
#include "llama_model.hpp"
#include "sampler.hpp"
#include "sparf_eval.hpp"
#include "sparse_eval.hpp"
#include "tokenizer.hpp"

using namespace instinfer;
using namespace instinfer::model;
using namespace instinfer::sparse_eval;

namespace {

using cli::now_s;
using cli::parse_u32;

constexpr const char* kDefaultModel = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
constexpr const char* kDefaultText = "tests/data/text/declaration-gettysburg-inaugural.txt";

void usage(FILE* out) {
  std::fprintf(out,
               "usage: instinfer-sparse-eval [options]\n"
               "  --model PATH        GGUF file (default %s, in the working directory or the source tree)\n"
               "  --text FILE         filler text (default %s, then the built-in lighthouse text)\n"
               "  --lengths LIST      filler tokens per prompt (default 2048,4096; 8192 fits the model)\n"
               "  --depths LIST       needle depths in [0, 1] (default 0.1,0.5,0.9)\n"
               "  --needles N         needles per length and depth (default 3; 0: skip the needle task)\n"
               "  --needle-tokens N   greedy tokens searched for the number (default 16)\n"
               "  --gen-tokens N      greedy agreement tokens (default 64; 0: skip agreement and KL)\n"
               "  --summary-prompts N agreement / KL prompts per length, each from another filler offset\n"
               "                      (default 1)\n"
               "  --kl-steps N        teacher-forced steps of the KL mean (default 32)\n"
               "  --budget LIST       fractions, as 0.25 or 1/4 (default 1/2,1/4,1/8,1/16)\n"
               "  --policies LIST     sparf,page (default both)\n"
               "  --sinks N           attention-sink tokens of the +S/W configurations (default 16)\n"
               "  --window N          recent-window tokens of the +S/W configurations (default 64)\n"
               "  --sw-only           only the +S/W configurations (not also without)\n"
               "  --page-spread X     SparF token pages: X x the fewest holding k (default 2; 0: off)\n"
               "  --channel-share S   SparF's budget share for column reads, in (0, 1) (default 0.5: r = c d,\n"
               "                      k = c n / 2); otherwise r = 2 S c d channels, k = (1 - S) c n tokens\n"
               "                      (sparf_params::channel_share)\n"
               "  --reuse LIST        SparF selection reuse cosines, each a configuration (default 0: off)\n"
               "  --reuse-steps N     calls one selection serves at most (default 8)\n"
               "  --threads N         compute threads (default: all cores)\n"
               "  --seed N            needle words and numbers (default 16)\n"
               "  --json              JSON lines (one per configuration) instead of tables\n",
               kDefaultModel, kDefaultText);
}

int fail(const std::string& msg) {
  std::fprintf(stderr, "instinfer-sparse-eval: %s\n", msg.c_str());
  return 1;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, sep);)
    if (!item.empty()) out.push_back(item);
  return out;
}

std::string find_file(const std::string& given, const char* fallback) {
  if (!given.empty()) return given;
  if (std::filesystem::exists(fallback)) return fallback;
  return std::string(INSTINFER_SOURCE_DIR) + "/" + fallback;
}

// log-softmax in float64 (the KL of nearly equal distributions needs the precision).
std::vector<double> log_softmax(const std::vector<float>& x) {
  double mx = -INFINITY;
  for (float v : x) mx = std::max(mx, static_cast<double>(v));
  double sum = 0.0;
  for (float v : x) sum += std::exp(static_cast<double>(v) - mx);
  const double lse = mx + std::log(sum);
  std::vector<double> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = static_cast<double>(x[i]) - lse;
  return out;
}

// Top-1 minus top-2 of a log-probability row: how near a tie the greedy choice is.
double top2_gap(const std::vector<double>& logp) {
  double a = -INFINITY, b = -INFINITY;
  for (double v : logp) {
    if (v > a) {
      b = a;
      a = v;
    } else if (v > b) {
      b = v;
    }
  }
  return a - b;
}

double kl_divergence(const std::vector<double>& logp, const std::vector<double>& logq) {
  double kl = 0.0;
  for (size_t i = 0; i < logp.size(); ++i) {
    const double p = std::exp(logp[i]);
    if (p > 0.0) kl += p * (logp[i] - logq[i]);
  }
  return std::max(kl, 0.0);
}

// Decode on a fork of `base` (length `len`), the first token taken from `logits0` (the dense
// prefill's, the same for every configuration). forced: feed these tokens instead of the argmax
// (teacher forcing). stop: end at an end-of-generation token. on_logits(i, logits) sees the
// distribution after feeding token i.
template <class OnLogits>
status decode(llama_model& m, kv_cache& cache, seq_id base, uint32_t len, const std::vector<float>& logits0, uint32_t n,
              const std::vector<int32_t>* forced, const tokenizer* stop, std::vector<int32_t>& out,
              OnLogits on_logits) {
  auto seq = cache.fork_sequence(base);
  if (!seq.ok()) return seq.error();
  out.clear();
  std::vector<float> logits = logits0;
  uint32_t pos = len;
  status st;
  for (uint32_t i = 0; i < n; ++i) {
    const int32_t next = forced ? (*forced)[i] : sampler::argmax(logits);
    out.push_back(forced ? sampler::argmax(logits) : next);
    if ((stop && stop->is_end_of_generation(next)) || i + 1 == n) break;
    const forward_item item{*seq, pos++, next, true};
    st = m.forward(cache, {&item, 1}, logits);
    if (!st.ok()) break;
    on_logits(i, logits);
  }
  const status fr = cache.free_sequence(*seq);
  return st.ok() ? fr : st;
}

// The filler: paragraphs of the text, tokenized one by one and cycled until `n` tokens.
struct filler {
  std::vector<std::vector<token_id>> paragraphs;
};

}  // namespace

int main(int argc, char** argv) {
  options o;
  cli::flags args("instinfer-sparse-eval", argc, argv);
  const auto parse_list_u32 = [&](const char* v, std::vector<uint32_t>& out, uint32_t lo, uint32_t hi) {
    out.clear();
    for (const auto& s : split(v, ',')) {
      uint32_t x = 0;
      if (!parse_u32(s.c_str(), x) || x < lo || x > hi) args.bad(v);
      out.push_back(x);
    }
    if (out.empty()) args.bad(v);
  };
  const auto parse_u32_in = [&](const char* v, uint32_t& out, uint32_t lo, uint32_t hi) {
    if (!parse_u32(v, out) || out < lo || out > hi) args.bad(v);
  };
  while (args.next()) {
    const std::string& a = args.flag();
    if (a == "--help" || a == "-h") {
      usage(stdout);
      return 0;
    } else if (a == "--model")
      o.model = args.need("a path");
    else if (a == "--text")
      o.text_file = args.need("a file");
    else if (a == "--lengths")
      parse_list_u32(args.need("a list of token counts"), o.lengths, 64, 1u << 20);
    else if (a == "--depths") {
      const char* v = args.need("a list of fractions");
      o.depths.clear();
      for (const auto& s : split(v, ',')) {
        char* e = nullptr;
        const double d = std::strtod(s.c_str(), &e);
        if (e == s.c_str() || *e || !(d >= 0.0 && d <= 1.0)) args.bad(v);
        o.depths.push_back(d);
      }
      if (o.depths.empty()) args.bad(v);
    } else if (a == "--needles")
      parse_u32_in(args.need("a number"), o.needles, 0, 100);
    else if (a == "--needle-tokens")
      parse_u32_in(args.need("a number"), o.needle_tokens, 1, 256);
    else if (a == "--gen-tokens")
      parse_u32_in(args.need("a number"), o.gen_tokens, 0, 4096);
    else if (a == "--summary-prompts")
      parse_u32_in(args.need("a number"), o.summary_prompts, 1, 64);
    else if (a == "--kl-steps")
      parse_u32_in(args.need("a number"), o.kl_steps, 1, 4096);
    else if (a == "--budget") {
      const char* v = args.need("a list such as 1/4,1/8");
      o.budgets.clear();
      o.budget_labels.clear();
      for (const auto& s : split(v, ',')) {
        double x = 0.0;
        if (!cli::parse_fraction(s.c_str(), x)) args.bad(v);
        o.budgets.push_back(x);
        o.budget_labels.push_back(s);
      }
      if (o.budgets.empty()) args.bad(v);
    } else if (a == "--policies") {
      const char* v = args.need("sparf,page");
      o.policies = split(v, ',');
      for (const auto& p : o.policies)
        if (p != "sparf" && p != "page") args.bad(v);
      if (o.policies.empty()) args.bad(v);
    } else if (a == "--sinks")
      parse_u32_in(args.need("a number"), o.sinks, 0, 1u << 20);
    else if (a == "--window")
      parse_u32_in(args.need("a number"), o.window, 0, 1u << 20);
    else if (a == "--sw-only")
      o.both_sw = false;
    else if (a == "--reuse") {
      const char* v = args.need("a list of cosines such as 0,0.9");
      o.reuse.clear();
      for (const auto& x : split(v, ',')) {
        char* end = nullptr;
        const double c = std::strtod(x.c_str(), &end);
        if (x.empty() || *end != '\0' || !(c >= 0.0 && c <= 1.0)) args.bad(v);
        o.reuse.push_back(c);
      }
      if (o.reuse.empty()) args.bad(v);
    } else if (a == "--reuse-steps")
      parse_u32_in(args.need("a number"), o.reuse_steps, 1, sparf_params::kMaxReuseSteps);
    else if (a == "--page-spread") {
      const char* v = args.need("0 or a number >= 1");
      char* end = nullptr;
      o.page_spread = std::strtod(v, &end);
      if (end == v || *end != '\0' || !(o.page_spread == 0.0 || (o.page_spread >= 1.0 && o.page_spread <= 1e6)))
        args.bad(v);
    } else if (a == "--channel-share") {
      const char* v = args.need("a number in (0, 1)");
      if (!cli::parse_fraction(v, o.channel_share) || o.channel_share >= 1.0) args.bad(v);
    } else if (a == "--threads")
      parse_u32_in(args.need("a number"), o.threads, 0, 256);
    else if (a == "--seed")
      parse_u32_in(args.need("a number"), o.seed, 0, UINT32_MAX);
    else if (a == "--json")
      o.json = true;
    else {
      std::fprintf(stderr, "instinfer-sparse-eval: unknown option '%s'\n", a.c_str());
      usage(stderr);
      return 2;
    }
  }
  if (o.kl_steps > o.gen_tokens) o.kl_steps = o.gen_tokens;

  const std::string path = find_file(o.model, kDefaultModel);
  auto file = gguf_file::open(path);
  if (!file.ok())
    return fail(file.error().to_string() + (file.error().code() == errc::kIoError
                                                ? "\n  (fetch it with scripts/fetch-model, or pass --model PATH)"
                                                : ""));
  auto tok_r = tokenizer::from_gguf(**file);
  if (!tok_r.ok()) return fail(tok_r.error().to_string());
  const tokenizer& tok = **tok_r;
  model_options mo;
  mo.n_threads = o.threads;
  auto loaded = llama_model::load(**file, mo);
  if (!loaded.ok()) return fail(loaded.error().to_string());
  llama_model& m = **loaded;
  const llama_hparams& hp = m.hparams();

  // ---- prompts ----
  std::string text;
  {
    const std::string tf = find_file(o.text_file, kDefaultText);
    std::ifstream in(tf);
    if (!in) return fail("cannot read the filler text '" + tf + "'");
    std::stringstream ss;
    ss << in.rdbuf();
    text = ss.str();
    if (o.text_file.empty()) text += "\n\n" + std::string(sparf_eval::kLongText);
  }
  filler fill;
  for (size_t at = 0; at < text.size();) {
    size_t end = text.find("\n\n", at);
    end = end == std::string::npos ? text.size() : end;
    if (end > at) fill.paragraphs.push_back(tok.encode(text.substr(at, end - at) + "\n\n", false));
    at = end + 2;
  }
  if (fill.paragraphs.empty()) return fail("the filler text is empty");
  if (o.summary_prompts > fill.paragraphs.size())
    return fail("--summary-prompts " + std::to_string(o.summary_prompts) + " exceeds the filler's " +
                std::to_string(fill.paragraphs.size()) + " paragraphs");
  // The chat template around the user message, split at a marker: head + message + tail.
  const std::string tpl = tok.apply_chat_template({{"user", "\x01"}});
  const size_t mark = tpl.find('\x01');
  const std::vector<token_id> head = tok.encode(tpl.substr(0, mark));
  const std::string tail = tpl.substr(mark + 1);
  // Filler of about n tokens from paragraph `first` on, cut at paragraph ends; breaks: token
  // offsets of paragraph starts.
  const auto make_filler = [&](uint32_t n, size_t first, std::vector<token_id>& ids, std::vector<uint32_t>& breaks) {
    ids.clear();
    breaks.clear();
    for (size_t i = first; ids.size() < n; ++i) {
      breaks.push_back(static_cast<uint32_t>(ids.size()));
      const auto& p = fill.paragraphs[i % fill.paragraphs.size()];
      ids.insert(ids.end(), p.begin(), p.end());
    }
  };
  // Needles: a word and a 5-digit number per (length, depth, index), from a fixed generator.
  static const char* const kWords[] = {"falcon", "lantern", "orchid",  "granite", "harbor",  "violet",
                                       "copper", "meadow",  "thistle", "glacier", "saffron", "walnut",
                                       "ember",  "juniper", "cobalt",  "willow"};
  uint64_t rng = 0x9E3779B97F4A7C15ull ^ o.seed;
  const auto next_rand = [&] {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
  };

  // ---- configurations ----
  std::vector<config> configs{{"dense", std::nullopt}};
  for (const auto& pol : o.policies)
    for (size_t b = 0; b < o.budgets.size(); ++b)
      for (int sw = o.both_sw ? 0 : 1; sw <= 1; ++sw)
        for (const double reuse : o.reuse) {
          if (reuse > 0.0 && pol != "sparf") continue;  // reuse is SparF's
          sparf_params p = sparf_params::with_compression(o.budgets[b]);
          p.policy = pol == "sparf" ? sparse_policy::kSparf : sparse_policy::kPageSummary;
          p.sink_tokens = sw ? o.sinks : 0;  // without +S/W: plain top-k (the defaults are 16 / 64)
          p.window_tokens = sw ? o.window : 0;
          p.page_spread = o.page_spread;
          p.channel_share = o.channel_share;
          p.reuse_min_cosine = static_cast<float>(reuse);
          p.reuse_max_steps = o.reuse_steps;
          char reuse_label[32] = "";
          if (reuse > 0.0) std::snprintf(reuse_label, sizeof reuse_label, " reuse %.3g", reuse);
          char share_label[32] = "";
          if (pol == "sparf" && o.channel_share != sparf_params::kDefaultChannelShare)
            std::snprintf(share_label, sizeof share_label, " share %.3g", o.channel_share);
          config c{pol + " " + o.budget_labels[b] + (sw ? " +S/W" : "") + reuse_label + share_label, p, pol,
                   o.budget_labels[b], sw == 1};
          configs.push_back(c);
        }
  std::vector<tally> tallies(configs.size());
  for (auto& t : tallies) t.agreement.assign(o.lengths.size(), std::vector<tally::agree>(o.summary_prompts));

  cache_options co = m.kv_options("host", dtype::kF16, true);
  co.page_summaries = true;
  auto cache_r = kv_cache::create(co);
  if (!cache_r.ok()) return fail("KV cache: " + cache_r.error().to_string());
  kv_cache& cache = **cache_r;
  std::fprintf(
      stderr,
      "[model] %s: %u layers, %u heads (%u kv), head %u, context %u | f16 KV, page %u B (%u tokens), %u threads\n",
      path.c_str(), hp.n_layers, hp.n_head, hp.n_kv_head, hp.head_dim, hp.n_ctx_train, cache.page().page_bytes,
      cache.page().tokens_per_page, m.n_threads());

  // Storage of the sparse policies' data over the KV bytes, taken on the first prefilled prompt.
  double column_overhead = -1.0, summary_overhead = -1.0;
  std::vector<uint32_t> prompt_tokens(o.lengths.size(), 0);
  std::vector<std::string> dense_text(o.lengths.size());
  uint32_t dense_needle_hits = 0, dense_needles = 0;
  std::vector<std::string> needle_examples;

  // Runs every configuration's decode on a fork of `base`; fn(ci) does the work.
  const auto for_each_config = [&](auto&& fn) -> status {
    for (size_t ci = 0; ci < configs.size(); ++ci) {
      m.set_sparse_attention(configs[ci].params);
      const cache_stats before = cache.stats();
      status s = fn(ci);
      const cache_stats after = cache.stats();
      tallies[ci].counters.add(after.sparf.since(before.sparf));
      tallies[ci].reused += after.sparf_reused_selections - before.sparf_reused_selections;
      m.set_sparse_attention(std::nullopt);
      if (!s.ok()) return status{s.code(), configs[ci].name + ": " + s.to_string()};
    }
    return {};
  };

  const double t_start = now_s();
  for (size_t li = 0; li < o.lengths.size(); ++li) {
    const uint32_t L = o.lengths[li];
    std::vector<token_id> body;
    std::vector<uint32_t> breaks;
    make_filler(L, 0, body, breaks);

    // ---- agreement and KL: filler + summarise instruction, per summary prompt ----
    for (uint32_t pi = 0; pi < o.summary_prompts && o.gen_tokens > 0; ++pi) {
      std::vector<token_id> text_ids = body;
      if (pi > 0) {
        std::vector<uint32_t> b;
        make_filler(L, size_t{pi} * fill.paragraphs.size() / o.summary_prompts, text_ids, b);
      }
      std::vector<token_id> ids = head;
      ids.insert(ids.end(), text_ids.begin(), text_ids.end());
      const auto t = tok.encode(std::string(sparf_eval::kInstruction) + tail);
      ids.insert(ids.end(), t.begin(), t.end());
      if (ids.size() + o.gen_tokens > hp.n_ctx_train)
        return fail("a prompt of " + std::to_string(ids.size()) + " tokens exceeds the model's context");
      if (pi == 0) prompt_tokens[li] = static_cast<uint32_t>(ids.size());
      auto base = cache.create_sequence();
      if (!base.ok()) return fail(base.error().to_string());
      std::vector<float> logits0;
      double t0 = now_s();
      if (status s = m.prefill(cache, *base, ids, 0, logits0); !s.ok()) return fail("prefill: " + s.to_string());
      std::fprintf(stderr, "[agreement] %zu-token prompt %u prefilled in %.1f s\n", ids.size(), pi, now_s() - t0);
      if (column_overhead < 0) {
        const cache_stats cs = cache.stats();
        // Only this prompt is in the cache now: its chunks are the KV bytes.
        const double kv = static_cast<double>(cs.backend.used_chunks * cs.chunk_bytes);
        column_overhead = static_cast<double>(cs.sparf_column_bytes) / kv;
        summary_overhead = static_cast<double>(cs.page_summary_bytes) / kv;
      }
      const uint32_t len = static_cast<uint32_t>(ids.size());
      // Dense: its greedy tokens, the log-probabilities of its first kl_steps steps, and its
      // top-1 minus top-2 gap at every step (gap[i]: the step that chose token i).
      std::vector<int32_t> dense_tokens;
      std::vector<std::vector<double>> dense_logp;
      std::vector<double> dense_gap{top2_gap(log_softmax(logits0))};
      t0 = now_s();
      if (status s = decode(m, cache, *base, len, logits0, o.gen_tokens, nullptr, nullptr, dense_tokens,
                            [&](uint32_t i, const std::vector<float>& lg) {
                              std::vector<double> lp = log_softmax(lg);
                              dense_gap.push_back(top2_gap(lp));
                              if (i < o.kl_steps) dense_logp.push_back(std::move(lp));
                            });
          !s.ok())
        return fail("dense decode: " + s.to_string());
      if (pi == 0) dense_text[li] = tok.decode(dense_tokens);
      const status s = for_each_config([&](size_t ci) -> status {
        tally::agree& g = tallies[ci].agreement[li][pi];
        g.prompt_tokens = len;
        if (!configs[ci].params) {  // dense against itself: identical by construction
          g.same32 = g.n32 = std::min<uint32_t>(32, o.gen_tokens);
          g.tf_same = o.kl_steps;
          g.same64 = g.n64 = std::min<uint32_t>(64, o.gen_tokens);
          return {};
        }
        std::vector<int32_t> out;
        INSTINFER_TRY(decode(m, cache, *base, len, logits0, o.gen_tokens, nullptr, nullptr, out,
                             [](uint32_t, const std::vector<float>&) {}));
        for (size_t i = 0; i < out.size() && i < dense_tokens.size(); ++i) {
          const bool same = out[i] == dense_tokens[i];
          if (!same && g.first_divergence < 0) {
            g.first_divergence = static_cast<int>(i);
            g.dense_gap = i < dense_gap.size() ? dense_gap[i] : -1.0;
          }
          if (i < 32) g.same32 += same, ++g.n32;
          if (i < 64) g.same64 += same, ++g.n64;
        }
        double kl = 0.0;
        INSTINFER_TRY(decode(m, cache, *base, len, logits0, o.kl_steps + 1, &dense_tokens, nullptr, out,
                             [&](uint32_t i, const std::vector<float>& lg) {
                               if (i < o.kl_steps) kl += kl_divergence(dense_logp[i], log_softmax(lg));
                             }));
        g.kl = kl / o.kl_steps;
        for (uint32_t i = 1; i < out.size() && i <= o.kl_steps; ++i) g.tf_same += out[i] == dense_tokens[i];
        return {};
      });
      if (!s.ok()) return fail(s.to_string());
      std::fprintf(stderr, "[agreement] %u tokens x %zu configurations in %.1f s\n", o.gen_tokens, configs.size(),
                   now_s() - t0);
      if (status fs = cache.free_sequence(*base); !fs.ok()) return fail(fs.to_string());
    }

    // ---- needles ----
    for (size_t di = 0; di < o.depths.size() && o.needles > 0; ++di) {
      // The paragraph start nearest the depth: the filler before it is shared by the needles.
      const double want = o.depths[di] * body.size();
      uint32_t cut = breaks[0];
      for (uint32_t b : breaks)
        if (std::fabs(b - want) < std::fabs(cut - want)) cut = b;
      std::vector<token_id> prefix = head;
      prefix.insert(prefix.end(), body.begin(), body.begin() + cut);
      auto pre = cache.create_sequence();
      if (!pre.ok()) return fail(pre.error().to_string());
      std::vector<float> unused;
      double t0 = now_s();
      if (status s = m.prefill(cache, *pre, prefix, 0, unused); !s.ok()) return fail("prefill: " + s.to_string());
      for (uint32_t ni = 0; ni < o.needles; ++ni) {
        const std::string word = kWords[next_rand() % std::size(kWords)];
        const std::string number = std::to_string(10000 + next_rand() % 90000);
        const std::string needle = "The secret code for " + word + " is " + number + ".\n\n";
        const std::string question = "What is the secret code for " + word + "? Answer with the number only." + tail;
        std::vector<token_id> rest = tok.encode(needle, false);
        rest.insert(rest.end(), body.begin() + cut, body.end());
        const auto q = tok.encode(question);
        rest.insert(rest.end(), q.begin(), q.end());
        const uint32_t len = static_cast<uint32_t>(prefix.size() + rest.size());
        if (len + o.needle_tokens > hp.n_ctx_train)
          return fail("a prompt of " + std::to_string(len) + " tokens exceeds the model's context");
        auto base = cache.fork_sequence_at(*pre, prefix.size());
        if (!base.ok()) return fail(base.error().to_string());
        std::vector<float> logits0;
        if (status s = m.prefill(cache, *base, rest, static_cast<uint32_t>(prefix.size()), logits0); !s.ok())
          return fail("prefill: " + s.to_string());
        const status s = for_each_config([&](size_t ci) -> status {
          std::vector<int32_t> out;
          INSTINFER_TRY(decode(m, cache, *base, len, logits0, o.needle_tokens, nullptr, &tok, out,
                               [](uint32_t, const std::vector<float>&) {}));
          const std::string answer = tok.decode(out);
          const bool hit = answer.find(number) != std::string::npos;
          auto& cell = tallies[ci].needle[{static_cast<uint32_t>(li), static_cast<uint32_t>(di)}];
          cell.first += hit;
          ++cell.second;
          if (!configs[ci].params) {
            dense_needle_hits += hit;
            ++dense_needles;
            if (needle_examples.size() < 4)
              needle_examples.push_back(std::to_string(L) + " @" + std::to_string(o.depths[di]) + ": " + number +
                                        " -> \"" + answer + "\"");
          }
          return {};
        });
        if (!s.ok()) return fail(s.to_string());
        if (status fs = cache.free_sequence(*base); !fs.ok()) return fail(fs.to_string());
      }
      if (status fs = cache.free_sequence(*pre); !fs.ok()) return fail(fs.to_string());
      std::fprintf(stderr, "[needle] length %u depth %.2f: %u needles x %zu configurations in %.1f s\n", L,
                   o.depths[di], o.needles, configs.size(), now_s() - t0);
    }
  }
  std::fprintf(stderr, "[done] %.1f s; dense retrieved %u of %u needles\n", now_s() - t_start, dense_needle_hits,
               dense_needles);
  for (const auto& e : needle_examples) std::fprintf(stderr, "[dense needle] %s\n", e.c_str());

  print_report(report_data{o, configs, tallies, std::filesystem::path(path).filename().string(),
                           cache.page().page_bytes, cache.page().tokens_per_page, hp.n_kv_head, prompt_tokens,
                           dense_text, column_overhead, summary_overhead});
  return 0;
}
