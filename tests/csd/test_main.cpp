// main() of the csd: backend tests: without the instinfer-csd binary there is no drive to test,
// so the binary is skipped (exit 77), never passed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

#include "instinfer/backend/csd_backend.hpp"

int main(int argc, char** argv) {
  if (!instinfer::csd_backend::available()) {
    std::fprintf(stderr, "skipped: instinfer-csd not found (next to this executable, or INSTINFER_CSD_DEVICE)\n");
    return 77;
  }
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
