// The C header compiles as C++ and its status codes mirror instinfer::errc one to one.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "instinfer/core/status.hpp"
#include "instinfer/instinfer.h"

TEST_CASE("C status codes equal errc values") {
  using instinfer::errc;
  CHECK(INSTINFER_E_INVALID_ARGUMENT == static_cast<int>(errc::kInvalidArgument));
  CHECK(INSTINFER_E_OUT_OF_PAGES == static_cast<int>(errc::kOutOfPages));
  CHECK(INSTINFER_E_UNKNOWN_SEQUENCE == static_cast<int>(errc::kUnknownSequence));
  CHECK(INSTINFER_E_LAYER_OUT_OF_RANGE == static_cast<int>(errc::kLayerOutOfRange));
  CHECK(INSTINFER_E_UNSUPPORTED == static_cast<int>(errc::kUnsupported));
  CHECK(INSTINFER_E_IO == static_cast<int>(errc::kIoError));
  CHECK(INSTINFER_E_NO_SPACE == static_cast<int>(errc::kNoSpace));
  CHECK(INSTINFER_E_DEVICE_LOST == static_cast<int>(errc::kDeviceLost));
  CHECK(INSTINFER_E_TIMEOUT == static_cast<int>(errc::kTimeout));
  CHECK(INSTINFER_E_CORRUPT_DATA == static_cast<int>(errc::kCorruptData));
  CHECK(INSTINFER_E_BUSY == static_cast<int>(errc::kBusy));
  CHECK(INSTINFER_E_INTERNAL == static_cast<int>(errc::kInternal));
  for (int c = 0; c >= INSTINFER_E_INTERNAL; --c)
    CHECK(std::string(instinfer_status_name(c)) == instinfer::errc_name(static_cast<errc>(c)));
}

TEST_CASE("C API never throws on exhausting misuse") {
  instinfer_config cfg;
  instinfer_config_init(&cfg);
  cfg.n_layers = 1;
  cfg.n_q_heads = 2;
  cfg.n_kv_heads = 1;
  cfg.head_dim = 64;
  cfg.capacity_bytes = 1 << 16;
  instinfer_cache* cache = nullptr;
  REQUIRE(instinfer_cache_create(&cfg, &cache) == INSTINFER_OK);
  // Create and free many sequences; append until the pool is full, then free and reuse.
  std::vector<float> rows(64 * 64, 0.5f);
  instinfer_seq s = 0;
  REQUIRE(instinfer_seq_create(cache, &s) == INSTINFER_OK);
  instinfer_status st = INSTINFER_OK;
  int appended = 0;
  while ((st = instinfer_append(cache, s, 0, 64, rows.data(), rows.data(), INSTINFER_DTYPE_F32)) == INSTINFER_OK)
    ++appended;
  CHECK(st == INSTINFER_E_OUT_OF_PAGES);
  CHECK(appended > 0);
  CHECK(instinfer_seq_free(cache, s) == INSTINFER_OK);
  REQUIRE(instinfer_seq_create(cache, &s) == INSTINFER_OK);
  CHECK(instinfer_append(cache, s, 0, 64, rows.data(), rows.data(), INSTINFER_DTYPE_F32) == INSTINFER_OK);
  instinfer_cache_destroy(cache);
}
