/* 02: the C API as an engine such as llama.cpp would use it.
 *
 *   build/bin/instinfer-example-02_c_api_decode [BACKEND_URI]      (default: host)
 *
 * An engine keeps its own model and calls instinfer for the KV cache: per layer, append the new
 * token's K/V rows ([n_tokens][n_kv_heads][head_dim], the row layout of llama.cpp's K/V
 * tensors), then attend with the query ([n_seq][n_q_heads][head_dim]) and get the output in
 * ggml_flash_attn_ext's layout. Here the "model" is random numbers; two sequences share a
 * prompt through a fork, as parallel sampling would. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "instinfer/instinfer.h"

enum { N_LAYERS = 4, N_Q_HEADS = 16, N_KV_HEADS = 4, HEAD_DIM = 64, PROMPT = 1000, STEPS = 16 };

static float frand(unsigned* s) {
  *s = *s * 1664525u + 1013904223u;
  return (float)((*s >> 8) & 0xffff) / 32768.0f - 1.0f;
}

static int check(instinfer_status st, const char* what) {
  if (st == INSTINFER_OK) return 0;
  fprintf(stderr, "%s failed: %s (%s)\n", what, instinfer_status_name(st), instinfer_last_error());
  return 1;
}

int main(int argc, char** argv) {
  instinfer_config cfg;
  instinfer_config_init(&cfg);
  cfg.n_layers = N_LAYERS;
  cfg.n_q_heads = N_Q_HEADS;
  cfg.n_kv_heads = N_KV_HEADS;
  cfg.head_dim = HEAD_DIM;
  cfg.kv_dtype = INSTINFER_DTYPE_F16;
  cfg.capacity_bytes = 256u << 20;
  cfg.backend = argc > 1 ? argv[1] : "host";

  instinfer_cache* cache = NULL;
  if (check(instinfer_cache_create(&cfg, &cache), "instinfer_cache_create")) return 1;

  unsigned rng = 42;
  const size_t row = (size_t)N_KV_HEADS * HEAD_DIM;
  float* k = malloc(sizeof(float) * PROMPT * row);
  float* v = malloc(sizeof(float) * PROMPT * row);
  for (size_t i = 0; i < PROMPT * row; ++i) {
    k[i] = frand(&rng);
    v[i] = frand(&rng);
  }

  /* Prefill: the prompt's K/V for every layer. */
  instinfer_seq seqs[2];
  if (check(instinfer_seq_create(cache, &seqs[0]), "instinfer_seq_create")) return 1;
  for (uint32_t l = 0; l < N_LAYERS; ++l)
    if (check(instinfer_append(cache, seqs[0], l, PROMPT, k, v, INSTINFER_DTYPE_F32), "instinfer_append")) return 1;
  /* A second sample of the same prompt shares its pages. */
  if (check(instinfer_seq_fork(cache, seqs[0], &seqs[1]), "instinfer_seq_fork")) return 1;

  /* Decode: both sequences together, one attend per layer per step. */
  float q[2 * N_Q_HEADS * HEAD_DIM], out[2 * N_Q_HEADS * HEAD_DIM], lse[2 * N_Q_HEADS];
  for (int step = 0; step < STEPS; ++step) {
    for (uint32_t l = 0; l < N_LAYERS; ++l) {
      for (int s = 0; s < 2; ++s) {
        for (size_t i = 0; i < row; ++i) {
          k[i] = frand(&rng);
          v[i] = frand(&rng);
        }
        if (check(instinfer_append(cache, seqs[s], l, 1, k, v, INSTINFER_DTYPE_F32), "instinfer_append")) return 1;
      }
      for (size_t i = 0; i < sizeof q / sizeof q[0]; ++i) q[i] = frand(&rng);
      if (check(instinfer_attend(cache, l, 2, seqs, q, out, lse), "instinfer_attend")) return 1;
    }
  }
  uint64_t n = 0;
  instinfer_seq_length(cache, seqs[1], 0, &n);
  instinfer_stats st = {0};
  st.struct_size = sizeof st;
  instinfer_cache_stats(cache, &st);
  printf("2 sequences x %llu tokens, %llu chunks in use (%llu shared by the fork), lse[0] = %.4f\n",
         (unsigned long long)n, (unsigned long long)st.used_chunks, (unsigned long long)st.shared_chunks, lse[0]);

  /* Misuse is an error code and a message, never a crash. */
  instinfer_status bad = instinfer_attend(cache, N_LAYERS, 2, seqs, q, out, lse);
  printf("attend on layer %d: %s (%s)\n", N_LAYERS, instinfer_status_name(bad), instinfer_last_error());

  free(k);
  free(v);
  instinfer_cache_destroy(cache);
  return 0;
}
