// The io_uring engine: feature fallbacks, batched I/O, registered and plain buffers, the fault seam.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "instinfer/io/uring_engine.hpp"
#include "ssd_test_util.hpp"

using namespace instinfer;
using namespace instinfer::io;

namespace {

struct fixture {
  storage_file file;
  std::unique_ptr<uring_engine> engine;
  uint32_t handle = 0;

  explicit fixture(const std::string& name, engine_options o = {}) {
    auto f = open_storage_file(ssd_test::scratch_file(name), true, false);
    REQUIRE(f.ok());
    file = std::move(f.value());
    REQUIRE(file.direct);
    auto e = uring_engine::create(o);
    REQUIRE_MESSAGE(e.ok(), e.error().to_string());
    engine = std::move(e.value());
    auto h = engine->add_file(file.fd);
    REQUIRE(h.ok());
    handle = h.value();
  }
};

// Fill `bytes` at `p` with a pattern derived from the file offset, so misplaced data shows.
void pattern(std::byte* p, size_t bytes, uint64_t offset, uint32_t salt) {
  for (size_t i = 0; i < bytes; i += 8) {
    const uint64_t v = (offset + i) * 0x9e3779b97f4a7c15ull + salt;
    std::memcpy(p + i, &v, 8);
  }
}

bool has_pattern(const std::byte* p, size_t bytes, uint64_t offset, uint32_t salt) {
  for (size_t i = 0; i < bytes; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    if (v != (offset + i) * 0x9e3779b97f4a7c15ull + salt) return false;
  }
  return true;
}

// Write `n` blocks of `block` bytes through the staging pool in one batch, then read them back.
void roundtrip(fixture& fx, uint32_t n, uint32_t block, uint32_t salt) {
  auto staging = fx.engine->staging();
  REQUIRE(staging.size() >= uint64_t{n} * block);
  for (uint32_t i = 0; i < n; ++i) {
    pattern(staging.data() + uint64_t{i} * block, block, uint64_t{i} * block, salt);
    REQUIRE(
        fx.engine->queue(io_op::kWrite, fx.handle, staging.data() + uint64_t{i} * block, block, uint64_t{i} * block, i)
            .ok());
  }
  std::vector<completion> done(n);
  uint32_t got = 0;
  while (got < n) {
    auto r = fx.engine->wait(std::span(done).subspan(got), 1);
    REQUIRE(r.ok());
    got += r.value();
  }
  for (const auto& c : done) CHECK(check_completion(c, "write").ok());
  std::memset(staging.data(), 0, uint64_t{n} * block);
  for (uint32_t i = 0; i < n; ++i)
    REQUIRE(
        fx.engine
            ->queue(io_op::kRead, fx.handle, staging.data() + uint64_t{i} * block, block, uint64_t{i} * block, 100 + i)
            .ok());
  got = 0;
  while (got < n) {
    auto r = fx.engine->wait(std::span(done).subspan(got), n - got);
    REQUIRE(r.ok());
    got += r.value();
  }
  for (const auto& c : done) {
    CHECK(c.user_data >= 100);
    CHECK(check_completion(c, "read").ok());
  }
  for (uint32_t i = 0; i < n; ++i)
    CHECK(has_pattern(staging.data() + uint64_t{i} * block, block, uint64_t{i} * block, salt));
  CHECK(fx.engine->idle());
}

}  // namespace

TEST_CASE("engine options are checked") {
  engine_options o;
  o.queue_depth = 0;
  CHECK(uring_engine::create(o).error().code() == errc::kInvalidArgument);
  o.queue_depth = 5000;
  CHECK(uring_engine::create(o).error().code() == errc::kInvalidArgument);
  o.queue_depth = 8;
  o.staging_bytes = 1000;
  CHECK(uring_engine::create(o).error().code() == errc::kInvalidArgument);
  o.staging_bytes = 2ull << 30;
  CHECK(uring_engine::create(o).error().code() == errc::kInvalidArgument);
  o.staging_bytes = 0;
  auto e = uring_engine::create(o);
  REQUIRE(e.ok());
  CHECK(e.value()->staging().empty());
  CHECK(e.value()->add_file(-1).error().code() == errc::kInvalidArgument);
  char c = 0;
  CHECK(e.value()->queue(io_op::kRead, 3, &c, 1, 0, 0).code() == errc::kInvalidArgument);
}

TEST_CASE("storage files: bad paths are clear errors") {
  CHECK(open_storage_file("", true, false).error().code() == errc::kInvalidArgument);
  auto missing = open_storage_file(ssd_test::scratch_file("nope/never"), false, false);
  CHECK(!missing.ok());
  CHECK(missing.error().message().find("nope/never") != std::string::npos);
  auto dir = open_storage_file(ssd_test::scratch_dir(), true, false);
  CHECK(!dir.ok());
  auto f = open_storage_file(ssd_test::scratch_file("sf"), true, false);
  REQUIRE(f.ok());
  CHECK(f->direct);
  CHECK(f->created);
  CHECK(f->offset_align >= 4096);
  CHECK(!f->block_device);
}

TEST_CASE("errno mapping") {
  CHECK(errno_status(ENOSPC, "x").code() == errc::kNoSpace);
  CHECK(errno_status(EDQUOT, "x").code() == errc::kNoSpace);
  CHECK(errno_status(EIO, "x").code() == errc::kIoError);
  CHECK(errno_status(ENOMEM, "x").code() == errc::kOutOfMemory);
  CHECK(check_completion({1, 100, 4096, io_op::kRead}, "r").code() == errc::kIoError);
  CHECK(check_completion({1, 4096, 4096, io_op::kRead}, "r").ok());
  CHECK(check_completion({1, 0, 0, io_op::kFsync}, "f").ok());
  CHECK(check_completion({1, -ENOSPC, 4096, io_op::kWrite}, "w").code() == errc::kNoSpace);
}

TEST_CASE("default engine: single issuer, deferred task run, registered pool and files") {
  fixture fx("default.bin");
  const auto& f = fx.engine->features();
  MESSAGE(f.describe());
  CHECK(f.single_issuer);
  CHECK(f.registered_files);
  CHECK(f.registered_staging);
  CHECK(f.queue_depth == 32);
  roundtrip(fx, 32, 64 * 1024, 1);
}

TEST_CASE("batches larger than the queue depth report kBusy until reaped") {
  engine_options o;
  o.queue_depth = 4;
  o.staging_bytes = 1 << 20;
  fixture fx("busy.bin", o);
  auto st = fx.engine->staging();
  for (uint32_t i = 0; i < 4; ++i)
    REQUIRE(fx.engine->queue(io_op::kWrite, fx.handle, st.data() + i * 4096, 4096, i * 4096, i).ok());
  CHECK(fx.engine->queue(io_op::kWrite, fx.handle, st.data(), 4096, 0, 9).code() == errc::kBusy);
  fx.engine->drain();
  CHECK(fx.engine->idle());
  roundtrip(fx, 4, 4096, 2);
}

TEST_CASE("plain (unregistered) buffers outside the pool") {
  fixture fx("plain.bin");
  void* p = nullptr;
  REQUIRE(::posix_memalign(&p, 4096, 1 << 20) == 0);
  auto* b = static_cast<std::byte*>(p);
  pattern(b, 1 << 20, 0, 3);
  CHECK(fx.engine->sync_io(io_op::kWrite, fx.handle, b, 1 << 20, 0).ok());
  std::memset(b, 0, 1 << 20);
  CHECK(fx.engine->sync_io(io_op::kRead, fx.handle, b, 1 << 20, 0).ok());
  CHECK(has_pattern(b, 1 << 20, 0, 3));
  std::free(p);
}

TEST_CASE("registration refused (ENOMEM) falls back to plain staging buffers") {
  engine_options o;
  o.simulate_register_error = ENOMEM;
  fixture fx("enomem.bin", o);
  CHECK(!fx.engine->features().registered_staging);
  CHECK(fx.engine->features().staging_register_errno == ENOMEM);
  roundtrip(fx, 16, 16384, 4);
}

TEST_CASE("IOPOLL without poll queues is detected at the first file and falls back") {
  engine_options o;
  o.iopoll = true;
  fixture fx("iopoll.bin", o);
  MESSAGE(fx.engine->features().describe());
  // This machine's disk has no poll queues; a device that has them keeps iopoll.
  CHECK((fx.engine->features().iopoll || fx.engine->features().iopoll_fell_back));
  if (fx.engine->features().iopoll_fell_back) CHECK(!fx.engine->features().iopoll);
  roundtrip(fx, 8, 65536, 5);
}

TEST_CASE("SQPOLL ring") {
  engine_options o;
  o.sqpoll = true;
  fixture fx("sqpoll.bin", o);
  MESSAGE(fx.engine->features().describe());
  roundtrip(fx, 16, 65536, 6);
}

TEST_CASE("without single issuer, and with unregistered files") {
  engine_options o;
  o.single_issuer = false;
  o.register_files = false;
  fixture fx("plainring.bin", o);
  CHECK(!fx.engine->features().single_issuer);
  CHECK(!fx.engine->features().registered_files);
  roundtrip(fx, 8, 4096, 7);
}

TEST_CASE("a single-issuer ring follows a new thread when idle") {
  fixture fx("thread.bin");
  roundtrip(fx, 4, 4096, 8);
  std::thread t([&] { roundtrip(fx, 4, 4096, 9); });
  t.join();
  roundtrip(fx, 4, 4096, 10);
}

TEST_CASE("fault seam: nth read/write fails with an errno or comes back short") {
  fixture fx("faults.bin");
  roundtrip(fx, 4, 4096, 11);
  auto st = fx.engine->staging();

  SUBCASE("EIO on the 2nd read") {
    fx.engine->set_fault({io_op::kRead, 2, EIO, 0});
    CHECK(fx.engine->sync_io(io_op::kRead, fx.handle, st.data(), 4096, 0).ok());
    const status s = fx.engine->sync_io(io_op::kRead, fx.handle, st.data(), 4096, 4096);
    CHECK(s.code() == errc::kIoError);
    CHECK(fx.engine->sync_io(io_op::kRead, fx.handle, st.data(), 4096, 4096).ok());  // one-shot
  }
  SUBCASE("short read") {
    fx.engine->set_fault({io_op::kRead, 1, 0, 512});
    const status s = fx.engine->sync_io(io_op::kRead, fx.handle, st.data(), 8192, 0);
    CHECK(s.code() == errc::kIoError);
    CHECK(s.message().find("short") != std::string::npos);
  }
  SUBCASE("ENOSPC write never reaches the device") {
    pattern(st.data(), 4096, 0, 99);
    fx.engine->set_fault({io_op::kWrite, 1, ENOSPC, 0});
    CHECK(fx.engine->sync_io(io_op::kWrite, fx.handle, st.data(), 4096, 0).code() == errc::kNoSpace);
    CHECK(fx.engine->sync_io(io_op::kRead, fx.handle, st.data(), 4096, 0).ok());
    CHECK(has_pattern(st.data(), 4096, 0, 11));  // old contents
  }
  SUBCASE("fsync failure") {
    fx.engine->set_fault({io_op::kFsync, 1, EIO, 0});
    CHECK(fx.engine->sync_io(io_op::kFsync, fx.handle, nullptr, 0, 0).code() == errc::kIoError);
    CHECK(fx.engine->sync_io(io_op::kFsync, fx.handle, nullptr, 0, 0).ok());
  }
  SUBCASE("a failure inside a batch is reported for that request only") {
    fx.engine->set_fault({io_op::kRead, 3, EIO, 0});
    for (uint32_t i = 0; i < 4; ++i)
      REQUIRE(fx.engine->queue(io_op::kRead, fx.handle, st.data() + i * 4096, 4096, i * 4096, i).ok());
    std::vector<completion> done(4);
    uint32_t got = 0;
    while (got < 4) got += fx.engine->wait(std::span(done).subspan(got), 1).value();
    int failures = 0;
    for (const auto& c : done) {
      if (!check_completion(c, "r").ok()) {
        ++failures;
        CHECK(c.user_data == 2);
      }
    }
    CHECK(failures == 1);
  }
  CHECK(fx.engine->idle());
}

// Completions routed by dispatch(): each reaches the handler whose id its tag carries, with its
// payload, also when another owner's wait reaps it; injected failures are routed the same way.
struct recording_handler final : completion_handler {
  std::vector<uint64_t> payloads;
  std::vector<int32_t> results;
  void on_completion(const completion& c) noexcept override {
    payloads.push_back(c.payload());
    results.push_back(c.result);
  }
};

TEST_CASE("dispatch hands each completion to the handler that queued it") {
  fixture fx("dispatch");
  recording_handler a, b;
  auto ha = fx.engine->add_handler(a);
  auto hb = fx.engine->add_handler(b);
  REQUIRE(ha.ok());
  REQUIRE(hb.ok());
  CHECK(ha.value() != 0);
  CHECK(ha.value() != hb.value());
  auto st = fx.engine->staging();
  REQUIRE(fx.engine->sync_io(io_op::kWrite, fx.handle, st.data(), 4 * 4096, 0).ok());
  fx.engine->set_fault({io_op::kRead, 4, EIO, 0});
  for (uint32_t i = 0; i < 4; ++i) {
    const uint64_t payload = kMaxPayload - i;  // the whole payload range survives the tag
    const uint32_t owner = i % 2 ? hb.value() : ha.value();
    REQUIRE(fx.engine->queue(io_op::kRead, fx.handle, st.data() + i * 4096, 4096, i * 4096, handler_tag(owner, payload))
                .ok());
  }
  // A completion naming no handler is dropped, not misrouted.
  REQUIRE(fx.engine->queue(io_op::kRead, fx.handle, st.data() + 4 * 4096, 4096, 0, handler_tag(0, 7)).ok());
  uint32_t got = 0;
  while (!fx.engine->idle()) {
    auto r = fx.engine->dispatch(1);
    REQUIRE(r.ok());
    got += r.value();
  }
  CHECK(got == 5);
  std::sort(a.payloads.begin(), a.payloads.end());
  std::sort(b.payloads.begin(), b.payloads.end());
  CHECK(a.payloads == std::vector<uint64_t>{kMaxPayload - 2, kMaxPayload});
  CHECK(b.payloads == std::vector<uint64_t>{kMaxPayload - 3, kMaxPayload - 1});
  CHECK(std::count(b.results.begin(), b.results.end(), -EIO) == 1);  // the 4th read, owner b
  CHECK(std::count(a.results.begin(), a.results.end(), 4096) == 2);
}

int main(int argc, char** argv) {
  return ssd_test::run_tests(argc, argv);
}
