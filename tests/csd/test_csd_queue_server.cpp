// The drive's queue server in-process: a drive and its queue_server on one thread, the host's
// connection (src/backend/csd/client.cpp) attached over a named queue-pair region in the same process.
// Every command crosses the real SQ/CQ/doorbell protocol and must mean exactly what it means when
// executed on a drive directly.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <unistd.h>
#include <atomic>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "csd_test_util.hpp"
#include "drive.hpp"
#include "instinfer/csd/client.hpp"
#include "instinfer/csd/protocol_codec.hpp"
#include "queue_server.hpp"

using namespace instinfer;
using namespace instinfer::csd;

namespace {

drive_options small_drive() {
  drive_options o;
  o.flash.channels = 4;
  o.flash.dies_per_channel = 2;
  o.flash.blocks_per_die = 16;
  o.flash.pages_per_block = 64;
  o.n_cores = 2;
  o.buffer_bytes = 1ull << 20;
  return o;
}

// The same command sequence, built into any data area: config, one write, one attend.
struct script {
  namespace_config cfg{};
  std::vector<std::byte> k, v;
  std::vector<float> q;
  uint32_t n_tokens = 37;

  script() {
    cfg.n_layers = 1;
    cfg.n_kv_heads = 2;
    cfg.group_size = 2;
    cfg.head_dim = 64;
    cfg.page_bytes = 4096;
    cfg.kv_dtype = static_cast<uint8_t>(dtype::kF16);
    std::mt19937 rng(7);
    k = csd_test::random_rows(rng, n_tokens, cfg.n_kv_heads, cfg.head_dim, dtype::kF16);
    v = csd_test::random_rows(rng, n_tokens, cfg.n_kv_heads, cfg.head_dim, dtype::kF16);
    q = csd_test::random_q(rng, uint64_t{cfg.n_kv_heads} * cfg.group_size * cfg.head_dim);
  }

  sq_entry config(std::byte* area) const {
    std::memcpy(area, &cfg, sizeof cfg);
    sq_entry e{};
    e.opcode = static_cast<uint8_t>(opcode::kConfig);
    e.data_bytes = sizeof cfg;
    e.result_offset = 4096;
    e.result_bytes = sizeof(namespace_info);
    return e;
  }
  // All tokens into consecutive chunks from the namespace's first, page-table positions 0...
  sq_entry write(std::byte* area, const namespace_info& ns) const {
    const uint32_t n_chunks = (n_tokens + ns.tokens_per_page - 1) / ns.tokens_per_page;
    for (uint32_t i = 0; i < n_chunks; ++i) {
      const auto id = static_cast<uint32_t>(ns.chunk_base + i);
      std::memcpy(area + uint64_t{i} * 4, &id, 4);
    }
    std::memcpy(area + uint64_t{n_chunks} * 4, k.data(), k.size());
    std::memcpy(area + uint64_t{n_chunks} * 4 + k.size(), v.data(), v.size());
    sq_entry e{};
    e.opcode = static_cast<uint8_t>(opcode::kWriteKv);
    e.nsid = ns.nsid;
    e.data_bytes = static_cast<uint32_t>(uint64_t{n_chunks} * 4 + k.size() + v.size());
    set_args(e, write_kv_args{1, 0, 0, 0, n_tokens, n_chunks, 0});
    return e;
  }
  sq_entry attend(std::byte* area, const namespace_info& ns) const {
    const attend_wire_layout wire = attend_wire_layout::make(1, cfg.n_kv_heads * cfg.group_size, cfg.head_dim, false);
    const attend_entry item{1, n_tokens, 0};
    std::memcpy(area + wire.entries_offset, &item, sizeof item);
    std::memcpy(area + wire.q_offset, q.data(), q.size() * 4);
    sq_entry e{};
    e.opcode = static_cast<uint8_t>(opcode::kAttend);
    e.nsid = ns.nsid;
    e.data_bytes = static_cast<uint32_t>(wire.data_bytes);
    e.result_offset = wire.result_offset;
    e.result_bytes = static_cast<uint32_t>(wire.result_bytes);
    set_args(e, attend_args{0, 1});
    return e;
  }
};

// A drive serving a named region on its own thread until shutdown.
struct served_drive {
  std::unique_ptr<drive> dev;
  std::string name = "qs-test-" + std::to_string(::getpid());
  region_layout layout{1, 64, 1u << 20};
  std::unique_ptr<shared_region> region;
  std::unique_ptr<queue_server> server;
  std::atomic<bool> stop{false};
  std::thread thread;

  served_drive() {
    auto d = drive::create(small_drive());
    REQUIRE(d.ok());
    dev = std::move(*d);
    auto r = shared_region::create_named(name, layout);
    REQUIRE_MESSAGE(r.ok(), r.error().to_string());
    region = std::make_unique<shared_region>(std::move(*r));
    server = std::make_unique<queue_server>(*dev, region->base(), layout, true);
    server->publish();
    thread = std::thread([this] { server->serve(stop); });
  }
  ~served_drive() {
    stop.store(true);
    if (thread.joinable()) thread.join();
    server->close();
  }
};

}  // namespace

TEST_CASE("queue server: commands over the queue pair mean what they mean on the drive directly") {
  const script s;
  // The reference: the same commands executed on a drive directly.
  auto direct = drive::create(small_drive());
  REQUIRE(direct.ok());
  std::vector<uint64_t> storage((1u << 20) / 8);
  auto* area = reinterpret_cast<std::byte*>(storage.data());
  command_outcome r = (*direct)->execute(0, s.config(area), area, 1u << 20);
  REQUIRE(r.cqe.status == 0);
  namespace_info direct_ns;
  std::memcpy(&direct_ns, area + 4096, sizeof direct_ns);
  REQUIRE((*direct)->execute(0, s.write(area, direct_ns), area, 1u << 20).cqe.status == 0);
  const sq_entry direct_attend = s.attend(area, direct_ns);
  REQUIRE((*direct)->execute(0, direct_attend, area, 1u << 20).cqe.status == 0);
  const std::vector<std::byte> want(area + direct_attend.result_offset,
                                    area + direct_attend.result_offset + direct_attend.result_bytes);

  served_drive served;
  connection_options co;
  co.attach = served.name;
  auto conn = connection::open(co);
  REQUIRE_MESSAGE(conn.ok(), conn.error().to_string());
  connection& c = **conn;
  CHECK(c.identity().n_cores == 2);
  CHECK(c.identity().page_bytes == 4096);

  REQUIRE(c.execute(s.config(c.area())).ok());
  namespace_info ns;
  std::memcpy(&ns, c.area() + 4096, sizeof ns);
  CHECK(ns.nsid == direct_ns.nsid);
  CHECK(ns.chunk_base == direct_ns.chunk_base);
  REQUIRE(c.execute(s.write(c.area(), ns)).ok());
  const sq_entry att = s.attend(c.area(), ns);
  REQUIRE(c.execute(att).ok());
  CHECK(c.last().result == att.result_bytes);
  CHECK(c.last().modelled_ns > 0);
  CHECK(std::memcmp(c.area() + att.result_offset, want.data(), want.size()) == 0);

  // A failing command: its status and the drive's message come back; the drive keeps serving.
  sq_entry bad = s.attend(c.area(), ns);
  bad.nsid = 999;
  const status st = c.execute(bad);
  CHECK(!st.ok());
  CHECK(st.message().find("namespace 999") != std::string::npos);
  CHECK(c.execute(s.attend(c.area(), ns)).ok());

  // Shutdown: completed, then the server stops by itself.
  sq_entry down{};
  down.opcode = static_cast<uint8_t>(opcode::kShutdown);
  CHECK(c.execute(down).ok());
  served.thread.join();
  CHECK(served.server->shut_down());
}
