/* The C API from plain C11: a round trip (append, attend checked against a float64 reference
 * computed here from the same stored values) and every kind of bad input. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    k[7] = NAN;
    CHECK_ERR(instinfer_append(cache, seq, 0, 1, k, v, INSTINFER_DTYPE_F32), INSTINFER_E_INVALID_ARGUMENT);
    CHECK_ERR(instinfer_append(cache, seq, 0, 1, k, v, types[1 - ti]), INSTINFER_E_UNSUPPORTED);
    uint64_t n = 0;
    CHECK(instinfer_seq_length(cache, seq, 0, &n) == INSTINFER_OK && n == N);
    free(k);
    free(v);
    free(kb);
    free(vb);
    instinfer_cache_destroy(cache);
  }
}

int main(void) {
  test_round_trip();
  test_bad_configs();
  test_sparf();
  test_quantized();
  printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
