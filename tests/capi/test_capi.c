/* The C API from plain C11: a round trip (append, attend checked against a float64 reference
 * computed here from the same stored values) and every kind of bad input. */
#define _POSIX_C_SOURCE 200809L /* mkdtemp, symlink, lstat, umask */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sys/stat.h>
#include <unistd.h>

#include "instinfer/instinfer.h"

static int g_passed, g_failed;

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (cond) {                                                                \
      ++g_passed;                                                              \
    } else {                                                                   \
      ++g_failed;                                                              \
      fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
    }                                                                          \
  } while (0)

/* A failing call returns the expected code and leaves a message naming the problem. */
#define CHECK_ERR(call, code)                                                             \
  do {                                                                                    \
    instinfer_status s_ = (call);                                                         \
    CHECK(s_ == (code));                                                                  \
    CHECK(strlen(instinfer_last_error()) > 0);                                            \
    if (s_ != (code)) fprintf(stderr, "  got %d: %s\n", (int)s_, instinfer_last_error()); \
  } while (0)

enum { L = 2, HQ = 8, HKV = 2, D = 64, N = 300 };

static uint64_t rng_state = 0x1234567887654321ull;
static float frand(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return (float)((double)(rng_state >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static void test_round_trip(void) {
  instinfer_config cfg;
  instinfer_config_init(&cfg);
  cfg.n_layers = L;
  cfg.n_q_heads = HQ;
  cfg.n_kv_heads = HKV;
  cfg.head_dim = D;
  cfg.kv_dtype = INSTINFER_DTYPE_F32;
  cfg.page_bytes = 4096;
  cfg.capacity_bytes = 8u << 20;
  cfg.n_threads = 2;
  instinfer_cache* cache = NULL;
  CHECK(instinfer_cache_create(&cfg, &cache) == INSTINFER_OK);
  if (!cache) return;

  instinfer_seq seq = 0;
  CHECK(instinfer_seq_create(cache, &seq) == INSTINFER_OK);
  float* k = malloc(sizeof(float) * N * HKV * D);
  float* v = malloc(sizeof(float) * N * HKV * D);
  float q[HQ * D], out[HQ * D], lse[HQ];
  for (int i = 0; i < N * HKV * D; ++i) {
    k[i] = frand();
    v[i] = frand();
  }
  for (int i = 0; i < HQ * D; ++i) q[i] = frand();
  /* Two appends that straddle a page boundary. */
  CHECK(instinfer_append(cache, seq, 1, 100, k, v, INSTINFER_DTYPE_F32) == INSTINFER_OK);
  CHECK(instinfer_append(cache, seq, 1, N - 100, k + 100 * HKV * D, v + 100 * HKV * D, INSTINFER_DTYPE_F32) ==
        INSTINFER_OK);
  uint64_t n = 0;
  CHECK(instinfer_seq_length(cache, seq, 1, &n) == INSTINFER_OK && n == N);
  CHECK(instinfer_attend(cache, 1, 1, &seq, q, out, lse) == INSTINFER_OK);

  double max_rel = 0.0;
  for (int h = 0; h < HQ; ++h) {
    const int kvh = h / (HQ / HKV);
    double s[N], m = -INFINITY, sum = 0.0;
    for (int t = 0; t < N; ++t) {
      double dot = 0.0;
      for (int d = 0; d < D; ++d) dot += (double)q[h * D + d] * k[(t * HKV + kvh) * D + d];
      s[t] = dot / sqrt((double)D);
      if (s[t] > m) m = s[t];
    }
    for (int t = 0; t < N; ++t) sum += exp(s[t] - m);
    double num = 0.0, den = 0.0;
    for (int d = 0; d < D; ++d) {
      double o = 0.0;
      for (int t = 0; t < N; ++t) o += exp(s[t] - m) / sum * v[(t * HKV + kvh) * D + d];
      num += (o - out[h * D + d]) * (o - out[h * D + d]);
      den += o * o;
    }
    const double rel = sqrt(num / den);
    if (rel > max_rel) max_rel = rel;
    CHECK(fabs((m + log(sum)) - lse[h]) < 1e-4 * fabs(m + log(sum)) + 1e-5);
  }
  printf("C API attend vs float64 reference: max relative error %.3g\n", max_rel);
  CHECK(max_rel <= 1e-5);

  /* Fork, stats, merge of two partials. */
  instinfer_seq child = 0;
  CHECK(instinfer_seq_fork(cache, seq, &child) == INSTINFER_OK);
  instinfer_stats st;
  memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  CHECK(instinfer_cache_stats(cache, &st) == INSTINFER_OK);
  CHECK(st.n_sequences == 2 && st.shared_chunks > 0);
  float merged[HQ * D], merged_lse[HQ];
  CHECK(instinfer_merge_partials(HQ, D, out, lse, out, lse, merged, merged_lse) == INSTINFER_OK);
  CHECK(fabsf(merged[5] - out[5]) < 1e-6f && fabsf(merged_lse[0] - (lse[0] + logf(2.0f))) < 1e-5f);
  CHECK(instinfer_seq_remove_range(cache, child, 10, UINT64_MAX) == INSTINFER_OK);
  CHECK(instinfer_seq_length(cache, child, 1, &n) == INSTINFER_OK && n == 10);
  CHECK(instinfer_seq_free(cache, child) == INSTINFER_OK);
  CHECK(instinfer_cache_flush(cache) == INSTINFER_OK);

  /* Bad inputs on a live cache. */
  CHECK_ERR(instinfer_append(cache, 4242, 0, 1, k, v, INSTINFER_DTYPE_F32), INSTINFER_E_UNKNOWN_SEQUENCE);
  CHECK_ERR(instinfer_append(cache, seq, L, 1, k, v, INSTINFER_DTYPE_F32), INSTINFER_E_LAYER_OUT_OF_RANGE);
  CHECK_ERR(instinfer_append(cache, seq, 0, 1, NULL, v, INSTINFER_DTYPE_F32), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_append(cache, seq, 0, 0, k, v, INSTINFER_DTYPE_F32), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_append(cache, seq, 0, UINT32_MAX, k, v, INSTINFER_DTYPE_F32), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_append(cache, seq, 0, 1, k, v, (instinfer_dtype)17), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_append(cache, seq, 0, 100000, k, v, INSTINFER_DTYPE_F32), INSTINFER_E_OUT_OF_PAGES);
  CHECK_ERR(instinfer_attend(cache, 0, 0, &seq, q, out, NULL), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend(cache, 0, SIZE_MAX, &seq, q, out, NULL), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend(cache, 0, 1, NULL, q, out, NULL), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend(cache, 0, 1, &seq, NULL, out, NULL), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend(cache, 0, 1, &seq, q, NULL, NULL), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend(cache, 9, 1, &seq, q, out, NULL), INSTINFER_E_LAYER_OUT_OF_RANGE);
  instinfer_seq unknown = 777;
  CHECK_ERR(instinfer_attend(cache, 0, 1, &unknown, q, out, NULL), INSTINFER_E_UNKNOWN_SEQUENCE);
  CHECK_ERR(instinfer_seq_fork(cache, unknown, &child), INSTINFER_E_UNKNOWN_SEQUENCE);
  CHECK_ERR(instinfer_seq_fork(cache, seq, NULL), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_seq_free(cache, unknown), INSTINFER_E_UNKNOWN_SEQUENCE);
  CHECK_ERR(instinfer_seq_remove_range(cache, seq, 5, 2), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_seq_length(cache, seq, 0, NULL), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_seq_create(cache, NULL), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_prefetch(cache, 0, 0, &seq), INSTINFER_E_INVALID_ARGUMENT);
  st.struct_size = 3;
  CHECK_ERR(instinfer_cache_stats(cache, &st), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_merge_partials(0, D, out, lse, out, lse, merged, merged_lse), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_merge_partials(HQ, D, NULL, lse, out, lse, merged, merged_lse), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_merge_partials(SIZE_MAX / 2, D, out, lse, out, lse, merged, merged_lse),
            INSTINFER_E_INVALID_ARGUMENT);
  /* The sequence survived all of that. */
  CHECK(instinfer_seq_length(cache, seq, 1, &n) == INSTINFER_OK && n == N);
  free(k);
  free(v);
  instinfer_cache_destroy(cache);
}

static void test_bad_configs(void) {
  instinfer_cache* cache = (instinfer_cache*)0x1;
  instinfer_config cfg;
  CHECK_ERR(instinfer_cache_create(NULL, &cache), INSTINFER_E_INVALID_ARGUMENT);
  CHECK(cache == NULL);
  instinfer_config_init(&cfg);
  cfg.n_layers = 1;
  cfg.n_q_heads = 4;
  cfg.n_kv_heads = 4;
  cfg.head_dim = 128;
  cfg.capacity_bytes = 1 << 20;
  CHECK_ERR(instinfer_cache_create(&cfg, NULL), INSTINFER_E_INVALID_ARGUMENT);

  instinfer_config bad = cfg;
  bad.struct_size = 0;
  CHECK_ERR(instinfer_cache_create(&bad, &cache), INSTINFER_E_INVALID_ARGUMENT);
  bad = cfg;
  bad.head_dim = 100;
  CHECK_ERR(instinfer_cache_create(&bad, &cache), INSTINFER_E_UNSUPPORTED);
  bad = cfg;
  bad.n_q_heads = 6;
  CHECK_ERR(instinfer_cache_create(&bad, &cache), INSTINFER_E_INVALID_ARGUMENT);
  bad = cfg;
  bad.n_layers = 0;
  CHECK_ERR(instinfer_cache_create(&bad, &cache), INSTINFER_E_INVALID_ARGUMENT);
  bad = cfg;
  bad.n_layers = UINT32_MAX;
  CHECK_ERR(instinfer_cache_create(&bad, &cache), INSTINFER_E_INVALID_ARGUMENT);
  bad = cfg;
  bad.page_bytes = 1000;
  CHECK_ERR(instinfer_cache_create(&bad, &cache), INSTINFER_E_INVALID_ARGUMENT);
  bad = cfg;
  bad.kv_dtype = (instinfer_dtype)5;
  CHECK_ERR(instinfer_cache_create(&bad, &cache), INSTINFER_E_INVALID_ARGUMENT);
  bad = cfg;
  bad.scale = -1.0f;
  CHECK_ERR(instinfer_cache_create(&bad, &cache), INSTINFER_E_INVALID_ARGUMENT);
  bad = cfg;
  bad.capacity_bytes = 100; /* smaller than one chunk */
  CHECK_ERR(instinfer_cache_create(&bad, &cache), INSTINFER_E_INVALID_ARGUMENT);
  CHECK(strncmp(instinfer_last_error(), "host: ", 6) == 0); /* names the backend that refused */
  bad = cfg;
  bad.page_bytes = 131072;
  CHECK_ERR(instinfer_cache_create(&bad, &cache), INSTINFER_E_INVALID_ARGUMENT);
  CHECK(strncmp(instinfer_last_error(), "host: ", 6) == 0);
  const char* uris[] = {"", "::", "Host", "host:/x", "host:?x=1", "tape:0", "ssd:/x?queue_depth=banana"};
  for (size_t i = 0; i < sizeof uris / sizeof uris[0]; ++i) {
    bad = cfg;
    bad.backend = uris[i];
    instinfer_status s = instinfer_cache_create(&bad, &cache);
    CHECK(s != INSTINFER_OK);
    CHECK(cache == NULL);
    CHECK(strlen(instinfer_last_error()) > 0);
  }
  /* NULL handles. */
  instinfer_seq seq;
  CHECK_ERR(instinfer_seq_create(NULL, &seq), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend(NULL, 0, 1, &seq, NULL, NULL, NULL), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_cache_flush(NULL), INSTINFER_E_INVALID_ARGUMENT);
  instinfer_cache_destroy(NULL);
  CHECK(strcmp(instinfer_status_name(INSTINFER_E_OUT_OF_PAGES), "out of KV pages") == 0);
  CHECK(strcmp(instinfer_status_name(12345), "unknown status") == 0);
  CHECK(instinfer_version() ==
        INSTINFER_VERSION_MAJOR * 10000 + INSTINFER_VERSION_MINOR * 100 + INSTINFER_VERSION_PATCH);
#ifdef INSTINFER_TEST_PROJECT_VERSION
  /* The library's version is project()'s (one number: tests/capi/check_version.cmake). */
  CHECK(instinfer_version() == INSTINFER_TEST_PROJECT_VERSION);
#endif
}

/* SparF through the C API: compression 1 equals dense attend; 1/8 reads fewer pages than dense;
 * bad parameters and a cache without SparF are clear errors; a 0.1-sized config still works. */
static void test_sparf(void) {
  instinfer_config cfg;
  instinfer_config_init(&cfg);
  CHECK(cfg.sparf == 0 && cfg.sparf_channels_per_page == 0);
  cfg.n_layers = 1;
  cfg.n_q_heads = HQ;
  cfg.n_kv_heads = HKV;
  cfg.head_dim = D;
  cfg.kv_dtype = INSTINFER_DTYPE_F16;
  cfg.page_bytes = 4096;
  cfg.capacity_bytes = 8u << 20;
  cfg.n_threads = 1;
  cfg.sparf = 1;
  instinfer_cache* cache = NULL;
  CHECK(instinfer_cache_create(&cfg, &cache) == INSTINFER_OK);
  if (!cache) return;
  enum { NS = 2000 };
  float* k = malloc(sizeof(float) * NS * HKV * D);
  float* v = malloc(sizeof(float) * NS * HKV * D);
  float q[HQ * D], dense[HQ * D], sparse[HQ * D], lse_d[HQ], lse_s[HQ];
  for (int i = 0; i < NS * HKV * D; ++i) {
    k[i] = frand();
    v[i] = frand();
  }
  for (int i = 0; i < HQ * D; ++i) q[i] = 3.0f * frand();
  instinfer_seq seq = 0;
  CHECK(instinfer_seq_create(cache, &seq) == INSTINFER_OK);
  CHECK(instinfer_append(cache, seq, 0, NS, k, v, INSTINFER_DTYPE_F32) == INSTINFER_OK);
  CHECK(instinfer_attend(cache, 0, 1, &seq, q, dense, lse_d) == INSTINFER_OK);

  instinfer_sparf_params p;
  instinfer_sparf_params_init(&p);
  CHECK(p.compression == 0.125 && p.whole_pages == 1 && p.page_spread == 2.0 && p.r == 0 && p.k == 0);
  p.compression = 1.0;
  CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, lse_s, &p) == INSTINFER_OK);
  double num = 0.0, den = 0.0;
  for (int i = 0; i < HQ * D; ++i) {
    num += ((double)sparse[i] - dense[i]) * ((double)sparse[i] - dense[i]);
    den += (double)dense[i] * dense[i];
  }
  printf("C API SparF at compression 1 vs dense: relative error %.3g\n", sqrt(num / den));
  CHECK(sqrt(num / den) <= 1e-5);
  for (int h = 0; h < HQ; ++h) CHECK(fabsf(lse_s[h] - lse_d[h]) <= 1e-4f * fabsf(lse_d[h]) + 1e-5f);

  instinfer_stats st;
  memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  CHECK(instinfer_cache_stats(cache, &st) == INSTINFER_OK);
  const uint64_t pages1 = st.sparf_pages_read, dense1 = st.sparf_dense_pages;
  CHECK(pages1 == dense1 && dense1 > 0);
  CHECK(st.sparf_column_bytes > 0); /* host backend: the copy is in memory */
  CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, NULL) == INSTINFER_OK); /* defaults: 1/8 */
  for (int i = 0; i < HQ * D; ++i) CHECK(isfinite(sparse[i]));
  CHECK(instinfer_cache_stats(cache, &st) == INSTINFER_OK);
  CHECK((st.sparf_pages_read - pages1) * 4 <= st.sparf_dense_pages - dense1);

  /* Since 0.4: sinks + window. Covering the whole sequence, SparF at 1/8 is dense attention. */
  instinfer_sparf_params ends;
  instinfer_sparf_params_init(&ends);
  CHECK(ends.sink_tokens == 16 && ends.window_tokens == 64);
  ends.sink_tokens = NS / 2;
  ends.window_tokens = NS - NS / 2;
  CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, lse_s, &ends) == INSTINFER_OK);
  num = den = 0.0;
  for (int i = 0; i < HQ * D; ++i) {
    num += ((double)sparse[i] - dense[i]) * ((double)sparse[i] - dense[i]);
    den += (double)dense[i] * dense[i];
  }
  CHECK(sqrt(num / den) <= 1e-5);
  /* A 0.2/0.3 caller's shorter struct is accepted and gets the default sinks and window. */
  float sparse_old[HQ * D], sparse_new[HQ * D];
  instinfer_sparf_params older;
  instinfer_sparf_params_init(&older);
  older.struct_size = (uint32_t)offsetof(instinfer_sparf_params, sink_tokens);
  older.sink_tokens = NS; /* beyond the old struct: must be ignored */
  CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse_old, NULL, &older) == INSTINFER_OK);
  CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse_new, NULL, NULL) == INSTINFER_OK);
  CHECK(memcmp(sparse_old, sparse_new, sizeof sparse_old) == 0);
  older.struct_size = (uint32_t)offsetof(instinfer_sparf_params, sink_tokens) + 4; /* neither size */
  CHECK_ERR(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, &older), INSTINFER_E_INVALID_ARGUMENT);

  /* Since 0.7: selection reuse. The same queries again: the kept selection, the same output,
   * counted in sparf_reused_selections. A 0.5 / 0.6 caller's struct (which ends with policy) means
   * no reuse, and a call without reuse drops the kept selection. */
  {
    typedef struct { /* instinfer_sparf_params as 0.5 / 0.6 laid it out */
      uint32_t struct_size, r, k, whole_pages;
      double compression, page_spread;
      uint32_t sink_tokens, window_tokens, policy;
    } sparf_params_v06;
    instinfer_sparf_params reuse;
    instinfer_sparf_params_init(&reuse);
    CHECK(reuse.reuse_min_cosine == 0.0f && reuse.reuse_max_steps == 8);
    CHECK(instinfer_sparf_params_check(&reuse, D) == INSTINFER_OK);
    reuse.reuse_min_cosine = 0.8f;
    CHECK(instinfer_sparf_params_check(&reuse, D) == INSTINFER_OK);
    float first[HQ * D], again[HQ * D];
    CHECK(instinfer_cache_stats(cache, &st) == INSTINFER_OK);
    const uint64_t reused0 = st.sparf_reused_selections;
    CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, first, NULL, &reuse) == INSTINFER_OK);
    CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, again, NULL, &reuse) == INSTINFER_OK);
    CHECK(memcmp(first, again, sizeof first) == 0);
    CHECK(instinfer_cache_stats(cache, &st) == INSTINFER_OK);
    CHECK(st.sparf_reused_selections == reused0 + 1);
    instinfer_sparf_params v06 = reuse;
    v06.struct_size = (uint32_t)sizeof(sparf_params_v06);
    CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, again, NULL, &v06) == INSTINFER_OK);
    CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, again, NULL, &reuse) == INSTINFER_OK);
    CHECK(instinfer_cache_stats(cache, &st) == INSTINFER_OK);
    CHECK(st.sparf_reused_selections == reused0 + 1); /* both selected afresh */
    /* A 0.5 / 0.6 stats struct: no byte past it is written. */
    unsigned char raw[sizeof(instinfer_stats)];
    memset(raw, 0xa5, sizeof raw);
    instinfer_stats* st06 = (instinfer_stats*)(void*)raw;
    st06->struct_size = (uint32_t)offsetof(instinfer_stats, sparf_reused_selections);
    CHECK(instinfer_cache_stats(cache, st06) == INSTINFER_OK);
    for (size_t i = offsetof(instinfer_stats, sparf_reused_selections); i < sizeof raw; ++i) CHECK(raw[i] == 0xa5);
    /* Refusals, from the attend and from the check alike. */
    instinfer_sparf_params wrong = reuse;
    wrong.reuse_min_cosine = 1.5f;
    CHECK_ERR(instinfer_attend_sparse(cache, 0, 1, &seq, q, again, NULL, &wrong), INSTINFER_E_INVALID_ARGUMENT);
    CHECK_ERR(instinfer_sparf_params_check(&wrong, D), INSTINFER_E_INVALID_ARGUMENT);
    CHECK(strstr(instinfer_last_error(), "reuse_min_cosine") != NULL);
    wrong = reuse;
    wrong.reuse_max_steps = 0;
    CHECK_ERR(instinfer_sparf_params_check(&wrong, D), INSTINFER_E_INVALID_ARGUMENT);
    wrong = reuse;
    wrong.policy = INSTINFER_SPARSE_PAGE_SUMMARY;
    CHECK_ERR(instinfer_sparf_params_check(&wrong, D), INSTINFER_E_INVALID_ARGUMENT);
    wrong = reuse;
    wrong.compression = 0.0;
    CHECK_ERR(instinfer_sparf_params_check(&wrong, D), INSTINFER_E_INVALID_ARGUMENT);
    CHECK_ERR(instinfer_sparf_params_check(&reuse, 100), INSTINFER_E_INVALID_ARGUMENT);
    CHECK_ERR(instinfer_sparf_params_check(NULL, D), INSTINFER_E_INVALID_ARGUMENT);
    wrong = reuse;
    wrong.struct_size = 3;
    CHECK_ERR(instinfer_sparf_params_check(&wrong, D), INSTINFER_E_INVALID_ARGUMENT);
  }

  /* Since 0.8: SparF's channel share. The plan follows r = ceil(2 S c d), k = ceil((1 - S) c n);
   * another share selects differently; a 0.7 caller's struct, and 0, mean the default (0.5). */
  {
    instinfer_sparf_params sh;
    instinfer_sparf_params_init(&sh);
    CHECK(sh.channel_share == 0.5);
    sh.compression = 0.25;
    sh.sink_tokens = 0;
    sh.window_tokens = 0;
    uint32_t r = 0, kk = 0;
    CHECK(instinfer_sparf_plan(&sh, D, NS, &r, &kk) == INSTINFER_OK);
    CHECK(r == (uint32_t)ceil(0.25 * D) && kk == (uint32_t)ceil(0.25 * NS / 2.0));
    const double shares[] = {0.25, 0.125, 0.75};
    for (int i = 0; i < 3; ++i) {
      sh.channel_share = shares[i];
      CHECK(instinfer_sparf_plan(&sh, D, NS, &r, &kk) == INSTINFER_OK);
      CHECK(r == (uint32_t)ceil(2.0 * shares[i] * 0.25 * D));
      CHECK(kk == (uint32_t)ceil((1.0 - shares[i]) * 0.25 * NS));
    }
    instinfer_sparf_params_init(&sh);
    sh.sink_tokens = 500; /* sinks and window count toward k */
    CHECK(instinfer_sparf_plan(&sh, D, NS, &r, &kk) == INSTINFER_OK);
    CHECK(kk == 500 + 64);
    CHECK(instinfer_sparf_plan(&sh, D, 0, &r, &kk) == INSTINFER_OK);
    CHECK(r == 0 && kk == 0);

    float even[HQ * D], quarter[HQ * D], v07_out[HQ * D], zero_out[HQ * D];
    instinfer_sparf_params_init(&sh);
    CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, even, NULL, &sh) == INSTINFER_OK);
    sh.channel_share = 0.25;
    CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, quarter, NULL, &sh) == INSTINFER_OK);
    CHECK(memcmp(even, quarter, sizeof even) != 0);
    num = den = 0.0;
    for (int i = 0; i < HQ * D; ++i) {
      CHECK(isfinite(quarter[i]));
      num += ((double)quarter[i] - dense[i]) * ((double)quarter[i] - dense[i]);
      den += (double)dense[i] * dense[i];
    }
    printf("C API SparF at 1/8, channel share 0.25 vs dense: relative error %.3g\n", sqrt(num / den));
    sh.struct_size = (uint32_t)offsetof(instinfer_sparf_params, channel_share); /* 0.7: share ignored */
    CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, v07_out, NULL, &sh) == INSTINFER_OK);
    CHECK(memcmp(even, v07_out, sizeof even) == 0);
    instinfer_sparf_params_init(&sh);
    sh.channel_share = 0.0;
    CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, zero_out, NULL, &sh) == INSTINFER_OK);
    CHECK(memcmp(even, zero_out, sizeof even) == 0);

    const double bad_shares[] = {1.0, -0.25, 1.5, NAN};
    for (int i = 0; i < 4; ++i) {
      sh.channel_share = bad_shares[i];
      CHECK_ERR(instinfer_attend_sparse(cache, 0, 1, &seq, q, quarter, NULL, &sh), INSTINFER_E_INVALID_ARGUMENT);
      CHECK(strstr(instinfer_last_error(), "channel_share") != NULL);
      CHECK_ERR(instinfer_sparf_params_check(&sh, D), INSTINFER_E_INVALID_ARGUMENT);
      CHECK_ERR(instinfer_sparf_plan(&sh, D, NS, &r, &kk), INSTINFER_E_INVALID_ARGUMENT);
    }
    instinfer_sparf_params_init(&sh);
    sh.r = 8;
    sh.k = NS + 1; /* more tokens than the sequence holds */
    CHECK_ERR(instinfer_sparf_plan(&sh, D, NS, &r, &kk), INSTINFER_E_INVALID_ARGUMENT);
    sh.k = 100;
    CHECK(instinfer_sparf_plan(&sh, D, NS, &r, &kk) == INSTINFER_OK);
    CHECK(r == 8 && kk == 100);
    CHECK_ERR(instinfer_sparf_plan(&sh, 100, NS, &r, &kk), INSTINFER_E_INVALID_ARGUMENT);
    CHECK_ERR(instinfer_sparf_plan(&sh, D, NS, NULL, &kk), INSTINFER_E_INVALID_ARGUMENT);
    CHECK_ERR(instinfer_sparf_plan(NULL, D, NS, &r, &kk), INSTINFER_E_INVALID_ARGUMENT);
    sh.policy = INSTINFER_SPARSE_PAGE_SUMMARY;
    CHECK_ERR(instinfer_sparf_plan(&sh, D, NS, &r, &kk), INSTINFER_E_UNSUPPORTED);
  }

  /* Bad parameters. */
  instinfer_sparf_params bad;
  instinfer_sparf_params_init(&bad);
  bad.compression = 0.0;
  CHECK_ERR(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, &bad), INSTINFER_E_INVALID_ARGUMENT);
  bad.compression = 1.5;
  CHECK_ERR(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, &bad), INSTINFER_E_INVALID_ARGUMENT);
  instinfer_sparf_params_init(&bad);
  bad.r = 8; /* k missing */
  CHECK_ERR(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, &bad), INSTINFER_E_INVALID_ARGUMENT);
  bad.k = NS + 1; /* more tokens than the sequence holds */
  CHECK_ERR(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, &bad), INSTINFER_E_INVALID_ARGUMENT);
  bad.r = D + 1;
  bad.k = 10;
  CHECK_ERR(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, &bad), INSTINFER_E_INVALID_ARGUMENT);
  instinfer_sparf_params_init(&bad);
  bad.struct_size = 3;
  CHECK_ERR(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, &bad), INSTINFER_E_INVALID_ARGUMENT);
  instinfer_sparf_params_init(&bad);
  bad.whole_pages = 7;
  CHECK_ERR(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, &bad), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend_sparse(cache, 1, 1, &seq, q, sparse, NULL, NULL), INSTINFER_E_LAYER_OUT_OF_RANGE);
  CHECK_ERR(instinfer_attend_sparse(cache, 0, 1, &seq, NULL, sparse, NULL, NULL), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend_sparse(NULL, 0, 1, &seq, q, sparse, NULL, NULL), INSTINFER_E_INVALID_ARGUMENT);
  /* The cache still serves after the refusals. */
  CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, NULL) == INSTINFER_OK);
  instinfer_cache_destroy(cache);

  /* Since 0.5: page summaries, chosen per call. This cache kept none: unsupported; a bad policy is
   * refused before that. */
  instinfer_sparf_params pp;
  instinfer_sparf_params_init(&pp);
  CHECK(pp.policy == INSTINFER_SPARSE_SPARF);
  pp.policy = INSTINFER_SPARSE_PAGE_SUMMARY;
  CHECK(instinfer_cache_create(&cfg, &cache) == INSTINFER_OK);
  if (cache) {
    CHECK(instinfer_seq_create(cache, &seq) == INSTINFER_OK);
    CHECK(instinfer_append(cache, seq, 0, NS, k, v, INSTINFER_DTYPE_F32) == INSTINFER_OK);
    CHECK_ERR(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, &pp), INSTINFER_E_UNSUPPORTED);
    instinfer_cache_destroy(cache);
  }
  cfg.page_summaries = 1; /* both policies */
  CHECK(instinfer_cache_create(&cfg, &cache) == INSTINFER_OK);
  if (cache) {
    CHECK(instinfer_seq_create(cache, &seq) == INSTINFER_OK);
    CHECK(instinfer_append(cache, seq, 0, NS, k, v, INSTINFER_DTYPE_F32) == INSTINFER_OK);
    pp.compression = 1.0; /* every group: dense */
    CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, lse_s, &pp) == INSTINFER_OK);
    num = den = 0.0;
    for (int i = 0; i < HQ * D; ++i) {
      num += ((double)sparse[i] - dense[i]) * ((double)sparse[i] - dense[i]);
      den += (double)dense[i] * dense[i];
    }
    printf("C API page summaries at budget 1 vs dense: relative error %.3g\n", sqrt(num / den));
    CHECK(sqrt(num / den) <= 1e-5);
    pp.compression = 0.25;
    CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, &pp) == INSTINFER_OK);
    for (int i = 0; i < HQ * D; ++i) CHECK(isfinite(sparse[i]));
    CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, NULL) == INSTINFER_OK); /* SparF too */
    instinfer_stats ps;
    memset(&ps, 0, sizeof ps);
    ps.struct_size = sizeof ps;
    CHECK(instinfer_cache_stats(cache, &ps) == INSTINFER_OK);
    CHECK(ps.page_summary_bytes > 0 && ps.sparf_column_bytes > 0);
    /* A 0.4 caller's stats struct: accepted, the new field untouched. */
    ps.struct_size = (uint32_t)offsetof(instinfer_stats, page_summary_bytes);
    ps.page_summary_bytes = 12345;
    CHECK(instinfer_cache_stats(cache, &ps) == INSTINFER_OK);
    CHECK(ps.page_summary_bytes == 12345 && ps.sparf_column_bytes > 0);
    /* A 0.4 caller's params struct: SparF whatever lies beyond it. */
    instinfer_sparf_params p04;
    instinfer_sparf_params_init(&p04);
    p04.struct_size = (uint32_t)offsetof(instinfer_sparf_params, policy);
    p04.policy = 77;
    CHECK(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, &p04) == INSTINFER_OK);
    pp.policy = 2;
    CHECK_ERR(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, &pp), INSTINFER_E_INVALID_ARGUMENT);
    instinfer_cache_destroy(cache);
  }
  cfg.page_summaries = 2;
  CHECK_ERR(instinfer_cache_create(&cfg, &cache), INSTINFER_E_INVALID_ARGUMENT);
  /* A 0.4 caller's config: accepted, no page summaries whatever lies beyond it. */
  cfg.struct_size = (uint32_t)offsetof(instinfer_config, page_summaries);
  CHECK(instinfer_cache_create(&cfg, &cache) == INSTINFER_OK);
  if (cache) {
    CHECK(instinfer_seq_create(cache, &seq) == INSTINFER_OK);
    CHECK(instinfer_append(cache, seq, 0, 100, k, v, INSTINFER_DTYPE_F32) == INSTINFER_OK);
    pp.policy = INSTINFER_SPARSE_PAGE_SUMMARY;
    CHECK_ERR(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, &pp), INSTINFER_E_UNSUPPORTED);
    instinfer_cache_destroy(cache);
  }
  cfg.struct_size = sizeof cfg;
  cfg.page_summaries = 0;

  /* Without SparF: unsupported. A config of the 0.1 size (no SparF fields) is still accepted. */
  cfg.sparf = 0;
  CHECK(instinfer_cache_create(&cfg, &cache) == INSTINFER_OK);
  if (cache) {
    CHECK(instinfer_seq_create(cache, &seq) == INSTINFER_OK);
    CHECK(instinfer_append(cache, seq, 0, 100, k, v, INSTINFER_DTYPE_F32) == INSTINFER_OK);
    CHECK_ERR(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, NULL), INSTINFER_E_UNSUPPORTED);
    instinfer_cache_destroy(cache);
  }
  cfg.sparf = 2;
  CHECK_ERR(instinfer_cache_create(&cfg, &cache), INSTINFER_E_INVALID_ARGUMENT);
  cfg.sparf = 1;
  cfg.struct_size = (uint32_t)offsetof(instinfer_config, sparf);
  CHECK(instinfer_cache_create(&cfg, &cache) == INSTINFER_OK);
  if (cache) {
    CHECK(instinfer_seq_create(cache, &seq) == INSTINFER_OK);
    CHECK(instinfer_append(cache, seq, 0, 100, k, v, INSTINFER_DTYPE_F32) == INSTINFER_OK);
    /* the old-size config carries no SparF fields: SparF is off */
    CHECK_ERR(instinfer_attend_sparse(cache, 0, 1, &seq, q, sparse, NULL, NULL), INSTINFER_E_UNSUPPORTED);
    instinfer_cache_destroy(cache);
  }
  free(k);
  free(v);
}

/* Issue 17.1: an append that cannot fit is refused before any row is read. The buffers are exactly
 * 1 MiB while the call claims 1<<20 tokens (far more): converting F32 rows first used to read far
 * past them (SIGSEGV, or an ASan over-read) where F16 rows returned OUT_OF_PAGES. */
static void test_append_checks_capacity_before_reading(void) {
  instinfer_config cfg;
  instinfer_config_init(&cfg);
  cfg.n_layers = 1;
  cfg.n_q_heads = 2;
  cfg.n_kv_heads = 1;
  cfg.head_dim = 64;
  cfg.kv_dtype = INSTINFER_DTYPE_F16;
  cfg.page_bytes = 4096;
  cfg.capacity_bytes = 1u << 20;
  instinfer_cache* cache = NULL;
  CHECK(instinfer_cache_create(&cfg, &cache) == INSTINFER_OK);
  if (!cache) return;
  instinfer_seq seq = 0;
  CHECK(instinfer_seq_create(cache, &seq) == INSTINFER_OK);
  const size_t bytes = (size_t)1 << 20;
  void* k = malloc(bytes);
  void* v = malloc(bytes);
  CHECK(k && v);
  if (k && v) {
    memset(k, 0, bytes);
    memset(v, 0, bytes);
    CHECK_ERR(instinfer_append(cache, seq, 0, 1u << 20, k, v, INSTINFER_DTYPE_F32), INSTINFER_E_OUT_OF_PAGES);
    CHECK_ERR(instinfer_append(cache, seq, 0, 1u << 20, k, v, INSTINFER_DTYPE_F16), INSTINFER_E_OUT_OF_PAGES);
    uint64_t n = 1;
    CHECK(instinfer_seq_length(cache, seq, 0, &n) == INSTINFER_OK && n == 0);
    /* What fits still goes in: 1 MiB of F32 rows is 4096 tokens, 128 KiB of F16 storage. */
    CHECK(instinfer_append(cache, seq, 0, (uint32_t)(bytes / (sizeof(float) * 64)), k, v, INSTINFER_DTYPE_F32) ==
          INSTINFER_OK);
  }
  free(k);
  free(v);
  instinfer_cache_destroy(cache);
}

/* 0.3: append at positions, a causal chunk against a float64 reference (each row = decode of
 * that query over its prefix), fork at a position, sequence state, slices, and the bad inputs. */
static void reference_row(const float* k, const float* v, int n, const float* q, double* out) {
  /* one query [HQ][D] over the first n tokens of [N][HKV][D] rows, f32 cache */
  const double scale = 1.0 / sqrt((double)D);
  for (int h = 0; h < HQ; ++h) {
    const int kvh = h / (HQ / HKV);
    double m = -INFINITY, sum = 0.0;
    double* logits = malloc(sizeof(double) * (size_t)n);
    for (int t = 0; t < n; ++t) {
      double dot = 0.0;
      for (int d = 0; d < D; ++d) dot += (double)q[h * D + d] * k[(t * HKV + kvh) * D + d];
      logits[t] = dot * scale;
      if (logits[t] > m) m = logits[t];
    }
    for (int d = 0; d < D; ++d) out[h * D + d] = 0.0;
    for (int t = 0; t < n; ++t) {
      const double p = exp(logits[t] - m);
      sum += p;
      for (int d = 0; d < D; ++d) out[h * D + d] += p * v[(t * HKV + kvh) * D + d];
    }
    for (int d = 0; d < D; ++d) out[h * D + d] /= sum;
    free(logits);
  }
}

static void test_v03(void) {
  instinfer_config cfg;
  instinfer_config_init(&cfg);
  CHECK(cfg.caller_threads == 0);
  cfg.n_layers = L;
  cfg.n_q_heads = HQ;
  cfg.n_kv_heads = HKV;
  cfg.head_dim = D;
  cfg.kv_dtype = INSTINFER_DTYPE_F32;
  cfg.page_bytes = 4096; /* 8 tokens per page */
  cfg.capacity_bytes = 8u << 20;
  cfg.caller_threads = 1;
  instinfer_cache* cache = NULL;
  CHECK(instinfer_cache_create(&cfg, &cache) == INSTINFER_OK);
  if (!cache) return;
  enum { P = 5, C = 20 }; /* a prefix, then a chunk crossing pages */
  float* k = malloc(sizeof(float) * N * HKV * D);
  float* v = malloc(sizeof(float) * N * HKV * D);
  float* q = malloc(sizeof(float) * C * HQ * D);
  float* out = malloc(sizeof(float) * C * HQ * D);
  float* lse = malloc(sizeof(float) * C * HQ);
  double* want = malloc(sizeof(double) * HQ * D);
  for (int i = 0; i < N * HKV * D; ++i) k[i] = frand(), v[i] = frand();
  for (int i = 0; i < C * HQ * D; ++i) q[i] = frand();

  instinfer_seq seq = 0;
  CHECK(instinfer_seq_create(cache, &seq) == INSTINFER_OK);
  CHECK(instinfer_append_at(cache, seq, 0, 0, P, k, v, INSTINFER_DTYPE_F32) == INSTINFER_OK);
  CHECK_ERR(instinfer_append_at(cache, seq, 0, P + 1, C, k + P * HKV * D, v + P * HKV * D, INSTINFER_DTYPE_F32),
            INSTINFER_E_INVALID_ARGUMENT); /* a gap */
  CHECK_ERR(instinfer_append_at(cache, seq, 0, P - 1, C, k + P * HKV * D, v + P * HKV * D, INSTINFER_DTYPE_F32),
            INSTINFER_E_INVALID_ARGUMENT); /* an overlap */
  CHECK_ERR(instinfer_append_at(cache, seq, 0, P, 0, k, v, INSTINFER_DTYPE_F32), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_append_at(cache, seq, 0, P, C, NULL, v, INSTINFER_DTYPE_F32), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_append_at(NULL, seq, 0, P, C, k, v, INSTINFER_DTYPE_F32), INSTINFER_E_INVALID_ARGUMENT);
  CHECK(instinfer_append_at(cache, seq, 0, P, C, k + P * HKV * D, v + P * HKV * D, INSTINFER_DTYPE_F32) ==
        INSTINFER_OK);

  const uint32_t pos = P, rows = C;
  CHECK(instinfer_attend_chunk(cache, 0, 1, &seq, &pos, &rows, q, out, lse) == INSTINFER_OK);
  double max_rel = 0.0;
  for (int r = 0; r < C; ++r) {
    reference_row(k, v, P + r + 1, q + r * HQ * D, want);
    double err = 0.0, mag = 0.0;
    for (int i = 0; i < HQ * D; ++i) {
      const double e = fabs(out[r * HQ * D + i] - want[i]);
      err = e > err ? e : err;
      mag = fabs(want[i]) > mag ? fabs(want[i]) : mag;
    }
    max_rel = err / mag > max_rel ? err / mag : max_rel;
  }
  CHECK(max_rel <= 1e-5);
  /* In place (out == q), as instinfer_attend allows: the same rows, bit for bit. */
  float* out2 = malloc(sizeof(float) * C * HQ * D);
  memcpy(out2, q, sizeof(float) * C * HQ * D);
  CHECK(instinfer_attend_chunk(cache, 0, 1, &seq, &pos, &rows, out2, out2, NULL) == INSTINFER_OK);
  CHECK(memcmp(out, out2, sizeof(float) * C * HQ * D) == 0);
  /* Slices on one thread each in turn: the same rows, bit for bit. */
  for (uint32_t i = 0; i < 3; ++i)
    CHECK(instinfer_attend_chunk_slice(cache, 0, 1, &seq, &pos, &rows, q, out2, NULL, i, 3) == INSTINFER_OK);
  CHECK(memcmp(out, out2, sizeof(float) * C * HQ * D) == 0);
  for (uint32_t i = 0; i < 2; ++i)
    CHECK(instinfer_attend_slice(cache, 0, 1, &seq, q, out2, NULL, i, 2) == INSTINFER_OK);
  CHECK(instinfer_attend(cache, 0, 1, &seq, q, out, NULL) == INSTINFER_OK);
  CHECK(memcmp(out, out2, sizeof(float) * HQ * D) == 0);

  /* Bad chunk inputs. */
  const uint32_t zero = 0, too_many = C + 1, past = P + 1;
  CHECK_ERR(instinfer_attend_chunk(cache, 0, 1, &seq, &pos, &zero, q, out, lse), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend_chunk(cache, 0, 1, &seq, &pos, &too_many, q, out, lse), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend_chunk(cache, 0, 1, &seq, &past, &rows, q, out, lse), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend_chunk(cache, 0, 0, &seq, &pos, &rows, q, out, lse), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend_chunk(cache, 0, 1, NULL, &pos, &rows, q, out, lse), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend_chunk(cache, 0, 1, &seq, NULL, &rows, q, out, lse), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend_chunk(cache, 0, 1, &seq, &pos, NULL, q, out, lse), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend_chunk(cache, 0, 1, &seq, &pos, &rows, NULL, out, lse), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend_chunk(cache, 0, 1, &seq, &pos, &rows, q, NULL, lse), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend_chunk(cache, L, 1, &seq, &pos, &rows, q, out, lse), INSTINFER_E_LAYER_OUT_OF_RANGE);
  const instinfer_seq unknown = seq + 1000;
  CHECK_ERR(instinfer_attend_chunk(cache, 0, 1, &unknown, &pos, &rows, q, out, lse), INSTINFER_E_UNKNOWN_SEQUENCE);
  CHECK_ERR(instinfer_attend_chunk(NULL, 0, 1, &seq, &pos, &rows, q, out, lse), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend_slice(cache, 0, 1, &seq, q, out, NULL, 1, 1), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend_slice(cache, 0, 1, &seq, q, out, NULL, 0, 0), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_attend_chunk_slice(cache, 0, 1, &seq, &pos, &rows, q, out2, NULL, 3, 3),
            INSTINFER_E_INVALID_ARGUMENT);

  /* Fork at a position. */
  instinfer_seq child = 0;
  uint64_t n = 0;
  CHECK(instinfer_append(cache, seq, 1, P + C, k, v, INSTINFER_DTYPE_F32) == INSTINFER_OK);
  CHECK(instinfer_seq_fork_at(cache, seq, 12, &child) == INSTINFER_OK);
  CHECK(instinfer_seq_length(cache, child, 0, &n) == INSTINFER_OK && n == 12);
  CHECK(instinfer_seq_length(cache, seq, 0, &n) == INSTINFER_OK && n == P + C);
  CHECK_ERR(instinfer_seq_fork_at(cache, seq, P + C + 1, &child), INSTINFER_E_INVALID_ARGUMENT); /* past the end */
  CHECK_ERR(instinfer_seq_fork_at(cache, seq, 0, NULL), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_seq_fork_at(cache, unknown, 0, &child), INSTINFER_E_UNKNOWN_SEQUENCE);

  /* Sequence state: save, load back, compare attention; corrupt and short inputs refused. */
  size_t size = 0, written = 0;
  CHECK(instinfer_seq_state_size(cache, seq, &size) == INSTINFER_OK && size > 0);
  unsigned char* blob = malloc(size);
  CHECK_ERR(instinfer_seq_state_save(cache, seq, blob, size - 1, &written), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_seq_state_save(cache, seq, NULL, size, &written), INSTINFER_E_INVALID_ARGUMENT);
  CHECK(instinfer_seq_state_save(cache, seq, blob, size, &written) == INSTINFER_OK && written == size);
  instinfer_seq loaded = 0;
  CHECK(instinfer_seq_state_load(cache, blob, size, &loaded) == INSTINFER_OK);
  CHECK(instinfer_attend(cache, 0, 1, &loaded, q, out2, NULL) == INSTINFER_OK);
  CHECK(memcmp(out, out2, sizeof(float) * HQ * D) == 0);
  CHECK_ERR(instinfer_seq_state_load(cache, blob, size - 1, &loaded), INSTINFER_E_CORRUPT_DATA);
  blob[size / 2] ^= 0x10;
  CHECK_ERR(instinfer_seq_state_load(cache, blob, size, &loaded), INSTINFER_E_CORRUPT_DATA);
  CHECK_ERR(instinfer_seq_state_load(cache, NULL, size, &loaded), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_seq_state_load(cache, blob, size, NULL), INSTINFER_E_INVALID_ARGUMENT);
  const char* path = "instinfer-test-capi-state.bin";
  CHECK(instinfer_seq_state_save_file(cache, seq, path) == INSTINFER_OK);
  CHECK(instinfer_seq_state_load_file(cache, path, &loaded) == INSTINFER_OK);
  CHECK_ERR(instinfer_seq_state_load_file(cache, "no/such/dir/state.bin", &loaded), INSTINFER_E_IO);
  CHECK_ERR(instinfer_seq_state_save_file(cache, seq, NULL), INSTINFER_E_INVALID_ARGUMENT);
  remove(path);
  instinfer_stats st;
  memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  CHECK(instinfer_cache_stats(cache, &st) == INSTINFER_OK && st.n_sequences == 4);
  instinfer_cache_destroy(cache);

  /* Older config sizes are still accepted; caller_threads must be 0 or 1. */
  cfg.caller_threads = 2;
  CHECK_ERR(instinfer_cache_create(&cfg, &cache), INSTINFER_E_INVALID_ARGUMENT);
  cfg.struct_size = (uint32_t)offsetof(instinfer_config, caller_threads);
  CHECK(instinfer_cache_create(&cfg, &cache) == INSTINFER_OK);
  instinfer_cache_destroy(cache);
  free(k);
  free(v);
  free(q);
  free(out);
  free(out2);
  free(lse);
  free(want);
  free(blob);
}

/* Q8_0 / Q4_0 caches: F32 and BF16 rows are quantized on append; attention follows the float
 * reference within the formats' own error; a head_dim that is not whole blocks, non-finite rows
 * and rows of another quantized dtype are refused. */
static void test_quantized(void) {
  const instinfer_dtype types[] = {INSTINFER_DTYPE_Q8_0, INSTINFER_DTYPE_Q4_0};
  const double tolerance[] = {0.02, 0.2};
  for (int ti = 0; ti < 2; ++ti) {
    instinfer_config cfg;
    instinfer_config_init(&cfg);
    cfg.n_layers = 1;
    cfg.n_q_heads = HQ;
    cfg.n_kv_heads = HKV;
    cfg.head_dim = D;
    cfg.kv_dtype = types[ti];
    cfg.page_bytes = 4096;
    cfg.capacity_bytes = 8u << 20;
    cfg.n_threads = 2;
    instinfer_config bad = cfg;
    bad.head_dim = 48;
    instinfer_cache* cache = NULL;
    CHECK_ERR(instinfer_cache_create(&bad, &cache), INSTINFER_E_INVALID_ARGUMENT);
    CHECK(instinfer_cache_create(&cfg, &cache) == INSTINFER_OK);
    if (!cache) return;
    instinfer_seq seq = 0;
    CHECK(instinfer_seq_create(cache, &seq) == INSTINFER_OK);
    float* k = malloc(sizeof(float) * N * HKV * D);
    float* v = malloc(sizeof(float) * N * HKV * D);
    uint16_t* kb = malloc(sizeof(uint16_t) * N * HKV * D);
    uint16_t* vb = malloc(sizeof(uint16_t) * N * HKV * D);
    float q[HQ * D], out[HQ * D], lse[HQ];
    for (int i = 0; i < N * HKV * D; ++i) {
      k[i] = frand();
      v[i] = frand() + 0.5f;
      /* bf16 by truncation: every such pattern is a bf16 value; keep the float it stands for. */
      uint32_t bits;
      memcpy(&bits, &k[i], 4);
      kb[i] = (uint16_t)(bits >> 16);
      bits &= 0xffff0000u;
      memcpy(&k[i], &bits, 4);
      memcpy(&bits, &v[i], 4);
      vb[i] = (uint16_t)(bits >> 16);
      bits &= 0xffff0000u;
      memcpy(&v[i], &bits, 4);
    }
    for (int i = 0; i < HQ * D; ++i) q[i] = frand();
    CHECK(instinfer_append(cache, seq, 0, 100, k, v, INSTINFER_DTYPE_F32) == INSTINFER_OK);
    CHECK(instinfer_append(cache, seq, 0, N - 100, kb + 100 * HKV * D, vb + 100 * HKV * D, INSTINFER_DTYPE_BF16) ==
          INSTINFER_OK);
    CHECK(instinfer_attend(cache, 0, 1, &seq, q, out, lse) == INSTINFER_OK);
    double num = 0.0, den = 0.0;
    for (int h = 0; h < HQ; ++h) {
      const int kvh = h / (HQ / HKV);
      double s[N], m = -INFINITY, sum = 0.0;
      for (int t = 0; t < N; ++t) {
        double dot = 0.0;
        for (int d = 0; d < D; ++d) dot += (double)q[h * D + d] * k[(t * HKV + kvh) * D + d];
        s[t] = dot / sqrt((double)D);
        if (s[t] > m) m = s[t];
      }
      for (int t = 0; t < N; ++t) sum += exp(s[t] - m);
      for (int d = 0; d < D; ++d) {
        double o = 0.0;
        for (int t = 0; t < N; ++t) o += exp(s[t] - m) / sum * v[(t * HKV + kvh) * D + d];
        num += (o - out[h * D + d]) * (o - out[h * D + d]);
        den += o * o;
      }
    }
    printf("C API %s cache attend vs float64 reference on the unquantized rows: relative error %.3g\n",
           ti == 0 ? "Q8_0" : "Q4_0", sqrt(num / den));
    CHECK(sqrt(num / den) <= tolerance[ti]);
    /* Since 0.6: int8 Q.K (q8_0 only). 2 is invalid; a 0.5 caller's struct ignores what lies
     * beyond it; on q8_0 the scores move by the query's q8_0 rounding only. */
    instinfer_config i8 = cfg;
    instinfer_cache* c8 = NULL;
    i8.int8_query_dot = 2;
    CHECK_ERR(instinfer_cache_create(&i8, &c8), INSTINFER_E_INVALID_ARGUMENT);
    i8.int8_query_dot = 1;
    if (ti == 1) {
      CHECK_ERR(instinfer_cache_create(&i8, &c8), INSTINFER_E_UNSUPPORTED);
    } else {
      i8.struct_size = (uint32_t)offsetof(instinfer_config, int8_query_dot);
      i8.int8_query_dot = 7;
      CHECK(instinfer_cache_create(&i8, &c8) == INSTINFER_OK);
      instinfer_cache_destroy(c8);
      c8 = NULL;
      i8.struct_size = sizeof i8;
      i8.int8_query_dot = 1;
      CHECK(instinfer_cache_create(&i8, &c8) == INSTINFER_OK);
      if (c8) {
        instinfer_seq s8 = 0;
        float out8[HQ * D];
        CHECK(instinfer_seq_create(c8, &s8) == INSTINFER_OK);
        CHECK(instinfer_append(c8, s8, 0, 100, k, v, INSTINFER_DTYPE_F32) == INSTINFER_OK);
        CHECK(instinfer_append(c8, s8, 0, N - 100, kb + 100 * HKV * D, vb + 100 * HKV * D, INSTINFER_DTYPE_BF16) ==
              INSTINFER_OK);
        CHECK(instinfer_attend(c8, 0, 1, &s8, q, out8, NULL) == INSTINFER_OK);
        double dn = 0.0, dd = 0.0;
        for (int i = 0; i < HQ * D; ++i) {
          dn += ((double)out8[i] - out[i]) * ((double)out8[i] - out[i]);
          dd += (double)out[i] * out[i];
        }
        printf("C API Q8_0 int8_query_dot vs the f32 scores: relative difference %.3g\n", sqrt(dn / dd));
        CHECK(sqrt(dn / dd) > 0.0 && sqrt(dn / dd) <= 0.02);
        instinfer_cache_destroy(c8);
      }
    }
    k[7] = NAN;
    CHECK_ERR(instinfer_append(cache, seq, 0, 1, k, v, INSTINFER_DTYPE_F32), INSTINFER_E_INVALID_ARGUMENT);
    CHECK_ERR(instinfer_append(cache, seq, 0, 1, k, v, types[1 - ti]), INSTINFER_E_UNSUPPORTED);
    /* append_at takes the quantized dtypes as instinfer_append does (it called them "not a dtype":
     * found by fuzz/capi_fuzzer.cpp). A token of zero blocks is a valid row of either format. */
    unsigned char zeros[HKV * D / 32 * 34] = {0};
    CHECK(instinfer_append_at(cache, seq, 0, N, 1, zeros, zeros, types[ti]) == INSTINFER_OK);
    CHECK_ERR(instinfer_append_at(cache, seq, 0, N + 1, 1, zeros, zeros, types[1 - ti]), INSTINFER_E_UNSUPPORTED);
    uint64_t n = 0;
    CHECK(instinfer_seq_length(cache, seq, 0, &n) == INSTINFER_OK && n == N + 1);
    free(k);
    free(v);
    free(kb);
    free(vb);
    instinfer_cache_destroy(cache);
  }
}

static int path_exists(const char* path) {
  struct stat st;
  return lstat(path, &st) == 0;
}

/* ssd: files are exclusive (a second cache on one file is INSTINFER_E_BUSY, the first keeps
 * working), created 0600, never opened through a symbolic link, and removed on destroy. Skipped
 * where the ssd backend is not built or the scratch directory refuses O_DIRECT. */
static void test_exclusive_files(void) {
  const char* tmp = getenv("TMPDIR");
  char dir[512];
  snprintf(dir, sizeof dir, "%s/instinfer-capi-XXXXXX", tmp && *tmp ? tmp : "/tmp");
  if (!mkdtemp(dir)) return;
  char file[600], uri[620], link_path[600], link_uri[620];
  snprintf(file, sizeof file, "%s/kv.bin", dir);
  snprintf(uri, sizeof uri, "ssd:%s", file);
  snprintf(link_path, sizeof link_path, "%s/link.bin", dir);
  snprintf(link_uri, sizeof link_uri, "ssd:%s", link_path);

  instinfer_config cfg;
  instinfer_config_init(&cfg);
  cfg.n_layers = 1;
  cfg.n_q_heads = 2;
  cfg.n_kv_heads = 1;
  cfg.head_dim = D;
  cfg.kv_dtype = INSTINFER_DTYPE_F32;
  cfg.page_bytes = 4096;
  cfg.capacity_bytes = 1u << 20;
  cfg.n_threads = 1;
  cfg.backend = uri;
  const mode_t old_mask = umask(0); /* the mode must come from the open, not the umask */
  instinfer_cache* a = NULL;
  const instinfer_status st = instinfer_cache_create(&cfg, &a);
  umask(old_mask);
  if (st == INSTINFER_E_UNSUPPORTED) {
    printf("exclusive files: skipped (%s)\n", instinfer_last_error());
    rmdir(dir);
    return;
  }
  CHECK(st == INSTINFER_OK);
  if (!a) return;
  struct stat sb;
  CHECK(stat(file, &sb) == 0 && (sb.st_mode & 07777) == 0600);

  enum { T = 40 };
  float k[T * D], v[T * D], q[2 * D], out1[2 * D], out2[2 * D], lse1[2], lse2[2];
  for (int i = 0; i < T * D; ++i) k[i] = frand(), v[i] = frand();
  for (int i = 0; i < 2 * D; ++i) q[i] = frand();
  instinfer_seq seq = 0;
  CHECK(instinfer_seq_create(a, &seq) == INSTINFER_OK);
  CHECK(instinfer_append(a, seq, 0, T, k, v, INSTINFER_DTYPE_F32) == INSTINFER_OK);
  CHECK(instinfer_attend(a, 0, 1, &seq, q, out1, lse1) == INSTINFER_OK);

  instinfer_cache* b = (instinfer_cache*)0x1;
  CHECK_ERR(instinfer_cache_create(&cfg, &b), INSTINFER_E_BUSY);
  CHECK(b == NULL);
  CHECK(strstr(instinfer_last_error(), "in use") != NULL);
  CHECK(strstr(instinfer_last_error(), file) != NULL);
  CHECK(strcmp(instinfer_status_name(INSTINFER_E_BUSY), "busy") == 0);
  /* The refused cache changed nothing: the same attention, bit for bit. */
  CHECK(instinfer_attend(a, 0, 1, &seq, q, out2, lse2) == INSTINFER_OK);
  CHECK(memcmp(out1, out2, sizeof out1) == 0 && memcmp(lse1, lse2, sizeof lse1) == 0);
  instinfer_cache_destroy(a);
  CHECK(!path_exists(file)); /* created by the cache: removed with it */

  /* A symbolic link at the path: refused, nothing created where it points. */
  CHECK(symlink(file, link_path) == 0);
  cfg.backend = link_uri;
  CHECK_ERR(instinfer_cache_create(&cfg, &b), INSTINFER_E_INVALID_ARGUMENT);
  CHECK(strstr(instinfer_last_error(), "symbolic link") != NULL);
  CHECK(!path_exists(file));
  unlink(link_path);

  /* The path is free again after destroy. */
  cfg.backend = uri;
  CHECK(instinfer_cache_create(&cfg, &a) == INSTINFER_OK);
  instinfer_cache_destroy(a);
  CHECK(!path_exists(file));
  rmdir(dir);
}

/* The prefix cache (0.4): the longest cached prefix comes back as a sequence whose attention equals
 * that of the inserted sequence's prefix bit for bit; misses, stats, bad arguments; a prefix cache
 * left open is freed with its cache. */
static void test_prefix_cache(void) {
  instinfer_config cfg;
  instinfer_config_init(&cfg);
  cfg.n_layers = 1;
  cfg.n_q_heads = 2;
  cfg.n_kv_heads = 1;
  cfg.head_dim = D;
  cfg.kv_dtype = INSTINFER_DTYPE_F32;
  cfg.page_bytes = 4096; /* 16 tokens per group */
  cfg.capacity_bytes = 1u << 20;
  cfg.n_threads = 1;
  instinfer_cache* cache = NULL;
  CHECK(instinfer_cache_create(&cfg, &cache) == INSTINFER_OK);
  if (!cache) return;
  enum { T = 40, G = 16 };
  int32_t tokens[T];
  float k[T * D], v[T * D], q[2 * D], out1[2 * D], out2[2 * D], lse1[2], lse2[2];
  for (int i = 0; i < T; ++i) tokens[i] = 1000 + 7 * i;
  for (int i = 0; i < T * D; ++i) k[i] = frand(), v[i] = frand();
  for (int i = 0; i < 2 * D; ++i) q[i] = frand();
  instinfer_seq seq = 0, fork = 0, hit = 0;
  CHECK(instinfer_seq_create(cache, &seq) == INSTINFER_OK);
  CHECK(instinfer_append(cache, seq, 0, T, k, v, INSTINFER_DTYPE_F32) == INSTINFER_OK);

  instinfer_prefix_cache* prefix = (instinfer_prefix_cache*)0x1;
  CHECK_ERR(instinfer_prefix_cache_create(cache, NULL, 8, &prefix), INSTINFER_E_INVALID_ARGUMENT);
  CHECK(prefix == NULL);
  CHECK_ERR(instinfer_prefix_cache_create(cache, "m", 0, &prefix), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_prefix_cache_create(NULL, "m", 8, &prefix), INSTINFER_E_INVALID_ARGUMENT);
  CHECK(instinfer_prefix_cache_create(cache, "smollm2-135m", 8, &prefix) == INSTINFER_OK);
  if (!prefix) {
    instinfer_cache_destroy(cache);
    return;
  }
  CHECK(instinfer_prefix_insert(prefix, seq, tokens, T) == INSTINFER_OK);
  CHECK_ERR(instinfer_prefix_insert(prefix, 999, tokens, T), INSTINFER_E_UNKNOWN_SEQUENCE);
  CHECK_ERR(instinfer_prefix_insert(prefix, seq, NULL, T), INSTINFER_E_INVALID_ARGUMENT);

  uint64_t n = 99;
  CHECK(instinfer_prefix_lookup(prefix, tokens, T, &hit, &n) == INSTINFER_OK);
  CHECK(n == 2 * G);
  CHECK(hit != 0 && hit != seq);
  CHECK(instinfer_seq_fork_at(cache, seq, 2 * G, &fork) == INSTINFER_OK);
  CHECK(instinfer_attend(cache, 0, 1, &hit, q, out1, lse1) == INSTINFER_OK);
  CHECK(instinfer_attend(cache, 0, 1, &fork, q, out2, lse2) == INSTINFER_OK);
  CHECK(memcmp(out1, out2, sizeof out1) == 0 && memcmp(lse1, lse2, sizeof lse1) == 0);
  /* A different second group: one group; a different first token: a miss. */
  tokens[G + 1] += 1;
  instinfer_seq hit2 = 0;
  CHECK(instinfer_prefix_lookup(prefix, tokens, T, &hit2, &n) == INSTINFER_OK);
  CHECK(n == G && hit2 != 0);
  tokens[0] += 1;
  CHECK(instinfer_prefix_lookup(prefix, tokens, T, &hit2, &n) == INSTINFER_OK);
  CHECK(n == 0 && hit2 == 0);
  CHECK_ERR(instinfer_prefix_lookup(prefix, tokens, T, NULL, &n), INSTINFER_E_INVALID_ARGUMENT);

  instinfer_prefix_stats st;
  memset(&st, 0, sizeof st);
  CHECK_ERR(instinfer_prefix_cache_stats(prefix, &st), INSTINFER_E_INVALID_ARGUMENT); /* struct_size 0 */
  st.struct_size = sizeof st;
  CHECK(instinfer_prefix_cache_stats(prefix, &st) == INSTINFER_OK);
  CHECK(st.groups == 2 && st.capacity_groups == 8 && st.tokens_per_group == G);
  CHECK(st.lookups == 3 && st.hits == 2 && st.hit_tokens == 3 * G);
  CHECK(st.held_sequences == 1 && st.host_bytes > 2 * G * sizeof(int32_t));
  instinfer_prefix_cache_destroy(prefix);
  instinfer_prefix_cache_destroy(NULL);
  /* One left open: freed with the cache. */
  CHECK(instinfer_prefix_cache_create(cache, "m", 8, &prefix) == INSTINFER_OK);
  CHECK(instinfer_prefix_insert(prefix, seq, tokens, T) == INSTINFER_OK);
  instinfer_cache_destroy(cache);
}

/* Named sequences and a persistent store (0.5): names set, found and listed; on
 * "ssd:PATH?persist=1" the named sequences come back after destroy and create, with attention equal
 * bit for bit; the store's files are 0600 and kept. Skipped where ssd or O_DIRECT is missing. */
static void test_persistent_names(void) {
  const char* tmp = getenv("TMPDIR");
  char dir[512];
  snprintf(dir, sizeof dir, "%s/instinfer-capi-XXXXXX", tmp && *tmp ? tmp : "/tmp");
  if (!mkdtemp(dir)) return;
  char file[600], meta[620], uri[640];
  snprintf(file, sizeof file, "%s/store.kv", dir);
  snprintf(meta, sizeof meta, "%s.meta", file);
  snprintf(uri, sizeof uri, "ssd:%s?persist=1", file);

  instinfer_config cfg;
  instinfer_config_init(&cfg);
  cfg.n_layers = 1;
  cfg.n_q_heads = 2;
  cfg.n_kv_heads = 1;
  cfg.head_dim = D;
  cfg.kv_dtype = INSTINFER_DTYPE_F32;
  cfg.page_bytes = 4096;
  cfg.capacity_bytes = 1u << 20;
  cfg.n_threads = 1;
  cfg.backend = uri;
  instinfer_cache* a = NULL;
  const instinfer_status st = instinfer_cache_create(&cfg, &a);
  if (st == INSTINFER_E_UNSUPPORTED) {
    printf("persistent names: skipped (%s)\n", instinfer_last_error());
    rmdir(dir);
    return;
  }
  CHECK(st == INSTINFER_OK);
  if (!a) return;

  enum { T = 45 };
  float k[T * D], v[T * D], q[2 * D], out1[2 * D], out2[2 * D], lse1[2], lse2[2];
  for (int i = 0; i < T * D; ++i) k[i] = frand(), v[i] = frand();
  for (int i = 0; i < 2 * D; ++i) q[i] = frand();
  instinfer_seq s1 = 0, s2 = 0, unnamed = 0, found = 0;
  CHECK(instinfer_seq_create(a, &s1) == INSTINFER_OK);
  CHECK(instinfer_seq_create(a, &unnamed) == INSTINFER_OK);
  CHECK(instinfer_append(a, s1, 0, T, k, v, INSTINFER_DTYPE_F32) == INSTINFER_OK);
  CHECK(instinfer_seq_fork(a, s1, &s2) == INSTINFER_OK);
  CHECK(instinfer_seq_remove_range(a, s2, 20, UINT64_MAX) == INSTINFER_OK);
  CHECK(instinfer_seq_set_name(a, s1, 1001) == INSTINFER_OK);
  CHECK(instinfer_seq_set_name(a, s2, 1002) == INSTINFER_OK);
  CHECK_ERR(instinfer_seq_set_name(a, unnamed, 1001), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_seq_set_name(a, 999, 5), INSTINFER_E_UNKNOWN_SEQUENCE);
  CHECK_ERR(instinfer_seq_set_name(NULL, s1, 5), INSTINFER_E_INVALID_ARGUMENT);
  CHECK(instinfer_seq_find(a, 1002, &found) == INSTINFER_OK && found == s2);
  CHECK_ERR(instinfer_seq_find(a, 77, &found), INSTINFER_E_UNKNOWN_SEQUENCE);
  CHECK_ERR(instinfer_seq_find(a, 0, &found), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_seq_find(a, 1001, NULL), INSTINFER_E_INVALID_ARGUMENT);
  size_t count = 0;
  CHECK_ERR(instinfer_seq_names(a, NULL, NULL, 2, &count), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_seq_names(a, NULL, NULL, 0, NULL), INSTINFER_E_INVALID_ARGUMENT);
  CHECK(instinfer_seq_names(a, NULL, NULL, 0, &count) == INSTINFER_OK && count == 2);
  uint64_t names[2] = {0, 0};
  instinfer_seq seqs[2] = {0, 0};
  CHECK(instinfer_seq_names(a, names, seqs, 1, &count) == INSTINFER_OK && count == 2);
  CHECK(names[0] == 1001 && seqs[0] == s1 && names[1] == 0);
  CHECK(instinfer_attend(a, 0, 1, &s2, q, out1, lse1) == INSTINFER_OK);
  CHECK(instinfer_cache_flush(a) == INSTINFER_OK);
  instinfer_cache_destroy(a);
  struct stat sb;
  CHECK(stat(file, &sb) == 0 && (sb.st_mode & 07777) == 0600); /* kept, private */
  CHECK(stat(meta, &sb) == 0 && (sb.st_mode & 07777) == 0600);

  a = NULL;
  CHECK(instinfer_cache_create(&cfg, &a) == INSTINFER_OK);
  if (a) {
    CHECK(instinfer_seq_names(a, names, seqs, 2, &count) == INSTINFER_OK && count == 2);
    CHECK(names[0] == 1001 && names[1] == 1002);
    uint64_t len = 0;
    CHECK(instinfer_seq_find(a, 1002, &found) == INSTINFER_OK);
    CHECK(instinfer_seq_length(a, found, 0, &len) == INSTINFER_OK && len == 20);
    CHECK(instinfer_attend(a, 0, 1, &found, q, out2, lse2) == INSTINFER_OK);
    CHECK(memcmp(out1, out2, sizeof out1) == 0 && memcmp(lse1, lse2, sizeof lse1) == 0);
    CHECK(instinfer_seq_find(a, 1001, &found) == INSTINFER_OK);
    CHECK(instinfer_seq_length(a, found, 0, &len) == INSTINFER_OK && len == T);
    instinfer_cache_destroy(a);
  }
  unlink(file);
  unlink(meta);
  rmdir(dir);
}

/* Since 0.6: instinfer_cache_config gives back what the cache runs with: the given fields, the
 * resolved page size and capacity, its own copy of the URI; an older struct_size gets its fields
 * and not a byte more. */
static void test_cache_config(void) {
  char uri[] = "host";
  instinfer_config cfg;
  instinfer_config_init(&cfg);
  cfg.n_layers = 3;
  cfg.n_q_heads = HQ;
  cfg.n_kv_heads = HKV;
  cfg.head_dim = D;
  cfg.kv_dtype = INSTINFER_DTYPE_Q8_0;
  cfg.capacity_bytes = (1u << 20) + 123; /* not whole chunks: rounded down */
  cfg.int8_query_dot = 1;
  cfg.backend = uri;
  instinfer_cache* cache = NULL;
  CHECK(instinfer_cache_create(&cfg, &cache) == INSTINFER_OK);
  if (!cache) return;
  uri[0] = 'X'; /* the cache keeps its own copy */
  instinfer_config got;
  memset(&got, 0, sizeof got);
  got.struct_size = sizeof got;
  CHECK(instinfer_cache_config(cache, &got) == INSTINFER_OK);
  instinfer_stats st;
  memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  CHECK(instinfer_cache_stats(cache, &st) == INSTINFER_OK);
  CHECK(got.struct_size == sizeof got);
  CHECK(got.n_layers == 3 && got.n_q_heads == HQ && got.n_kv_heads == HKV && got.head_dim == D);
  CHECK(got.kv_dtype == INSTINFER_DTYPE_Q8_0 && got.int8_query_dot == 1 && got.sparf == 0);
  CHECK(got.page_bytes == 4096); /* the host's choice for 0 */
  CHECK(got.capacity_bytes == st.capacity_chunks * st.chunk_bytes && got.capacity_bytes <= cfg.capacity_bytes);
  CHECK(got.capacity_bytes > 0 && got.capacity_bytes % st.chunk_bytes == 0);
  CHECK(got.backend != NULL && got.backend != uri && strcmp(got.backend, "host") == 0);
  /* A 0.5 caller's struct: filled up to its size, the bytes after it untouched. */
  unsigned char raw[sizeof(instinfer_config)];
  memset(raw, 0xa5, sizeof raw);
  instinfer_config* older = (instinfer_config*)raw;
  older->struct_size = (uint32_t)offsetof(instinfer_config, int8_query_dot);
  CHECK(instinfer_cache_config(cache, older) == INSTINFER_OK);
  CHECK(older->n_layers == 3 && older->page_bytes == 4096);
  int untouched = 1;
  for (size_t i = offsetof(instinfer_config, int8_query_dot); i < sizeof raw; ++i) untouched &= raw[i] == 0xa5;
  CHECK(untouched);
  older->struct_size = 3;
  CHECK_ERR(instinfer_cache_config(cache, older), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_cache_config(cache, NULL), INSTINFER_E_INVALID_ARGUMENT);
  CHECK_ERR(instinfer_cache_config(NULL, &got), INSTINFER_E_INVALID_ARGUMENT);
  instinfer_cache_destroy(cache);
}

int main(void) {
  test_round_trip();
  test_bad_configs();
  test_sparf();
  test_append_checks_capacity_before_reading();
  test_v03();
  test_quantized();
  test_cache_config();
  test_exclusive_files();
  test_prefix_cache();
  test_persistent_names();
  printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
