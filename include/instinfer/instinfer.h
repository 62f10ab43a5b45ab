/* instinfer C API: a paged KV cache for LLM decode whose pages live in host RAM, on an SSD, on a
 * computational storage drive or in GPU memory, with decode attention run where the pages are.
 *
 * Conventions
 *  - Every function that can fail returns an instinfer_status: 0 on success, a negative
 *    INSTINFER_E_* code on failure. instinfer_last_error() then gives a readable message (per
 *    thread). Nothing throws. Six functions cannot fail and return something else:
 *    instinfer_version, instinfer_status_name, instinfer_last_error, instinfer_config_init,
 *    instinfer_cache_destroy and instinfer_sparf_params_init.
 *  - Handles are opaque. A cache may be used from several threads: calls on one cache are
 *    serialised inside.
 *  - Buffer shapes are row-major, innermost last:
 *      K, V rows   [n_tokens][n_kv_heads][head_dim]   (llama.cpp's K/V row layout)
 *      queries     [n_seq][n_q_heads][head_dim] float
 *      outputs     [n_seq][n_q_heads][head_dim] float  (ggml_flash_attn_ext's layout)
 *      lse         [n_seq][n_q_heads] float, natural log
 *  - Compiles as C11 and as C++.
 */
#ifndef INSTINFER_H
#define INSTINFER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define INSTINFER_VERSION_MAJOR 0
#define INSTINFER_VERSION_MINOR 8
#define INSTINFER_VERSION_PATCH 0

typedef int32_t instinfer_status;
enum {
  INSTINFER_OK = 0,
  INSTINFER_E_INVALID_ARGUMENT = -1,
  INSTINFER_E_OUT_OF_MEMORY = -2,
  INSTINFER_E_OUT_OF_PAGES = -3,
  INSTINFER_E_UNKNOWN_SEQUENCE = -4,
  INSTINFER_E_LAYER_OUT_OF_RANGE = -5,
  INSTINFER_E_UNSUPPORTED = -6,
  INSTINFER_E_IO = -7,
  INSTINFER_E_NO_SPACE = -8,
  INSTINFER_E_DEVICE_LOST = -9,
  INSTINFER_E_TIMEOUT = -10,
  INSTINFER_E_CORRUPT_DATA = -11,
  INSTINFER_E_BUSY = -12,
  INSTINFER_E_INTERNAL = -13
};

typedef enum instinfer_dtype {
  INSTINFER_DTYPE_F32 = 0,
  INSTINFER_DTYPE_F16 = 1,
  INSTINFER_DTYPE_BF16 = 2,
  /* ggml's block formats, 32 values per block (head_dim a multiple of 32): kv_dtype only, or
   * rows already in the cache's kv_dtype. */
  INSTINFER_DTYPE_Q8_0 = 3, /* f16 scale + 32 x int8: 34 bytes per block */
  INSTINFER_DTYPE_Q4_0 = 4  /* f16 scale + 32 x 4 bits: 18 bytes per block */
} instinfer_dtype;

typedef struct instinfer_cache instinfer_cache;
typedef uint64_t instinfer_seq;

/* Cache configuration. Initialise with instinfer_config_init() and then set fields, so that
 * fields added in later versions keep their defaults.
 *
 * page_bytes and capacity_bytes, per backend (instinfer_cache_create enforces them, returning
 * INSTINFER_E_INVALID_ARGUMENT with a message that starts with the backend's name):
 *  - page_bytes 0 is the backend's preferred size (host, cuda: 4096; ssd: the device's; csd: the
 *    drive's flash page). Otherwise every backend needs a power of two in [512, 65536] holding a
 *    whole number of head_dim rows, and also:
 *      host, cuda: nothing more;
 *      ssd:  a chunk (2 * n_kv_heads pages) a multiple of the device's direct-I/O alignment, at
 *            least 4096 (so 512 needs n_kv_heads >= 4);
 *      csd:  exactly the drive's flash page (the URI's page=, default 4096).
 *  - capacity_bytes 0 is the backend's default (host: half the physical memory; ssd: the block
 *    device, or up to 64 GiB of a file's free space; csd: all of the drive's flash; cuda: half the
 *    free GPU memory). Otherwise, on every backend, at least one chunk of
 *    2 * n_kv_heads * page_bytes; the pool holds capacity_bytes / chunk whole chunks. */
typedef struct instinfer_config {
  uint32_t struct_size; /* sizeof(instinfer_config), set by instinfer_config_init */
  uint32_t n_layers;
  uint32_t n_q_heads;
  uint32_t n_kv_heads; /* n_q_heads must be a multiple of it (GQA) */
  uint32_t head_dim;   /* 64, 128 or 256 */
  instinfer_dtype kv_dtype;
  uint32_t page_bytes;     /* 0 = the backend's default; rules per backend above */
  uint64_t capacity_bytes; /* KV capacity; 0 = the backend's default; at least one chunk */
  uint32_t n_threads;      /* host compute threads; 0 = all cores */
  float scale;             /* logit scale; 0 = 1/sqrt(head_dim) */
  float logit_softcap;     /* cap*tanh(logit/cap); 0 = off */
  const char* backend;     /* "host", "ssd:PATH", "csd:PATH", "cuda:N"; NULL = "host" */
  /* Since 0.2: SparF (instinfer_attend_sparse) keeps a channel-indexed copy of K (1.5x the KV). */
  uint32_t sparf;                   /* 1: enable; 0: off (instinfer_attend_sparse is unsupported) */
  uint32_t sparf_channels_per_page; /* column page width; 0 = the default for the page size */
  /* Since 0.3: 1 = the caller's threads: no internal pool (n_threads is ignored); attention runs
   * on the calling thread, spread it with instinfer_attend_slice / instinfer_attend_chunk_slice. */
  uint32_t caller_threads;
  /* Since 0.5: 1 = keep page summaries (per page group and kv head the per-channel min and max of
   * K, 0.125x the KV in host memory) for instinfer_attend_sparse with policy
   * INSTINFER_SPARSE_PAGE_SUMMARY; with or without sparf. Host, ssd and cuda keep them in host
   * memory; csd in the drive's DRAM (the drive runs the policy next to its flash).
   * 64-bit so that it lies past the 0.4 struct (whose tail padding a 32-bit field would fill):
   * callers built against 0.1-0.4 pass the shorter struct_size and get 0. */
  uint64_t page_summaries;
  /* Since 0.6: 1 = q8_0 caches on host and ssd score Q.K with integer dot products of the query
   * rounded to q8_0 (per 32 values an f32 scale; each value moves by at most amax / 254 of its
   * block): faster on CPUs with integer dot instructions, logits within that rounding. Decode and
   * causal chunk attention; sparse attention stays f32. Another kv_dtype, csd or cuda:
   * INSTINFER_E_UNSUPPORTED. 0 (default): exact f32 scores. */
  uint32_t int8_query_dot;
} instinfer_config;

/* SparF parameters (flash-aware sparse decode attention). Initialise with
 * instinfer_sparf_params_init(): compression 1/8, whole column pages, page spread 2. */
typedef struct instinfer_sparf_params {
  uint32_t struct_size; /* sizeof(instinfer_sparf_params), set by instinfer_sparf_params_init */
  uint32_t r;           /* with k: explicit channels and tokens (then compression is ignored); 0 = use compression */
  uint32_t k;
  uint32_t whole_pages; /* 1: choose whole column pages of channels; 0: single channels */
  double compression;   /* target fraction of dense K+V traffic, in (0, 1]; 1 = dense attention */
  double page_spread;   /* token pages read, as a multiple of the fewest holding k tokens; 0 = no limit */
  /* Since 0.4: always attend the first sink_tokens and the last window_tokens tokens exactly, sparse
   * in between; they count toward k (k is raised to hold them). Default 16 and 64 (since 0.6;
   * before: 0, 0); 0, 0 = plain SparF. Callers built against 0.2/0.3 pass the shorter struct_size
   * and get the defaults. Every backend runs them (csd: inside the drive). */
  uint32_t sink_tokens;
  uint32_t window_tokens;
  /* Since 0.5: the sparse policy, one of instinfer_sparse_policy (0 = SparF, the default). The
   * page-summary policy reads the fields above as: compression = fraction of page groups read, or
   * k tokens -> ceil(k / tokens per page) groups (r ignored, but r and k still come together);
   * sink and window tokens as the groups holding them; whole_pages and page_spread unused. */
  uint32_t policy;
  /* Since 0.7: selection reuse across decode steps, SparF only (host, ssd, cuda; csd:
   * INSTINFER_E_UNSUPPORTED when on). reuse_min_cosine 0 (the default) = off; in (0, 1]: a
   * (sequence, layer)'s last selection is reused while every kv head's query group keeps this cosine
   * similarity to the queries it was made for, for at most reuse_max_steps calls (default 8, at most
   * 1024); the tokens appended since are attended exactly. 0.8 kept SmolLM2's quality
   * (docs/experiment.md). Callers built against 0.5 / 0.6 pass the shorter struct_size: reuse off. */
  uint32_t reuse_max_steps;
  float reuse_min_cosine;
  /* Since 0.8: with compression (r = k = 0), SparF's share S of the budget spent on the K columns
   * of every token, the rest on the selected tokens' K and V rows: r = ceil(2 S c d) channels,
   * k = ceil((1 - S) c n) tokens. In (0, 1); 0 = the default, 0.5 (SparQ's even split). At 1/4 on
   * SmolLM2, 0.25 found more needles at lower KL (docs/experiment.md). Callers built against
   * 0.2-0.7 pass the shorter struct_size and get the default. */
  double channel_share;
} instinfer_sparf_params;

typedef enum instinfer_sparse_policy {
  INSTINFER_SPARSE_SPARF = 0,        /* SparF: channel-indexed K copy, approximate scores, top-k tokens */
  INSTINFER_SPARSE_PAGE_SUMMARY = 1, /* Quest-style: per-group K min/max bounds, top groups read whole */
} instinfer_sparse_policy;

typedef struct instinfer_stats {
  uint32_t struct_size; /* set by the caller to sizeof(instinfer_stats) */
  uint64_t n_sequences;
  uint64_t chunk_bytes; /* bytes of one chunk: 2 * n_kv_heads pages */
  uint64_t capacity_chunks;
  uint64_t used_chunks;
  uint64_t shared_chunks;
  uint64_t kv_bytes_appended;
  uint64_t device_bytes_written;
  uint64_t device_bytes_read;
  uint64_t link_bytes_host_to_device;
  uint64_t link_bytes_device_to_host;
  uint64_t flash_pages_read;
  uint64_t flash_pages_programmed;
  uint64_t flash_pages_erased;
  double write_amplification;
  double modelled_device_seconds; /* modelled, not measured (CSD) */
  /* Since 0.2: what instinfer_attend_sparse read, beside what dense attention would have. */
  uint64_t sparf_pages_read;   /* token + column pages */
  uint64_t sparf_dense_pages;  /* token pages dense attention reads */
  uint64_t sparf_column_bytes; /* channel-indexed K copy held in host memory */
  /* Since 0.5 (0.2-0.4 callers pass the shorter struct_size and do not get it): */
  uint64_t page_summary_bytes; /* page summaries held in host memory (shared groups once) */
  /* Since 0.7 (older callers pass the shorter struct_size and do not get it): */
  uint64_t sparf_reused_selections; /* SparF calls per (sequence, layer) that reused a kept selection */
} instinfer_stats;

/* Library version as MAJOR*10000 + MINOR*100 + PATCH. */
int instinfer_version(void);
/* Static name of a status code ("out of KV pages"). */
const char* instinfer_status_name(instinfer_status status);
/* Message of the last failed call on this thread; "" if none. Valid until the next call. */
const char* instinfer_last_error(void);

void instinfer_config_init(instinfer_config* config);
/* ssd: and csd: files are the cache's alone: created 0600, never opened through a symbolic link
 * (INSTINFER_E_INVALID_ARGUMENT), and locked while the cache lives, so a second cache on a file in
 * use, in this or another process, is INSTINFER_E_BUSY. */
instinfer_status instinfer_cache_create(const instinfer_config* config, instinfer_cache** out_cache);
/* Frees the cache and all its sequences; NULL is a no-op. ssd: and csd: remove the files the cache
 * created (not a file that was there before; keep=1 keeps them). */
void instinfer_cache_destroy(instinfer_cache* cache);
instinfer_status instinfer_cache_stats(instinfer_cache* cache, instinfer_stats* out_stats);
/* Since 0.6: the cache's configuration as it runs: the fields given at creation, with page_bytes
 * and capacity_bytes as the backend resolved them (0 given: the backend's choice; capacity in whole
 * chunks) and backend pointing at the cache's own copy of the URI (valid until the cache is
 * destroyed). Set out_config->struct_size first (sizeof, or an older size: no byte past it is
 * written). */
instinfer_status instinfer_cache_config(instinfer_cache* cache, instinfer_config* out_config);
/* ssd: writes every appended token to the device and syncs it. csd: the drives already hold them
 * (no flush command); checks that every drive answers. host, cuda: nothing to do. */
instinfer_status instinfer_cache_flush(instinfer_cache* cache);

instinfer_status instinfer_seq_create(instinfer_cache* cache, instinfer_seq* out_seq);
/* New sequence sharing all of src's tokens (full pages by reference, the partial tail copied). */
instinfer_status instinfer_seq_fork(instinfer_cache* cache, instinfer_seq src, instinfer_seq* out_seq);
instinfer_status instinfer_seq_free(instinfer_cache* cache, instinfer_seq seq);
/* Removes positions [p0, p1) from every layer; p1 = UINT64_MAX removes to the end. */
instinfer_status instinfer_seq_remove_range(instinfer_cache* cache, instinfer_seq seq, uint64_t p0, uint64_t p1);
instinfer_status instinfer_seq_length(instinfer_cache* cache, instinfer_seq seq, uint32_t layer,
                                      uint64_t* out_n_tokens);

/* Appends n_tokens K and V rows of one layer, [n_tokens][n_kv_heads][head_dim] of src_dtype
 * (F32, converted to the cache dtype; F16 or BF16 into a Q8_0 / Q4_0 cache, quantized; or
 * exactly the cache dtype). */
instinfer_status instinfer_append(instinfer_cache* cache, instinfer_seq seq, uint32_t layer, uint32_t n_tokens,
                                  const void* k, const void* v, instinfer_dtype src_dtype);

/* Decode attention of one layer for n_seq sequences: q and out [n_seq][n_q_heads][head_dim],
 * lse [n_seq][n_q_heads] or NULL. A sequence with no tokens yields zeros and lse = -inf.
 * out (or lse) may overlap q, e.g. out == q for in-place attention, on every backend; out and lse
 * must not overlap each other. */
instinfer_status instinfer_attend(instinfer_cache* cache, uint32_t layer, size_t n_seq, const instinfer_seq* seqs,
                                  const float* q, float* out, float* lse);

void instinfer_sparf_params_init(instinfer_sparf_params* params);
/* SparF decode attention (needs config.sparf = 1): shapes and aliasing as instinfer_attend. Reads
 * only the chosen column pages and the pages holding the selected tokens (on a CSD: inside the
 * drive). params NULL = the defaults. Bad parameters (r > head_dim, k > a sequence's tokens, compression
 * outside (0, 1]) are INSTINFER_E_INVALID_ARGUMENT. */
instinfer_status instinfer_attend_sparse(instinfer_cache* cache, uint32_t layer, size_t n_seq,
                                         const instinfer_seq* seqs, const float* q, float* out, float* lse,
                                         const instinfer_sparf_params* params);

/* Hint: layer `layer` of these sequences is attended next (storage backends start reading). */
instinfer_status instinfer_prefetch(instinfer_cache* cache, uint32_t layer, size_t n_seq, const instinfer_seq* seqs);

/* Exact merge of two partial attention results over disjoint token sets (e.g. a hot window in RAM
 * and cold pages on a CSD): each is (out [n_rows][head_dim], lse [n_rows]). out/out_lse may alias
 * an input. */
instinfer_status instinfer_merge_partials(size_t n_rows, uint32_t head_dim, const float* out_a, const float* lse_a,
                                          const float* out_b, const float* lse_b, float* out, float* out_lse);

/* ---- Since 0.3: prefill chunks, positions, sequence state, the caller's threads ---- */

/* Appends at an explicit position: pos must equal the layer's current length (a gap or an
 * overlap is INSTINFER_E_INVALID_ARGUMENT); otherwise as instinfer_append. */
instinfer_status instinfer_append_at(instinfer_cache* cache, instinfer_seq seq, uint32_t layer, uint64_t pos,
                                     uint32_t n_tokens, const void* k, const void* v, instinfer_dtype src_dtype);
/* New sequence sharing positions [0, pos) of src in every layer (pos <= every layer's length). */
instinfer_status instinfer_seq_fork_at(instinfer_cache* cache, instinfer_seq src, uint64_t pos, instinfer_seq* out_seq);

/* Causal chunk attention of one layer (prefill). Sequence i has n_rows[i] >= 1 query rows at
 * positions positions[i] .. positions[i] + n_rows[i] - 1, whose K/V are already appended; row j
 * attends tokens [0, positions[i] + j]. q, out: [sum n_rows][n_q_heads][head_dim] (sequences in
 * order; out or lse may overlap q, as in instinfer_attend); lse: [sum n_rows][n_q_heads] or NULL. Each K/V page is read
 * once per call and kv head for all rows. Host and ssd backends; others: INSTINFER_E_UNSUPPORTED. */
instinfer_status instinfer_attend_chunk(instinfer_cache* cache, uint32_t layer, size_t n_seq, const instinfer_seq* seqs,
                                        const uint32_t* positions, const uint32_t* n_rows, const float* q, float* out,
                                        float* lse);

/* Slice ith of nth of instinfer_attend / instinfer_attend_chunk (arguments as those, for the
 * whole batch), for an engine's threads (llama.cpp's ith/nth). The nth slices together write every
 * output, as one call does. On the host backend the slices of one call are one shared run: the
 * first to arrive plans the call for nth threads and every slice that arrives while it runs takes
 * work from it (one long sequence is split over the threads by tokens); no slice waits for another,
 * and a slice that arrives after its call's run ended returns at once if nothing changed since
 * (same arguments, no other call on the cache, query and output rows as the run left them), else
 * runs the call again. Call every slice of a call. The slice that ends the run returns its
 * outcome. Other backends: slice ith computes sequences [n_seq * ith / nth, n_seq * (ith + 1) / nth),
 * one slice at a time. Every slice checks the whole call (layer, every sequence), so all slices of
 * a rejected call return the same error. */
instinfer_status instinfer_attend_slice(instinfer_cache* cache, uint32_t layer, size_t n_seq, const instinfer_seq* seqs,
                                        const float* q, float* out, float* lse, uint32_t ith, uint32_t nth);
instinfer_status instinfer_attend_chunk_slice(instinfer_cache* cache, uint32_t layer, size_t n_seq,
                                              const instinfer_seq* seqs, const uint32_t* positions,
                                              const uint32_t* n_rows, const float* q, float* out, float* lse,
                                              uint32_t ith, uint32_t nth);

/* Sequence state: all layers of one sequence as a self-checking byte stream (magic, format
 * version, shape, per-layer lengths, K/V rows in the cache dtype, CRC32C), loadable into a cache of
 * the same shape on any backend. Truncated or corrupt input is INSTINFER_E_CORRUPT_DATA, another
 * shape INSTINFER_E_INVALID_ARGUMENT; a failed load leaves the cache unchanged. */
instinfer_status instinfer_seq_state_size(instinfer_cache* cache, instinfer_seq seq, size_t* out_size);
instinfer_status instinfer_seq_state_save(instinfer_cache* cache, instinfer_seq seq, void* buf, size_t buf_size,
                                          size_t* out_written);
instinfer_status instinfer_seq_state_load(instinfer_cache* cache, const void* buf, size_t size, instinfer_seq* out_seq);
instinfer_status instinfer_seq_state_save_file(instinfer_cache* cache, instinfer_seq seq, const char* path);
instinfer_status instinfer_seq_state_load_file(instinfer_cache* cache, const char* path, instinfer_seq* out_seq);

/* ---- Since 0.4: the content-addressed prefix cache ---- */

/* An in-process prefix cache over one cache (kv/prefix_cache.hpp): page groups of
 * tokens_per_group token ids keyed by a chained hash over a model fingerprint (the cache's shape,
 * dtype and page size, and model_id). Destroy it before its cache; instinfer_cache_destroy also
 * destroys the prefix caches still open on it (their handles are then invalid). */
typedef struct instinfer_prefix_cache instinfer_prefix_cache;

typedef struct instinfer_prefix_stats {
  uint32_t struct_size;      /* sizeof(instinfer_prefix_stats), set by the caller */
  uint64_t groups;           /* page groups indexed now (at most capacity_groups) */
  uint64_t capacity_groups;  /* the cap */
  uint64_t tokens_per_group; /* tokens of one page group */
  uint64_t held_sequences;   /* hidden sequences holding the groups' chunks */
  uint64_t lookups, hits, hit_tokens;
  uint64_t inserted_groups, evicted_groups;
  uint64_t host_bytes; /* host memory of the index */
} instinfer_prefix_stats;

/* capacity_groups >= 1 page groups are indexed at most (least recently used evicted first);
 * model_id: a NUL-terminated identity of the model (not NULL). */
instinfer_status instinfer_prefix_cache_create(instinfer_cache* cache, const char* model_id, uint64_t capacity_groups,
                                               instinfer_prefix_cache** out_prefix);
/* NULL is a no-op. Frees the hidden sequences; sequences returned by lookups stay the caller's. */
void instinfer_prefix_cache_destroy(instinfer_prefix_cache* prefix);
/* Index the full page groups of tokens[0, n_tokens) that seq holds in every layer. */
instinfer_status instinfer_prefix_insert(instinfer_prefix_cache* prefix, instinfer_seq seq, const int32_t* tokens,
                                         uint64_t n_tokens);
/* The longest indexed prefix of tokens[0, n_tokens): *out_n_tokens tokens (a multiple of
 * tokens_per_group; 0 on a miss), as a new sequence *out_seq sharing its chunks (0 on a miss). */
instinfer_status instinfer_prefix_lookup(instinfer_prefix_cache* prefix, const int32_t* tokens, uint64_t n_tokens,
                                         instinfer_seq* out_seq, uint64_t* out_n_tokens);
instinfer_status instinfer_prefix_cache_stats(instinfer_prefix_cache* prefix, instinfer_prefix_stats* out_stats);

/* ---- Since 0.5: named sequences, persistent stores ---- */

/* A cache on "ssd:PATH?persist=1" keeps its named sequences across processes (docs/persistence.md):
 * instinfer_cache_flush commits them, and a cache created later on the same path gets them back,
 * found by name. A name is a caller-chosen nonzero uint64_t, unique in the cache; 0 removes it. */
instinfer_status instinfer_seq_set_name(instinfer_cache* cache, instinfer_seq seq, uint64_t name);
/* The sequence named `name`: INSTINFER_E_UNKNOWN_SEQUENCE when none, INSTINFER_E_CORRUPT_DATA when
 * the store's record of it was damaged. */
instinfer_status instinfer_seq_find(instinfer_cache* cache, uint64_t name, instinfer_seq* out_seq);
/* Every named sequence, by name: the first min(capacity, count) pairs into names / seqs (either may
 * be NULL when capacity is 0), the count into *out_count. */
instinfer_status instinfer_seq_names(instinfer_cache* cache, uint64_t* names, instinfer_seq* seqs, size_t capacity,
                                     size_t* out_count);

/* ---- Since 0.7: SparF selection reuse (instinfer_sparf_params.reuse_*) ---- */

/* Checks SparF parameters for a cache of this head_dim without attending: INSTINFER_OK, or
 * INSTINFER_E_INVALID_ARGUMENT with the reason in instinfer_last_error(). What depends on a
 * sequence's length (k > its tokens) is checked when it is attended. */
instinfer_status instinfer_sparf_params_check(const instinfer_sparf_params* params, uint32_t head_dim);

/* ---- Since 0.8: SparF's split of the budget (instinfer_sparf_params.channel_share) ---- */

/* What SparF parameters choose for one sequence of n_tokens tokens in a cache of this head_dim:
 * *channels = r (the K channels asked for; whole column pages may round the channels read up),
 * *tokens = k (the tokens attended exactly, sinks and window included). n_tokens 0: both 0.
 * The page-summary policy's plan depends on the cache's pages: INSTINFER_E_UNSUPPORTED. Bad
 * parameters, or k > n_tokens: INSTINFER_E_INVALID_ARGUMENT, as instinfer_attend_sparse. */
instinfer_status instinfer_sparf_plan(const instinfer_sparf_params* params, uint32_t head_dim, uint32_t n_tokens,
                                      uint32_t* channels, uint32_t* tokens);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* INSTINFER_H */
