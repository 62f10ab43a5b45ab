// instinfer-sparse-eval's shared types (sparse_eval.cpp runs the evaluation, sparse_eval_report.cpp
// prints it).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "instinfer/attention/sparf.hpp"

namespace instinfer::sparse_eval {

struct options {
  std::string model, text_file;
  std::vector<uint32_t> lengths{2048, 4096};
  std::vector<double> depths{0.1, 0.5, 0.9};
  std::vector<double> budgets{0.5, 0.25, 0.125, 0.0625};
  std::vector<std::string> budget_labels{"1/2", "1/4", "1/8", "1/16"};
  std::vector<std::string> policies{"sparf", "page"};
  uint32_t needles = 3;         // needles per (length, depth)
  uint32_t needle_tokens = 16;  // SmolLM2 often repeats the question's sentence first
  uint32_t gen_tokens = 64;
  // Summary prompts per length for agreement and KL: prompt p starts its filler at paragraph
  // p * paragraphs / N, so each is a different text of the same length.
  uint32_t summary_prompts = 1;
  uint32_t kl_steps = 32;
  uint32_t sinks = 16, window = 64;
  double page_spread = sparf_params{}.page_spread;  // SparF's token-page limit (0: none)
  // SparF's split of the budget: the share spent on column reads (sparf_params::channel_share:
  // r = 2 S c d channels, k = (1 - S) c n tokens).
  double channel_share = sparf_params::kDefaultChannelShare;
  std::vector<double> reuse{0.0};  // SparF selection reuse cosines (0: off)
  uint32_t reuse_steps = sparf_params{}.reuse_max_steps;
  uint32_t threads = 0;
  uint32_t seed = 16;
  bool both_sw = true;  // each budget with and without sinks + window
  bool json = false;
};

// One decode configuration: dense (no params) or a policy at a budget, with or without S/W.
struct config {
  std::string name;
  std::optional<sparf_params> params;
  std::string policy = "dense", budget = "1";
  bool sw = false;
};

// What one configuration measured, summed over prompts.
struct tally {
  std::map<std::pair<uint32_t, uint32_t>, std::pair<uint32_t, uint32_t>> needle;  // (len, depth) -> (hit, n)
  struct agree {
    uint32_t prompt_tokens = 0;
    uint32_t same32 = 0, same64 = 0, n32 = 0, n64 = 0;
    int first_divergence = -1;
    // Dense's top-1 minus top-2 log-probability (nats) at the first divergence: a near tie there
    // flips on any perturbation, so a small gap says the divergence tells little.
    double dense_gap = -1.0;
    uint32_t tf_same = 0;  // teacher-forced steps whose argmax is dense's token
    double kl = 0.0;
  };
  std::vector<std::vector<agree>> agreement;  // [length][summary prompt]
  sparf_counters counters;
  uint64_t reused = 0;  // (sequence, layer) SparF calls that reused a selection
};

// Everything the report prints, gathered by the run.
struct report_data {
  const options& o;
  const std::vector<config>& configs;
  const std::vector<tally>& tallies;
  std::string model_name;  // the GGUF file's name
  uint32_t page_bytes = 0, tokens_per_page = 0, n_kv_heads = 0;
  std::vector<uint32_t> prompt_tokens;  // per length (its first summary prompt)
  std::vector<std::string> dense_text;  // per length (its first summary prompt)
  double column_overhead = -1.0, summary_overhead = -1.0;
};

// JSON lines (o.json) or the markdown tables, to stdout.
void print_report(const report_data& r);

}  // namespace instinfer::sparse_eval
