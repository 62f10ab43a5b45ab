#include <cstdio>

#include "instinfer/kv/kv_cache.hpp"

int main() {
  instinfer::cache_options o;
  o.shape = {1, 2, 1, 64, instinfer::dtype::kF16};
  o.capacity_bytes = 1 << 20;
  auto cache = instinfer::kv_cache::create(o);
  if (!cache.ok()) {
    std::fprintf(stderr, "%s\n", cache.error().to_string().c_str());
    return 1;
  }
  std::printf("instinfer from C++: page of %u tokens\n", cache.value()->page().tokens_per_page);
  return 0;
}
