// instinfer-sparse-eval's report: one JSON line per configuration, or markdown tables.
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>

#include "sparse_eval.hpp"

namespace instinfer::sparse_eval {

void print_report(const report_data& r) {
  const options& o = r.o;
  const std::vector<config>& configs = r.configs;
  const std::vector<tally>& tallies = r.tallies;
  const std::vector<uint32_t>& prompt_tokens = r.prompt_tokens;
  const auto needle_acc = [&](const tally& t, int li, int di) {
    uint32_t hit = 0, n = 0;
    for (const auto& [key, v] : t.needle)
      if ((li < 0 || key.first == static_cast<uint32_t>(li)) && (di < 0 || key.second == static_cast<uint32_t>(di)))
        hit += v.first, n += v.second;
    return std::pair{hit, n};
  };
  if (o.json) {
    for (size_t ci = 0; ci < configs.size(); ++ci) {
      const config& c = configs[ci];
      const tally& t = tallies[ci];
      const auto [hit, n] = needle_acc(t, -1, -1);
      std::printf(
          "{\"bench\":\"sparse-eval\",\"kind\":\"measured\",\"model\":\"%s\",\"config\":\"%s\",\"policy\":\"%s\","
          "\"budget\":\"%s\",\"sinks\":%u,\"window\":%u,\"needle_hits\":%u,\"needles\":%u,\"page_frac\":%.6g,"
          "\"byte_frac\":%.6g,\"sparf_column_overhead\":%.6g,\"page_summary_overhead\":%.6g,\"needle_cells\":[",
          r.model_name.c_str(), c.name.c_str(), c.policy.c_str(), c.budget.c_str(), c.sw ? o.sinks : 0,
          c.sw ? o.window : 0, hit, n, t.counters.page_fraction(), t.counters.byte_fraction(), r.column_overhead,
          r.summary_overhead);
      bool first = true;
      for (const auto& [key, v] : t.needle) {
        std::printf("%s{\"length\":%u,\"depth\":%g,\"hits\":%u,\"n\":%u}", first ? "" : ",", o.lengths[key.first],
                    o.depths[key.second], v.first, v.second);
        first = false;
      }
      std::printf("],\"agreement\":[");
      bool first_agree = true;
      for (size_t li = 0; li < o.lengths.size() && o.gen_tokens > 0; ++li)
        for (size_t pi = 0; pi < t.agreement[li].size(); ++pi) {
          const auto& g = t.agreement[li][pi];
          std::printf(
              "%s{\"length\":%u,\"prompt\":%zu,\"prompt_tokens\":%u,\"same32\":%u,\"n32\":%u,\"same64\":%u,"
              "\"n64\":%u,\"first_divergence\":%d,\"dense_gap_at_divergence\":%.6g,\"kl_mean\":%.6g,"
              "\"kl_steps\":%u,\"tf_same\":%u}",
              first_agree ? "" : ",", o.lengths[li], pi, g.prompt_tokens, g.same32, g.n32, g.same64, g.n64,
              g.first_divergence, g.dense_gap, g.kl, o.kl_steps, g.tf_same);
          first_agree = false;
        }
      std::printf("]}\n");
    }
    return;
  }

  std::printf(
      "\nLong-context sparse evaluation of %s (measured on this machine): f16 KV, %u B pages (%u tokens), "
      "+S/W = %u sink tokens + %u recent tokens; prefill dense, decode through kv_cache::attend_sparse.\n",
      r.model_name.c_str(), r.page_bytes, r.tokens_per_page, o.sinks, o.window);
  if (o.needles > 0) {
    std::printf(
        "\nNeedle retrieval (hits / needles; %u needles per cell, answer within %u greedy tokens):\n\n| "
        "configuration |",
        o.needles, o.needle_tokens);
    for (uint32_t L : o.lengths)
      for (double d : o.depths) std::printf(" %u @ %.0f%% |", L, d * 100);
    std::printf(" all |\n|---|");
    for (size_t i = 0; i <= o.lengths.size() * o.depths.size(); ++i) std::printf("---|");
    std::printf("\n");
    for (size_t ci = 0; ci < configs.size(); ++ci) {
      std::printf("| %s |", configs[ci].name.c_str());
      for (size_t li = 0; li < o.lengths.size(); ++li)
        for (size_t di = 0; di < o.depths.size(); ++di) {
          const auto [h, n] = needle_acc(tallies[ci], static_cast<int>(li), static_cast<int>(di));
          std::printf(" %u/%u |", h, n);
        }
      const auto [h, n] = needle_acc(tallies[ci], -1, -1);
      std::printf(" %u/%u |\n", h, n);
    }
  }
  if (o.gen_tokens > 0) {
    // One value per summary prompt, joined: "8" for one prompt, "8, 31, 32" for three.
    const auto joined = [](const std::vector<tally::agree>& gs, auto&& cell) {
      std::string out;
      for (const auto& g : gs) out += (out.empty() ? "" : ", ") + cell(g);
      return out;
    };
    std::printf(
        "\nGreedy agreement with dense (identical tokens of the first 32 / 64, first divergence with dense's "
        "top-1 minus top-2 log-probability there in nats: a small gap is a near tie) and KL(dense || sparse) "
        "mean over %u teacher-forced steps, with tf = steps of those whose argmax is dense's token; %u summary "
        "prompt(s) per length, one value each:\n\n| configuration |",
        o.kl_steps, o.summary_prompts);
    for (size_t li = 0; li < o.lengths.size(); ++li)
      std::printf(" %u tok: 32 | >= 30 | 64 | first div. (gap) | KL | tf |", prompt_tokens[li]);
    std::printf("\n|---|");
    for (size_t li = 0; li < o.lengths.size(); ++li) std::printf("---|---|---|---|---|---|");
    std::printf("\n");
    for (size_t ci = 0; ci < configs.size(); ++ci) {
      std::printf("| %s |", configs[ci].name.c_str());
      for (const auto& gs : tallies[ci].agreement) {
        uint32_t at_least_30 = 0;
        double kl = 0.0;
        for (const auto& g : gs) at_least_30 += g.same32 >= 30, kl += g.kl;
        char gap[32];
        std::printf(" %s | %u/%zu | %s | %s | %.3g | %s |",
                    joined(gs, [](const tally::agree& g) { return std::to_string(g.same32); }).c_str(), at_least_30,
                    gs.size(), joined(gs, [](const tally::agree& g) { return std::to_string(g.same64); }).c_str(),
                    joined(gs,
                           [&](const tally::agree& g) {
                             if (g.first_divergence < 0) return std::string("none");
                             std::snprintf(gap, sizeof gap, " (%.2g)", g.dense_gap);
                             return std::to_string(g.first_divergence) + gap;
                           })
                        .c_str(),
                    gs.empty() ? 0.0 : kl / static_cast<double>(gs.size()),
                    joined(gs, [](const tally::agree& g) { return std::to_string(g.tf_same); }).c_str());
      }
      std::printf("\n");
    }
  }
  std::printf(
      "\nReads while decoding (all prompts; pages read / pages dense attention reads, bytes likewise; reused:\n"
      "share of SparF calls per (sequence, layer) that reused a selection):\n\n"
      "| configuration | pages | bytes | reused |\n|---|---|---|---|\n");
  for (size_t ci = 1; ci < configs.size(); ++ci) {
    const tally& t = tallies[ci];
    const double calls = static_cast<double>(t.counters.items) / r.n_kv_heads;
    std::printf("| %s | %.3f | %.3f | %.3f |\n", configs[ci].name.c_str(), t.counters.page_fraction(),
                t.counters.byte_fraction(), calls > 0 ? static_cast<double>(t.reused) / calls : 0.0);
  }
  if (r.column_overhead >= 0)
    std::printf(
        "\nStorage beside the KV (%u-token prompt): SparF column copy %.3f x KV bytes, page summaries %.4f "
        "x KV bytes.\n",
        prompt_tokens[0], r.column_overhead, r.summary_overhead);
  for (size_t li = 0; li < o.lengths.size() && o.gen_tokens > 0; ++li)
    std::printf("\ndense (%u tokens): %s\n", prompt_tokens[li], r.dense_text[li].c_str());
}

}  // namespace instinfer::sparse_eval
