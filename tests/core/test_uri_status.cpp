#include <doctest/doctest.h>

#include "instinfer/backend/backend.hpp"
#include "instinfer/backend/uri.hpp"

using namespace instinfer;

TEST_CASE("backend_uri: scheme, path and options") {
  auto u = backend_uri::parse("ssd:/tmp/kv.bin?queue_depth=32&staging=8M&buffered");
  REQUIRE(u.ok());
  CHECK(u->scheme == "ssd");
  CHECK(u->path == "/tmp/kv.bin");
  CHECK(u->option_u64("queue_depth", 1).value() == 32);
  CHECK(u->option_u64("staging", 0).value() == 8u << 20);
  CHECK(u->option_u64("absent", 7).value() == 7);
  CHECK(u->option_bool("buffered", false));
  CHECK_FALSE(u->option_u64("queue_depth", 0).ok() == false);
  auto bad = backend_uri::parse("ssd:/x?queue_depth=abc");
  REQUIRE(bad.ok());
  CHECK(bad->option_u64("queue_depth", 1).error().code() == errc::kInvalidArgument);
  CHECK(backend_uri::parse("host").value().path.empty());
}

TEST_CASE("backend_uri: malformed URIs are rejected with a message") {
  for (const char* text : {"", ":path", "SSD:/x", "ho st", "ssd:/x?=1"}) {
    auto u = backend_uri::parse(text);
    CHECK_FALSE(u.ok());
    CHECK(u.error().code() == errc::kInvalidArgument);
    CHECK(u.error().message().find("malformed backend URI") != std::string::npos);
  }
}

TEST_CASE("make_backend: unknown schemes and bad host options") {
  auto b = make_backend("tape:/dev/st0");
  CHECK(b.error().code() == errc::kInvalidArgument);
  CHECK(b.error().message().find("unknown backend scheme") != std::string::npos);
  CHECK(make_backend("host:/somewhere").error().code() == errc::kInvalidArgument);
  CHECK(make_backend("host:?colour=blue").error().code() == errc::kInvalidArgument);
  CHECK(make_backend("host").ok());
}

TEST_CASE("status: codes, names and messages") {
  status s{errc::kOutOfPages, "pool of 4 chunks is exhausted"};
  CHECK_FALSE(s.ok());
  CHECK(s.to_string() == "out of KV pages: pool of 4 chunks is exhausted");
  CHECK(status{}.ok());
  result<int> r = status{errc::kUnsupported, "x"};
  CHECK_FALSE(r.ok());
  CHECK(r.error().code() == errc::kUnsupported);
  result<int> v = 5;
  CHECK(v.ok());
  CHECK(*v == 5);
}
