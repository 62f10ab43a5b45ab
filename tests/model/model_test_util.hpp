// Helpers shared by the model tests: the KV backends to try and a greedy generation loop.
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "gguf.hpp"
#include "llama_model.hpp"
#include "prompt_cache.hpp"
#include "sampler.hpp"
#include "tokenizer.hpp"

namespace model_test {

// The real model file: $INSTINFER_MODEL, else the path scripts/fetch-model writes.
inline std::string model_path() {
  if (const char* p = std::getenv("INSTINFER_MODEL"); p && *p) return p;
  return INSTINFER_MODEL_PATH;
}

// The file, its tokenizer and the model, loaded once per test binary (REQUIREs on failure).
struct loaded_model {
  std::unique_ptr<instinfer::model::gguf_file> file;
  std::unique_ptr<instinfer::model::tokenizer> tok;
  std::unique_ptr<instinfer::model::llama_model> model;
};
inline loaded_model load_model(const instinfer::model::model_options& options = {}) {
  using namespace instinfer::model;
  loaded_model x;
  auto g = gguf_file::open(model_path());
  REQUIRE_MESSAGE(g.ok(), g.error().to_string());
  x.file = std::move(*g);
  auto t = tokenizer::from_gguf(*x.file);
  REQUIRE_MESSAGE(t.ok(), t.error().to_string());
  x.tok = std::move(*t);
  auto m = llama_model::load(*x.file, options);
  REQUIRE_MESSAGE(m.ok(), m.error().to_string());
  x.model = std::move(*m);
  return x;
}

// main() of a test binary that needs the real model: exit 77 (skipped) without it.
inline int run_with_model(int argc, char** argv) {
  if (!std::filesystem::exists(model_path())) {
    std::printf("SKIP: %s is absent (run scripts/fetch-model, or set INSTINFER_MODEL)\n", model_path().c_str());
    return 77;
  }
  doctest::Context ctx(argc, argv);
  return ctx.run();
}

// Every backend URI worth trying here; the ones not built or not usable on this machine are
// reported and skipped by the callers (kv_cache::create fails for them), except those named in
// $INSTINFER_REQUIRE_BACKENDS (comma-separated schemes; CMake sets host,ssd,csd where they are
// built), which must run (backend_required). The SSD file may fall back to buffered I/O where the
// temporary directory refuses O_DIRECT, so it runs on every filesystem.
inline std::vector<std::string> backend_uris() {
  const std::string dir = std::filesystem::temp_directory_path().string();
  const std::string tag = std::to_string(::getpid());
  return {"host", "host:?hugepages=0", "ssd:" + dir + "/instinfer-model-test-" + tag + ".kv?buffered=1",
          "csd:", "cuda:0"};
}

inline bool backend_required(const std::string& uri) {
  const char* env = std::getenv("INSTINFER_REQUIRE_BACKENDS");
  if (!env) return false;
  const std::string scheme = uri.substr(0, uri.find(':'));
  const std::string list = std::string(",") + env + ",";
  return list.find("," + scheme + ",") != std::string::npos;
}

inline void remove_backend_files(const std::string& uri) {
  if (uri.rfind("ssd:", 0) == 0) std::filesystem::remove(uri.substr(4, uri.find('?') - 4));
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

// Greedy continuation as instinfer-generate --prompt-cache runs it: restore the longest cached
// prefix of `prompt` from `path` (restored: how many tokens; note: why none), prefill the rest,
// save the prompt there when the file did not cover it, then decode n tokens.
inline instinfer::status cached_greedy(instinfer::model::llama_model& m, instinfer::kv_cache& cache,
                                       const std::string& path, uint64_t fingerprint,
                                       const std::vector<int32_t>& prompt, uint32_t n, std::vector<int32_t>& out,
                                       uint32_t& restored, std::string* note = nullptr) {
  using namespace instinfer::model;
  auto r = prompt_cache::restore(cache, path, fingerprint, prompt);
  if (!r.ok()) return r.error();
  restored = r->restored;
  if (note) *note = r->note;
  instinfer::seq_id seq = r->seq;
  if (!restored) {
    auto created = cache.create_sequence();
    if (!created.ok()) return created.error();
    seq = *created;
  }
  std::vector<float> logits;
  INSTINFER_TRY(m.prefill(cache, seq, std::span<const int32_t>(prompt).subspan(restored), restored, logits));
  if (restored + 1 < prompt.size()) INSTINFER_TRY(prompt_cache::save(cache, seq, path, fingerprint, prompt));
  uint32_t pos = static_cast<uint32_t>(prompt.size());
  for (uint32_t i = 0; i < n; ++i) {
    const int32_t next = sampler::argmax(logits);
    out.push_back(next);
    if (i + 1 == n) break;
    const forward_item item{seq, pos++, next, true};
    INSTINFER_TRY(m.forward(cache, {&item, 1}, logits));
  }
  return cache.free_sequence(seq);
}

// |a - b| <= rel · max(|b|, 1): relative, with an absolute floor for logits near zero.
inline bool close(double a, double b, double rel) {
  return std::fabs(a - b) <= rel * std::max(std::fabs(b), 1.0);
}

}  // namespace model_test
