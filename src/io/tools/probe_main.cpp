// instinfer-probe PATH: what the storage under PATH prefers and the KV page size instinfer picks.
#include <cstdio>
#include <cstring>

#include "instinfer/io/device_probe.hpp"

int main(int argc, char** argv) {
  if (argc != 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
    std::fprintf(stderr, "usage: instinfer-probe PATH   (a file, its directory, or a block device)\n");
    return argc == 2 ? 0 : 2;
  }
  auto r = instinfer::probe_device(argv[1]);
  if (!r.ok()) {
    std::fprintf(stderr, "instinfer-probe: %s\n", r.error().to_string().c_str());
    return 1;
  }
  std::fputs(r->report().c_str(), stdout);
  return 0;
}
