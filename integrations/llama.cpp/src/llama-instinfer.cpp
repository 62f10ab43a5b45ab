#include "llama-instinfer.h"

#include "llama-batch.h"
#include "llama-cparams.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-model.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

//
// helpers
//

const char * llama_instinfer_backend_env() {
    const char * e = getenv("LLAMA_INSTINFER");
    return (e && *e) ? e : nullptr;
}

[[noreturn]] static void ii_fail(const char * what, instinfer_status st) {
    GGML_ABORT("instinfer: %s failed: %s (%s)", what, instinfer_status_name(st), instinfer_last_error());
}

static void ii_check(const char * what, instinfer_status st) {
    if (st != INSTINFER_OK) {
        ii_fail(what, st);
    }
}

static instinfer_dtype ii_dtype(ggml_type t) {
    switch (t) {
        case GGML_TYPE_F32:  return INSTINFER_DTYPE_F32;
        case GGML_TYPE_F16:  return INSTINFER_DTYPE_F16;
        case GGML_TYPE_BF16: return INSTINFER_DTYPE_BF16;
        case GGML_TYPE_Q8_0: return INSTINFER_DTYPE_Q8_0; // ggml's block format, byte for byte
        case GGML_TYPE_Q4_0: return INSTINFER_DTYPE_Q4_0;
        default:
            throw std::runtime_error(std::string("instinfer memory: KV type ") + ggml_type_name(t) +
                    " is not supported (use f32, f16, bf16, q8_0 or q4_0)");
    }
}

// LLAMA_INSTINFER_SPARSE=POLICY[:COMPRESSION[:REUSE_COSINE]][,KEY=VALUE...]: decode steps (one
// query row) attend sparsely, prefill stays dense. POLICY: sparf (SparF: a channel copy of K) or
// pages (per-page key summaries); COMPRESSION: the budget (default 1/8); REUSE_COSINE: SparF's
// selection reuse across steps (0: off, the default). KEYs: sinks, window (dense ends, tokens;
// default 16, 64), share (SparF's budget share for K columns, default 0.5), spread (SparF's token
// page spread, default 2). Unset: dense.
static double ii_env_number(const std::string & what, const std::string & text) {
    char * end = nullptr;
    const double x = strtod(text.c_str(), &end);
    if (text.empty() || *end) {
        throw std::runtime_error("LLAMA_INSTINFER_SPARSE: " + what + " '" + text + "' is not a number");
    }
    return x;
}

static uint32_t ii_env_count(const std::string & what, const std::string & text) {
    const double x = ii_env_number(what, text);
    if (!(x >= 0.0 && x <= 4294967295.0) || x != static_cast<double>(static_cast<uint32_t>(x))) {
        throw std::runtime_error("LLAMA_INSTINFER_SPARSE: " + what + " '" + text + "' is not a token count");
    }
    return static_cast<uint32_t>(x);
}

static bool ii_sparse_from_env(instinfer_sparf_params & p, uint32_t head_dim) {
    const char * e = getenv("LLAMA_INSTINFER_SPARSE");
    if (!e || !*e) {
        return false;
    }
    instinfer_sparf_params_init(&p);
    const std::string all = e;
    const size_t comma = all.find(',');
    const std::string spec = all.substr(0, comma);
    const size_t c1 = spec.find(':');
    const std::string policy = spec.substr(0, c1);
    if (policy == "sparf") {
        p.policy = INSTINFER_SPARSE_SPARF;
    } else if (policy == "pages") {
        p.policy = INSTINFER_SPARSE_PAGE_SUMMARY;
    } else {
        throw std::runtime_error("LLAMA_INSTINFER_SPARSE: policy '" + policy + "' is not sparf or pages");
    }
    if (c1 != std::string::npos) {
        const size_t c2 = spec.find(':', c1 + 1);
        const std::string comp = spec.substr(c1 + 1, c2 == std::string::npos ? std::string::npos : c2 - c1 - 1);
        p.compression = ii_env_number("compression", comp);
        if (c2 != std::string::npos) {
            p.reuse_min_cosine = static_cast<float>(ii_env_number("reuse cosine", spec.substr(c2 + 1)));
        }
    }
    for (size_t at = comma; at != std::string::npos;) {
        const size_t next = all.find(',', at + 1);
        const std::string opt = all.substr(at + 1, next == std::string::npos ? std::string::npos : next - at - 1);
        const size_t eq = opt.find('=');
        const std::string key = opt.substr(0, eq);
        const std::string value = eq == std::string::npos ? std::string() : opt.substr(eq + 1);
        if (eq == std::string::npos) {
            throw std::runtime_error("LLAMA_INSTINFER_SPARSE: option '" + opt + "' is not KEY=VALUE");
        } else if (key == "sinks") {
            p.sink_tokens = ii_env_count("sinks", value);
        } else if (key == "window") {
            p.window_tokens = ii_env_count("window", value);
        } else if (key == "share") {
            p.channel_share = ii_env_number("share", value);
            if (p.channel_share == 0.0) {  // 0 would mean the default in the C API: say no instead
                throw std::runtime_error("LLAMA_INSTINFER_SPARSE: share must be in (0, 1), got 0");
            }
        } else if (key == "spread") {
            p.page_spread = ii_env_number("spread", value);
        } else {
            throw std::runtime_error("LLAMA_INSTINFER_SPARSE: unknown option '" + key +
                    "' (sinks, window, share, spread)");
        }
        at = next;
    }
    const instinfer_status st = instinfer_sparf_params_check(&p, head_dim);
    if (st != INSTINFER_OK) {
        throw std::runtime_error(std::string("LLAMA_INSTINFER_SPARSE='") + e + "': " + instinfer_status_name(st) + ": " +
                instinfer_last_error());
    }
    return true;
}

//
// llama_instinfer_memory
//

llama_instinfer_memory::llama_instinfer_memory(
        const llama_model & model, const char * backend, ggml_type type_k, ggml_type type_v, uint32_t n_seq_max) :
    n_seq_max(n_seq_max) {
    const auto & hp = model.hparams;

    if (model.arch != LLM_ARCH_LLAMA) {
        throw std::runtime_error(std::string("instinfer memory: architecture '") + llm_arch_name(model.arch) +
                "' is not supported (plain causal attention of the llama architecture only)");
    }
    if (hp.swa_type != LLAMA_SWA_TYPE_NONE || hp.use_alibi || hp.attn_soft_cap || hp.n_layer_nextn > 0) {
        throw std::runtime_error("instinfer memory: sliding-window attention, ALiBi, soft-capping and MTP layers are not supported");
    }
    if (type_k != type_v) {
        throw std::runtime_error("instinfer memory: K and V must have the same type");
    }

    n_layer   = hp.n_layer();
    n_head    = hp.n_head(0);
    n_head_kv = hp.n_head_kv(0);
    head_dim  = hp.n_embd_head_k(0);
    for (uint32_t il = 0; il < n_layer; ++il) {
        if (hp.n_head(il) != n_head || hp.n_head_kv(il) != n_head_kv ||
            hp.n_embd_head_k(il) != head_dim || hp.n_embd_head_v(il) != head_dim) {
            throw std::runtime_error("instinfer memory: layers with different head counts or sizes are not supported");
        }
    }
    // as the llama graph computes kq_scale
    scale = hp.f_attention_scale == 0.0f ? 1.0f/sqrtf(float(head_dim)) : hp.f_attention_scale;

    instinfer_config cfg;
    instinfer_config_init(&cfg);
    cfg.n_layers       = n_layer;
    cfg.n_q_heads      = n_head;
    cfg.n_kv_heads     = n_head_kv;
    cfg.head_dim       = head_dim;
    cfg.kv_dtype       = ii_dtype(type_k);
    cfg.scale          = scale;
    // ggml's threads take turns with the cache (an append on one, the prefetch after an attention
    // on another): an ssd ring must accept submissions from any of them, unless the URI says.
    std::string uri = backend;
    if (uri.rfind("ssd:", 0) == 0 && uri.find("single_issuer") == std::string::npos) {
        uri += uri.find('?') == std::string::npos ? "?single_issuer=0" : "&single_issuer=0";
    }
    cfg.backend        = uri.c_str();
    cfg.caller_threads = 1; // attention runs on ggml's threads (the op's ith/nth)
    if (const char * mb = getenv("LLAMA_INSTINFER_CAPACITY_MB")) {
        cfg.capacity_bytes = uint64_t(atoll(mb)) << 20;
    }
    sparse = ii_sparse_from_env(sparse_params, head_dim);
    if (sparse) {
        // what the policy keeps beside the cache: SparF's channel copy or the page summaries
        cfg.sparf          = sparse_params.policy == INSTINFER_SPARSE_SPARF;
        cfg.page_summaries = sparse_params.policy == INSTINFER_SPARSE_PAGE_SUMMARY;
    }

    const instinfer_status st = instinfer_cache_create(&cfg, &cache);
    if (st != INSTINFER_OK) {
        throw std::runtime_error(std::string("instinfer memory: cache on '") + backend + "': " +
                instinfer_status_name(st) + ": " + instinfer_last_error());
    }
    is_host = strcmp(backend, "host") == 0;

    ops.resize(n_layer);
    slices_done.reset(new std::atomic<int>[n_layer]);
    for (uint32_t il = 0; il < n_layer; ++il) {
        slices_done[il] = 0;
        ops[il] = { cache, il, n_layer, &slices_done[il], sparse ? &sparse_params : nullptr };
    }

    LLAMA_LOG_INFO("%s: instinfer %d, backend '%s', %u layers, %u/%u heads of %u, KV %s, n_seq_max %u%s\n", __func__,
            instinfer_version(), backend, n_layer, n_head, n_head_kv, head_dim, ggml_type_name(type_k), n_seq_max,
            sparse ? (sparse_params.policy == INSTINFER_SPARSE_SPARF ? ", sparse decode: SparF" : ", sparse decode: pages") : "");
}

llama_instinfer_memory::~llama_instinfer_memory() {
    instinfer_cache_destroy(cache);
}

uint64_t llama_instinfer_memory::seq_length(instinfer_seq seq) const {
    uint64_t n = 0;
    ii_check("seq_length", instinfer_seq_length(cache, seq, 0, &n));
    return n;
}

bool llama_instinfer_memory::seq_find(llama_seq_id seq_id, instinfer_seq & out) const {
    const auto it = seqs.find(seq_id);
    if (it == seqs.end()) {
        return false;
    }
    out = it->second;
    return true;
}

instinfer_seq llama_instinfer_memory::seq_get_or_create(llama_seq_id seq_id) {
    instinfer_seq s;
    if (!seq_find(seq_id, s)) {
        ii_check("seq_create", instinfer_seq_create(cache, &s));
        seqs[seq_id] = s;
    }
    return s;
}

void llama_instinfer_memory::seq_free(llama_seq_id seq_id) {
    const auto it = seqs.find(seq_id);
    if (it != seqs.end()) {
        ii_check("seq_free", instinfer_seq_free(cache, it->second));
        seqs.erase(it);
    }
}

llama_memory_context_ptr llama_instinfer_memory::init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) {
    GGML_UNUSED(embd_all);

    balloc.split_reset();

    std::vector<llama_ubatch> ubatches;
    std::map<llama_seq_id, llama_pos> next_pos; // where each sequence continues

    while (true) {
        auto ubatch = balloc.split_seq(n_ubatch);
        if (ubatch.n_tokens == 0) {
            break;
        }
        if (ubatch.n_pos > 1) {
            LLAMA_LOG_ERROR("%s: instinfer memory: multi-dimensional positions are not supported\n", __func__);
            return std::make_unique<llama_instinfer_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
        }
        if (ubatch.n_seqs_unq != 1) {
            LLAMA_LOG_ERROR("%s: instinfer memory: a ubatch holds %u sequences; one is supported\n", __func__, ubatch.n_seqs_unq);
            return std::make_unique<llama_instinfer_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
        }
        const llama_seq_id s = ubatch.seq_id_unq[0];
        if (s < 0 || (uint32_t) s >= n_seq_max) {
            LLAMA_LOG_ERROR("%s: instinfer memory: seq_id %d out of [0, %u)\n", __func__, s, n_seq_max);
            return std::make_unique<llama_instinfer_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
        }
        if (next_pos.find(s) == next_pos.end()) {
            next_pos[s] = seq_pos_max(s) + 1;
        }
        const llama_pos p0 = next_pos[s];
        for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
            if (ubatch.n_seq_id[i] != 1) {
                LLAMA_LOG_ERROR("%s: instinfer memory: tokens shared by several sequences are not supported\n", __func__);
                return std::make_unique<llama_instinfer_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
            }
            if (ubatch.pos[i] != p0 + (llama_pos) i) {
                LLAMA_LOG_ERROR("%s: instinfer memory: seq %d: token %u at position %d, expected %d (positions must continue the sequence)\n",
                        __func__, s, i, ubatch.pos[i], p0 + (llama_pos) i);
                return std::make_unique<llama_instinfer_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
            }
        }
        next_pos[s] = p0 + (llama_pos) ubatch.n_tokens;

        ubatches.push_back(std::move(ubatch)); // NOLINT
    }

    if (balloc.get_n_used() < balloc.get_n_tokens()) {
        return std::make_unique<llama_instinfer_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }

    return std::make_unique<llama_instinfer_context>(this, std::move(ubatches));
}

llama_memory_context_ptr llama_instinfer_memory::init_full() {
    return std::make_unique<llama_instinfer_context>(LLAMA_MEMORY_STATUS_SUCCESS, this);
}

llama_memory_context_ptr llama_instinfer_memory::init_update(llama_context * lctx, bool optimize) {
    GGML_UNUSED(lctx);
    GGML_UNUSED(optimize);
    return std::make_unique<llama_instinfer_context>(LLAMA_MEMORY_STATUS_NO_UPDATE, this);
}

void llama_instinfer_memory::clear(bool data) {
    GGML_UNUSED(data);
    while (!seqs.empty()) {
        seq_free(seqs.begin()->first);
    }
}

bool llama_instinfer_memory::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (p0 < 0) {
        p0 = 0;
    }
    const bool to_end = p1 < 0 || p1 == std::numeric_limits<llama_pos>::max();

    std::vector<llama_seq_id> ids;
    if (seq_id < 0) {
        for (const auto & it : seqs) {
            ids.push_back(it.first);
        }
    } else {
        ids.push_back(seq_id);
    }

    // check first, so that an unsupported range changes nothing
    for (llama_seq_id id : ids) {
        instinfer_seq s;
        if (seq_find(id, s) && !to_end && (uint64_t) p0 < seq_length(s) && (uint64_t) p1 < seq_length(s)) {
            return false; // a range inside the sequence: positions would shift
        }
    }
    for (llama_seq_id id : ids) {
        instinfer_seq s;
        if (!seq_find(id, s) || (uint64_t) p0 >= seq_length(s)) {
            continue;
        }
        if (p0 == 0) {
            seq_free(id);
        } else {
            ii_check("seq_remove_range", instinfer_seq_remove_range(cache, s, (uint64_t) p0, UINT64_MAX));
        }
    }
    return true;
}

void llama_instinfer_memory::seq_cp(llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) {
    if (seq_id_src == seq_id_dst) {
        return;
    }
    if (p0 > 0) {
        GGML_ABORT("instinfer memory: seq_cp of a range not starting at 0 is not supported (p0 = %d)", p0);
    }
    seq_free(seq_id_dst);

    instinfer_seq src;
    if (!seq_find(seq_id_src, src)) {
        return;
    }
    const uint64_t n   = seq_length(src);
    const uint64_t end = (p1 < 0 || (uint64_t) p1 > n) ? n : (uint64_t) p1;
    if (end == 0) {
        return;
    }
    instinfer_seq dst;
    ii_check("seq_fork_at", instinfer_seq_fork_at(cache, src, end, &dst));
    seqs[seq_id_dst] = dst;
}

void llama_instinfer_memory::seq_keep(llama_seq_id seq_id) {
    std::vector<llama_seq_id> drop;
    for (const auto & it : seqs) {
        if (it.first != seq_id) {
            drop.push_back(it.first);
        }
    }
    for (llama_seq_id id : drop) {
        seq_free(id);
    }
}

void llama_instinfer_memory::seq_add(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift) {
    GGML_UNUSED(seq_id);
    GGML_UNUSED(p0);
    GGML_UNUSED(p1);
    if (shift != 0) {
        GGML_ABORT("instinfer memory: position shifts (seq_add) are not supported");
    }
}

void llama_instinfer_memory::seq_div(llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    GGML_UNUSED(seq_id);
    GGML_UNUSED(p0);
    GGML_UNUSED(p1);
    if (d != 1) {
        GGML_ABORT("instinfer memory: position division (seq_div) is not supported");
    }
}

llama_pos llama_instinfer_memory::seq_pos_min(llama_seq_id seq_id) const {
    instinfer_seq s;
    return (seq_find(seq_id, s) && seq_length(s) > 0) ? 0 : -1;
}

llama_pos llama_instinfer_memory::seq_pos_max(llama_seq_id seq_id) const {
    instinfer_seq s;
    return seq_find(seq_id, s) ? (llama_pos) seq_length(s) - 1 : -1;
}

std::map<ggml_backend_buffer_type_t, size_t> llama_instinfer_memory::memory_breakdown() const {
    std::map<ggml_backend_buffer_type_t, size_t> res;
    if (!is_host) {
        return res; // the KV is not in host memory
    }
    instinfer_stats st;
    memset(&st, 0, sizeof(st));
    st.struct_size = sizeof(st);
    if (instinfer_cache_stats(cache, &st) == INSTINFER_OK) {
        ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (cpu) {
            res[ggml_backend_dev_buffer_type(cpu)] = st.used_chunks * st.chunk_bytes;
        }
    }
    return res;
}

// state: u32 n_seq, then per sequence: i32 seq_id, u64 size, instinfer's sequence state (self-checking)
void llama_instinfer_memory::state_write(llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
    GGML_UNUSED(flags);

    std::vector<std::pair<llama_seq_id, instinfer_seq>> out;
    for (const auto & it : seqs) {
        if (seq_id < 0 || it.first == seq_id) {
            out.push_back(it);
        }
    }
    const uint32_t n = out.size();
    io.write(&n, sizeof(n));

    std::vector<uint8_t> buf;
    for (const auto & [id, s] : out) {
        size_t size = 0;
        ii_check("seq_state_size", instinfer_seq_state_size(cache, s, &size));
        buf.resize(size);
        size_t written = 0;
        ii_check("seq_state_save", instinfer_seq_state_save(cache, s, buf.data(), buf.size(), &written));
        const uint64_t size64 = written;
        io.write(&id, sizeof(id));
        io.write(&size64, sizeof(size64));
        io.write(buf.data(), written);
    }
}

void llama_instinfer_memory::state_read(llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) {
    GGML_UNUSED(flags);

    uint32_t n = 0;
    io.read(&n, sizeof(n));
    if (seq_id >= 0 && n > 1) {
        throw std::runtime_error("instinfer memory: state of one sequence holds several");
    }
    if (seq_id < 0) {
        clear(true);
    } else {
        seq_free(seq_id);
    }

    std::vector<uint8_t> buf;
    for (uint32_t i = 0; i < n; ++i) {
        llama_seq_id id   = -1;
        uint64_t     size = 0;
        io.read(&id, sizeof(id));
        io.read(&size, sizeof(size));
        buf.resize(size);
        io.read(buf.data(), size);

        const llama_seq_id dst = seq_id >= 0 ? seq_id : id;
        if (dst < 0 || (uint32_t) dst >= n_seq_max) {
            throw std::runtime_error("instinfer memory: state holds seq_id " + std::to_string(dst) + " out of range");
        }
        instinfer_seq s;
        const instinfer_status st = instinfer_seq_state_load(cache, buf.data(), buf.size(), &s);
        if (st != INSTINFER_OK) {
            throw std::runtime_error(std::string("instinfer memory: loading a sequence's state: ") +
                    instinfer_status_name(st) + ": " + instinfer_last_error());
        }
        seq_free(dst);
        seqs[dst] = s;
    }
}

//
// llama_instinfer_context
//

llama_instinfer_context::llama_instinfer_context(llama_memory_status status, llama_instinfer_memory * mem) :
    status(status), mem(mem) {}

llama_instinfer_context::llama_instinfer_context(llama_instinfer_memory * mem, std::vector<llama_ubatch> ubatches) :
    status(LLAMA_MEMORY_STATUS_SUCCESS), mem(mem), ubatches(std::move(ubatches)) {}

bool llama_instinfer_context::next() {
    GGML_ASSERT(status == LLAMA_MEMORY_STATUS_SUCCESS);
    return ++i_next < ubatches.size();
}

bool llama_instinfer_context::apply() {
    GGML_ASSERT(!llama_memory_status_is_fail(status));
    if (i_next < ubatches.size()) {
        // the graph's append op writes the K/V; here the sequence only has to exist
        mem->seq_get_or_create(ubatches[i_next].seq_id_unq[0]);
    }
    return true;
}

const llama_ubatch & llama_instinfer_context::get_ubatch() const {
    GGML_ASSERT(status == LLAMA_MEMORY_STATUS_SUCCESS);
    return ubatches[i_next];
}

//
// graph
//

void llm_graph_input_attn_instinfer::set_input(const llama_ubatch * ubatch) {
    if (!info || !info->buffer) {
        return;
    }
    instinfer_seq s = 0;
    GGML_ASSERT(ictx->get_mem()->seq_find(ubatch->seq_id_unq[0], s));

    const int32_t data[4] = {
        ubatch->pos[0],
        (int32_t) ubatch->n_tokens,
        (int32_t) (uint32_t) (s & 0xffffffffu),
        (int32_t) (uint32_t) (s >> 32),
    };
    ggml_backend_tensor_set(info, data, 0, sizeof(data));
}

bool llm_graph_input_attn_instinfer::can_reuse(const llm_graph_params & params) {
    ictx = static_cast<const llama_instinfer_context *>(params.mctx);
    // the ops read the sequence and positions from `info`; the row count is the graph's
    return params.ubatch.n_tokens == (uint32_t) n_tokens_built;
}

static instinfer_seq ii_info_seq(const ggml_tensor * info) {
    const int32_t * d = (const int32_t *) info->data;
    return (uint64_t) (uint32_t) d[2] | ((uint64_t) (uint32_t) d[3] << 32);
}

// src: k [head_dim, n_head_kv, n_tokens], v (same), info
static void ii_append_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    GGML_UNUSED(nth);
    if (ith != 0) {
        return;
    }
    const auto *    op   = (const llama_instinfer_memory::layer_op *) userdata;
    const ggml_tensor * k = dst->src[0];
    const ggml_tensor * v = dst->src[1];
    const int32_t * info = (const int32_t *) dst->src[2]->data;

    const uint32_t n = (uint32_t) k->ne[2];
    GGML_ASSERT((int32_t) n == info[1]);
    const instinfer_status st = instinfer_append_at(op->cache, ii_info_seq(dst->src[2]), op->il, (uint64_t) info[0], n,
            k->data, v->data, INSTINFER_DTYPE_F32);
    if (st != INSTINFER_OK) {
        ii_fail("append_at", st);
    }
}

// src: q [head_dim, n_head, n_tokens], the append op (ordering), info, k, v; dst [head_dim*n_head, n_tokens]
static void ii_attend_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto *        op   = (const llama_instinfer_memory::layer_op *) userdata;
    const ggml_tensor * q    = dst->src[0];
    const int32_t *     info = (const int32_t *) dst->src[2]->data;

    const instinfer_seq seq    = ii_info_seq(dst->src[2]);
    const uint32_t      pos    = (uint32_t) info[0];
    const uint32_t      n_rows = (uint32_t) q->ne[2];

    if (op->sparse && n_rows == 1) {
        // Sparse decode: one call for the sequence on the op's first thread (the library splits
        // its kv heads over its own workers), no prefetch of the next layer's whole KV.
        if (ith == 0) {
            const instinfer_status st = instinfer_attend_sparse(op->cache, op->il, 1, &seq, (const float *) q->data,
                    (float *) dst->data, nullptr, op->sparse);
            if (st != INSTINFER_OK) {
                ii_fail("attend_sparse", st);
            }
        }
        return;
    }
    const instinfer_status st = instinfer_attend_chunk_slice(op->cache, op->il, 1, &seq, &pos, &n_rows,
            (const float *) q->data, (float *) dst->data, nullptr, (uint32_t) ith, (uint32_t) nth);
    if (st != INSTINFER_OK) {
        ii_fail("attend_chunk_slice", st);
    }
    // Decode: the last thread out of this layer's attention tells the cache that the next layer
    // comes next, so a storage backend reads it while ggml runs the rest of this layer (wo, FFN)
    // and the next one's projections. Only the last thread: an earlier hint would be dropped by
    // the attention still running on another thread (one staging pool per cache).
    if (n_rows == 1 && op->il + 1 < op->n_layer && op->slices_done->fetch_add(1) + 1 == nth) {
        op->slices_done->store(0);
        instinfer_prefetch(op->cache, op->il + 1, 1, &seq); // a hint: its failure is the next attend's
    }
    if (ith == 0 && pos == 0 && getenv("LLAMA_INSTINFER_CHECK")) {
        // debug: the first chunk's attention recomputed from its own K/V
        const ggml_tensor * k = dst->src[3];
        const ggml_tensor * v = dst->src[4];
        const int D = q->ne[0], H = q->ne[1], HK = k->ne[1];
        double maxd = 0;
        for (uint32_t i = 0; i < n_rows; ++i) for (int h = 0; h < H; ++h) {
            const float * qi = (const float *) q->data + (size_t(i)*H + h)*D;
            const int hk = h / (H/HK);
            std::vector<double> w(i + 1);
            double m = -1e300;
            for (uint32_t j = 0; j <= i; ++j) {
                const float * kj = (const float *) k->data + (size_t(j)*HK + hk)*D;
                double d = 0; for (int c = 0; c < D; ++c) d += (double) qi[c]*kj[c];
                w[j] = d/sqrt((double) D); m = std::max(m, w[j]);
            }
            double sum = 0; for (auto & x : w) { x = exp(x - m); sum += x; }
            const float * oi = (const float *) dst->data + (size_t(i)*H + h)*D;
            for (int c = 0; c < D; ++c) {
                double o = 0;
                for (uint32_t j = 0; j <= i; ++j) o += w[j]*((const float *) v->data)[(size_t(j)*HK + hk)*D + c];
                maxd = std::max(maxd, fabs(o/sum - oi[c]));
            }
        }
        fprintf(stderr, "instinfer check layer %u rows %u: max |out - reference| %.3g\n", op->il, n_rows, maxd);
    }
}

std::unique_ptr<llm_graph_input_attn_kv> llama_instinfer_build_inp(
        ggml_context * ctx0, const llama_hparams & hparams, const llama_cparams & cparams, const llama_memory_context_i * mctx) {
    const auto * ictx = dynamic_cast<const llama_instinfer_context *>(mctx);
    if (!ictx) {
        return nullptr;
    }
    if (!cparams.causal_attn) {
        throw std::runtime_error("instinfer memory: non-causal attention is not supported");
    }
    auto inp = std::make_unique<llm_graph_input_attn_instinfer>(hparams, cparams, ictx);
    inp->info = ggml_new_tensor_1d(ctx0, GGML_TYPE_I32, 4);
    ggml_set_input(inp->info);
    ggml_set_name(inp->info, "instinfer_info");
    return inp;
}

ggml_tensor * llama_instinfer_build_attn(
        ggml_context * ctx0, ggml_cgraph * gf, llm_graph_input_attn_kv * inp,
        ggml_tensor * q_cur, ggml_tensor * k_cur, ggml_tensor * v_cur,
        ggml_tensor * kq_b, ggml_tensor * sinks, float kq_scale, int il) {
    auto * ii = dynamic_cast<llm_graph_input_attn_instinfer *>(inp);
    if (!ii) {
        return nullptr;
    }
    llama_instinfer_memory * mem = ii->ictx->get_mem();

    GGML_ASSERT(kq_b == nullptr && sinks == nullptr && "instinfer memory: KQ bias and attention sinks are not supported");
    GGML_ASSERT(fabsf(kq_scale - mem->scale) <= 1e-6f*mem->scale && "instinfer memory: the graph's kq_scale differs from the cache's");
    GGML_ASSERT(q_cur->type == GGML_TYPE_F32 && k_cur->type == GGML_TYPE_F32 && v_cur->type == GGML_TYPE_F32);
    GGML_ASSERT(q_cur->ne[0] == mem->head_dim && q_cur->ne[1] == mem->n_head);
    GGML_ASSERT(k_cur->ne[0] == mem->head_dim && k_cur->ne[1] == mem->n_head_kv);
    GGML_ASSERT(v_cur->ne[0] == mem->head_dim && v_cur->ne[1] == mem->n_head_kv);

    // instinfer reads rows [n_tokens][heads][head_dim], i.e. contiguous ggml tensors
    if (!ggml_is_contiguous(q_cur)) {
        q_cur = ggml_cont(ctx0, q_cur);
    }
    if (!ggml_is_contiguous(k_cur)) {
        k_cur = ggml_cont(ctx0, k_cur);
    }
    if (!ggml_is_contiguous(v_cur)) {
        v_cur = ggml_cont(ctx0, v_cur);
    }
    const int64_t n_tokens = q_cur->ne[2];
    ii->n_tokens_built = n_tokens;

    void * ud = mem->get_layer_op(il);

    ggml_tensor * args_app[3] = { k_cur, v_cur, ii->info };
    ggml_tensor * app = ggml_custom_4d(ctx0, GGML_TYPE_F32, 1, 1, 1, 1, args_app, 3, ii_append_op, 1, ud);
    ggml_format_name(app, "instinfer_append-%d", il);

    ggml_tensor * args_att[5] = { q_cur, app, ii->info, k_cur, v_cur };
    ggml_tensor * cur = ggml_custom_4d(ctx0, GGML_TYPE_F32, mem->head_dim*mem->n_head, n_tokens, 1, 1, args_att, 5,
            ii_attend_op, GGML_N_TASKS_MAX, ud);
    ggml_format_name(cur, "instinfer_attend-%d", il);

    ggml_build_forward_expand(gf, cur);
    return cur;
}

llama_memory_i * llama_instinfer_create_memory(
        const llama_model & model, const char * backend, ggml_type type_k, ggml_type type_v, uint32_t n_seq_max) {
    return new llama_instinfer_memory(model, backend, type_k, type_v, n_seq_max);
}
