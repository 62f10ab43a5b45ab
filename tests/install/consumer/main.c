/* A C consumer of the installed tree: the header compiles as strict C11, the library links and
 * runs, and the version the library reports equals the installed header's and the one the build
 * system found (INSTINFER_EXPECTED_VERSION: the CMake package version or pkg-config's Version). */
#include <stdio.h>

#include "instinfer/instinfer.h"

int main(void) {
  const int header_version = INSTINFER_VERSION_MAJOR * 10000 + INSTINFER_VERSION_MINOR * 100 + INSTINFER_VERSION_PATCH;
  if (instinfer_version() != header_version) {
    fprintf(stderr, "libinstinfer reports %d, the installed header says %d\n", instinfer_version(), header_version);
    return 1;
  }
#ifdef INSTINFER_EXPECTED_VERSION
  if (header_version != INSTINFER_EXPECTED_VERSION) {
    fprintf(stderr, "the installed header says %d, the package says %d\n", header_version, INSTINFER_EXPECTED_VERSION);
    return 1;
  }
#endif

  instinfer_config cfg;
  instinfer_config_init(&cfg);
  cfg.n_layers = 1;
  cfg.n_q_heads = 2;
  cfg.n_kv_heads = 1;
  cfg.head_dim = 64;
  cfg.capacity_bytes = 1 << 20;
  cfg.sparf = 1;
  instinfer_cache* cache = NULL;
  if (instinfer_cache_create(&cfg, &cache) != INSTINFER_OK) {
    fprintf(stderr, "%s\n", instinfer_last_error());
    return 1;
  }
  /* One call of each version node (0.1 above, 0.2 here): the binary records both. */
  instinfer_sparf_params params;
  instinfer_sparf_params_init(&params);
  instinfer_seq seq = 0;
  float q[2 * 64] = {0}, out[2 * 64], lse[2];
  instinfer_status s = instinfer_seq_create(cache, &seq);
  if (s == INSTINFER_OK) s = instinfer_attend_sparse(cache, 0, 1, &seq, q, out, lse, &params);
  if (s != INSTINFER_OK) {
    fprintf(stderr, "%s: %s\n", instinfer_status_name(s), instinfer_last_error());
    instinfer_cache_destroy(cache);
    return 1;
  }
  instinfer_cache_destroy(cache);
  printf("instinfer %d.%d.%d from C\n", INSTINFER_VERSION_MAJOR, INSTINFER_VERSION_MINOR, INSTINFER_VERSION_PATCH);
  return 0;
}
