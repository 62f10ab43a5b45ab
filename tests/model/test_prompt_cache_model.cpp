// instinfer-generate's prompt cache on the real SmolLM2-135M-Instruct: a cold run saves its chat
// prompt from a host cache; warm runs restore it into an ssd cache (the same prompt: all but its
// last token; the same system prompt and another question: their common prefix) and must
// generate exactly the cold runs' tokens. Exits 77 (skipped) when the model file is absent.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <algorithm>
#include <filesystem>

#include "model_test_util.hpp"
#include "prompt_cache.hpp"

using namespace instinfer;
using namespace instinfer::model;

TEST_CASE("prompt cache on the real model: warm runs generate the cold runs' tokens") {
  model_test::loaded_model l = model_test::load_model();
  const uint64_t fingerprint = prompt_cache::model_fingerprint(*l.file);
  const std::string system =
      "You are a careful assistant for a lighthouse museum. Answer in plain English, briefly, and say so when you "
      "do not know.";
  const auto chat = [&](const std::string& question) {
    return l.tok->encode(l.tok->apply_chat_template({{"system", system}, {"user", question}}));
  };
  const auto a = chat("Why were lighthouses painted with bands of colour?");
  const auto b = chat("What did a lighthouse keeper do at night?");
  const uint32_t n = 24;
  const auto cold = [&](const std::vector<int32_t>& prompt) {
    auto cache = kv_cache::create(l.model->kv_options("host", dtype::kF16));
    REQUIRE(cache.ok());
    std::vector<int32_t> out;
    REQUIRE(model_test::greedy(*l.model, **cache, prompt, n, out).ok());
    return out;
  };
  const auto cold_a = cold(a), cold_b = cold(b);
  const size_t common = std::mismatch(a.begin(), a.end(), b.begin(), b.end()).first - a.begin();
  REQUIRE(common > 20);  // the system prompt

  std::string ssd;
  for (const std::string& uri : model_test::backend_uris())
    if (uri.rfind("ssd:", 0) == 0) ssd = uri;
  if (auto probe = kv_cache::create(l.model->kv_options(ssd, dtype::kF16)); !probe.ok()) {
    CHECK_MESSAGE(!model_test::backend_required(ssd), "required backend '" << ssd << "' did not start");
    MESSAGE("ssd backend unavailable (" << probe.error().to_string() << "): warm runs use host");
    model_test::remove_backend_files(ssd);
    ssd = "host";
  }
  model_test::remove_backend_files(ssd);

  const std::string path =
      (std::filesystem::temp_directory_path() / ("instinfer-prompt-cache-model." + std::to_string(::getpid())))
          .string();
  std::filesystem::remove(path);
  const auto run = [&](const std::string& uri, const std::vector<int32_t>& prompt, uint32_t& restored) {
    auto cache = kv_cache::create(l.model->kv_options(uri, dtype::kF16));
    REQUIRE_MESSAGE(cache.ok(), cache.error().to_string());
    std::vector<int32_t> out;
    const status s = model_test::cached_greedy(*l.model, **cache, path, fingerprint, prompt, n, out, restored);
    cache.value().reset();
    model_test::remove_backend_files(uri);
    REQUIRE_MESSAGE(s.ok(), s.to_string());
    return out;
  };
  uint32_t restored = 0;
  CHECK(run("host", a, restored) == cold_a);  // cold: writes the file
  CHECK(restored == 0);
  CHECK(run(ssd, a, restored) == cold_a);
  CHECK(restored == a.size() - 1);
  CHECK(run(ssd, b, restored) == cold_b);
  CHECK(restored == common);
  MESSAGE("prompt a: " << a.size() << " tokens, b: " << b.size() << ", common prefix " << common << "; warm on "
                       << ssd);
  std::filesystem::remove(path);
}

int main(int argc, char** argv) {
  return model_test::run_with_model(argc, argv);
}
