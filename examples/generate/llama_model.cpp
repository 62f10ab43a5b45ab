#include "llama_model.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace instinfer::model {

namespace {

status bad(const std::string& what) {
  return {errc::kCorruptData, "model: " + what};
}

result<weight> get_weight(const gguf_file& f, const std::string& name, uint64_t n_cols, uint64_t n_rows) {
  const gguf_tensor* t = f.tensor(name);
  if (!t) return bad("tensor '" + name + "' is missing");
  if (t->ne[0] != n_cols || t->n_rows() != n_rows || t->ne[2] != 1 || t->ne[3] != 1)
    return bad("tensor '" + name + "' has shape [" + std::to_string(t->ne[0]) + ", " + std::to_string(t->ne[1]) + ", " +
               std::to_string(t->ne[2]) + ", " + std::to_string(t->ne[3]) + "], expected [" + std::to_string(n_cols) +
               ", " + std::to_string(n_rows) + "]");
  return weight{t->data, t->type, static_cast<uint32_t>(n_cols), static_cast<uint32_t>(n_rows), t->row_bytes()};
}

result<std::vector<float>> get_vector(const gguf_file& f, const std::string& name, uint64_t n) {
  auto w = get_weight(f, name, n, 1);
  if (!w.ok()) return w.error();
  std::vector<float> out(n);
  dequantize_row(w->type, w->data, out.data(), n);
  return out;
}

void rmsnorm(const float* x, const float* g, float* out, uint32_t n, float eps) noexcept {
  double ss = 0.0;
  for (uint32_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float s = static_cast<float>(1.0 / std::sqrt(ss / n + eps));
  for (uint32_t i = 0; i < n; ++i) out[i] = x[i] * s * g[i];
}

}  // namespace

result<std::unique_ptr<llama_model>> llama_model::load(const gguf_file& f, const model_options& options) {
  auto arch = f.get_string("general.architecture");
  if (!arch.ok()) return arch.error();
  if (*arch != "llama")
    return status{errc::kUnsupported, "model: architecture '" + std::string(*arch) + "' is not supported (llama)"};
  if (options.max_batch == 0 || options.max_batch > 4096)
    return status{errc::kInvalidArgument, "model: max_batch must be in [1, 4096]"};
  std::unique_ptr<llama_model> m(new llama_model(options));
  llama_hparams& hp = m->hp_;
  const std::string a(*arch);
  auto u32 = [&](const std::string& key, uint32_t& out, uint64_t lo, uint64_t hi) -> status {
    auto v = f.get_u64(a + "." + key);
    if (!v.ok()) return v.error();
    if (*v < lo || *v > hi)
      return bad(a + "." + key + " = " + std::to_string(*v) + " is out of range [" + std::to_string(lo) + ", " +
                 std::to_string(hi) + "]");
    out = static_cast<uint32_t>(*v);
    return {};
  };
  INSTINFER_TRY(u32("block_count", hp.n_layers, 1, 1024));
  INSTINFER_TRY(u32("embedding_length", hp.n_embd, 1, 65536));
  INSTINFER_TRY(u32("feed_forward_length", hp.n_ff, 1, 1u << 18));
  INSTINFER_TRY(u32("attention.head_count", hp.n_head, 1, 1024));
  if (f.find(a + ".attention.head_count_kv"))
    INSTINFER_TRY(u32("attention.head_count_kv", hp.n_kv_head, 1, 1024));
  else
    hp.n_kv_head = hp.n_head;
  if (f.find(a + ".context_length"))
    INSTINFER_TRY(u32("context_length", hp.n_ctx_train, 1, 1u << 24));
  else
    hp.n_ctx_train = 4096;
  if (hp.n_embd % hp.n_head) return bad("embedding_length is not a multiple of head_count");
  if (hp.n_head % hp.n_kv_head) return bad("head_count is not a multiple of head_count_kv");
  hp.head_dim = hp.n_embd / hp.n_head;
  if (hp.head_dim > 1024) return status{errc::kUnsupported, "model: head size above 1024 is not supported"};
  if (f.find(a + ".attention.key_length")) {
    uint32_t kl = 0;
    INSTINFER_TRY(u32("attention.key_length", kl, 1, 1024));
    if (kl != hp.head_dim)
      return status{errc::kUnsupported, "model: key_length != embedding_length / head_count is not supported"};
  }
  hp.rope_dim = hp.head_dim;
  if (f.find(a + ".rope.dimension_count")) INSTINFER_TRY(u32("rope.dimension_count", hp.rope_dim, 2, hp.head_dim));
  if (hp.rope_dim % 2) return bad("rope.dimension_count must be even");
  if (auto v = f.get_f64(a + ".rope.freq_base"); v.ok()) hp.rope_theta = static_cast<float>(*v);
  if (!(hp.rope_theta > 1.0f) || !std::isfinite(hp.rope_theta))
    return bad("rope.freq_base must be a finite number > 1");
  if (auto v = f.get_f64(a + ".attention.layer_norm_rms_epsilon"); v.ok()) hp.rms_eps = static_cast<float>(*v);
  if (!(hp.rms_eps > 0.0f) || hp.rms_eps > 1.0f) return bad("layer_norm_rms_epsilon must be in (0, 1]");
  if (auto st = f.get_string(a + ".rope.scaling.type"); st.ok() && *st != "none") {
    if (*st != "linear")
      return status{errc::kUnsupported,
                    "model: rope scaling '" + std::string(*st) + "' is not supported (none, linear)"};
    auto fac = f.get_f64(a + ".rope.scaling.factor");
    if (!fac.ok() || !(*fac >= 1.0) || *fac > 1024.0) return bad("rope.scaling.factor must be in [1, 1024]");
    hp.rope_scale = static_cast<float>(*fac);
  }

  const gguf_tensor* emb = f.tensor("token_embd.weight");
  if (!emb) return bad("tensor 'token_embd.weight' is missing");
  if (emb->ne[1] == 0 || emb->ne[1] > (1u << 24)) return bad("token_embd.weight has an absurd vocabulary size");
  hp.n_vocab = static_cast<uint32_t>(emb->ne[1]);
  auto te = get_weight(f, "token_embd.weight", hp.n_embd, hp.n_vocab);
  if (!te.ok()) return te.error();
  m->tok_embd_ = *te;
  if (f.tensor("output.weight")) {
    auto o = get_weight(f, "output.weight", hp.n_embd, hp.n_vocab);
    if (!o.ok()) return o.error();
    m->output_ = *o;
  } else {
    m->output_ = m->tok_embd_;
    hp.tied_output = true;
  }
  auto on = get_vector(f, "output_norm.weight", hp.n_embd);
  if (!on.ok()) return on.error();
  m->output_norm_ = std::move(*on);

  const uint32_t q_dim = hp.n_head * hp.head_dim, kv_dim = hp.n_kv_head * hp.head_dim;
  m->layers_.resize(hp.n_layers);
  for (uint32_t l = 0; l < hp.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    layer& L = m->layers_[l];
    auto an = get_vector(f, p + "attn_norm.weight", hp.n_embd);
    if (!an.ok()) return an.error();
    L.attn_norm = std::move(*an);
    auto fn = get_vector(f, p + "ffn_norm.weight", hp.n_embd);
    if (!fn.ok()) return fn.error();
    L.ffn_norm = std::move(*fn);
    struct {
      weight* w;
      const char* name;
      uint32_t cols, rows;
    } specs[] = {{&L.wq, "attn_q.weight", hp.n_embd, q_dim},         {&L.wk, "attn_k.weight", hp.n_embd, kv_dim},
                 {&L.wv, "attn_v.weight", hp.n_embd, kv_dim},        {&L.wo, "attn_output.weight", q_dim, hp.n_embd},
                 {&L.w_gate, "ffn_gate.weight", hp.n_embd, hp.n_ff}, {&L.w_up, "ffn_up.weight", hp.n_embd, hp.n_ff},
                 {&L.w_down, "ffn_down.weight", hp.n_ff, hp.n_embd}};
    for (auto& s : specs) {
      auto w = get_weight(f, p + s.name, s.cols, s.rows);
      if (!w.ok()) return w.error();
      *s.w = *w;
    }
  }
  for (const auto& t : f.tensors()) m->weight_bytes_ += t.n_bytes;
  for (const weight* w : {&m->tok_embd_, &m->output_})
    if (!matmul_kernel(w->type, m->isa_)) return status{errc::kUnsupported, "model: no kernel for the requested ISA"};
  if (!quantize_act_kernel(m->isa_)) m->q8_ = false;

  m->inv_freq_.resize(hp.rope_dim / 2);
  for (uint32_t i = 0; i < hp.rope_dim / 2; ++i)
    m->inv_freq_[i] = static_cast<float>(std::pow(static_cast<double>(hp.rope_theta), -2.0 * i / hp.rope_dim));

  const size_t B = m->max_batch_;
  m->x_.assign(B * hp.n_embd, 0.0f);
  m->xn_.assign(B * std::max(hp.n_embd, q_dim), 0.0f);
  m->q_.assign(B * q_dim, 0.0f);
  m->k_.assign(B * kv_dim, 0.0f);
  m->v_.assign(B * kv_dim, 0.0f);
  m->att_.assign(B * q_dim, 0.0f);
  m->gate_.assign(B * hp.n_ff, 0.0f);
  m->up_.assign(B * hp.n_ff, 0.0f);
  m->normed_out_.assign(B * hp.n_embd, 0.0f);
  m->group_seqs_.reserve(B);
  m->rope_cs_.assign(B * (hp.rope_dim / 2), 0.0f);
  m->rope_sn_.assign(B * (hp.rope_dim / 2), 0.0f);
  m->xq_.resize(B * std::max({hp.n_embd, q_dim, hp.n_ff}) / 32);
  return m;
}

uint64_t llama_model::workspace_bytes() const noexcept {
  return 4ull * (x_.size() + xn_.size() + q_.size() + k_.size() + v_.size() + att_.size() + gate_.size() + up_.size() +
                 normed_out_.size() + output_norm_.size() + 2ull * layers_.size() * hp_.n_embd);
}

cache_options llama_model::kv_options(const std::string& backend_uri, dtype kv_dtype, bool sparf) const {
  cache_options o;
  o.shape.n_layers = hp_.n_layers;
  o.shape.n_q_heads = hp_.n_head;
  o.shape.n_kv_heads = hp_.n_kv_head;
  o.shape.head_dim = hp_.head_dim;
  o.shape.kv_dtype = kv_dtype;
  o.n_threads = pool_.size();
  o.scale = 1.0f / std::sqrt(static_cast<float>(hp_.head_dim));
  o.backend_uri = backend_uri;
  o.sparf = sparf;
  return o;
}

void llama_model::matmul(std::initializer_list<matmul_job> jobs) {
  // Split every job's rows into blocks of ~kRows and hand the blocks out dynamically.
  constexpr uint32_t kMaxTasks = 256;
  struct task {
    const matmul_job* job;
    matmul_fn fn;
    matmul_q8_fn fn_q8;
    uint32_t r0, r1;
  };
  task tasks[kMaxTasks + 8];
  uint64_t total = 0;
  for (const matmul_job& j : jobs) total += j.w->n_rows;
  const uint32_t per = static_cast<uint32_t>(std::max<uint64_t>(32, (total + kMaxTasks - 1) / kMaxTasks));
  // The jobs of one call share their input (Wq/Wk/Wv, gate/up): quantize it once, here, for all.
  const float* quantized = nullptr;
  uint32_t q_cols = 0;
  uint32_t n = 0;
  for (const matmul_job& j : jobs) {
    matmul_q8_fn fn_q8 = q8_ ? matmul_q8_kernel(j.w->type, isa_) : nullptr;
    if (fn_q8 && quantized != j.x) {
      if (quantized) {
        fn_q8 = nullptr;  // a second input in one call: not needed by this model, take the f32 path
      } else {
        const quantize_act_fn quant = quantize_act_kernel(isa_);
        for (uint32_t v = 0; v < j.n_vec; ++v)
          quant(j.x + size_t{v} * j.w->n_cols, j.w->n_cols, &xq_[size_t{v} * (j.w->n_cols / 32)]);
        quantized = j.x;
        q_cols = j.w->n_cols;
      }
    }
    if (fn_q8 && q_cols != j.w->n_cols) fn_q8 = nullptr;
    const matmul_fn fn = fn_q8 ? nullptr : matmul_kernel(j.w->type, isa_);
    for (uint32_t r = 0; r < j.w->n_rows; r += per) tasks[n++] = {&j, fn, fn_q8, r, std::min(j.w->n_rows, r + per)};
  }
  pool_.run(n, [&](uint32_t i) {
    const task& t = tasks[i];
    const matmul_job& j = *t.job;
    if (t.fn_q8)
      t.fn_q8(j.w->data, j.w->row_bytes, j.w->n_cols, t.r0, t.r1, xq_.data(), j.w->n_cols / 32, j.n_vec, j.y,
              j.w->n_rows);
    else
      t.fn(j.w->data, j.w->row_bytes, j.w->n_cols, t.r0, t.r1, j.x, j.w->n_cols, j.n_vec, j.y, j.w->n_rows);
  });
}

void llama_model::rope(float* x, uint32_t n_heads, const float* cs, const float* sn) const noexcept {
  const uint32_t half = hp_.rope_dim / 2;
  for (uint32_t h = 0; h < n_heads; ++h) {
    float* v = x + static_cast<size_t>(h) * hp_.head_dim;
    for (uint32_t i = 0; i < half; ++i) {
      const float a = v[2 * i], b = v[2 * i + 1];
      v[2 * i] = a * cs[i] - b * sn[i];
      v[2 * i + 1] = a * sn[i] + b * cs[i];
    }
  }
}

status llama_model::forward(kv_cache& cache, std::span<const forward_item> items, std::vector<float>& logits) {
  return run(cache, items, logits, true);
}

status llama_model::run(kv_cache& cache, std::span<const forward_item> items, std::vector<float>& logits,
                        bool allow_sparse) {
  const bool sparse = allow_sparse && sparse_.has_value();
  const uint32_t T = static_cast<uint32_t>(items.size());
  if (T == 0) return {};
  if (T > max_batch_)
    return {errc::kInvalidArgument,
            "forward: " + std::to_string(T) + " items exceed max_batch " + std::to_string(max_batch_)};
  const llama_hparams& hp = hp_;
  const uint32_t E = hp.n_embd, q_dim = hp.n_head * hp.head_dim, kv_dim = hp.n_kv_head * hp.head_dim;
  uint32_t n_out = 0;
  for (const auto& it : items) {
    if (it.token < 0 || static_cast<uint32_t>(it.token) >= hp.n_vocab)
      return {errc::kInvalidArgument, "forward: token id " + std::to_string(it.token) + " is outside the vocabulary"};
    auto len = cache.length(it.seq, 0);
    if (!len.ok()) return len.error();
    n_out += it.want_logits ? 1 : 0;
  }
  // Positions must continue each sequence: check the first item of each sequence against the cache
  // and the rest against the items before them.
  for (uint32_t i = 0; i < T; ++i) {
    uint32_t expect = cache.length(items[i].seq, 0).value();
    for (uint32_t j = 0; j < i; ++j)
      if (items[j].seq == items[i].seq) expect = items[j].pos + 1;
    if (items[i].pos != expect)
      return {errc::kInvalidArgument, "forward: item " + std::to_string(i) + " has position " +
                                          std::to_string(items[i].pos) + ", the sequence continues at " +
                                          std::to_string(expect)};
  }

  // Prefill chunks: when each sequence's items form one contiguous run and some run has several
  // tokens, every layer appends each run's K/V at once and answers all rows with one causal
  // attend_chunk call (row i sees positions <= its own; each K/V page is read once per chunk).
  // Decode batches, SparF and observed runs keep one attend call per group of distinct sequences.
  std::vector<seq_id> chunk_seqs;
  std::vector<uint32_t> chunk_pos, chunk_rows, chunk_first;
  bool chunked = !sparse && !observer_ && cache.supports_attend_chunk();
  for (uint32_t i = 0; chunked && i < T;) {
    uint32_t j = i;
    while (j < T && items[j].seq == items[i].seq) ++j;
    if (std::find(chunk_seqs.begin(), chunk_seqs.end(), items[i].seq) != chunk_seqs.end()) chunked = false;
    chunk_seqs.push_back(items[i].seq);
    chunk_pos.push_back(items[i].pos);
    chunk_rows.push_back(j - i);
    chunk_first.push_back(i);
    i = j;
  }
  chunked = chunked && chunk_seqs.size() < T;  // some sequence has more than one token

  for (uint32_t t = 0; t < T; ++t)
    dequantize_row(tok_embd_.type, tok_embd_.data + static_cast<uint64_t>(items[t].token) * tok_embd_.row_bytes,
                   &x_[size_t{t} * E], E);

  // RoPE angles depend on the position only: one table per token serves every layer, q and k.
  const uint32_t half = hp.rope_dim / 2;
  for (uint32_t t = 0; t < T; ++t) {
    const double p = static_cast<double>(items[t].pos) / hp.rope_scale;
    for (uint32_t i = 0; i < half; ++i) {
      const double ang = p * inv_freq_[i];
      rope_cs_[size_t{t} * half + i] = static_cast<float>(std::cos(ang));
      rope_sn_[size_t{t} * half + i] = static_cast<float>(std::sin(ang));
    }
  }

  for (uint32_t l = 0; l < hp.n_layers; ++l) {
    const layer& L = layers_[l];
    for (uint32_t t = 0; t < T; ++t)
      rmsnorm(&x_[size_t{t} * E], L.attn_norm.data(), &xn_[size_t{t} * E], E, hp.rms_eps);
    matmul({{&L.wq, xn_.data(), q_.data(), T}, {&L.wk, xn_.data(), k_.data(), T}, {&L.wv, xn_.data(), v_.data(), T}});
    for (uint32_t t = 0; t < T; ++t) {
      rope(&q_[size_t{t} * q_dim], hp.n_head, &rope_cs_[size_t{t} * half], &rope_sn_[size_t{t} * half]);
      rope(&k_[size_t{t} * kv_dim], hp.n_kv_head, &rope_cs_[size_t{t} * half], &rope_sn_[size_t{t} * half]);
    }
    // Attention in groups of consecutive items with distinct sequences: append their K/V, then
    // one attend call for the group (a decode batch is one group; a prefill chunk is T groups).
    if (chunked) {
      for (size_t r = 0; r < chunk_seqs.size(); ++r) {
        const size_t t = chunk_first[r];
        INSTINFER_TRY(cache.append_at(chunk_seqs[r], l, chunk_pos[r], chunk_rows[r], &k_[t * kv_dim], &v_[t * kv_dim],
                                      dtype::kF32));
      }
      INSTINFER_TRY(cache.attend_chunk(l, chunk_seqs, chunk_pos, chunk_rows, q_.data(), att_.data(), nullptr));
    }
    for (uint32_t g0 = chunked ? T : 0; g0 < T;) {
      uint32_t g1 = g0;
      group_seqs_.clear();
      while (g1 < T && std::find(group_seqs_.begin(), group_seqs_.end(), items[g1].seq) == group_seqs_.end())
        group_seqs_.push_back(items[g1++].seq);
      for (uint32_t t = g0; t < g1; ++t)
        INSTINFER_TRY(cache.append(items[t].seq, l, 1, &k_[size_t{t} * kv_dim], &v_[size_t{t} * kv_dim], dtype::kF32));
      const float* q = &q_[size_t{g0} * q_dim];
      if (observer_) observer_(attention_call{l, group_seqs_, q, sparse});
      if (sparse)
        INSTINFER_TRY(cache.attend_sparse(l, group_seqs_, q, &att_[size_t{g0} * q_dim], nullptr, *sparse_));
      else
        INSTINFER_TRY(cache.attend(l, group_seqs_, q, &att_[size_t{g0} * q_dim], nullptr));
      g0 = g1;
    }
    if (l + 1 < hp.n_layers) {
      group_seqs_.clear();
      for (const auto& it : items)
        if (std::find(group_seqs_.begin(), group_seqs_.end(), it.seq) == group_seqs_.end())
          group_seqs_.push_back(it.seq);
      cache.prefetch(l + 1, group_seqs_);
    }
    matmul({{&L.wo, att_.data(), xn_.data(), T}});
    for (size_t i = 0; i < size_t{T} * E; ++i) x_[i] += xn_[i];
    for (uint32_t t = 0; t < T; ++t) rmsnorm(&x_[size_t{t} * E], L.ffn_norm.data(), &xn_[size_t{t} * E], E, hp.rms_eps);
    matmul({{&L.w_gate, xn_.data(), gate_.data(), T}, {&L.w_up, xn_.data(), up_.data(), T}});
    for (size_t i = 0; i < size_t{T} * hp.n_ff; ++i) {
      const float g = gate_[i];
      gate_[i] = g / (1.0f + std::exp(-g)) * up_[i];
    }
    matmul({{&L.w_down, gate_.data(), xn_.data(), T}});
    for (size_t i = 0; i < size_t{T} * E; ++i) x_[i] += xn_[i];
  }

  logits.resize(size_t{n_out} * hp.n_vocab);
  uint32_t o = 0;
  for (uint32_t t = 0; t < T; ++t)
    if (items[t].want_logits)
      rmsnorm(&x_[size_t{t} * E], output_norm_.data(), &normed_out_[size_t{o++} * E], E, hp.rms_eps);
  if (n_out) matmul({{&output_, normed_out_.data(), logits.data(), n_out}});
  return {};
}

status llama_model::prefill(kv_cache& cache, seq_id seq, std::span<const token_id> tokens, uint32_t start,
                            std::vector<float>& last_logits) {
  if (tokens.empty()) return {errc::kInvalidArgument, "prefill: no tokens"};
  std::vector<forward_item> items;
  items.reserve(max_batch_);
  for (size_t b = 0; b < tokens.size(); b += max_batch_) {
    const size_t e = std::min(tokens.size(), b + max_batch_);
    items.clear();
    for (size_t i = b; i < e; ++i)
      items.push_back({seq, static_cast<uint32_t>(start + i), tokens[i], i + 1 == tokens.size()});
    INSTINFER_TRY(run(cache, items, last_logits, false));  // prefill is dense (see set_sparse_attention)
  }
  return {};
}

}  // namespace instinfer::model
