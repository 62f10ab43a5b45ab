// instinfer-bench: benchmarks of KV access patterns and decode, printing JSON lines.
#include <cstdio>
#include <cstring>
#include <string>

#include "bench_common.hpp"

int main(int argc, char** argv) {
  auto& table = instinfer::bench::command_table();
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
    std::printf("usage: instinfer-bench <command> [--flags]\n\ncommands:\n");
    for (const auto& [name, info] : table) std::printf("  %-12s %s\n", name.c_str(), info.help.c_str());
    return argc < 2 ? 2 : 0;
  }
  auto it = table.find(argv[1]);
  if (it == table.end()) {
    std::fprintf(stderr, "instinfer-bench: unknown command '%s' (try --help)\n", argv[1]);
    return 2;
  }
  return it->second.run(argc - 1, argv + 1);
}
