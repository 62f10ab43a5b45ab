// q8_0 / q4_0 against golden vectors from an independent numpy implementation of ggml's block
// formats (scripts/golden/quant_golden.py): the library's quantizer (convert_elements, and the
// KV cache's append from f32 / f16 / bf16 rows) must produce the very same bytes, and its
// dequantization (load_as_float, which the reference and the kernels' tests read through) the
// very same floats. Argument: the vector file (the committed one, or one the script just wrote).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "instinfer/core/dtype.hpp"
#include "instinfer/kv/kv_cache.hpp"

using namespace instinfer;

namespace {

std::string g_path;

struct golden_case {
  std::string name;
  dtype src = dtype::kF32;
  dtype dst = dtype::kQ8_0;
  uint32_t n = 0;
  std::vector<std::byte> in, out, deq;
};

std::vector<std::byte> unhex(const std::string& s) {
  std::vector<std::byte> b(s.size() / 2);
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<std::byte>(std::stoul(s.substr(2 * i, 2), nullptr, 16));
  return b;
}

std::vector<golden_case> load(const std::string& path) {
  std::ifstream f(path);
  REQUIRE_MESSAGE(f.good(), "cannot open " << path);
  std::vector<golden_case> cases;
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ls(line);
    std::string tag;
    ls >> tag;
    if (tag == "case") {
      golden_case c;
      std::string src, dst;
      ls >> c.name >> src >> dst >> c.n;
      REQUIRE(parse_dtype(src).has_value());
      REQUIRE(parse_dtype(dst).has_value());
      c.src = *parse_dtype(src);
      c.dst = *parse_dtype(dst);
      cases.push_back(std::move(c));
      continue;
    }
    REQUIRE(!cases.empty());
    std::string hex;
    ls >> hex;
    if (tag == "in") cases.back().in = unhex(hex);
    if (tag == "out") cases.back().out = unhex(hex);
    if (tag == "deq") cases.back().deq = unhex(hex);
  }
  return cases;
}

// "block b: got .. want .." for the first differing block, or empty.
std::string first_difference(const std::vector<std::byte>& got, const std::vector<std::byte>& want, dtype t) {
  const uint32_t bb = dtype_block_bytes(t);
  for (size_t b = 0; b * bb < want.size(); ++b) {
    if (std::memcmp(got.data() + b * bb, want.data() + b * bb, bb) == 0) continue;
    std::string s = "block " + std::to_string(b) + ":";
    char buf[4];
    for (const char* what : {" got ", " want "}) {
      s += what;
      const auto& v = what[1] == 'g' ? got : want;
      for (uint32_t i = 0; i < bb; ++i) {
        std::snprintf(buf, sizeof buf, "%02x", static_cast<unsigned>(v[b * bb + i]));
        s += buf;
      }
    }
    return s;
  }
  return {};
}

}  // namespace

TEST_CASE("the vector file covers both dtypes from every source type") {
  const auto cases = load(g_path);
  CHECK(cases.size() >= 20);
  for (dtype dst : {dtype::kQ8_0, dtype::kQ4_0})
    for (dtype src : {dtype::kF32, dtype::kF16, dtype::kBF16}) {
      bool found = false;
      for (const auto& c : cases) found = found || (c.src == src && c.dst == dst);
      CHECK_MESSAGE(found, dtype_name(src) << " -> " << dtype_name(dst));
    }
}

TEST_CASE("quantizing matches the golden bytes bit for bit, and dequantizing the golden floats") {
  for (const auto& c : load(g_path)) {
    CAPTURE(c.name);
    CAPTURE(dtype_name(c.src));
    CAPTURE(dtype_name(c.dst));
    REQUIRE(c.in.size() == dtype_row_bytes(c.src, c.n));
    REQUIRE(c.out.size() == dtype_row_bytes(c.dst, c.n));
    std::vector<std::byte> got(c.out.size());
    CHECK(convert_elements(c.in.data(), c.src, got.data(), c.dst, c.n));
    CHECK_MESSAGE(got == c.out, first_difference(got, c.out, c.dst));
    if (!c.deq.empty()) {
      REQUIRE(c.deq.size() == size_t{c.n} * 4);
      uint32_t mismatches = 0;
      for (uint32_t i = 0; i < c.n; ++i) {
        const float x = load_as_float(c.out.data(), c.dst, i);
        if (std::memcmp(&x, c.deq.data() + size_t{i} * 4, 4) != 0) ++mismatches;
      }
      CHECK(mismatches == 0);
      // Back to f32 through convert_elements too (the conformance suite's path).
      std::vector<std::byte> f(size_t{c.n} * 4);
      CHECK(convert_elements(c.out.data(), c.dst, f.data(), dtype::kF32, c.n));
      CHECK(f == c.deq);
    }
  }
}

TEST_CASE("the KV cache stores the golden bytes when rows are appended in the source dtype") {
  for (const auto& c : load(g_path)) {
    CAPTURE(c.name);
    CAPTURE(dtype_name(c.src));
    CAPTURE(dtype_name(c.dst));
    cache_options o;
    o.shape = kv_shape{1, 1, 1, 64, c.dst};  // a row = 64 values = two blocks
    o.page_bytes = 4096;
    o.capacity_bytes = 64ull * 2 * 4096;
    o.n_threads = 1;
    auto cache = kv_cache::create(o);
    REQUIRE_MESSAGE(cache.ok(), cache.error().to_string());
    const seq_id s = (*cache)->create_sequence().value();
    const uint32_t tokens = c.n / 64;
    // V gets the same rows as K; both must come back as the golden blocks.
    const status st = (*cache)->append(s, 0, tokens, c.in.data(), c.in.data(), c.src);
    REQUIRE_MESSAGE(st.ok(), st.to_string());
    std::vector<std::byte> k, v;
    REQUIRE((*cache)->read_tokens(s, 0, k, v).ok());
    CHECK_MESSAGE(k == c.out, first_difference(k, c.out, c.dst));
    CHECK(v == c.out);
  }
}

int main(int argc, char** argv) {
  std::vector<char*> args{argv[0]};
  for (int i = 1; i < argc; ++i) {
    if (argv[i][0] != '-' && g_path.empty())
      g_path = argv[i];
    else
      args.push_back(argv[i]);
  }
  if (g_path.empty()) {
    std::fprintf(stderr, "usage: %s VECTORS.txt [doctest options]\n", argv[0]);
    return 2;
  }
  std::printf("golden vectors: %s\n", g_path.c_str());
  doctest::Context ctx(static_cast<int>(args.size()), args.data());
  return ctx.run();
}
