// Helpers shared by the model tests: the KV backends to try and a greedy generation loop.
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "llama_model.hpp"
#include "sampler.hpp"

namespace model_test {

// Every backend URI worth trying here; the ones not built or not usable on this machine are
// reported and skipped by the callers (kv_cache::create fails for them).
inline std::vector<std::string> backend_uris() {
  const std::string dir = std::filesystem::temp_directory_path().string();
  const std::string tag = std::to_string(::getpid());
  return {"host", "host:?hugepages=0", "ssd:" + dir + "/instinfer-model-test-" + tag + ".kv", "csd:", "cuda:0"};
}

inline void remove_backend_files(const std::string& uri) {
  if (uri.rfind("ssd:", 0) == 0) std::filesystem::remove(uri.substr(4));
}

// Greedy continuation of `prompt` for n tokens; logits of each step go to all_logits.
inline instinfer::status greedy(instinfer::model::llama_model& m, instinfer::kv_cache& cache,
                                const std::vector<int32_t>& prompt, uint32_t n, std::vector<int32_t>& out,
                                std::vector<std::vector<float>>* all_logits = nullptr) {
  using namespace instinfer::model;
  auto seq = cache.create_sequence();
  if (!seq.ok()) return seq.error();
  std::vector<float> logits;
  INSTINFER_TRY(m.prefill(cache, *seq, prompt, 0, logits));
  uint32_t pos = static_cast<uint32_t>(prompt.size());
  for (uint32_t i = 0; i < n; ++i) {
    if (all_logits) all_logits->push_back(logits);
    const int32_t next = sampler::argmax(logits);
    out.push_back(next);
    if (i + 1 == n) break;
    const forward_item item{*seq, pos++, next, true};
    INSTINFER_TRY(m.forward(cache, {&item, 1}, logits));
  }
  return cache.free_sequence(*seq);
}

// |a - b| <= rel · max(|b|, 1): relative, with an absolute floor for logits near zero.
inline bool close(double a, double b, double rel) {
  return std::fabs(a - b) <= rel * std::max(std::fabs(b), 1.0);
}

}  // namespace model_test
