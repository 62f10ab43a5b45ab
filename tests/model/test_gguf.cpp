// GGUF reader: a valid synthetic file parses to what was written; truncated, bit-flipped and
// hostile files fail with a clear status (this binary runs under ASan+UBSan in CI).
#include <doctest/doctest.h>

#include <cstdio>
#include <random>

#include "gguf.hpp"
#include "llama_model.hpp"
#include "synthetic_model.hpp"
#include "tokenizer.hpp"

using namespace instinfer;
using namespace instinfer::model;

namespace {

std::span<const std::byte> view(const std::vector<std::byte>& v) {
  return {v.data(), v.size()};
}

// Offset just past the tensor infos (where the header ends), found by parsing the valid image.
uint64_t header_end(const synth::model& m) {
  auto f = gguf_file::parse(view(m.image));
  REQUIRE(f.ok());
  uint64_t first = UINT64_MAX;
  for (const auto& t : (*f)->tensors())
    first = std::min<uint64_t>(first, static_cast<uint64_t>(t.data - m.image.data()));
  return first;
}

template <class T>
void poke(std::vector<std::byte>& img, uint64_t at, T v) {
  std::memcpy(img.data() + at, &v, sizeof v);
}

// Byte offset of the first occurrence of `s` in the image.
uint64_t find_bytes(const std::vector<std::byte>& img, const std::string& s) {
  auto it = std::search(img.begin(), img.end(), reinterpret_cast<const std::byte*>(s.data()),
                        reinterpret_cast<const std::byte*>(s.data()) + s.size());
  REQUIRE(it != img.end());
  return static_cast<uint64_t>(it - img.begin());
}

// Everything the generator does with a file: parse, tokenizer, model. Must never crash.
bool load_all(std::span<const std::byte> bytes, std::string* why = nullptr) {
  auto f = gguf_file::parse(bytes);
  if (!f.ok()) {
    if (why) *why = f.error().to_string();
    CHECK(!f.error().message().empty());
    return false;
  }
  auto t = tokenizer::from_gguf(**f);
  if (t.ok()) {
    auto ids = (*t)->encode("the world's 12 <|im_start|>x");
    CHECK((*t)->decode(ids).size() <= 64);
  }
  model_options mo;
  mo.n_threads = 1;
  mo.max_batch = 2;
  auto m = llama_model::load(**f, mo);
  if (!m.ok() && why) *why = m.error().to_string();
  return t.ok() && m.ok();
}

}  // namespace

TEST_CASE("gguf: the synthetic model parses to what was written") {
  const synth::model m = synth::make_model();
  auto f = gguf_file::parse(view(m.image));
  REQUIRE_MESSAGE(f.ok(), f.error().to_string());
  const gguf_file& g = **f;
  CHECK(g.version() == 3);
  CHECK(g.alignment() == 32);
  CHECK(g.get_string("general.architecture").value() == "llama");
  CHECK(g.get_u64("llama.block_count").value() == m.cfg.n_layers);
  CHECK(g.get_f64("llama.rope.freq_base").value() == doctest::Approx(m.cfg.rope_theta));
  CHECK(g.get_string_array("tokenizer.ggml.tokens").value().size() == m.tokens.size());
  CHECK(g.get_int_array("tokenizer.ggml.token_type").value() == std::vector<int64_t>(m.types.begin(), m.types.end()));
  REQUIRE(g.tensors().size() == m.tensors.size());
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    const auto& t = g.tensors()[i];
    CHECK(t.name == m.tensors[i].name);
    CHECK(static_cast<uint32_t>(t.type) == m.tensors[i].type);
    CHECK(t.n_bytes == m.tensors[i].data.size());
    CHECK(std::memcmp(t.data, m.tensors[i].data.data(), t.n_bytes) == 0);
    CHECK(static_cast<uint64_t>(t.data - m.image.data()) % 32 == 0);
  }
  // Typed getters name the key on a mismatch.
  auto wrong = g.get_string("llama.block_count");
  REQUIRE(!wrong.ok());
  CHECK(wrong.error().message().find("llama.block_count") != std::string::npos);
  auto missing = g.get_u64("llama.nope");
  REQUIRE(!missing.ok());
  CHECK(missing.error().message().find("missing") != std::string::npos);
  std::string why;
  CHECK_MESSAGE(load_all(view(m.image), &why), why);
}

TEST_CASE("gguf: open() on a file, a missing path, a directory and a tiny file") {
  const synth::model m = synth::make_model();
  const std::string path = synth::write_temp(m.image, "instinfer-gguf-open.gguf");
  auto f = gguf_file::open(path);
  REQUIRE_MESSAGE(f.ok(), f.error().to_string());
  CHECK((*f)->file_size() == m.image.size());
  std::remove(path.c_str());

  auto missing = gguf_file::open("/nonexistent/model.gguf");
  REQUIRE(!missing.ok());
  CHECK(missing.error().code() == errc::kIoError);
  CHECK(missing.error().message().find("/nonexistent/model.gguf") != std::string::npos);
  auto dir = gguf_file::open("/");
  REQUIRE(!dir.ok());
  CHECK(dir.error().code() == errc::kInvalidArgument);
  const std::string tiny = synth::write_temp({std::byte('G'), std::byte('G')}, "instinfer-gguf-tiny.gguf");
  auto t = gguf_file::open(tiny);
  REQUIRE(!t.ok());
  CHECK(t.error().code() == errc::kCorruptData);
  std::remove(tiny.c_str());
}

TEST_CASE("gguf: every truncation fails cleanly") {
  const synth::model m = synth::make_model();
  const uint64_t hdr = header_end(m);
  // Every length inside the header, then a stride through the tensor data (each cut loses data).
  std::vector<uint64_t> lengths;
  for (uint64_t n = 0; n < hdr; ++n) lengths.push_back(n);
  for (uint64_t n = hdr; n < m.image.size(); n += 997) lengths.push_back(n);
  lengths.push_back(m.image.size() - 1);
  for (uint64_t n : lengths) {
    // A fresh heap copy of exactly n bytes, so ASan sees any read past the end.
    std::vector<std::byte> cut(m.image.begin(), m.image.begin() + static_cast<std::ptrdiff_t>(n));
    auto f = gguf_file::parse(view(cut));
    if (f.ok()) FAIL("truncation to " << n << " of " << m.image.size() << " bytes was accepted");
    CHECK(f.error().code() == errc::kCorruptData);
  }
}

TEST_CASE("gguf: bit flips in the header fail cleanly or load consistently") {
  const synth::model m = synth::make_model();
  const uint64_t hdr = header_end(m);
  std::mt19937_64 rng(77);
  int rejected = 0, accepted = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<std::byte> img = m.image;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int k = 0; k < flips; ++k) {
      const uint64_t at = rng() % hdr;
      img[at] ^= std::byte(1u << (rng() % 8));
    }
    if (load_all(view(img)))
      ++accepted;
    else
      ++rejected;
  }
  MESSAGE("bit-flip trials: " << rejected << " rejected, " << accepted << " still valid (flips in text)");
  CHECK(rejected > 1000);  // most header bytes are structure: flips there must be caught
}

TEST_CASE("gguf: hostile headers get specific errors") {
  const synth::model m = synth::make_model();
  auto expect = [&](std::vector<std::byte> img, errc code, const char* words) {
    auto f = gguf_file::parse(view(img));
    std::string msg;
    if (f.ok()) {
      auto mm = llama_model::load(**f);
      REQUIRE_MESSAGE(!mm.ok(), "accepted a file that should fail with: " << words);
      msg = mm.error().message();
      CHECK(mm.error().code() == code);
    } else {
      msg = f.error().message();
      CHECK(f.error().code() == code);
    }
    CHECK_MESSAGE(msg.find(words) != std::string::npos, msg);
  };
  SUBCASE("bad magic") {
    auto img = m.image;
    img[0] = std::byte('X');
    expect(img, errc::kCorruptData, "magic");
  }
  SUBCASE("unsupported version") {
    auto img = m.image;
    poke<uint32_t>(img, 4, 7);
    expect(img, errc::kUnsupported, "version 7");
  }
  SUBCASE("absurd counts") {
    auto img = m.image;
    poke<uint64_t>(img, 16, 1ull << 60);
    expect(img, errc::kCorruptData, "metadata count");
    img = m.image;
    poke<uint64_t>(img, 8, 1ull << 62);
    expect(img, errc::kCorruptData, "tensor count");
  }
  SUBCASE("absurd string length") {
    auto img = m.image;
    const uint64_t at = find_bytes(img, "general.architecture") - 8;
    poke<uint64_t>(img, at, 1ull << 40);
    expect(img, errc::kCorruptData, "claims");
  }
  SUBCASE("string array with an absurd element count") {
    auto img = m.image;
    const uint64_t at = find_bytes(img, "tokenizer.ggml.tokens") + std::string("tokenizer.ggml.tokens").size() + 8;
    poke<uint64_t>(img, at, 1ull << 58);
    expect(img, errc::kCorruptData, "more than the file holds");
  }
  SUBCASE("nested array") {
    auto img = m.image;
    const uint64_t at =
        find_bytes(img, "tokenizer.ggml.token_type") + std::string("tokenizer.ggml.token_type").size() + 4;
    poke<uint32_t>(img, at, 9);
    expect(img, errc::kCorruptData, "nested");
  }
  SUBCASE("unknown metadata type") {
    auto img = m.image;
    const uint64_t at = find_bytes(img, "llama.block_count") + std::string("llama.block_count").size();
    poke<uint32_t>(img, at, 99);
    expect(img, errc::kCorruptData, "unknown metadata type 99");
  }
  SUBCASE("unsupported tensor type is named") {
    auto img = m.image;
    const std::string name = "blk.0.attn_q.weight";
    const uint64_t at = find_bytes(img, name) + name.size() + 4 + 2 * 8;
    poke<uint32_t>(img, at, 14);  // q6_K
    expect(img, errc::kUnsupported, "q6_K");
  }
  SUBCASE("tensor outside the file") {
    auto img = m.image;
    const std::string name = "blk.1.ffn_down.weight";
    const uint64_t at = find_bytes(img, name) + name.size() + 4 + 2 * 8 + 4;
    poke<uint64_t>(img, at, 1ull << 40);
    expect(img, errc::kCorruptData, "outside the file");
  }
  SUBCASE("misaligned tensor offset") {
    auto img = m.image;
    const std::string name = "blk.1.ffn_down.weight";
    const uint64_t at = find_bytes(img, name) + name.size() + 4 + 2 * 8 + 4;
    uint64_t off = 0;
    std::memcpy(&off, img.data() + at, 8);
    poke<uint64_t>(img, at, off + 4);
    expect(img, errc::kCorruptData, "not aligned");
  }
  SUBCASE("absurd dimension") {
    auto img = m.image;
    const std::string name = "token_embd.weight";
    const uint64_t at = find_bytes(img, name) + name.size() + 4 + 8;
    poke<uint64_t>(img, at, 1ull << 45);
    expect(img, errc::kCorruptData, "absurd dimension");
  }
  SUBCASE("rank 0") {
    auto img = m.image;
    const std::string name = "token_embd.weight";
    poke<uint32_t>(img, find_bytes(img, name) + name.size(), 0);
    expect(img, errc::kCorruptData, "rank 0");
  }
  SUBCASE("bad alignment value") {
    auto img = m.image;
    const uint64_t at = find_bytes(img, "general.alignment") + std::string("general.alignment").size() + 4;
    poke<uint32_t>(img, at, 24);
    expect(img, errc::kCorruptData, "power of two");
  }
  SUBCASE("model-level checks: wrong shape and wrong architecture") {
    auto img = m.image;
    const uint64_t at = find_bytes(img, "llama.embedding_length") + std::string("llama.embedding_length").size() + 4;
    poke<uint32_t>(img, at, 256);
    expect(img, errc::kCorruptData, "has shape");
    img = m.image;
    const uint64_t v = find_bytes(img, "general.architecture") + std::string("general.architecture").size() + 4 + 8;
    img[v] = std::byte('x');
    expect(img, errc::kUnsupported, "architecture 'xlama'");
  }
}
