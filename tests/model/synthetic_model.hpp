// A seeded synthetic Llama model written as a GGUF image, for tests that must run without the
// real model file, plus a float64 reference forward pass over its weights.
//
// The writer and the reference decode the ggml block formats from their specification here,
// independently of examples/generate/quant_blocks.hpp.
#pragma once

#include <unistd.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "instinfer/core/dtype.hpp"

namespace synth {

// ---- a minimal GGUF writer ------------------------------------------------------------------
struct writer {
  std::vector<std::byte> out;
  template <class T>
  void put(T v) {
    const auto* p = reinterpret_cast<const std::byte*>(&v);
    out.insert(out.end(), p, p + sizeof v);
  }
  void str(const std::string& s) {
    put<uint64_t>(s.size());
    const auto* p = reinterpret_cast<const std::byte*>(s.data());
    out.insert(out.end(), p, p + s.size());
  }
};

enum : uint32_t { kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7, kString = 8, kArray = 9 };
enum : uint32_t { kTF32 = 0, kTF16 = 1, kTQ4_0 = 2, kTQ4_1 = 3, kTQ8_0 = 8, kTBF16 = 30 };

struct tensor {
  std::string name;
  std::vector<uint64_t> ne;
  uint32_t type;
  std::vector<std::byte> data;
  std::vector<double> values;  // the exact weights the data decodes to (row-major, ne[0] fastest)
};

inline double f16d(uint16_t bits) {
  return instinfer::f16_to_float(instinfer::f16_t{bits});
}

// Random weights of a type, with `values` holding what they decode to per the format spec.
inline tensor make_tensor(std::mt19937_64& rng, std::string name, std::vector<uint64_t> ne, uint32_t type,
                          double scale) {
  tensor t{std::move(name), ne, type, {}, {}};
  uint64_t n = 1;
  for (auto d : ne) n *= d;
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  auto push16 = [&](uint16_t v) {
    t.data.push_back(std::byte(v & 0xff));
    t.data.push_back(std::byte(v >> 8));
  };
  auto half = [&](double x) { return instinfer::float_to_f16(static_cast<float>(x)).bits; };
  if (type == kTF32) {
    for (uint64_t i = 0; i < n; ++i) {
      const float f = static_cast<float>(u(rng) * scale);
      const auto* p = reinterpret_cast<const std::byte*>(&f);
      t.data.insert(t.data.end(), p, p + 4);
      t.values.push_back(f);
    }
  } else if (type == kTF16 || type == kTBF16) {
    for (uint64_t i = 0; i < n; ++i) {
      const float f = static_cast<float>(u(rng) * scale);
      if (type == kTF16) {
        const uint16_t h = half(f);
        push16(h);
        t.values.push_back(f16d(h));
      } else {
        const uint16_t h = instinfer::float_to_bf16(f).bits;
        push16(h);
        t.values.push_back(instinfer::bf16_to_float(instinfer::bf16_t{h}));
      }
    }
  } else {
    for (uint64_t b = 0; b < n / 32; ++b) {
      const uint16_t d = half(scale * (0.5 + 0.5 * std::fabs(u(rng))) / (type == kTQ8_0 ? 127.0 : 8.0));
      const double dd = f16d(d);
      push16(d);
      if (type == kTQ8_0) {
        for (int j = 0; j < 32; ++j) {
          const auto q = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
          t.data.push_back(std::byte(static_cast<uint8_t>(q)));
          t.values.push_back(dd * q);
        }
      } else {
        double m = 0.0;
        if (type == kTQ4_1) {
          const uint16_t mh = half(-8.0 * dd * (0.75 + 0.5 * std::fabs(u(rng))));
          push16(mh);
          m = f16d(mh);
        }
        uint8_t qs[16];
        for (auto& q : qs) q = static_cast<uint8_t>(rng() & 0xff);
        for (auto q : qs) t.data.push_back(std::byte(q));
        double vals[32];
        for (int j = 0; j < 16; ++j) {
          const int lo = qs[j] & 0x0f, hi = qs[j] >> 4;
          vals[j] = type == kTQ4_1 ? dd * lo + m : dd * (lo - 8);
          vals[j + 16] = type == kTQ4_1 ? dd * hi + m : dd * (hi - 8);
        }
        t.values.insert(t.values.end(), vals, vals + 32);
      }
    }
  }
  return t;
}

// GPT-2's byte alphabet: byte -> UTF-8 of its printable stand-in.
inline std::string byte_char(int b) {
  auto keep = [](int x) { return (x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174; };
  int cp = b;
  if (!keep(b)) {
    int n = 0;
    for (int x = 0; x < b; ++x) n += keep(x) ? 0 : 1;
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80)
    s += static_cast<char>(cp);
  else {
    s += static_cast<char>(0xc0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3f));
  }
  return s;
}

struct config {
  uint32_t n_layers = 2;
  uint32_t n_embd = 128;
  uint32_t n_head = 2;  // head_dim 64
  uint32_t n_kv_head = 1;
  uint32_t n_ff = 192;
  float rope_theta = 10000.0f;
  float eps = 1e-5f;
  bool tied = false;
  uint64_t seed = 1234;
};

struct model {
  config cfg;
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
  std::vector<std::string> merges;
  std::vector<tensor> tensors;
  std::vector<std::byte> image;  // the GGUF file

  const tensor& t(const std::string& name) const {
    for (const auto& x : tensors)
      if (x.name == name) return x;
    throw std::runtime_error("no tensor " + name);
  }
  uint32_t vocab() const { return static_cast<uint32_t>(tokens.size()); }
};

// Build the vocabulary (specials, 256 bytes, merges), weights of mixed types, and the image.
inline model make_model(const config& cfg = {}) {
  model m;
  m.cfg = cfg;
  std::mt19937_64 rng(cfg.seed);
  m.tokens = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
  m.types = {3, 3, 3};
  for (int b = 0; b < 256; ++b) {
    m.tokens.push_back(byte_char(b));
    m.types.push_back(1);
  }
  // Merges chosen so that a wrong pre-tokenizer would merge across piece boundaries.
  const char* pairs[][2] = {{"h", "e"}, {"\xc4\xa0", "t"}, {"\xc4\xa0t", "he"},
                            {"i", "n"}, {"a", "1"},        {"t", "'"},
                            {"'", "s"}, {".", "\xc4\xa0"}, {"\xc4\xa0", "\xc4\xa0"},
                            {"e", "r"}, {"\xc4\xa0", "w"}, {"\xc4\xa0w", "in"},
                            {"1", "2"}, {"o", "r"},        {"w", "or"},
                            {"l", "d"}, {"wor", "ld"}};
  for (auto& p : pairs) {
    m.merges.push_back(std::string(p[0]) + " " + p[1]);
    m.tokens.push_back(std::string(p[0]) + p[1]);
    m.types.push_back(1);
  }
  const uint64_t V = m.tokens.size(), E = cfg.n_embd, hd = E / cfg.n_head;
  const uint64_t qd = cfg.n_head * hd, kvd = cfg.n_kv_head * hd;
  m.tensors.push_back(make_tensor(rng, "token_embd.weight", {E, V}, kTQ8_0, 1.0));
  m.tensors.push_back(make_tensor(rng, "output_norm.weight", {E}, kTF32, 1.0));
  for (auto& v : m.tensors.back().values) v = 1.0 + 0.25 * v;
  if (!cfg.tied) m.tensors.push_back(make_tensor(rng, "output.weight", {E, V}, kTQ4_1, 0.3));
  const uint32_t mats[] = {kTQ4_1, kTQ4_0, kTQ8_0, kTF16, kTBF16, kTF32};
  for (uint32_t l = 0; l < cfg.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    auto norm = [&](const std::string& n) {
      m.tensors.push_back(make_tensor(rng, p + n, {E}, kTF32, 1.0));
      // Rewrite as 1 ± 0.25 (exact in f32) so the norms are well conditioned.
      auto& t = m.tensors.back();
      for (size_t i = 0; i < t.values.size(); ++i) {
        const float f = static_cast<float>(1.0 + 0.25 * t.values[i]);
        std::memcpy(t.data.data() + 4 * i, &f, 4);
        t.values[i] = f;
      }
    };
    norm("attn_norm.weight");
    norm("ffn_norm.weight");
    const double s = 1.0 / std::sqrt(static_cast<double>(E));
    m.tensors.push_back(make_tensor(rng, p + "attn_q.weight", {E, qd}, mats[(l + 0) % 6], 3.0 * s));
    m.tensors.push_back(make_tensor(rng, p + "attn_k.weight", {E, kvd}, mats[(l + 1) % 6], 3.0 * s));
    m.tensors.push_back(make_tensor(rng, p + "attn_v.weight", {E, kvd}, mats[(l + 2) % 6], s));
    m.tensors.push_back(make_tensor(rng, p + "attn_output.weight", {qd, E}, mats[(l + 3) % 6], s));
    m.tensors.push_back(make_tensor(rng, p + "ffn_gate.weight", {E, cfg.n_ff}, mats[(l + 4) % 6], s));
    m.tensors.push_back(make_tensor(rng, p + "ffn_up.weight", {E, cfg.n_ff}, mats[(l + 5) % 6], s));
    m.tensors.push_back(make_tensor(rng, p + "ffn_down.weight", {cfg.n_ff, E}, mats[(l + 0) % 6],
                                    1.0 / std::sqrt(static_cast<double>(cfg.n_ff))));
  }
  // The output norm got the same rewrite treatment above only in values; keep data consistent.
  {
    auto& t = m.tensors[1];
    for (size_t i = 0; i < t.values.size(); ++i) {
      const float f = static_cast<float>(t.values[i]);
      std::memcpy(t.data.data() + 4 * i, &f, 4);
      t.values[i] = f;
    }
  }

  writer w;
  w.out.insert(w.out.end(), {std::byte('G'), std::byte('G'), std::byte('U'), std::byte('F')});
  w.put<uint32_t>(3);
  w.put<uint64_t>(m.tensors.size());
  const uint64_t n_kv = 17;
  w.put<uint64_t>(n_kv);
  auto kv_u32 = [&](const std::string& k, uint32_t v) {
    w.str(k);
    w.put<uint32_t>(kU32);
    w.put<uint32_t>(v);
  };
  auto kv_f32 = [&](const std::string& k, float v) {
    w.str(k);
    w.put<uint32_t>(kF32);
    w.put<float>(v);
  };
  auto kv_str = [&](const std::string& k, const std::string& v) {
    w.str(k);
    w.put<uint32_t>(kString);
    w.str(v);
  };
  kv_str("general.architecture", "llama");
  kv_u32("general.alignment", 32);
  kv_u32("llama.block_count", cfg.n_layers);
  kv_u32("llama.context_length", 2048);
  kv_u32("llama.embedding_length", cfg.n_embd);
  kv_u32("llama.feed_forward_length", cfg.n_ff);
  kv_u32("llama.attention.head_count", cfg.n_head);
  kv_u32("llama.attention.head_count_kv", cfg.n_kv_head);
  kv_f32("llama.rope.freq_base", cfg.rope_theta);
  kv_f32("llama.attention.layer_norm_rms_epsilon", cfg.eps);
  kv_str("tokenizer.ggml.model", "gpt2");
  kv_str("tokenizer.ggml.pre", "smollm");
  w.str("tokenizer.ggml.tokens");
  w.put<uint32_t>(kArray);
  w.put<uint32_t>(kString);
  w.put<uint64_t>(m.tokens.size());
  for (auto& s : m.tokens) w.str(s);
  w.str("tokenizer.ggml.token_type");
  w.put<uint32_t>(kArray);
  w.put<uint32_t>(kI32);
  w.put<uint64_t>(m.types.size());
  for (auto v : m.types) w.put<int32_t>(v);
  w.str("tokenizer.ggml.merges");
  w.put<uint32_t>(kArray);
  w.put<uint32_t>(kString);
  w.put<uint64_t>(m.merges.size());
  for (auto& s : m.merges) w.str(s);
  kv_u32("tokenizer.ggml.eos_token_id", 2);
  kv_str("tokenizer.chat_template",
         "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
         "'\n'}}{% endfor %}");
  uint64_t off = 0;
  for (auto& t : m.tensors) {
    w.str(t.name);
    w.put<uint32_t>(static_cast<uint32_t>(t.ne.size()));
    for (auto d : t.ne) w.put<uint64_t>(d);
    w.put<uint32_t>(t.type);
    w.put<uint64_t>(off);
    off += (t.data.size() + 31) / 32 * 32;
  }
  while (w.out.size() % 32) w.out.push_back(std::byte{0});
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    auto& t = m.tensors[i];
    w.out.insert(w.out.end(), t.data.begin(), t.data.end());
    if (i + 1 < m.tensors.size())
      while (w.out.size() % 32) w.out.push_back(std::byte{0});
  }
  m.image = std::move(w.out);
  return m;
}

inline std::string write_temp(const std::vector<std::byte>& image, const std::string& name) {
  const char* dir = std::getenv("TMPDIR");
  const std::string path = std::string(dir && *dir ? dir : "/tmp") + "/" + name + "." + std::to_string(::getpid());
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(image.data()), static_cast<std::streamsize>(image.size()));
  return path;
}

// ---- float64 reference forward pass -----------------------------------------------------------
struct reference {
  const model& m;
  uint32_t E, hd, H, KV;
  std::vector<std::vector<std::vector<double>>> k, v;  // [layer][pos][kv*hd]

  explicit reference(const model& mm)
      : m(mm),
        E(mm.cfg.n_embd),
        hd(mm.cfg.n_embd / mm.cfg.n_head),
        H(mm.cfg.n_head),
        KV(mm.cfg.n_kv_head),
        k(mm.cfg.n_layers),
        v(mm.cfg.n_layers) {}

  std::vector<double> matvec(const tensor& w, const std::vector<double>& x) const {
    const uint64_t cols = w.ne[0], rows = w.values.size() / cols;
    std::vector<double> y(rows, 0.0);
    for (uint64_t r = 0; r < rows; ++r)
      for (uint64_t c = 0; c < cols; ++c) y[r] += w.values[r * cols + c] * x[c];
    return y;
  }
  std::vector<double> norm(const std::vector<double>& x, const tensor& g) const {
    double ss = 0;
    for (double a : x) ss += a * a;
    const double s = 1.0 / std::sqrt(ss / static_cast<double>(x.size()) + m.cfg.eps);
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * s * g.values[i];
    return y;
  }
  void rope(std::vector<double>& x, uint32_t heads, uint32_t pos) const {
    for (uint32_t h = 0; h < heads; ++h)
      for (uint32_t i = 0; i < hd / 2; ++i) {
        const double ang = pos * std::pow(static_cast<double>(m.cfg.rope_theta), -2.0 * i / hd);
        double& a = x[h * hd + 2 * i];
        double& b = x[h * hd + 2 * i + 1];
        const double a0 = a, b0 = b;
        a = a0 * std::cos(ang) - b0 * std::sin(ang);
        b = a0 * std::sin(ang) + b0 * std::cos(ang);
      }
  }
  // Logits after feeding `token` at the next position.
  std::vector<double> step(int32_t token) {
    const tensor& emb = m.t("token_embd.weight");
    std::vector<double> x(emb.values.begin() + static_cast<std::ptrdiff_t>(token) * E,
                          emb.values.begin() + static_cast<std::ptrdiff_t>(token + 1) * E);
    for (uint32_t l = 0; l < m.cfg.n_layers; ++l) {
      const std::string p = "blk." + std::to_string(l) + ".";
      auto h = norm(x, m.t(p + "attn_norm.weight"));
      auto q = matvec(m.t(p + "attn_q.weight"), h);
      auto kk = matvec(m.t(p + "attn_k.weight"), h);
      auto vv = matvec(m.t(p + "attn_v.weight"), h);
      const uint32_t pos = static_cast<uint32_t>(k[l].size());
      rope(q, H, pos);
      rope(kk, KV, pos);
      k[l].push_back(kk);
      v[l].push_back(vv);
      std::vector<double> o(H * hd, 0.0);
      for (uint32_t qh = 0; qh < H; ++qh) {
        const uint32_t kh = qh / (H / KV);
        std::vector<double> s(k[l].size());
        double mx = -1e300;
        for (size_t t = 0; t < s.size(); ++t) {
          double d = 0;
          for (uint32_t i = 0; i < hd; ++i) d += q[qh * hd + i] * k[l][t][kh * hd + i];
          s[t] = d / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[t]);
        }
        double sum = 0;
        for (auto& e : s) sum += (e = std::exp(e - mx));
        for (size_t t = 0; t < s.size(); ++t)
          for (uint32_t i = 0; i < hd; ++i) o[qh * hd + i] += s[t] / sum * v[l][t][kh * hd + i];
      }
      auto ao = matvec(m.t(p + "attn_output.weight"), o);
      for (uint32_t i = 0; i < E; ++i) x[i] += ao[i];
      h = norm(x, m.t(p + "ffn_norm.weight"));
      auto g = matvec(m.t(p + "ffn_gate.weight"), h);
      auto u = matvec(m.t(p + "ffn_up.weight"), h);
      for (size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
      auto d = matvec(m.t(p + "ffn_down.weight"), g);
      for (uint32_t i = 0; i < E; ++i) x[i] += d[i];
    }
    auto h = norm(x, m.t("output_norm.weight"));
    return matvec(m.cfg.tied ? m.t("token_embd.weight") : m.t("output.weight"), h);
  }
};

}  // namespace synth
