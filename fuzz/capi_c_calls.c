/* Calls only a C caller can make: C converts any int to an enum type, C++ may not load such a
 * value (undefined, and UBSan says so), so the fuzzer passes bad dtypes through here. */
#include "instinfer/instinfer.h"

instinfer_status fuzz_append_raw_dtype(instinfer_cache* cache, instinfer_seq seq, uint32_t layer, uint32_t n_tokens,
                                       const void* k, const void* v, int src_dtype) {
  return instinfer_append(cache, seq, layer, n_tokens, k, v, (instinfer_dtype)src_dtype);
}

instinfer_status fuzz_append_at_raw_dtype(instinfer_cache* cache, instinfer_seq seq, uint32_t layer, uint64_t pos,
                                          uint32_t n_tokens, const void* k, const void* v, int src_dtype) {
  return instinfer_append_at(cache, seq, layer, pos, n_tokens, k, v, (instinfer_dtype)src_dtype);
}
