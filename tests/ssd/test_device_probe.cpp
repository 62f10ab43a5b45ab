// The device probe and its page-size policy.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <fstream>

#include "instinfer/io/device_probe.hpp"
#include "instinfer/layout/page_geometry.hpp"
#include "ssd_test_util.hpp"

using namespace instinfer;

namespace {
bool pow2(uint64_t v) {
  return v && (v & (v - 1)) == 0;
}
}  // namespace

TEST_CASE("page policy: >= 4 KiB, a multiple of the granularity, within one transfer") {
  std::vector<std::string> why;
  CHECK(choose_page_bytes(0, 0, &why) == 4096);
  CHECK(choose_page_bytes(512, 0, &why) == 4096);
  CHECK(choose_page_bytes(4096, 1 << 20, &why) == 4096);
  CHECK(choose_page_bytes(16384, 0, &why) == 16384);
  CHECK(choose_page_bytes(32768, 128 * 1024, &why) == 32768);
  // Not a power of two: the next power of two above it, and the reasons say it will not align.
  why.clear();
  CHECK(choose_page_bytes(12288, 0, &why) == 16384);
  bool said = false;
  for (const auto& w : why) said |= w.find("not a power of two") != std::string::npos;
  CHECK(said);
  // Larger than the layout allows: capped.
  CHECK(choose_page_bytes(1 << 20, 0, &why) == page_geometry::kMaxPageBytes);
  // Max transfer below the granularity: the transfer wins (never below 4 KiB).
  CHECK(choose_page_bytes(16384, 8192, &why) == 8192);
  CHECK(choose_page_bytes(16384, 1024, &why) == 4096);
  CHECK(choose_page_bytes(4096, 0, nullptr) == 4096);
}

TEST_CASE("probe of a file on the scratch disk") {
  const std::string path = ssd_test::scratch_file("probe.bin");
  {
    std::ofstream f(path);
    f << "x";
  }
  auto r = probe_device(path);
  REQUIRE(r.ok());
  const auto& p = r.value();
  MESSAGE(p.report());
  CHECK(p.kind != storage_kind::kUnknown);
  CHECK(p.page_bytes >= 4096);
  CHECK(pow2(p.page_bytes));
  CHECK(p.page_bytes <= page_geometry::kMaxPageBytes);
  if (p.write_granularity_bytes) CHECK(p.page_bytes % p.write_granularity_bytes == 0);
  if (p.max_transfer_bytes) CHECK(p.page_bytes <= p.max_transfer_bytes);
  if (!p.block_device.empty()) {
    CHECK(p.logical_block_bytes >= 512);
    CHECK(p.physical_block_bytes >= p.logical_block_bytes);
  }
  CHECK(!p.reasons.empty());
  CHECK(p.report().find("default page bytes") != std::string::npos);
  CHECK(p.dio_offset_align > 0);  // the scratch disk does direct I/O (the SSD tests rely on it)
}

TEST_CASE("probe of a file that does not exist yet describes its directory") {
  auto r = probe_device(ssd_test::scratch_file("not-yet.bin"));
  REQUIRE(r.ok());
  CHECK(r->reasons.front().find("does not exist yet") != std::string::npos);
  CHECK(r->page_bytes >= 4096);
  CHECK(r->dio_offset_align > 0);  // asked through an O_TMPFILE in the directory
}

TEST_CASE("probe: bad paths") {
  CHECK(probe_device("").error().code() == errc::kInvalidArgument);
  CHECK(probe_device("/definitely/not/here/x.bin").error().code() == errc::kInvalidArgument);
}

int main(int argc, char** argv) {
  doctest::Context ctx(argc, argv);
  const int rc = ctx.run();
  ssd_test::remove_scratch();
  return rc;
}
