#include <stdio.h>

#include "instinfer/instinfer.h"

int main(void) {
  instinfer_config cfg;
  instinfer_config_init(&cfg);
  cfg.n_layers = 1;
  cfg.n_q_heads = 2;
  cfg.n_kv_heads = 1;
  cfg.head_dim = 64;
  cfg.capacity_bytes = 1 << 20;
  instinfer_cache* cache = NULL;
  if (instinfer_cache_create(&cfg, &cache) != INSTINFER_OK) {
    fprintf(stderr, "%s\n", instinfer_last_error());
    return 1;
  }
  instinfer_cache_destroy(cache);
  printf("instinfer %d from C\n", instinfer_version());
  return 0;
}
