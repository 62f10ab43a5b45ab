// A hostile host against the emulated drive's firmware (device/csd), in process: a victim
// namespace is seeded with known bytes, then the input drives commands from other namespaces and
// another queue pair, mostly well-formed (so they get past the first check) with a few fields
// mutated: other namespaces' ids and chunks, lengths that overflow, offsets past the data area,
// truncated payloads, unknown opcodes, and (queue-server mode) corrupt doorbells and SQ slots.
// Checked, besides ASan/UBSan and libFuzzer's per-input timeout:
//   - no byte of the victim's KV ever reaches memory a command of another namespace can see (the
//     attacker's data areas, the whole queue-pair region);
//   - a command writes nothing outside its result range, and claims no more result bytes than
//     that range holds; a failed command produces none;
//   - the victim's chunks read back unchanged and its attention result is bit-identical after all
//     of it.
// Work per input is bounded: at most kMaxCommands commands, data areas of kAreaBytes, a small flash.
//
// Input layout (fuzz/corpus/make_seeds.py writes the same; namespace configs include the quantized
// dtypes): one flags byte (bit0 queue-server mode,
// bit1 victim with SparF), then per command: selector (bit0 qp 1, bits1-3 namespace, bits4-7 opcode),
// the opcode's argument bytes (see build()), a mutation count byte and 3 bytes per mutation.
#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <memory>
#include <vector>

#include <unistd.h>

#include "drive.hpp"
#include "fuzz_input.hpp"
#include "instinfer/core/dtype.hpp"
#include "instinfer/csd/protocol.hpp"
#include "instinfer/csd/protocol_codec.hpp"
#include "instinfer/csd/queue_pair.hpp"
#include "queue_server.hpp"

using namespace instinfer;
using namespace instinfer::csd;

namespace {

constexpr uint64_t kAreaBytes = 64 << 10;  // each data area: bounds every payload and result
constexpr size_t kMaxCommands = 48;
constexpr uint32_t kPage = 4096;
constexpr uint32_t kDepth = 4;  // queue-server mode: at most 4 commands per poll
constexpr uint32_t kVictimTokens = 100;

// The victim's KV bytes repeat this marker. As f16 values they are finite (exponents 0x0f..0x10),
// so the victim's attention result is well defined.
constexpr uint8_t kMarker[16] = {0x11, 0x3c, 0x22, 0x3d, 0x33, 0x3e, 0x44, 0x3f,
                                 0x55, 0x40, 0x66, 0x41, 0x77, 0x42, 0x88, 0x43};

[[noreturn]] [[gnu::format(printf, 1, 2)]] void die(const char* fmt, ...) {
  std::va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "drive_fuzzer: ");
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fputc('\n', stderr);
  std::abort();
}

// Offset of the first whole marker in [p, p + n), or -1. Not instrumented for coverage (nor inlined
// into code that is): libFuzzer must not learn the marker from these comparisons, nor spend its
// time tracing them.
[[clang::no_sanitize("coverage"), gnu::noinline]] ptrdiff_t find_marker(const std::byte* p, uint64_t n) {
  const auto* b = reinterpret_cast<const uint8_t*>(p);
  const uint8_t* end = b + n;
  for (const uint8_t* at = b; end - at >= static_cast<ptrdiff_t>(sizeof kMarker);) {
    at = static_cast<const uint8_t*>(std::memchr(at, kMarker[0], static_cast<size_t>(end - at) - sizeof kMarker + 1));
    if (!at) break;
    size_t j = 1;
    while (j < sizeof kMarker && at[j] == kMarker[j]) ++j;
    if (j == sizeof kMarker) return at - b;
    ++at;
  }
  return -1;
}
// The first byte in [0, n) that differs between a and b outside [skip_begin, skip_end), or n.
[[clang::no_sanitize("coverage"), gnu::noinline]] uint64_t first_change(const std::byte* a, const std::byte* b,
                                                                        uint64_t n, uint64_t skip_begin,
                                                                        uint64_t skip_end) {
  for (uint64_t i = 0; i < n;) {
    uint64_t x, y;  // eight bytes at a time while they agree
    if (i + 8 <= n && (std::memcpy(&x, a + i, 8), std::memcpy(&y, b + i, 8), x == y)) {
      i += 8;
      continue;
    }
    if (a[i] != b[i] && (i < skip_begin || i >= skip_end)) return i;
    ++i;
  }
  return n;
}
// Input bytes must never carry the marker themselves: break any occurrence.
void scrub(std::byte* p, uint64_t n) {
  for (ptrdiff_t at; (at = find_marker(p, n)) >= 0;) p[at] ^= std::byte{0x80};
}

using instinfer::fuzz::input;

// 8-byte aligned memory (data areas must be: the drive checks offsets, not the base).
struct area {
  std::vector<uint64_t> words;
  explicit area(uint64_t bytes) : words(bytes / 8) {}
  std::byte* data() { return reinterpret_cast<std::byte*>(words.data()); }
  uint64_t size() const { return words.size() * 8; }
};

drive_options small_drive() {
  drive_options o;
  o.flash.channels = 2;
  o.flash.dies_per_channel = 2;
  o.flash.blocks_per_die = 8;
  o.flash.pages_per_block = 16;  // 512 pages: a hostile host can fill it
  o.flash.page_bytes = kPage;
  o.n_cores = 2;
  o.buffer_bytes = 64 << 10;  // 8 one-head chunks: writes evict each other's partial chunks
  o.max_namespaces = 6;
  o.pages_per_batch = 4;
  return o;
}

// What the attacker knows of a namespace it created: enough to aim commands at it (and at others).
struct ns_view {
  namespace_info info{};
  namespace_config cfg{};
  uint32_t qp = 0;
  std::map<uint32_t, uint32_t> fill;  // chunk -> tokens written (what the drive should think)
  uint32_t next_chunk = 0;            // next never-used chunk index
  uint64_t row_bytes() const {        // one token of one head
    const auto t = static_cast<dtype>(cfg.kv_dtype);
    return is_valid_dtype(t) ? dtype_row_bytes(t, cfg.head_dim) : cfg.head_dim * 2ull;
  }
};

class harness {
 public:
  harness(bool use_server, bool victim_sparf);
  void run(input& in);

 private:
  // ---- victim ----
  sq_entry victim_entry(opcode op) const {
    sq_entry e{};
    e.opcode = static_cast<uint8_t>(op);
    e.nsid = victim_.info.nsid;
    return e;
  }
  command_outcome victim_exec(const sq_entry& e) { return dev_->execute(0, e, victim_area_.data(), kAreaBytes); }
  void setup_victim(bool sparf);
  std::vector<std::byte> victim_attend();
  void check_victim();

  // ---- attacker ----
  uint32_t pick_nsid(uint8_t sel, uint32_t qp, input& in) const;
  uint32_t pick_chunk(const ns_view* own, input& in) const;
  ns_view* view_of(uint32_t nsid) {
    auto it = spaces_.find(nsid);
    return it == spaces_.end() ? nullptr : &it->second;
  }
  // One command: entry and payload (in `a`), from the input; false when the input asks for none.
  void build(uint8_t op_sel, uint32_t qp, uint32_t nsid, input& in, sq_entry& e, std::byte* a);
  void mutate(input& in, sq_entry& e, std::byte* a);
  // What a completion says, checked and learnt from: payload = the area as submitted, results =
  // the area after the command.
  void after(uint32_t qp, const sq_entry& e, const cq_entry& c, const std::byte* payload, const std::byte* results);
  void run_direct(uint32_t qp, const sq_entry& e);
  void run_served(uint32_t qp, const sq_entry& e, input& in);
  void scan(const std::byte* p, uint64_t n, const char* where) const {
    if (const ptrdiff_t at = find_marker(p, n); at >= 0)
      die("victim bytes leaked into %s at offset %td (%" PRIu64 " commands in)", where, at, commands_);
  }

  std::unique_ptr<drive> dev_;
  area victim_area_{kAreaBytes};
  area attacker_area_{kAreaBytes};
  ns_view victim_;
  std::vector<std::byte> victim_kv_;  // [tokens][1][64] f16, K and V alike
  std::vector<std::byte> victim_result_;
  std::map<uint32_t, ns_view> spaces_;  // namespaces the attacker created
  uint32_t last_nsid_ = 0;
  uint64_t commands_ = 0;

  // queue-server mode: a region in this process, qp 0 shared with the victim's owner, qp 1 the
  // attacker's; the victim's own commands bypass it (its area never holds anything it can leak).
  bool use_server_;
  region_layout layout_{2, kDepth, kAreaBytes};
  std::vector<uint64_t> region_;
  std::unique_ptr<queue_server> server_;
};

harness::harness(bool use_server, bool victim_sparf) : use_server_(use_server) {
  auto d = drive::create(small_drive());
  if (!d.ok()) die("drive::create: %s", d.error().to_string().c_str());
  dev_ = std::move(*d);
  setup_victim(victim_sparf);
  if (use_server_) {
    region_.assign(layout_.total_bytes() / 8, 0);
    auto* base = reinterpret_cast<std::byte*>(region_.data());
    server_ = std::make_unique<queue_server>(*dev_, base, layout_, true);
    server_->publish();
    for (uint32_t q = 0; q < 2; ++q)
      qp_view::at(base, layout_, q).control->owner_pid.store(static_cast<int32_t>(::getpid()));
  }
}

void harness::setup_victim(bool sparf) {
  namespace_config& c = victim_.cfg;
  c.n_layers = 1;
  c.n_kv_heads = 1;
  c.group_size = 2;
  c.head_dim = 64;
  c.page_bytes = kPage;
  c.kv_dtype = 1;  // f16
  c.sparf = sparf ? 1 : 0;
  c.capacity_chunks = 16;
  std::byte* a = victim_area_.data();
  std::memcpy(a, &c, sizeof c);
  sq_entry e = victim_entry(opcode::kConfig);
  e.nsid = 0;
  e.data_bytes = sizeof c;
  e.result_offset = 4096;
  e.result_bytes = sizeof(namespace_info);
  command_outcome r = victim_exec(e);
  if (r.cqe.status != 0) die("victim config: %s", r.error.c_str());
  std::memcpy(&victim_.info, a + 4096, sizeof victim_.info);

  // 100 tokens of seq 1 in 4 chunks: 3 sealed (programmed to flash), one partial (buffered).
  const uint32_t tpp = victim_.info.tokens_per_page, n_chunks = (kVictimTokens + tpp - 1) / tpp;
  victim_kv_.resize(uint64_t{kVictimTokens} * victim_.row_bytes());
  for (size_t i = 0; i < victim_kv_.size(); ++i) victim_kv_[i] = std::byte{kMarker[i % sizeof kMarker]};
  for (uint32_t i = 0; i < n_chunks; ++i) {
    const auto id = static_cast<uint32_t>(victim_.info.chunk_base + i);
    std::memcpy(a + uint64_t{i} * 4, &id, 4);
  }
  std::memcpy(a + n_chunks * 4, victim_kv_.data(), victim_kv_.size());
  std::memcpy(a + n_chunks * 4 + victim_kv_.size(), victim_kv_.data(), victim_kv_.size());
  e = victim_entry(opcode::kWriteKv);
  e.data_bytes = static_cast<uint32_t>(n_chunks * 4 + 2 * victim_kv_.size());
  set_args(e, write_kv_args{1, 0, 0, 0, kVictimTokens, n_chunks, 0});
  r = victim_exec(e);
  if (r.cqe.status != 0) die("victim write: %s", r.error.c_str());
  victim_result_ = victim_attend();
  check_victim();
}

std::vector<std::byte> harness::victim_attend() {
  const attend_wire_layout w = attend_wire_layout::make(1, 2, 64, false);
  std::byte* a = victim_area_.data();
  const attend_entry item{1, kVictimTokens, 0};
  std::memcpy(a + w.entries_offset, &item, sizeof item);
  for (uint32_t i = 0; i < 2 * 64; ++i) {
    const float q = static_cast<float>(i % 7) * 0.25f - 0.75f;
    std::memcpy(a + w.q_offset + i * 4, &q, 4);
  }
  sq_entry e = victim_entry(opcode::kAttend);
  e.data_bytes = static_cast<uint32_t>(w.data_bytes);
  e.result_offset = w.result_offset;
  e.result_bytes = static_cast<uint32_t>(w.result_bytes);
  set_args(e, attend_args{0, 1});
  const command_outcome r = victim_exec(e);
  if (r.cqe.status != 0) die("victim attend failed: %s", r.error.c_str());
  return {a + w.result_offset, a + w.result_offset + w.result_bytes};
}

// The victim's namespace holds exactly what it wrote and attends to the same bits.
void harness::check_victim() {
  const uint32_t tpp = victim_.info.tokens_per_page;
  const uint64_t chunk_bytes = 2ull * kPage;
  std::byte* a = victim_area_.data();
  for (uint32_t i = 0; i * tpp < kVictimTokens; ++i) {
    const uint32_t n = std::min(tpp, kVictimTokens - i * tpp);
    sq_entry e = victim_entry(opcode::kRead);
    e.result_bytes = static_cast<uint32_t>(chunk_bytes);
    set_args(e, read_args{static_cast<uint32_t>(victim_.info.chunk_base + i), n});
    const command_outcome r = victim_exec(e);
    if (r.cqe.status != 0) die("victim read of chunk %u failed: %s", i, r.error.c_str());
    // chunk_layout [K|V][head 0][token][dim]: K page then V page, each tpp rows.
    const uint64_t row = victim_.row_bytes();
    for (uint32_t kv = 0; kv < 2; ++kv)
      if (std::memcmp(a + kv * kPage, victim_kv_.data() + uint64_t{i} * tpp * row, n * row) != 0)
        die("victim chunk %u (%s) changed after %" PRIu64 " attacker commands", i, kv ? "V" : "K", commands_);
  }
  if (victim_attend() != victim_result_) die("victim attention changed after %" PRIu64 " commands", commands_);
}

// Namespace selectors: the attacker's own (on this qp), the victim's, 0, an unused id, any.
uint32_t harness::pick_nsid(uint8_t sel, uint32_t qp, input& in) const {
  std::vector<uint32_t> own;
  for (const auto& [id, v] : spaces_)
    if (v.qp == qp) own.push_back(id);
  switch (sel % 8) {
    case 0:
    case 1:
    case 2: return own.empty() ? last_nsid_ : own[sel / 8 % own.size()];
    case 3: return victim_.info.nsid;  // another qp's (or, on qp 0, filtered below)
    case 4: return last_nsid_;         // maybe another qp's
    case 5: return 0;
    case 6: return last_nsid_ + 1;  // not created yet
    default: return in.u32();
  }
}

// Chunk selectors: own chunks (fresh or written), the victim's, just outside a range, anything.
uint32_t harness::pick_chunk(const ns_view* own, input& in) const {
  const uint8_t sel = in.u8();
  const uint32_t base = own ? static_cast<uint32_t>(own->info.chunk_base) : 0;
  const uint32_t count = own ? static_cast<uint32_t>(own->info.chunk_count) : 1;
  switch (sel % 8) {
    case 0:
    case 1: return own ? base + own->next_chunk % count : 0;
    case 2:
    case 3:
      if (own && !own->fill.empty()) {
        auto it = own->fill.begin();
        std::advance(it, (sel >> 3) % own->fill.size());
        return it->first;
      }
      return base + (sel >> 3) % count;
    case 4: return static_cast<uint32_t>(victim_.info.chunk_base + (sel >> 3) % 4);
    case 5: return base + count;  // one past the end
    case 6: return base - 1;
    default: return in.u32();
  }
}

void harness::build(uint8_t op_sel, uint32_t qp, uint32_t nsid, input& in, sq_entry& e, std::byte* a) {
  static constexpr opcode kOps[] = {opcode::kIdentify,     opcode::kConfig, opcode::kDeleteNamespace,
                                    opcode::kWriteKv,      opcode::kAttend, opcode::kReclaim,
                                    opcode::kMap,          opcode::kCopy,   opcode::kRead,
                                    opcode::kAttendSparse, opcode::kStats,  opcode::kWriteKv,
                                    opcode::kAttend,       opcode::kRead,   opcode::kShutdown};
  e = sq_entry{};
  e.cid = static_cast<uint16_t>(commands_);
  e.nsid = nsid;
  const ns_view* own = nullptr;
  if (auto it = spaces_.find(nsid); it != spaces_.end()) own = &it->second;
  e.opcode = op_sel < std::size(kOps) ? static_cast<uint8_t>(kOps[op_sel]) : in.u8();  // 15: a raw opcode
  e.result_offset = kAreaBytes / 2;  // results in the upper half, payloads from 0
  e.result_bytes = kAreaBytes / 2;
  const uint64_t room = kAreaBytes / 2;
  switch (static_cast<opcode>(e.opcode)) {
    case opcode::kConfig: {
      namespace_config c{};
      const uint8_t b0 = in.u8(), b1 = in.u8();
      c.n_layers = b0 & 1 ? 2 : 1;
      c.n_kv_heads = b0 & 2 ? 2 : 1;
      c.group_size = b0 & 4 ? 2 : (b0 & 8 ? 0 : 1);
      static constexpr uint32_t kDims[] = {64, 128, 64, 96};
      c.head_dim = kDims[(b0 >> 4) & 3];
      c.page_bytes = b0 & 64 ? 2048 : kPage;
      c.kv_dtype = static_cast<uint8_t>((b0 & 128 ? 4 : 0) + (b1 & 3));  // f32 .. q4_0, then 5-7: not a dtype
      c.sparf = (b1 >> 2) % 3;
      static constexpr uint64_t kCaps[] = {0, 8, 64, uint64_t{1} << 26, (uint64_t{1} << 26) + 1, 3, 1, 1000};
      c.capacity_chunks = kCaps[(b1 >> 4) & 7];
      if (b1 & 128) c.scale = -1.0f;
      std::memcpy(a, &c, sizeof c);
      e.nsid = 0;
      e.data_bytes = sizeof c;
      e.result_bytes = sizeof(namespace_info);
      break;
    }
    case opcode::kWriteKv: {
      // Append n tokens to (seq, layer) from a chunk's current fill, over the chunks it takes.
      const uint8_t b0 = in.u8(), b1 = in.u8();
      write_kv_args w{};
      w.seq = b0 & 3;
      w.layer = (b0 >> 2) & 1;
      w.first_index = (b0 >> 3) & 7;
      w.n_tokens = b1 % 80 + (b1 == 0xff ? UINT32_MAX - 80 : 0);
      const uint32_t tpp = own ? own->info.tokens_per_page : 32;
      const uint32_t first = pick_chunk(own, in);
      uint32_t first_token = 0;
      if (own)
        if (auto f = own->fill.find(first); f != own->fill.end()) first_token = f->second;
      w.first_token = first_token % std::max(tpp, 1u);
      w.n_chunks = tpp ? static_cast<uint32_t>((uint64_t{w.first_token} + w.n_tokens + tpp - 1) / tpp) : 1;
      const uint64_t row = own ? uint64_t{own->cfg.n_kv_heads} * own->row_bytes() : 128;
      const uint64_t kv = uint64_t{w.n_tokens} * row;
      const uint32_t listed = std::min<uint32_t>(w.n_chunks, 64);
      uint64_t bytes = uint64_t{w.n_chunks} * 4 + 2 * kv;
      if (bytes > room) bytes = room;  // truncated: the drive must notice
      // Then never-written chunks of the namespace, as the host allocates them.
      const uint32_t base = own ? static_cast<uint32_t>(own->info.chunk_base) : 0;
      const uint32_t count = own ? static_cast<uint32_t>(own->info.chunk_count) : 1;
      const uint32_t fresh0 = own ? own->next_chunk + (first == base + own->next_chunk % count ? 1 : 0) : 0;
      for (uint32_t i = 0; i < listed && i * 4 + 4 <= room; ++i) {
        const uint32_t id = i == 0 ? first : base + (fresh0 + i - 1) % count;
        std::memcpy(a + i * 4, &id, 4);
      }
      // K and V values from the input; a few bytes go a long way.
      const uint8_t seed = in.u8();
      for (uint64_t i = listed * 4; i < bytes; ++i) a[i] = std::byte{static_cast<uint8_t>(seed + i * 13)};
      e.data_bytes = static_cast<uint32_t>(bytes);
      set_args(e, w);
      break;
    }
    case opcode::kAttend:
    case opcode::kAttendSparse: {
      const bool sparse = e.opcode == static_cast<uint8_t>(opcode::kAttendSparse);
      const uint8_t b0 = in.u8(), b1 = in.u8();
      const uint32_t n_items = b0 % 5 + (b0 == 0xff ? 70000 : 0);
      const uint32_t hq = own ? own->cfg.n_kv_heads * own->cfg.group_size : 2;
      const uint32_t d = own ? own->cfg.head_dim : 64;
      const attend_wire_layout w = attend_wire_layout::make(n_items, hq, d, sparse);
      if (sparse) {
        sparf_params p = (b1 & 3) == 0   ? sparf_params::with_compression(1.0)
                         : (b1 & 3) == 1 ? sparf_params::with_compression((b1 >> 2) / 63.0)
                                         : sparf_params::with_rk(b1 >> 3, in.u8());
        p.whole_pages = b1 & 4;
        sparf_wire_params wp = encode_sparf_params(p);
        if ((b1 & 3) == 3) wp.mode = in.u8();
        std::memcpy(a, &wp, sizeof wp);
        const uint8_t ends = in.u8();  // sinks, window and the policy (2: unknown)
        p.sink_tokens = ends & 0x30;
        p.window_tokens = (ends & 0x0c) * 16;
        p.policy = static_cast<sparse_policy>(ends % 3);
        const sparf_wire_ext wx = encode_sparf_ext(p);
        std::memcpy(a + sizeof wp, &wx, sizeof wx);
        const uint8_t share = in.u8();  // the channel share: 0 and 255 are out of range
        p.channel_share = share / 255.0 + (share == 128 ? 1.0 : 0.0);
        sparf_wire_ext2 wx2 = encode_sparf_ext2(p);
        if (share == 7) wx2.reserved[5] = 1;
        std::memcpy(a + kSparfParamsBytesV6, &wx2, sizeof wx2);
      }
      for (uint32_t i = 0; i < n_items && w.entries_offset + (i + 1) * sizeof(attend_entry) <= room; ++i) {
        const uint8_t t = in.u8();
        const attend_entry item{uint64_t{t} & 3, t < 0xf0 ? uint32_t{t} : in.u32(), 0};
        std::memcpy(a + w.entries_offset + i * sizeof item, &item, sizeof item);
      }
      for (uint64_t off = w.q_offset; off + 4 <= std::min(w.data_bytes, room); off += 4) {
        const float q = static_cast<float>((off * 7 + b1) % 17) * 0.125f - 1.0f;
        std::memcpy(a + off, &q, 4);
      }
      e.data_bytes = static_cast<uint32_t>(std::min(w.data_bytes, room));
      e.result_offset = room;
      e.result_bytes = static_cast<uint32_t>(std::min<uint64_t>(w.result_bytes, room));
      if (sparse)
        set_args(e, attend_sparse_args{static_cast<uint32_t>(b1 >> 7), n_items, kSparfParamsBytes, 0});
      else
        set_args(e, attend_args{static_cast<uint32_t>(b1 >> 7), n_items});
      break;
    }
    case opcode::kReclaim: {
      const uint8_t b0 = in.u8(), b1 = in.u8();
      reclaim_args r{};
      r.mode = b0 % 5;
      r.seq = (b0 >> 3) & 3;
      r.layer = (b0 >> 5) & 1;
      r.begin = b1 & 7;
      r.end = (b1 >> 3) & 15;
      r.n_chunks = b0 & 64 ? in.u32() : (b1 >> 6) + 1;
      r.erase_target_blocks = b0 & 128 ? 1 : 0;
      for (uint32_t i = 0; i < std::min<uint32_t>(r.n_chunks, 4); ++i) {
        const uint32_t id = pick_chunk(own, in);
        std::memcpy(a + i * 4, &id, 4);
      }
      e.data_bytes = r.mode == 0 ? static_cast<uint32_t>(std::min<uint64_t>(uint64_t{r.n_chunks} * 4, room)) : 0;
      set_args(e, r);
      break;
    }
    case opcode::kMap: {
      const uint8_t b0 = in.u8();
      map_args m{b0 & 3u, (b0 >> 2) & 1u, (b0 >> 3) % 6u};
      for (uint32_t i = 0; i < m.n_chunks; ++i) {
        const uint32_t id = pick_chunk(own, in);
        std::memcpy(a + i * 4, &id, 4);
      }
      e.data_bytes = m.n_chunks * 4;
      set_args(e, m);
      break;
    }
    case opcode::kCopy: {
      const uint8_t b0 = in.u8();
      copy_args c{};
      c.seq = b0 & 3;
      c.layer = (b0 >> 2) & 1;
      c.index = (b0 >> 3) & 3;
      c.dst = pick_chunk(own, in);
      c.src = pick_chunk(own, in);
      c.n_tokens = in.u8() % 40;
      set_args(e, c);
      break;
    }
    case opcode::kRead: {
      const uint32_t chunk = pick_chunk(own, in);
      const uint8_t b0 = in.u8();
      set_args(e, read_args{chunk, b0 % 40u});
      if (b0 & 64) e.result_bytes = b0 & 128 ? 4096 : 0;
      break;
    }
    case opcode::kIdentify:
    case opcode::kStats:
      e.nsid = in.u8() & 1 ? nsid : 0;
      if (in.u8() & 1) e.result_bytes = 16;
      break;
    default: break;  // delete namespace, shutdown, raw opcodes: the entry as it is
  }
  mutate(in, e, a);
  // Qp 0 is also the victim's: a command there for the victim's namespace would be the victim's
  // own (allowed to change it). Aim it one id further.
  if (qp == 0 && e.nsid == victim_.info.nsid) e.nsid += 1000;
  scrub(a, kAreaBytes);
}

// Up to 3 field mutations: count byte, then (field, value byte) pairs.
void harness::mutate(input& in, sq_entry& e, std::byte* a) {
  const uint32_t n = in.u8() % 4;
  for (uint32_t i = 0; i < n; ++i) {
    const uint8_t field = in.u8(), v = in.u8();
    switch (field % 12) {
      case 0: e.data_bytes += static_cast<int8_t>(v); break;                     // off by a little
      case 1: e.data_bytes = v & 1 ? UINT32_MAX - v : uint32_t{v} << 12; break;  // huge
      case 2: e.data_offset = v & 1 ? UINT64_MAX - v : kAreaBytes - v; break;    // past the end
      case 3: e.data_offset = v; break;                                          // misaligned
      case 4: e.result_offset = v & 1 ? UINT64_MAX - 7 * v : kAreaBytes - 8 * (v % 4); break;
      case 5: e.result_bytes = v & 1 ? UINT32_MAX - v : v; break;
      case 6: e.result_offset = uint64_t{v} * 8; break;  // results over the payload
      case 7: e.args[v % sizeof e.args] = in.u8(); break;
      case 8: e.args[v % sizeof e.args] ^= 0x80; break;
      case 9: a[(uint64_t{v} << 4 | in.u8()) % kAreaBytes] = std::byte{in.u8()}; break;
      case 10: e.opcode = v; break;
      default: e.flags = v; break;
    }
  }
}

// The attacker's model of its namespaces, from the commands that succeeded.
void harness::after(uint32_t qp, const sq_entry& e, const cq_entry& c, const std::byte* payload,
                    const std::byte* results) {
  if (c.cid != e.cid) die("completion cid %u for command cid %u", c.cid, e.cid);
  if (c.status != 0 && c.result != 0)
    die("failed command (opcode %u) claims %" PRIu64 " result bytes", e.opcode, c.result);
  if (c.status == 0 && c.result > e.result_bytes)
    die("opcode %u: %" PRIu64 " result bytes in a %u-byte result range", e.opcode, c.result, e.result_bytes);
  if (c.status != 0) return;
  const std::byte* a = payload;
  switch (static_cast<opcode>(e.opcode)) {
    case opcode::kConfig: {
      ns_view v;
      std::memcpy(&v.cfg, a + e.data_offset, sizeof v.cfg);
      std::memcpy(&v.info, results + e.result_offset, sizeof v.info);
      v.qp = qp;
      last_nsid_ = v.info.nsid;
      if (v.info.nsid == victim_.info.nsid) die("namespace id %u handed out twice", v.info.nsid);
      const uint64_t lo = v.info.chunk_base, hi = lo + v.info.chunk_count;
      const uint64_t vlo = victim_.info.chunk_base, vhi = vlo + victim_.info.chunk_count;
      if (lo < vhi && vlo < hi) die("namespace %u's chunks overlap the victim's", v.info.nsid);
      spaces_[v.info.nsid] = std::move(v);
      break;
    }
    case opcode::kDeleteNamespace: spaces_.erase(e.nsid); break;
    case opcode::kWriteKv:
      if (ns_view* v = view_of(e.nsid)) {
        const auto w = get_args<write_kv_args>(e);
        const uint32_t tpp = v->info.tokens_per_page;
        uint32_t left = w.n_tokens;
        for (uint32_t i = 0; i < w.n_chunks && i < (e.data_bytes / 4); ++i) {
          uint32_t id;
          std::memcpy(&id, a + e.data_offset + uint64_t{i} * 4, 4);
          const uint32_t first = i == 0 ? w.first_token : 0, take = std::min(tpp - first, left);
          v->fill[id] = first + take;
          left -= take;
          v->next_chunk = std::max<uint32_t>(v->next_chunk, static_cast<uint32_t>(id - v->info.chunk_base + 1));
        }
      }
      break;
    case opcode::kCopy:
      if (ns_view* v = view_of(e.nsid)) v->fill[get_args<copy_args>(e).dst] = get_args<copy_args>(e).n_tokens;
      break;
    case opcode::kReclaim:
      if (ns_view* v = view_of(e.nsid); v && get_args<reclaim_args>(e).mode == 0)
        for (uint32_t i = 0; i < e.data_bytes / 4; ++i) {
          uint32_t id;
          std::memcpy(&id, a + e.data_offset + uint64_t{i} * 4, 4);
          v->fill.erase(id);
        }
      break;
    default: break;
  }
}

// A command straight into execute(): the area outside its result range must not change.
void harness::run_direct(uint32_t qp, const sq_entry& e) {
  std::byte* a = attacker_area_.data();
  const std::vector<std::byte> before(a, a + kAreaBytes);
  const command_outcome r = dev_->execute(qp, e, a, kAreaBytes);
  const bool range_ok = e.result_offset <= kAreaBytes && e.result_bytes <= kAreaBytes - e.result_offset;
  const uint64_t skip_begin = range_ok ? e.result_offset : 0,
                 skip_end = range_ok ? e.result_offset + e.result_bytes : 0;
  if (const uint64_t i = first_change(a, before.data(), kAreaBytes, skip_begin, skip_end); i != kAreaBytes)
    die("opcode %u wrote byte %" PRIu64 " outside its result range [%" PRIu64 ", +%u)", e.opcode, i, e.result_offset,
        e.result_bytes);
  scan(a, kAreaBytes, "the attacker's data area");
  if (r.result_bytes != r.cqe.result) die("outcome and completion disagree on the result bytes");
  after(qp, e, r.cqe, before.data(), a);
}

// A command through the queue server's SQ, with the input free to corrupt the queue pair's
// indices first (qp 1 only: qp 0's owner is the victim's too). One poll: bounded work.
void harness::run_served(uint32_t qp, const sq_entry& e, input& in) {
  auto* base = reinterpret_cast<std::byte*>(region_.data());
  qp_view v = qp_view::at(base, layout_, qp);
  std::memcpy(v.data, attacker_area_.data(), kAreaBytes);
  const uint32_t tail = v.control->sq_tail.load();
  v.sq[tail % kDepth] = e;
  v.control->sq_tail.store(tail + 1);
  const uint8_t corrupt = in.u8();
  if (qp == 1 && (corrupt & 0xf0) == 0xf0) {
    switch (corrupt & 7) {
      case 0: v.control->sq_tail.store(in.u32()); break;
      case 1: v.control->sq_head.store(in.u32()); break;
      case 2: v.control->cq_head.store(in.u32()); break;
      case 3: v.control->cq_tail.store(in.u32()); break;
      case 4: v.control->generation.fetch_add(1); break;  // a new client: its namespaces go
      case 5: v.control->owner_pid.store(0); break;
      default: v.sq[in.u8() % kDepth].opcode = in.u8(); break;
    }
  }
  const uint32_t cq_before = v.control->cq_tail.load();
  server_->poll();
  // The host side consumes every completion (keeps room in the CQ).
  const uint32_t cq_after = v.control->cq_tail.load();
  if (cq_after - cq_before > kDepth)
    die("one poll posted %u completions on a %u-deep queue", cq_after - cq_before, kDepth);
  v.control->cq_head.store(cq_after);
  // Our command's completion (corrupt indices may have dropped it, or run stale slots too).
  for (uint32_t i = cq_before; i != cq_after; ++i) {
    const cq_entry& c = v.cq[i % kDepth];
    if (c.cid == e.cid) after(qp, e, c, attacker_area_.data(), v.data);
  }
  if (qp == 1 && v.control->owner_pid.load() == 0) v.control->owner_pid.store(static_cast<int32_t>(::getpid()));
  if (qp == 1 && (corrupt & 0xf7) == 0xf4) {  // the generation change dropped qp 1's namespaces
    for (auto it = spaces_.begin(); it != spaces_.end();) it = it->second.qp == 1 ? spaces_.erase(it) : std::next(it);
  }
  scan(base, layout_.total_bytes(), "the queue-pair region");
}

void harness::run(input& in) {
  while (!in.empty() && commands_ < kMaxCommands) {
    const uint8_t sel = in.u8();
    const uint32_t qp = sel & 1;
    const uint32_t nsid = pick_nsid((sel >> 1) & 7, qp, in);
    sq_entry e;
    std::memset(attacker_area_.data(), 0, kAreaBytes);
    build(sel >> 4, qp, nsid, in, e, attacker_area_.data());
    ++commands_;
    if (use_server_)
      run_served(qp, e, in);
    else
      run_direct(qp, e);
    if (e.opcode == static_cast<uint8_t>(opcode::kShutdown)) break;  // the drive would exit here
  }
  check_victim();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return -1;
  input in(data, size);
  const uint8_t flags = in.u8();
  harness h(flags & 1, flags & 2);
  h.run(in);
  return 0;
}
