#pragma once

// instinfer memory: the KV cache of llama.cpp's attention layers lives in an instinfer cache
// (host RAM, an SSD file, an emulated computational storage drive), and the attention of each
// layer runs inside instinfer as causal chunk attention.
//
// opt-in, per context: LLAMA_INSTINFER=<backend URI> ("host", "ssd:/path/kv.bin", "csd:/path/flash.img")
//   LLAMA_INSTINFER_CAPACITY_MB  KV capacity (default: the backend's)
//
// one instinfer sequence per llama seq_id; the graph appends each ubatch's K/V at its positions
// (instinfer_append_at) and attends its query rows (instinfer_attend_chunk_slice) in two
// ggml_custom_4d ops, so K/V never pass through a ggml tensor of the cache
//
// supported: the llama architecture (plain causal attention), one sequence per ubatch, positions
// that continue the sequence, seq_rm of a suffix, seq_cp of a prefix, seq_keep, state save/load
// not supported (clear error): seq_add/seq_div (shifts), ubatches mixing sequences, SWA, ALiBi,
// soft-capping, attention sinks, KV types other than f32/f16/bf16
//
// csd: has no causal chunk attention in this version: a chunk runs there one row at a time
// (append one token, decode-attend it), which is exact but reads the KV once per row

#include "llama-graph.h"
#include "llama-memory.h"

#include <instinfer/instinfer.h>

#include <atomic>
#include <map>
#include <memory>
#include <vector>

struct llama_model;
struct llama_cparams;

// the backend URI from LLAMA_INSTINFER, or nullptr when unset/empty
const char * llama_instinfer_backend_env();

class llama_instinfer_memory : public llama_memory_i {
public:
    llama_instinfer_memory(const llama_model & model, const char * backend, ggml_type type_k, ggml_type type_v, uint32_t n_seq_max);
    ~llama_instinfer_memory();

    //
    // llama_memory_i
    //

    llama_memory_context_ptr init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) override;
    llama_memory_context_ptr init_full() override;
    llama_memory_context_ptr init_update(llama_context * lctx, bool optimize) override;

    bool get_can_shift() const override { return false; }

    void clear(bool data) override;

    bool seq_rm  (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1) override;
    void seq_cp  (llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) override;
    void seq_keep(llama_seq_id seq_id) override;
    void seq_add (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, llama_pos shift) override;
    void seq_div (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, int d) override;

    llama_pos seq_pos_min(llama_seq_id seq_id) const override;
    llama_pos seq_pos_max(llama_seq_id seq_id) const override;

    std::map<ggml_backend_buffer_type_t, size_t> memory_breakdown() const override;

    void state_write(llama_io_write_i & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) const override;
    void state_read (llama_io_read_i  & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) override;

    //
    // used by the context and the graph
    //

    // the instinfer sequence of seq_id, created when missing
    instinfer_seq seq_get_or_create(llama_seq_id seq_id);
    bool          seq_find(llama_seq_id seq_id, instinfer_seq & out) const;

    // what a custom op needs: the cache and its layer (stable addresses, one per layer)
    struct layer_op {
        instinfer_cache * cache;
        uint32_t          il;
        uint32_t          n_layer;
        std::atomic<int> * slices_done; // the attend op's threads that finished this layer (prefetch)
        const instinfer_sparf_params * sparse; // decode steps: sparse attention with these; null: dense
    };

    layer_op * get_layer_op(int il) { return &ops[il]; }

    float    scale;
    uint32_t n_head;
    uint32_t n_head_kv;
    uint32_t head_dim;

private:
    uint64_t seq_length(instinfer_seq seq) const;
    void     seq_free(llama_seq_id seq_id);

    instinfer_cache * cache = nullptr;
    uint32_t n_seq_max;
    uint32_t n_layer;
    bool     is_host;
    bool     sparse = false;              // LLAMA_INSTINFER_SPARSE is set
    instinfer_sparf_params sparse_params; // its parameters

    std::vector<layer_op> ops;
    std::unique_ptr<std::atomic<int>[]> slices_done; // one counter per layer, see layer_op
    std::map<llama_seq_id, instinfer_seq> seqs;
};

class llama_instinfer_context : public llama_memory_context_i {
public:
    // error, or a full/update context with status
    llama_instinfer_context(llama_memory_status status, llama_instinfer_memory * mem = nullptr);
    // a batch
    llama_instinfer_context(llama_instinfer_memory * mem, std::vector<llama_ubatch> ubatches);

    bool next() override;
    bool apply() override;

    llama_memory_status  get_status() const override { return status; }
    const llama_ubatch & get_ubatch() const override;

    llama_instinfer_memory * get_mem() const { return mem; }

private:
    llama_memory_status      status;
    llama_instinfer_memory * mem;

    size_t i_next = 0;
    std::vector<llama_ubatch> ubatches;
};

// the graph's attention input: one I32 tensor [4] = { first position, n_tokens, seq lo, seq hi },
// filled in set_input() so that a reused graph attends the right sequence and positions
class llm_graph_input_attn_instinfer : public llm_graph_input_attn_kv {
public:
    llm_graph_input_attn_instinfer(const llama_hparams & hparams, const llama_cparams & cparams, const llama_instinfer_context * ictx) :
        llm_graph_input_attn_kv(hparams, cparams, nullptr), ictx(ictx) {}

    void set_input(const llama_ubatch * ubatch) override;
    bool can_reuse(const llm_graph_params & params) override;

    ggml_tensor * info = nullptr; // I32 [4]

    int64_t n_tokens_built = -1; // query rows of the built graph

    const llama_instinfer_context * ictx;
};

// hook of llm_graph_context::build_attn_inp_kv(): the input when mctx is an instinfer context, else nullptr
std::unique_ptr<llm_graph_input_attn_kv> llama_instinfer_build_inp(
        ggml_context * ctx0, const llama_hparams & hparams, const llama_cparams & cparams, const llama_memory_context_i * mctx);

// hook of llm_graph_context::build_attn(llm_graph_input_attn_kv *): when inp is instinfer's, the
// attention output [head_dim*n_head, n_tokens] (build_attn_mha's layout); else nullptr
ggml_tensor * llama_instinfer_build_attn(
        ggml_context * ctx0, ggml_cgraph * gf, llm_graph_input_attn_kv * inp,
        ggml_tensor * q_cur, ggml_tensor * k_cur, ggml_tensor * v_cur,
        ggml_tensor * kq_b, ggml_tensor * sinks, float kq_scale, int il);

// hook of llama_model::create_memory()
llama_memory_i * llama_instinfer_create_memory(const llama_model & model, const char * backend, ggml_type type_k, ggml_type type_v, uint32_t n_seq_max);
