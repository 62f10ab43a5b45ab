#include <doctest/doctest.h>

#include "instinfer/backend/backend.hpp"
#include "instinfer/backend/registry.hpp"
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

TEST_CASE("registry: one entry per scheme, from the kv_backend concept") {
  const auto entries = registered_backends();
  REQUIRE(entries.size() == 4);
  CHECK(entries[0].scheme == "host");
  for (const backend_entry& e : entries) {
    CHECK(find_backend(e.scheme) == &e);
    CHECK(static_cast<bool>(e.make));
    CHECK(static_cast<bool>(e.available));
    // A scheme that is not compiled in refuses with kUnsupported, never a crash.
    if (!e.compiled_in) CHECK(make_backend(std::string(e.scheme) + ":0").error().code() == errc::kUnsupported);
    // describe_backends lists exactly the compiled-in schemes and marks the unusable ones.
    const std::string d = describe_backends();
    CHECK((d.find(e.usage) != std::string::npos) == e.compiled_in);
  }
  CHECK(find_backend("tape") == nullptr);
  CHECK(find_backend("host")->available());
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
