// The generator's prompt cache (examples/generate/prompt_cache.hpp) on the synthetic model: a
// restored prefix, on another backend, generates what a cold run generates; a prompt sharing only
// a prefix restores that prefix; every damaged or foreign file falls back to a cold prefill and
// leaves the cache untouched.
#include <doctest/doctest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "gguf.hpp"
#include "llama_model.hpp"
#include "model_test_util.hpp"
#include "prompt_cache.hpp"
#include "synthetic_model.hpp"

using namespace instinfer;
using namespace instinfer::model;

namespace {

struct loaded {
  synth::model m;
  std::unique_ptr<gguf_file> file;
  std::unique_ptr<llama_model> model;
  uint64_t fingerprint = 0;
};

std::unique_ptr<loaded> load(uint64_t seed = 1234) {
  auto l = std::make_unique<loaded>();
  synth::config cfg;
  cfg.seed = seed;
  l->m = synth::make_model(cfg);
  auto f = gguf_file::parse({l->m.image.data(), l->m.image.size()});
  REQUIRE_MESSAGE(f.ok(), f.error().to_string());
  l->file = std::move(*f);
  model_options mo;
  mo.max_batch = 8;  // prompts take several chunks, and a restored prefix ends inside one
  auto m = llama_model::load(*l->file, mo);
  REQUIRE_MESSAGE(m.ok(), m.error().to_string());
  l->model = std::move(*m);
  l->fingerprint = prompt_cache::model_fingerprint(*l->file);
  return l;
}

std::unique_ptr<kv_cache> make_cache(const llama_model& m, const std::string& uri, dtype d) {
  auto c = kv_cache::create(m.kv_options(uri, d));
  REQUIRE_MESSAGE(c.ok(), c.error().to_string());
  return std::move(*c);
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / (name + "." + std::to_string(::getpid()))).string();
}

// The ssd URI where this machine runs one (else host, unless ssd is required here): restores
// must cross backends.
std::string other_backend(const llama_model& m) {
  for (const std::string& uri : model_test::backend_uris()) {
    if (uri.rfind("ssd:", 0) != 0) continue;
    bool ok = false;
    {
      auto c = kv_cache::create(m.kv_options(uri, dtype::kF16));
      ok = c.ok();
      if (!ok) {
        CHECK_MESSAGE(!model_test::backend_required(uri), "required backend '" << uri << "' did not start");
        MESSAGE("ssd unavailable (" << c.error().to_string() << "): restoring into host");
      }
    }
    model_test::remove_backend_files(uri);
    if (ok) return uri;
  }
  return "host";
}

std::vector<int32_t> cold(loaded& l, const std::vector<int32_t>& prompt, uint32_t n, dtype d = dtype::kF16) {
  auto cache = make_cache(*l.model, "host", d);
  std::vector<int32_t> out;
  REQUIRE(model_test::greedy(*l.model, *cache, prompt, n, out).ok());
  return out;
}

const std::vector<int32_t> kSystem = {1, 3 + 's', 3 + 'y', 3 + 's', 270, 5, 9, 261, 3 + ' ', 3 + 'w', 100, 101, 102};
std::vector<int32_t> with_question(std::initializer_list<int32_t> q) {
  std::vector<int32_t> p = kSystem;
  p.insert(p.end(), q);
  return p;
}

}  // namespace

TEST_CASE("prompt cache: a restored prefix generates the cold run's tokens, across backends") {
  auto l = load();
  const std::string path = temp_path("instinfer-prompt-cache");
  std::filesystem::remove(path);
  const auto a = with_question({103, 2, 3 + '\n', 1, 44, 45, 46});
  const auto b = with_question({60, 61, 2, 3 + '\n', 1, 47});
  const uint32_t n = 16;
  const std::string uri = other_backend(*l->model);
  CAPTURE(uri);
  for (dtype d : {dtype::kF16, dtype::kQ8_0}) {
    CAPTURE(dtype_name(d));
    std::filesystem::remove(path);
    const auto cold_a = cold(*l, a, n, d), cold_b = cold(*l, b, n, d);
    uint32_t restored = 99;
    std::string note;
    std::vector<int32_t> out;
    {  // first run: no file yet, prefills everything and saves
      auto cache = make_cache(*l->model, "host", d);
      REQUIRE(model_test::cached_greedy(*l->model, *cache, path, l->fingerprint, a, n, out, restored, &note).ok());
      CHECK(restored == 0);
      CHECK(!note.empty());
      CHECK(out == cold_a);
    }
    struct stat st {};
    REQUIRE(::stat(path.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
    CHECK(!std::filesystem::exists(path + ".tmp." + std::to_string(::getpid())));
    {  // the same prompt, another backend: all but the last token restored
      auto cache = make_cache(*l->model, uri, d);
      out.clear();
      REQUIRE(model_test::cached_greedy(*l->model, *cache, path, l->fingerprint, a, n, out, restored).ok());
      CHECK(restored == a.size() - 1);
      CHECK(out == cold_a);
      auto toks = prompt_cache::read_tokens(path, l->fingerprint, d);
      REQUIRE(toks.ok());
      CHECK(*toks == a);  // a full hit does not rewrite the file
    }
    model_test::remove_backend_files(uri);
    {  // same system prompt, another question: the common prefix restored, the rest prefilled
      auto cache = make_cache(*l->model, uri, d);
      out.clear();
      REQUIRE(model_test::cached_greedy(*l->model, *cache, path, l->fingerprint, b, n, out, restored).ok());
      CHECK(restored == kSystem.size());
      CHECK(out == cold_b);
      auto toks = prompt_cache::read_tokens(path, l->fingerprint, d);
      REQUIRE(toks.ok());
      CHECK(*toks == b);  // the file now holds the newer prompt
    }
    model_test::remove_backend_files(uri);
    {  // a prompt that is a prefix of the cached one (and shorter by several tokens)
      const std::vector<int32_t> c(b.begin(), b.begin() + 5);
      auto cache = make_cache(*l->model, "host", d);
      out.clear();
      REQUIRE(model_test::cached_greedy(*l->model, *cache, path, l->fingerprint, c, n, out, restored).ok());
      CHECK(restored == c.size() - 1);
      CHECK(out == cold(*l, c, n, d));
    }
  }
  std::filesystem::remove(path);
}

TEST_CASE("prompt cache: damaged or foreign files fall back to a cold prefill") {
  auto l = load();
  const std::string path = temp_path("instinfer-prompt-cache-bad");
  const auto a = with_question({103, 2, 3 + '\n', 1, 44, 45, 46});
  const uint32_t n = 8;
  const auto cold_a = cold(*l, a, n);
  std::vector<int32_t> out;
  uint32_t restored = 0;
  std::filesystem::remove(path);
  {
    auto cache = make_cache(*l->model, "host", dtype::kF16);
    REQUIRE(model_test::cached_greedy(*l->model, *cache, path, l->fingerprint, a, n, out, restored).ok());
  }
  std::ifstream in(path, std::ios::binary);
  const std::vector<char> good((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  REQUIRE(good.size() > 4096);
  const std::string bad = path + ".bad";
  const auto write = [&](const std::vector<char>& bytes) {
    std::ofstream f(bad, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  };
  // Restore from `bad` into a fresh cache: a cold prefill unless `may_restore` (a flip in the
  // zero padding between the ids and the state is harmless), the cold run's tokens either way,
  // and no sequence left behind by a refused file.
  const auto check_falls_back = [&](const std::string& what, bool may_restore = false) {
    CAPTURE(what);
    auto cache = make_cache(*l->model, "host", dtype::kF16);
    auto r = prompt_cache::restore(*cache, bad, l->fingerprint, a);
    REQUIRE_MESSAGE(r.ok(), r.error().to_string());
    if (r->restored == 0) {
      CHECK(!r->note.empty());
      CHECK(cache->stats().backend.used_chunks == 0);
    } else {
      CHECK(may_restore);
      REQUIRE(cache->free_sequence(r->seq).ok());
    }
    std::filesystem::copy_file(bad, bad + ".run", std::filesystem::copy_options::overwrite_existing);
    out.clear();
    REQUIRE(model_test::cached_greedy(*l->model, *cache, bad + ".run", l->fingerprint, a, n, out, restored).ok());
    CHECK(out == cold_a);
  };

  write({});
  check_falls_back("empty file");
  for (size_t cut : {size_t{7}, size_t{47}, size_t{48}, size_t{100}, size_t{4096}, good.size() / 2, good.size() - 1}) {
    write(std::vector<char>(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(cut)));
    check_falls_back("truncated to " + std::to_string(cut));
  }
  {
    auto longer = good;
    longer.push_back('x');
    write(longer);
    check_falls_back("one byte appended");
  }
  {  // a (sparse) file far larger than its header accounts for is refused before it is read
    write(good);
    std::filesystem::resize_file(bad, good.size() + (256ull << 20));
    auto cache = make_cache(*l->model, "host", dtype::kF16);
    auto r = prompt_cache::restore(*cache, bad, l->fingerprint, a);
    REQUIRE(r.ok());
    CHECK(r->restored == 0);
    CHECK(r->note.find("more than its header accounts for") != std::string::npos);
  }
  std::mt19937_64 rng(7);
  const size_t ids_end = 48 + a.size() * 4;
  for (int trial = 0; trial < 24; ++trial) {
    // Flips in the header and ids, and anywhere in the file.
    const size_t at = trial < 12 ? rng() % ids_end : rng() % good.size();
    auto flipped = good;
    flipped[at] = static_cast<char>(flipped[at] ^ (1 << (rng() % 8)));
    write(flipped);
    const bool padding = at >= ids_end && at < 4096;
    check_falls_back("bit flip at byte " + std::to_string(at), padding);
  }
  {
    std::vector<char> garbage(good.size());
    for (auto& c : garbage) c = static_cast<char>(rng());
    write(garbage);
    check_falls_back("random bytes");
  }
  std::filesystem::copy_file(path, bad, std::filesystem::copy_options::overwrite_existing);
  {  // another model (same shape, other weights)
    auto other = load(99);
    CHECK(other->fingerprint != l->fingerprint);
    auto cache = make_cache(*other->model, "host", dtype::kF16);
    auto r = prompt_cache::restore(*cache, bad, other->fingerprint, a);
    REQUIRE(r.ok());
    CHECK(r->restored == 0);
    CHECK(r->note.find("another model") != std::string::npos);
  }
  {  // another KV dtype
    auto cache = make_cache(*l->model, "host", dtype::kQ8_0);
    auto r = prompt_cache::restore(*cache, bad, l->fingerprint, a);
    REQUIRE(r.ok());
    CHECK(r->restored == 0);
    CHECK(r->note.find("dtype f16") != std::string::npos);
  }
  {  // a prompt sharing no prefix, and a missing file
    auto cache = make_cache(*l->model, "host", dtype::kF16);
    auto r = prompt_cache::restore(*cache, bad, l->fingerprint, std::vector<int32_t>{50, 51, 52});
    REQUIRE(r.ok());
    CHECK(r->restored == 0);
    r = prompt_cache::restore(*cache, bad + ".missing", l->fingerprint, a);
    REQUIRE(r.ok());
    CHECK(r->restored == 0);
    CHECK(cache->stats().backend.used_chunks == 0);
  }
  {  // save refuses a sequence that does not hold exactly the prompt, and an unwritable path
    auto cache = make_cache(*l->model, "host", dtype::kF16);
    auto seq = cache->create_sequence();
    REQUIRE(seq.ok());
    std::vector<float> logits;
    REQUIRE(l->model->prefill(*cache, *seq, a, 0, logits).ok());
    CHECK(prompt_cache::save(*cache, *seq, bad, l->fingerprint, kSystem).code() == errc::kInvalidArgument);
    CHECK(prompt_cache::save(*cache, *seq, "/nonexistent-dir/x", l->fingerprint, a).code() == errc::kIoError);
    CHECK(prompt_cache::read_tokens(bad, l->fingerprint, dtype::kF16).value() == a);  // untouched
  }
  for (const std::string& p : {path, bad, bad + ".run"}) std::filesystem::remove(p);
}
