// A Llama-architecture decoder (Llama 1-3, SmolLM, Mistral without sliding window) running on the
// host, with its KV cache in an instinfer::kv_cache on any backend.
//
// Per layer: x += Wo·attn(rope(Wq·n), rope(Wk·n), Wv·n) with n = rmsnorm(x)·g_attn, then
// x += W_down·(silu(W_gate·m) ⊙ W_up·m) with m = rmsnorm(x)·g_ffn; logits = W_out·rmsnorm(x)·g_out
// (W_out = the token embedding when the file has no output.weight: tied). RoPE rotates adjacent
// pairs (x[2i], x[2i+1]) by pos·theta^(-2i/d): GGUF's llama tensors were permuted for that form.
//
// Attention: K and V of every token go to the kv_cache (append, f32 rows converted to the cache
// dtype), and every query is answered by kv_cache::attend. A forward call takes a list of
// (sequence, position, token); tokens of different sequences are attended together in one
// attend call per layer (decode batch). A prefill chunk (several consecutive tokens of a sequence)
// is appended at once and answered by one causal kv_cache::attend_chunk call per layer (row t sees
// positions [0, t]) where the backend runs it (host, ssd); elsewhere, and with SparF or an
// observer, its tokens are appended and attended one after another: the same causal attention.
//
// Options for experiments: set_sparse_attention routes forward()'s attention through
// kv_cache::attend_sparse (SparF; prefill() stays dense), and set_attention_observer sees every
// attention call's post-RoPE queries (sparf_model.cpp captures real attention with it).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "gguf.hpp"
#include "instinfer/kv/kv_cache.hpp"
#include "quant.hpp"
#include "thread_pool.hpp"

namespace instinfer::model {

using token_id = int32_t;

struct llama_hparams {
  uint32_t n_vocab = 0;
  uint32_t n_ctx_train = 0;
  uint32_t n_embd = 0;
  uint32_t n_layers = 0;
  uint32_t n_head = 0;
  uint32_t n_kv_head = 0;
  uint32_t head_dim = 0;
  uint32_t n_ff = 0;
  uint32_t rope_dim = 0;  // leading dims of each head that are rotated
  float rope_theta = 10000.0f;
  float rope_scale = 1.0f;  // linear position scaling (positions are divided by it)
  float rms_eps = 1e-5f;
  bool tied_output = false;
};

// A weight matrix in the mapped file: n_rows rows of n_cols weights of `type`.
struct weight {
  const std::byte* data = nullptr;
  ggml_type type = ggml_type::kF32;
  uint32_t n_cols = 0;
  uint32_t n_rows = 0;
  uint64_t row_bytes = 0;
};

// One token of a forward call.
struct forward_item {
  seq_id seq = 0;
  uint32_t pos = 0;  // must equal the sequence's current length in the cache
  token_id token = 0;
  bool want_logits = false;
};

// One attention call of a forward pass, as the observer sees it: the K/V of these tokens are
// already appended to the cache, the attend call follows.
struct attention_call {
  uint32_t layer = 0;
  std::span<const seq_id> seqs;  // distinct sequences, one query token each
  const float* q = nullptr;      // [seqs.size()][n_head][head_dim], after RoPE
  bool sparse = false;           // answered by kv_cache::attend_sparse (else kv_cache::attend)
};
using attention_observer = std::function<void(const attention_call&)>;

struct model_options {
  uint32_t n_threads = 0;   // 0: hardware concurrency
  uint32_t max_batch = 64;  // most tokens in one forward call (prefill chunk or decode batch)
  kernel_isa isa = best_kernel_isa();
  // Q4_0 / Q4_1 / Q8_0 matmuls on activations quantized to 8 bits once per matmul, with integer
  // dot products (quant.hpp; ggml does the same). false: the f32-unpacking kernels, exact up to
  // f32 rounding (the float64-reference tests use that).
  bool q8_activations = true;
};

class llama_model {
 public:
  // The model references the file's mapped tensors: `file` must outlive it.
  static result<std::unique_ptr<llama_model>> load(const gguf_file& file, const model_options& options = {});

  const llama_hparams& hparams() const noexcept { return hp_; }
  // Weight bytes (mapped) and the model's host working memory.
  uint64_t weight_bytes() const noexcept { return weight_bytes_; }
  uint64_t workspace_bytes() const noexcept;
  kernel_isa isa() const noexcept { return isa_; }
  uint32_t n_threads() const noexcept { return pool_.size(); }

  // The cache options this model needs (shape and dtype); backend and page size come from the caller.
  // sparf: keep the SparF index (needed by set_sparse_attention).
  cache_options kv_options(const std::string& backend_uri, dtype kv_dtype, bool sparf = false) const;

  // SparF decode attention: forward() answers its queries with kv_cache::attend_sparse(params)
  // (the cache needs cache_options::sparf); prefill() stays dense, as SparQ/SparF evaluate it.
  // nullopt (the default): dense kv_cache::attend everywhere.
  void set_sparse_attention(std::optional<sparf_params> params) noexcept { sparse_ = params; }
  const std::optional<sparf_params>& sparse_attention() const noexcept { return sparse_; }
  // Called once per attention call (every layer of every forward, prefill included), right
  // before the attend. Empty (the default): nothing is called.
  void set_attention_observer(attention_observer observer) { observer_ = std::move(observer); }

  // Run items (at most max_batch) through the model. logits: one row of n_vocab floats per item
  // with want_logits, in item order. The cache must have been created with kv_options().
  status forward(kv_cache& cache, std::span<const forward_item> items, std::vector<float>& logits);

  // Prefill helper: tokens at positions [start, start + n) of seq in chunks of max_batch; the
  // logits of the last token go to `last_logits` (n_vocab floats).
  status prefill(kv_cache& cache, seq_id seq, std::span<const token_id> tokens, uint32_t start,
                 std::vector<float>& last_logits);

 private:
  struct layer {
    std::vector<float> attn_norm, ffn_norm;
    weight wq, wk, wv, wo, w_gate, w_up, w_down;
  };
  struct matmul_job {
    const weight* w;
    const float* x;  // [n_vec][w->n_cols]
    float* y;        // [n_vec][w->n_rows]
    uint32_t n_vec;
  };

  llama_model(const model_options& options)
      : pool_(options.n_threads), isa_(options.isa), max_batch_(options.max_batch), q8_(options.q8_activations) {}
  status run(kv_cache& cache, std::span<const forward_item> items, std::vector<float>& logits, bool allow_sparse);
  void matmul(std::initializer_list<matmul_job> jobs);
  void rope(float* x, uint32_t n_heads, const float* cs, const float* sn) const noexcept;

  llama_hparams hp_;
  weight tok_embd_, output_;
  std::vector<float> output_norm_;
  std::vector<layer> layers_;
  std::vector<float> inv_freq_;
  uint64_t weight_bytes_ = 0;
  thread_pool pool_;
  kernel_isa isa_;
  uint32_t max_batch_;
  bool q8_;
  // Workspace, sized for max_batch tokens at load: the forward pass does not allocate.
  std::vector<float> x_, xn_, q_, k_, v_, att_, gate_, up_, normed_out_;
  std::vector<float> rope_cs_, rope_sn_;  // [max_batch][rope_dim / 2]: one table per token, all layers
  std::vector<act_block> xq_;             // a matmul's input quantized (q8_activations)
  std::vector<seq_id> group_seqs_;
  std::optional<sparf_params> sparse_;
  attention_observer observer_;
};

}  // namespace instinfer::model
