// Stateful fuzzer of the C API (instinfer.h): the input decodes into a cache configuration and a
// sequence of calls, each checked against a small reference model kept here (per sequence and
// layer, the rows appended, as the cache dtype stores them; fork, fork_at, remove_range and state
// loads as documented):
//
//   - every call returns INSTINFER_OK or a code the call may return; when the arguments decide the
//     outcome (an unknown id, a layer out of range, a NULL pointer, p0 > p1, a position gap, a
//     corrupt state, ...) it must be exactly the documented code, checked in the documented order;
//   - on OK, lengths match the model; decode, causal chunk and sliced attention match a float64
//     attention over the model's rows (SparF: dense at compression 1, otherwise inside the convex
//     hull of the V rows); a saved state holds exactly the model's rows;
//   - a failed call changes nothing: the model stays, and the lengths and used chunks agree;
//   - at the end every sequence is attended and freed, and the cache holds no chunk (no leak).
//
// Backends: host, and ssd: with its file on tmpfs (/dev/shm). Input layout (fuzz/corpus/make_seeds.py
// writes the same):
//   header h0 h1 h2 h3:
//     h0: bit0 ssd, bits1-2 kv dtype (f32, f16, bf16; 3 = f16), bit3 SparF, bit4 two layers,
//         bit5 two kv heads, bit6 GQA group 2, bit7 soft cap 20
//     h1: bits0-1 page size, bits2-6 capacity in chunks - 1, bit7 scale 0.3 (else 1/sqrt(d))
//     h2: bits0-1 value magnitude, bit2 two threads, bits3-4 ssd write_batch, bit5 a quantized kv
//         dtype instead of h0's (bit6: q4_0, else q8_0), bit7 caller_threads
//     h3: salt of the value generator; with a q8_0 cache, bit7 also sets int8_query_dot
//   then ops, one opcode byte (mod kOpCount) each followed by its argument bytes (see run_op).
#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include <unistd.h>

#include "fuzz_input.hpp"
#include "instinfer/attention/decode.hpp"  // quantize_query_q8: the query int8_query_dot scores
#include "instinfer/core/dtype.hpp"
#include "instinfer/instinfer.h"

// fuzz/capi_c_calls.c: instinfer_append(_at) with any int as the dtype, as a C caller may pass.
extern "C" instinfer_status fuzz_append_raw_dtype(instinfer_cache* cache, instinfer_seq seq, uint32_t layer,
                                                  uint32_t n_tokens, const void* k, const void* v, int src_dtype);
extern "C" instinfer_status fuzz_append_at_raw_dtype(instinfer_cache* cache, instinfer_seq seq, uint32_t layer,
                                                     uint64_t pos, uint32_t n_tokens, const void* k, const void* v,
                                                     int src_dtype);

namespace {

constexpr uint32_t kHeadDim = 64;
constexpr size_t kMaxOps = 160;
constexpr double kTol = 1e-4;  // relative to the largest |V| of the head (the kernels' float math)

// INSTINFER_FUZZ_TRACE=1: print every checked call and its status (replaying one input).
const bool g_trace = std::getenv("INSTINFER_FUZZ_TRACE") != nullptr;

[[noreturn]] [[gnu::format(printf, 1, 2)]] void die(const char* fmt, ...) {
  std::va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "capi_fuzzer: ");
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, " (last error: %s)\n", instinfer_last_error());
  std::abort();
}

using instinfer::fuzz::input;

// Values from a seed byte: cheap and deterministic, so an input stays short.
struct splitmix {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uniform(float mag) { return mag * (static_cast<float>(next() >> 40) / 8388608.0f - 1.0f); }
};

const char* code_name(instinfer_status s) {
  return instinfer_status_name(s);
}

instinfer::dtype to_dtype(instinfer_dtype t) {
  return static_cast<instinfer::dtype>(t);
}
bool quantized(instinfer_dtype t) {
  return t == INSTINFER_DTYPE_Q8_0 || t == INSTINFER_DTYPE_Q4_0;
}
// Rows of `src` go into a cache of `cache` (instinfer.h): f32 into any, f16 / bf16 into a
// quantized cache, or exactly the cache dtype.
bool convertible(instinfer_dtype src, instinfer_dtype cache) {
  return src == cache || src == INSTINFER_DTYPE_F32 || (quantized(cache) && !quantized(src));
}

// CRC32C (Castagnoli), to forge sequence states that pass the checksum.
uint32_t crc32c(const uint8_t* p, size_t n) {
  uint32_t c = ~0u;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
  }
  return ~c;
}

// The rows of one (sequence, layer): [n][n_kv_heads][head_dim], the values the cache stores.
struct ref_layer {
  std::vector<float> k, v;
};
using ref_seq = std::vector<ref_layer>;

struct shape {
  uint32_t layers = 1, kv_heads = 1, group = 1, page_bytes = 4096, tpp = 0;
  uint64_t capacity_chunks = 1;
  instinfer_dtype dtype = INSTINFER_DTYPE_F16;
  bool ssd = false, sparf = false, caller_threads = false, int8_dot = false;
  float scale = 0.0f, softcap = 0.0f, magnitude = 1.0f;
  uint32_t q_heads() const { return kv_heads * group; }
  size_t row_floats() const { return size_t{kv_heads} * kHeadDim; }  // one token of every kv head
  uint64_t row_bytes() const { return instinfer::dtype_row_bytes(to_dtype(dtype), kHeadDim); }  // one head
};

class session {
 public:
  session(const shape& s, instinfer_cache* c, uint8_t salt) : s_(s), cache_(c), salt_(salt) {}
  ~session() {
    instinfer_cache_destroy(cache_);
    ::unlink(state_path().c_str());
  }

  void run_op(uint8_t opcode, input& in);
  void finish();

 private:
  enum op : uint8_t {
    kCreate,
    kFork,
    kFree,
    kRemoveRange,
    kLength,
    kAppend,
    kAttend,
    kAttendSparse,
    kPrefetch,
    kFlush,
    kStats,
    kNullCache,
    kCheck,
    // since C API 0.3
    kAppendAt,
    kForkAt,
    kAttendChunk,
    kAttendSlice,
    kState,
    kName,
    kOpCount
  };

  // ---- ids ----
  instinfer_seq pick(uint8_t sel) const {
    if (sel < 0xf0 && !live_.empty()) {
      auto it = live_.begin();
      std::advance(it, sel % live_.size());
      return it->first;
    }
    switch (sel & 3) {
      case 0: return 0;  // never a sequence
      case 1: return freed_.empty() ? 0 : freed_.back();
      case 2: return UINT64_MAX;
      default: return max_id_ + 1 + ((sel >> 2) & 3);  // not created yet
    }
  }
  bool known(instinfer_seq id) const { return live_.count(id) != 0; }
  uint32_t pick_layer(uint8_t b) const { return b & 0x80 ? s_.layers + (b & 3) : b % s_.layers; }
  uint64_t length_of(instinfer_seq id, uint32_t layer) const {
    return known(id) && layer < s_.layers ? live_.at(id)[layer].k.size() / s_.row_floats() : 0;
  }
  void add_sequence(instinfer_seq id, ref_seq rows, const char* call) {
    if (id == 0 || id <= max_id_ || known(id)) die("%s returned id %" PRIu64 " again or 0", call, id);
    max_id_ = id;
    live_[id] = std::move(rows);
  }

  // ---- expectations ----
  void expect(instinfer_status got, instinfer_status want, const char* call) const {
    if (g_trace) std::fprintf(stderr, "  %s -> %s\n", call, code_name(got));
    if (got != want) die("%s returned %s (%d), expected %s (%d)", call, code_name(got), got, code_name(want), want);
  }
  // OK, or one of the codes the resources of this cache may produce.
  void expect_ok_or(instinfer_status got, std::initializer_list<instinfer_status> allowed, const char* call) const {
    if (g_trace) std::fprintf(stderr, "  %s -> %s\n", call, code_name(got));
    if (got == INSTINFER_OK) return;
    for (instinfer_status a : allowed)
      if (got == a) return;
    die("%s returned %s (%d) with valid arguments", call, code_name(got), got);
  }
  instinfer_stats stats() const {
    instinfer_stats st{};
    st.struct_size = sizeof st;
    if (instinfer_status got = instinfer_cache_stats(cache_, &st); got != INSTINFER_OK)
      die("instinfer_cache_stats returned %s", code_name(got));
    return st;
  }
  // After a failed call: the model is unchanged, so the cache must agree with it as before.
  void check_unchanged(uint64_t used_before, const char* call) {
    const instinfer_stats st = stats();
    if (st.used_chunks != used_before)
      die("failed %s changed used chunks %" PRIu64 " -> %" PRIu64, call, used_before, st.used_chunks);
    check_lengths(call);
  }
  void check_lengths(const char* after) const {
    const instinfer_stats st = stats();
    if (st.n_sequences != live_.size())
      die("after %s: %" PRIu64 " sequences, model has %zu", after, st.n_sequences, live_.size());
    if (st.used_chunks > st.capacity_chunks) die("after %s: used chunks over capacity", after);
    for (const auto& [id, layers] : live_)
      for (uint32_t l = 0; l < s_.layers; ++l) {
        uint64_t n = UINT64_MAX;
        if (instinfer_status got = instinfer_seq_length(cache_, id, l, &n); got != INSTINFER_OK)
          die("after %s: instinfer_seq_length returned %s", after, code_name(got));
        const uint64_t want = layers[l].k.size() / s_.row_floats();
        if (n != want)
          die("after %s: sequence %" PRIu64 " layer %u holds %" PRIu64 " tokens, model %" PRIu64, after, id, l, n,
              want);
      }
  }
  // Out of pages is plausible only when fewer chunks are free than appending n tokens to a layer
  // of `have` tokens needs (besides a copied tail, which the model cannot tell).
  void check_out_of_pages(uint64_t used, uint64_t have, uint64_t n, const char* call) const {
    const uint64_t room = have % s_.tpp ? s_.tpp - have % s_.tpp : 0;
    const uint64_t need = n > room ? (n - room + s_.tpp - 1) / s_.tpp : 0;
    if (!s_.sparf && s_.capacity_chunks - used > need)
      die("%s: out of pages for %" PRIu64 " tokens (%" PRIu64 " chunks) with %" PRIu64 " free", call, n, need,
          s_.capacity_chunks - used);
  }
  uint64_t partial_tails(instinfer_seq src) const {
    uint64_t tails = 0;
    for (const ref_layer& r : live_.at(src)) tails += (r.k.size() / s_.row_floats()) % s_.tpp != 0;
    return tails;
  }

  // ---- rows ----
  // n tokens of K or V as the caller passes them in `src` (bytes) and as the cache stores them
  // (ref, widened to float): f32 values rounded or quantized to the cache dtype, 16-bit rows
  // quantized from their float values, cache-dtype rows as they are.
  void make_rows(splitmix& g, uint32_t n, instinfer_dtype src, std::vector<std::byte>& bytes,
                 std::vector<float>& ref) const {
    const size_t count = size_t{n} * s_.row_floats();
    std::vector<float> f(count);
    for (float& x : f) x = g.uniform(s_.magnitude);
    const auto cache_t = to_dtype(s_.dtype), src_t = to_dtype(src);
    bytes.resize(instinfer::dtype_row_bytes(src_t, count));
    (void)instinfer::convert_elements(f.data(), instinfer::dtype::kF32, bytes.data(), src_t, count);
    std::vector<std::byte> stored;
    if (src_t == cache_t || !convertible(src, s_.dtype)) {
      stored = bytes;
    } else {
      std::vector<float> widened(count);
      (void)instinfer::convert_elements(bytes.data(), src_t, widened.data(), instinfer::dtype::kF32, count);
      stored.resize(instinfer::dtype_row_bytes(cache_t, count));
      (void)instinfer::convert_elements(widened.data(), instinfer::dtype::kF32, stored.data(), cache_t, count);
    }
    ref.resize(count);
    if (convertible(src, s_.dtype))
      (void)instinfer::convert_elements(stored.data(), cache_t, ref.data(), instinfer::dtype::kF32, count);
  }

  // ---- attention reference ----
  struct expected_row {
    std::vector<double> out, lse;  // [q_heads][d], [q_heads]
    std::vector<double> vmin, vmax, vmag;
  };
  // Attention of one query row [q_heads][d] over the first n_visible tokens of r.
  expected_row reference(const ref_layer& r, const float* q, size_t n_visible) const {
    const uint32_t d = kHeadDim, hq = s_.q_heads();
    const size_t n = std::min(n_visible, r.k.size() / s_.row_floats());
    const double scale = s_.scale > 0.0f ? s_.scale : 1.0 / std::sqrt(static_cast<double>(d));
    expected_row e;
    e.out.assign(size_t{hq} * d, 0.0);
    e.lse.assign(hq, -std::numeric_limits<double>::infinity());
    e.vmin.assign(size_t{hq} * d, std::numeric_limits<double>::infinity());
    e.vmax.assign(size_t{hq} * d, -std::numeric_limits<double>::infinity());
    e.vmag.assign(hq, 0.0);
    std::vector<double> logit(n);
    for (uint32_t h = 0; h < hq; ++h) {
      const uint32_t kvh = h / s_.group;
      double m = -std::numeric_limits<double>::infinity();
      for (size_t j = 0; j < n; ++j) {
        const float* kr = r.k.data() + (j * s_.kv_heads + kvh) * d;
        double dot = 0.0;
        for (uint32_t x = 0; x < d; ++x) dot += double{q[size_t{h} * d + x]} * kr[x];
        double z = scale * dot;
        if (s_.softcap > 0.0f) z = s_.softcap * std::tanh(z / s_.softcap);
        logit[j] = z;
        m = std::max(m, z);
      }
      double sum = 0.0;
      for (size_t j = 0; j < n; ++j) {
        const double w = std::exp(logit[j] - m);
        sum += w;
        const float* vr = r.v.data() + (j * s_.kv_heads + kvh) * d;
        for (uint32_t x = 0; x < d; ++x) {
          e.out[size_t{h} * d + x] += w * vr[x];
          e.vmin[size_t{h} * d + x] = std::min<double>(e.vmin[size_t{h} * d + x], vr[x]);
          e.vmax[size_t{h} * d + x] = std::max<double>(e.vmax[size_t{h} * d + x], vr[x]);
          e.vmag[h] = std::max<double>(e.vmag[h], std::fabs(vr[x]));
        }
      }
      if (n == 0) continue;
      for (uint32_t x = 0; x < d; ++x) e.out[size_t{h} * d + x] /= sum;
      e.lse[h] = m + std::log(sum);
    }
    return e;
  }
  // One output row [q_heads][d] (+ lse) against the model over its first n_visible tokens. dense:
  // exact attention; otherwise SparF's estimate, a blend of convex combinations of V rows.
  void check_row(const char* call, instinfer_seq id, uint32_t layer, const float* q, const float* out, const float* lse,
                 bool dense, size_t n_visible = SIZE_MAX) const {
    const ref_layer& r = live_.at(id)[layer];
    const uint32_t d = kHeadDim, hq = s_.q_heads();
    const size_t n = std::min(n_visible, r.k.size() / s_.row_floats());
    const expected_row e = reference(r, q, n);
    // int8_query_dot: dense attention scores the query rounded to q8_0 (sparse passes stay f32),
    // so a dense row may equal either reference.
    expected_row e8;
    if (s_.int8_dot && dense && n > 0) {
      std::vector<float> rounded(size_t{hq} * d);
      int8_t qs[kHeadDim];
      float qd[kHeadDim / 32];
      for (uint32_t h = 0; h < hq; ++h) {
        instinfer::quantize_query_q8(q + size_t{h} * d, d, qs, qd);
        for (uint32_t x = 0; x < d; ++x) rounded[size_t{h} * d + x] = static_cast<float>(qs[x]) * qd[x / 32];
      }
      e8 = reference(r, rounded.data(), n);
    }
    const auto near = [&](const expected_row& want, size_t i, double got, double tol) {
      return !want.out.empty() && std::fabs(got - want.out[i]) <= tol;
    };
    for (uint32_t h = 0; h < hq; ++h) {
      const double tol = kTol * std::max(e.vmag[h], 1e-3);
      for (uint32_t x = 0; x < d; ++x) {
        const double got = out[size_t{h} * d + x];
        const size_t i = size_t{h} * d + x;
        bool ok;
        if (n == 0)
          ok = got == 0.0;
        else if (dense)
          ok = near(e, i, got, tol) || near(e8, i, got, tol);
        else
          ok = got >= e.vmin[i] - tol && got <= e.vmax[i] + tol;
        if (!ok)
          die("%s: sequence %" PRIu64
              " layer %u (%zu tokens visible) head %u dim %u: got %.9g, want %.9g (range [%g, "
              "%g])",
              call, id, layer, n, h, x, got, e.out[i], e.vmin[i], e.vmax[i]);
      }
      if (!lse) continue;
      const double got = lse[h];
      bool ok;
      if (n == 0)
        ok = std::isinf(got) && got < 0;
      else if (dense)
        ok = std::fabs(got - e.lse[h]) <= kTol * std::max(1.0, std::fabs(e.lse[h])) ||
             (!e8.lse.empty() && std::fabs(got - e8.lse[h]) <= kTol * std::max(1.0, std::fabs(e8.lse[h])));
      else
        ok = std::isfinite(got);
      if (!ok) die("%s: sequence %" PRIu64 " layer %u head %u: lse %.9g, want %.9g", call, id, layer, h, got, e.lse[h]);
    }
  }

  // ---- sequence states (the format of src/core/kv_cache_state.cpp, read independently) ----
  static constexpr size_t kStateFixed = 8 + 7 * 4;  // magic, version, header bytes, shape (5 x u32)
  uint64_t state_size(const ref_seq& r) const {
    uint64_t bytes = kStateFixed + 4ull * s_.layers + 4;
    for (const ref_layer& l : r) bytes += 2 * (l.k.size() / s_.row_floats()) * s_.kv_heads * s_.row_bytes();
    return bytes;
  }
  // The rows a state holds, widened to float; false when it is not a state of this shape.
  bool parse_state(const std::vector<uint8_t>& b, ref_seq& out) const {
    const auto u32 = [&](size_t at) {
      uint32_t v = 0;
      for (int i = 0; i < 4; ++i) v |= uint32_t{b[at + i]} << (8 * i);
      return v;
    };
    if (b.size() < kStateFixed + 4ull * s_.layers + 4 || std::memcmp(b.data(), "IIKVSEQ1", 8) != 0) return false;
    if (u32(8) != 1 || u32(12) != kStateFixed + 4 * s_.layers || u32(16) != s_.layers || u32(20) != s_.q_heads() ||
        u32(24) != s_.kv_heads || u32(28) != kHeadDim || u32(32) != static_cast<uint32_t>(s_.dtype))
      return false;
    out.assign(s_.layers, ref_layer{});
    size_t at = kStateFixed + 4ull * s_.layers;
    const uint64_t row = s_.kv_heads * s_.row_bytes();
    for (uint32_t l = 0; l < s_.layers; ++l) {
      const uint64_t n = u32(kStateFixed + 4ull * l);
      for (std::vector<float>* rows : {&out[l].k, &out[l].v}) {
        if (at + n * row > b.size()) return false;
        rows->resize(n * s_.row_floats());
        if (n != 0)  // an empty vector's data() may be null
          (void)instinfer::convert_elements(b.data() + at, to_dtype(s_.dtype), rows->data(), instinfer::dtype::kF32,
                                            rows->size());
        at += n * row;
      }
    }
    return at + 4 == b.size() && u32(at) == crc32c(b.data(), at);
  }
  static void fix_crc(std::vector<uint8_t>& b) {
    const uint32_t c = crc32c(b.data(), b.size() - 4);
    for (int i = 0; i < 4; ++i) b[b.size() - 4 + i] = static_cast<uint8_t>(c >> (8 * i));
  }
  std::string state_path() const { return "/dev/shm/instinfer-fuzz-state-" + std::to_string(::getpid()) + ".bin"; }
  // Load a state and check the outcome: OK (the model gains `rows`) or out of pages, else `want`.
  void load(const std::vector<uint8_t>& b, const ref_seq* rows, instinfer_status want, const char* call);

  // ---- ops ----
  void op_create(input& in);
  void op_fork(input& in);
  void op_fork_at(input& in);
  void op_free(input& in);
  void op_remove_range(input& in);
  void op_length(input& in);
  void op_append(input& in, bool at);
  void op_attend(input& in, bool sparse, bool slice);
  void op_attend_chunk(input& in);
  void op_prefetch(input& in);
  void op_flush();
  void op_stats(input& in);
  void op_null_cache(input& in);
  void op_state(input& in);
  void op_name(input& in);
  void attend_all(uint32_t layer, const char* why);

  shape s_;
  instinfer_cache* cache_;
  uint8_t salt_;
  uint64_t op_index_ = 0;
  std::map<instinfer_seq, ref_seq> live_;
  std::map<uint64_t, instinfer_seq> names_;  // the model of the cache's sequence names
  std::vector<instinfer_seq> freed_;
  instinfer_seq max_id_ = 0;
};

void session::run_op(uint8_t opcode, input& in) {
  ++op_index_;
  switch (opcode % kOpCount) {
    case kCreate: return op_create(in);
    case kFork: return op_fork(in);
    case kFree: return op_free(in);
    case kRemoveRange: return op_remove_range(in);
    case kLength: return op_length(in);
    case kAppend: return op_append(in, false);
    case kAttend: return op_attend(in, false, false);
    case kAttendSparse: return op_attend(in, true, false);
    case kPrefetch: return op_prefetch(in);
    case kFlush: return op_flush();
    case kStats: return op_stats(in);
    case kNullCache: return op_null_cache(in);
    case kCheck: return attend_all(in.u8() % s_.layers, "check");
    case kAppendAt: return op_append(in, true);
    case kForkAt: return op_fork_at(in);
    case kAttendChunk: return op_attend_chunk(in);
    case kAttendSlice: return op_attend(in, false, true);
    case kState: return op_state(in);
    case kName: return op_name(in);
  }
}

void session::op_create(input&) {
  instinfer_seq id = 0;
  expect(instinfer_seq_create(cache_, &id), INSTINFER_OK, "instinfer_seq_create");
  add_sequence(id, ref_seq(s_.layers), "instinfer_seq_create");
}

// fork: sel, flags (bit0: NULL out_seq)
void session::op_fork(input& in) {
  const instinfer_seq src = pick(in.u8());
  const bool null_out = in.u8() & 1;
  const uint64_t used = stats().used_chunks;
  instinfer_seq id = 0;
  const instinfer_status st = instinfer_seq_fork(cache_, src, null_out ? nullptr : &id);
  if (null_out) return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_seq_fork(NULL out)");
  if (!known(src)) return expect(st, INSTINFER_E_UNKNOWN_SEQUENCE, "instinfer_seq_fork(unknown)");
  expect_ok_or(st, {INSTINFER_E_OUT_OF_PAGES}, "instinfer_seq_fork");
  if (st != INSTINFER_OK) {
    // Out of pages only when the partial tails to copy do not fit.
    if (!s_.sparf && s_.capacity_chunks - used >= partial_tails(src))
      die("instinfer_seq_fork: out of pages with %" PRIu64 " free chunks for %" PRIu64 " tails",
          s_.capacity_chunks - used, partial_tails(src));
    return check_unchanged(used, "instinfer_seq_fork");
  }
  add_sequence(id, live_.at(src), "instinfer_seq_fork");
}

// fork_at: sel, position (0xff: past the shortest layer, else min length - byte % 4 clipped at 0),
// flags (bit0: NULL out_seq)
void session::op_fork_at(input& in) {
  const instinfer_seq src = pick(in.u8());
  const uint8_t b = in.u8();
  const bool null_out = in.u8() & 1;
  uint64_t shortest = UINT64_MAX;
  for (uint32_t l = 0; l < s_.layers; ++l) shortest = std::min(shortest, length_of(src, l));
  const uint64_t pos = b == 0xff ? shortest + 1 + (b & 1) : shortest - std::min<uint64_t>(shortest, b % 4);
  const uint64_t used = stats().used_chunks;
  instinfer_seq id = 0;
  const instinfer_status st = instinfer_seq_fork_at(cache_, src, pos, null_out ? nullptr : &id);
  if (null_out) return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_seq_fork_at(NULL out)");
  if (!known(src)) return expect(st, INSTINFER_E_UNKNOWN_SEQUENCE, "instinfer_seq_fork_at(unknown)");
  if (pos > shortest) return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_seq_fork_at(past a layer's end)");
  // The fork copies src's partial tails before cutting them: it may run out of pages.
  expect_ok_or(st, {INSTINFER_E_OUT_OF_PAGES}, "instinfer_seq_fork_at");
  if (st != INSTINFER_OK) {
    if (!s_.sparf && s_.capacity_chunks - used >= partial_tails(src))
      die("instinfer_seq_fork_at: out of pages with %" PRIu64 " free chunks for %" PRIu64 " tails",
          s_.capacity_chunks - used, partial_tails(src));
    return check_unchanged(used, "instinfer_seq_fork_at");
  }
  ref_seq rows = live_.at(src);
  for (ref_layer& r : rows) {
    r.k.resize(pos * s_.row_floats());
    r.v.resize(pos * s_.row_floats());
  }
  add_sequence(id, std::move(rows), "instinfer_seq_fork_at");
  check_lengths("instinfer_seq_fork_at");
}

void session::op_free(input& in) {
  const instinfer_seq id = pick(in.u8());
  const instinfer_status st = instinfer_seq_free(cache_, id);
  if (!known(id)) return expect(st, INSTINFER_E_UNKNOWN_SEQUENCE, "instinfer_seq_free(unknown)");
  expect(st, INSTINFER_OK, "instinfer_seq_free");
  live_.erase(id);
  std::erase_if(names_, [id](const auto& n) { return n.second == id; });  // a freed sequence's name goes
  freed_.push_back(id);
}

// Names (C API 0.5): set (names 0-4 on any id, 0 removes), find (names 1-5), list (capacity 0-3).
// The model: a name is unique in the cache, moves with set, and goes with a freed sequence.
void session::op_name(input& in) {
  const uint8_t what = in.u8() % 3;
  if (what == 0) {
    const instinfer_seq id = pick(in.u8());
    const uint64_t name = in.u8() % 5;
    const instinfer_status st = instinfer_seq_set_name(cache_, id, name);
    if (!known(id)) return expect(st, INSTINFER_E_UNKNOWN_SEQUENCE, "instinfer_seq_set_name(unknown)");
    uint64_t current = 0;
    for (const auto& [n, s] : names_)
      if (s == id) current = n;
    if (name != 0 && name != current && names_.count(name) != 0)
      return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_seq_set_name(name taken)");
    expect(st, INSTINFER_OK, "instinfer_seq_set_name");
    if (current != 0) names_.erase(current);
    if (name != 0) names_[name] = id;
  } else if (what == 1) {
    const uint64_t name = 1 + in.u8() % 5;
    instinfer_seq found = 0;
    const instinfer_status st = instinfer_seq_find(cache_, name, &found);
    auto it = names_.find(name);
    if (it == names_.end()) return expect(st, INSTINFER_E_UNKNOWN_SEQUENCE, "instinfer_seq_find(unnamed)");
    expect(st, INSTINFER_OK, "instinfer_seq_find");
    if (found != it->second)
      die("instinfer_seq_find(%" PRIu64 ") gave sequence %" PRIu64 ", not %" PRIu64, name, found, it->second);
  } else {
    const size_t capacity = in.u8() % 4;
    uint64_t names[3] = {};
    instinfer_seq seqs[3] = {};
    size_t count = SIZE_MAX;
    expect(instinfer_seq_names(cache_, capacity ? names : nullptr, capacity ? seqs : nullptr, capacity, &count),
           INSTINFER_OK, "instinfer_seq_names");
    if (count != names_.size()) die("instinfer_seq_names counted %zu names, the model %zu", count, names_.size());
    auto it = names_.begin();
    for (size_t i = 0; i < std::min(capacity, count); ++i, ++it)
      if (names[i] != it->first || seqs[i] != it->second)
        die("instinfer_seq_names pair %zu: (%" PRIu64 ", %" PRIu64 "), the model (%" PRIu64 ", %" PRIu64 ")", i,
            names[i], seqs[i], it->first, it->second);
  }
}

// remove_range: sel, a, b, mode. p0 = a; p1 = p0 + b, UINT64_MAX, b (p0 > p1 when b < a) or p0.
void session::op_remove_range(input& in) {
  const instinfer_seq id = pick(in.u8());
  const uint64_t a = in.u8(), b = in.u8();
  const uint8_t mode = in.u8() % 4;
  const uint64_t p0 = a;
  const uint64_t p1 = mode == 0 ? p0 + b : mode == 1 ? UINT64_MAX : mode == 2 ? b : p0;
  const uint64_t used = stats().used_chunks;
  const instinfer_status st = instinfer_seq_remove_range(cache_, id, p0, p1);
  if (!known(id)) return expect(st, INSTINFER_E_UNKNOWN_SEQUENCE, "instinfer_seq_remove_range(unknown)");
  if (p0 > p1) return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_seq_remove_range(p0 > p1)");
  // An interior range re-appends the suffix: it may need fresh chunks.
  expect_ok_or(st, {INSTINFER_E_OUT_OF_PAGES}, "instinfer_seq_remove_range");
  if (st != INSTINFER_OK) return check_unchanged(used, "instinfer_seq_remove_range");
  const size_t row = s_.row_floats();
  for (ref_layer& r : live_.at(id)) {
    const uint64_t n = r.k.size() / row;
    if (p0 >= n || p0 == p1) continue;
    const uint64_t end = std::min(p1, n);
    r.k.erase(r.k.begin() + static_cast<ptrdiff_t>(p0 * row), r.k.begin() + static_cast<ptrdiff_t>(end * row));
    r.v.erase(r.v.begin() + static_cast<ptrdiff_t>(p0 * row), r.v.begin() + static_cast<ptrdiff_t>(end * row));
  }
  check_lengths("instinfer_seq_remove_range");
}

// length: sel, layer, flags (bit0: NULL out)
void session::op_length(input& in) {
  const instinfer_seq id = pick(in.u8());
  const uint32_t layer = pick_layer(in.u8());
  const bool null_out = in.u8() & 1;
  uint64_t n = 0;
  const instinfer_status st = instinfer_seq_length(cache_, id, layer, null_out ? nullptr : &n);
  if (null_out) return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_seq_length(NULL out)");
  if (layer >= s_.layers) return expect(st, INSTINFER_E_LAYER_OUT_OF_RANGE, "instinfer_seq_length(layer)");
  if (!known(id)) return expect(st, INSTINFER_E_UNKNOWN_SEQUENCE, "instinfer_seq_length(unknown)");
  expect(st, INSTINFER_OK, "instinfer_seq_length");
  if (n != length_of(id, layer)) die("instinfer_seq_length disagrees with the model");
}

// append / append_at: sel, layer, n, dtype flags, value seed; append_at then a position byte.
// dtype flags: bits0-1 f32, the cache dtype, a 16-bit dtype (f16, or bf16 for an f16 cache), or
// bit4 ? the quantized dtype the cache is not : not a dtype (5 + bits5-7); bit2 NULL k; bit3 NULL v.
// Position: 0xff past the end, 0xfe before it (when not empty), else the layer's length.
void session::op_append(input& in, bool at) {
  const char* call = at ? "instinfer_append_at" : "instinfer_append";
  const instinfer_seq id = pick(in.u8());
  const uint32_t layer = pick_layer(in.u8());
  const uint32_t n = in.u8() % (3 * s_.tpp + 2);
  const uint8_t flags = in.u8();
  splitmix g{(uint64_t{salt_} << 40) ^ (op_index_ << 8) ^ in.u8()};
  const uint8_t which = flags & 3;
  const bool bogus = which == 3 && !(flags & 16);
  const instinfer_dtype other16 = s_.dtype == INSTINFER_DTYPE_F16 ? INSTINFER_DTYPE_BF16 : INSTINFER_DTYPE_F16;
  const instinfer_dtype otherq = s_.dtype == INSTINFER_DTYPE_Q8_0 ? INSTINFER_DTYPE_Q4_0 : INSTINFER_DTYPE_Q8_0;
  const instinfer_dtype src = which == 0 ? INSTINFER_DTYPE_F32 : which == 1 ? s_.dtype : which == 2 ? other16 : otherq;
  const int raw = bogus ? 5 + (flags >> 5) : static_cast<int>(src);
  const bool null_k = flags & 4, null_v = flags & 8;
  const uint64_t have = length_of(id, layer);
  uint64_t pos = have;
  if (at) {
    const uint8_t b = in.u8();
    if (b == 0xff) pos = have + 1;
    if (b == 0xfe && have > 0) pos = have - 1;
  }

  std::vector<std::byte> kb, vb;
  std::vector<float> kr, vr;
  make_rows(g, std::max(n, 1u), bogus ? INSTINFER_DTYPE_F32 : src, kb, kr);
  make_rows(g, std::max(n, 1u), bogus ? INSTINFER_DTYPE_F32 : src, vb, vr);
  const uint64_t used = stats().used_chunks;
  const void* k = null_k ? nullptr : kb.data();
  const void* v = null_v ? nullptr : vb.data();
  const instinfer_status st = at ? fuzz_append_at_raw_dtype(cache_, id, layer, pos, n, k, v, raw)
                                 : fuzz_append_raw_dtype(cache_, id, layer, n, k, v, raw);
  // The documented order: the dtype's value (C API), layer, sequence, position (append_at),
  // n_tokens, K/V, dtype pairing.
  if (bogus)
    return expect(st, INSTINFER_E_INVALID_ARGUMENT,
                  at ? "instinfer_append_at(not a dtype)" : "instinfer_append(not a dtype)");
  if (layer >= s_.layers) return expect(st, INSTINFER_E_LAYER_OUT_OF_RANGE, call);
  if (!known(id)) return expect(st, INSTINFER_E_UNKNOWN_SEQUENCE, call);
  if (pos != have) return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_append_at(not at the end)");
  if (n == 0)
    return expect(st, INSTINFER_E_INVALID_ARGUMENT,
                  at ? "instinfer_append_at(0 tokens)" : "instinfer_append(0 tokens)");
  if (null_k || null_v)
    return expect(st, INSTINFER_E_INVALID_ARGUMENT,
                  at ? "instinfer_append_at(NULL rows)" : "instinfer_append(NULL rows)");
  if (!convertible(src, s_.dtype))
    return expect(st, INSTINFER_E_UNSUPPORTED,
                  at ? "instinfer_append_at(dtype pairing)" : "instinfer_append(dtype pairing)");
  expect_ok_or(st, {INSTINFER_E_OUT_OF_PAGES}, call);
  ref_layer& r = live_.at(id)[layer];
  if (st != INSTINFER_OK) {
    check_out_of_pages(used, have, n, call);
    return check_unchanged(used, call);
  }
  r.k.insert(r.k.end(), kr.begin(), kr.end());
  r.v.insert(r.v.end(), vr.begin(), vr.end());
}

// attend / attend_sparse / attend_slice: layer, count (0xff: n_seq 0), sel x count, flags (bit0
// lse NULL, bit1 q NULL, bit2 out NULL, bit3 seqs NULL, bit4 out over q, bit5 lse over q), query
// seed; attend_sparse then a params byte and two value bytes (below), attend_slice then ith, nth.
void session::op_attend(input& in, bool sparse, bool slice) {
  const char* call = sparse ? "instinfer_attend_sparse" : slice ? "instinfer_attend_slice" : "instinfer_attend";
  const uint32_t layer = pick_layer(in.u8());
  const uint8_t count = in.u8();
  const size_t n_seq = count == 0xff ? 0 : count % 4 + 1;
  std::vector<instinfer_seq> seqs(std::max<size_t>(n_seq, 1));
  for (size_t i = 0; i < n_seq; ++i) seqs[i] = pick(in.u8());
  const uint8_t flags = in.u8();
  splitmix g{(uint64_t{salt_} << 40) ^ (op_index_ << 8) ^ in.u8() ^ 0x5a5a};
  const size_t per = size_t{s_.q_heads()} * kHeadDim, rows = std::max<size_t>(n_seq, 1);
  std::vector<float> q(rows * per);
  for (float& x : q) x = g.uniform(s_.magnitude);
  const std::vector<float> q_ref = q;  // out or lse may overwrite q
  std::vector<float> out(q.size(), std::numeric_limits<float>::quiet_NaN());
  std::vector<float> lse(rows * s_.q_heads(), std::numeric_limits<float>::quiet_NaN());
  const bool null_lse = flags & 1, null_q = flags & 2, null_out = flags & 4, null_seqs = flags & 8;
  const bool out_over_q = flags & 16, lse_over_q = !out_over_q && (flags & 32);

  // SparF parameters: 0 NULL (defaults), 1 compression 1 (dense), 2 compression c / 255,
  // 3 explicit r and k, 4 a bad struct_size, 5 whole_pages 2, 6 page_spread 0.5, 7 single channels,
  // 8 selection reuse (cosine 0.5-1, 1-4 steps: a reused row is still a blend of V rows),
  // 9 a reuse cosine over 1.
  instinfer_sparf_params p;
  instinfer_sparf_params_init(&p);
  uint8_t mode = 0;
  uint32_t ith = 0, nth = 1;
  bool dense = !sparse;
  if (sparse) {
    mode = in.u8() % 10;
    const uint8_t a = in.u8(), b = in.u8();
    switch (mode) {
      case 1: p.compression = 1.0; break;
      case 2: p.compression = a / 255.0; break;
      case 3:
        p.r = a % (kHeadDim + 2);
        p.k = b % 40;
        break;
      case 4: p.struct_size = 8; break;
      case 5: p.whole_pages = 2; break;
      case 6: p.page_spread = 0.5; break;
      case 7:
        p.whole_pages = 0;
        p.compression = (a % 8 + 1) / 8.0;
        break;
      case 8:
        p.reuse_min_cosine = 0.5f + static_cast<float>(a) / 510.0f;
        p.reuse_max_steps = b % 4 + 1;
        break;
      case 9: p.reuse_min_cosine = 1.5f; break;
      default: break;
    }
    dense = mode == 1;
  }
  if (slice) {
    const uint8_t b = in.u8();
    nth = b & 0x80 ? 0 : b % 5 + 1;
    ith = (b >> 3) % 6;  // sometimes >= nth
  }
  const uint64_t used = stats().used_chunks;
  const instinfer_seq* seqs_arg = null_seqs ? nullptr : seqs.data();
  const float* q_arg = null_q ? nullptr : q.data();
  float* out_arg = null_out ? nullptr : out_over_q ? q.data() : out.data();
  float* lse_arg = null_lse ? nullptr : lse_over_q ? q.data() : lse.data();
  const instinfer_status st =
      sparse  ? instinfer_attend_sparse(cache_, layer, n_seq, seqs_arg, q_arg, out_arg, lse_arg, mode ? &p : nullptr)
      : slice ? instinfer_attend_slice(cache_, layer, n_seq, seqs_arg, q_arg, out_arg, lse_arg, ith, nth)
              : instinfer_attend(cache_, layer, n_seq, seqs_arg, q_arg, out_arg, lse_arg);

  // Every slice checks the whole call. On the host a slice of nth > 1 starts a shared run and,
  // called alone, computes every row; elsewhere slice ith computes sequences [begin, end) only.
  const bool sliced = slice && nth != 0 && ith < nth && !(nth > 1 && !s_.ssd);
  const size_t begin = sliced ? n_seq * ith / nth : 0, end = sliced ? n_seq * (ith + 1) / nth : n_seq;
  bool all_known = true;
  for (size_t i = 0; i < n_seq; ++i) all_known &= known(seqs[i]);
  // The documented order: batch shape and pointers (C API), SparF's struct checks, the slice,
  // SparF off, layer, parameter values, sequences, then k against each sequence's tokens.
  if (n_seq == 0 || null_seqs || null_q || null_out) return expect(st, INSTINFER_E_INVALID_ARGUMENT, call);
  if (sparse && (mode == 4 || mode == 5 || (mode == 3 && (p.r == 0) != (p.k == 0))))
    return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_attend_sparse(params struct)");
  if (slice && (nth == 0 || ith >= nth))
    return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_attend_slice(ith, nth)");
  if (sparse && !s_.sparf) return expect(st, INSTINFER_E_UNSUPPORTED, "instinfer_attend_sparse(SparF off)");
  if (layer >= s_.layers) return expect(st, INSTINFER_E_LAYER_OUT_OF_RANGE, call);
  if (sparse && (mode == 6 || mode == 9 || (mode == 2 && p.compression <= 0.0) || (mode == 3 && p.r > kHeadDim)))
    return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_attend_sparse(params values)");
  if (!all_known) return expect(st, INSTINFER_E_UNKNOWN_SEQUENCE, call);
  if (sparse && mode == 3 && p.k > 0) {
    bool too_few = false;
    for (size_t i = 0; i < n_seq; ++i) {
      const uint64_t n = length_of(seqs[i], layer);
      too_few |= n > 0 && p.k > n;
    }
    if (too_few) return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_attend_sparse(k > tokens)");
  }
  expect(st, INSTINFER_OK, call);
  if (stats().used_chunks != used && !s_.sparf) die("%s changed used chunks", call);
  const float* o = out_over_q ? q.data() : out.data();
  const float* l = null_lse ? nullptr : lse_over_q ? q.data() : lse.data();
  for (size_t i = 0; i < n_seq; ++i) {
    if (i < begin || i >= end) {  // another slice's rows: untouched
      if (!out_over_q && !lse_over_q && !std::isnan(out[i * per])) die("%s wrote row %zu of another slice", call, i);
      continue;
    }
    check_row(call, seqs[i], layer, q_ref.data() + i * per, o + i * per, l ? l + i * s_.q_heads() : nullptr, dense);
  }
}

// attend_chunk (and its slices): layer, count (0xff: n_seq 0), per sequence sel, position byte
// (0xff: one past the end, else length - rows - byte % 3) and rows byte (0xff: 0 rows, else
// 1 + byte % 4), flags (bit0 lse NULL, bit1 q NULL, bit2 out NULL, bit3 seqs NULL, bit4 positions
// NULL, bit5 n_rows NULL, bit6 out over q, bit7 a slice: then an ith/nth byte), query seed.
void session::op_attend_chunk(input& in) {
  const uint32_t layer = pick_layer(in.u8());
  const uint8_t count = in.u8();
  const size_t n_seq = count == 0xff ? 0 : count % 3 + 1;
  std::vector<instinfer_seq> seqs(std::max<size_t>(n_seq, 1));
  std::vector<uint32_t> positions(seqs.size()), n_rows(seqs.size());
  for (size_t i = 0; i < n_seq; ++i) {
    seqs[i] = pick(in.u8());
    const uint8_t pb = in.u8(), rb = in.u8();
    n_rows[i] = rb == 0xff ? 0 : 1 + rb % 4;
    const uint64_t len = length_of(seqs[i], layer < s_.layers ? layer : 0);
    const uint64_t last = len >= n_rows[i] ? len - n_rows[i] : 0;
    positions[i] = static_cast<uint32_t>(pb == 0xff ? last + 1 : last - std::min<uint64_t>(last, pb % 3));
  }
  const uint8_t flags = in.u8();
  uint32_t ith = 0, nth = 1;
  const bool slice = flags & 128;
  if (slice) {
    const uint8_t b = in.u8();
    nth = b & 0x80 ? 0 : b % 4 + 1;
    ith = (b >> 3) % 5;
  }
  const char* call = slice ? "instinfer_attend_chunk_slice" : "instinfer_attend_chunk";
  splitmix g{(uint64_t{salt_} << 40) ^ (op_index_ << 8) ^ in.u8() ^ 0xa5a5};
  size_t total = 0;
  std::vector<size_t> first(seqs.size() + 1, 0);
  for (size_t i = 0; i < n_seq; ++i) first[i + 1] = total += n_rows[i];
  const size_t per = size_t{s_.q_heads()} * kHeadDim, rows = std::max<size_t>(total, 1);
  std::vector<float> q(rows * per);
  for (float& x : q) x = g.uniform(s_.magnitude);
  const std::vector<float> q_ref = q;
  std::vector<float> out(q.size(), std::numeric_limits<float>::quiet_NaN());
  std::vector<float> lse(rows * s_.q_heads(), std::numeric_limits<float>::quiet_NaN());
  const bool null_lse = flags & 1, null_q = flags & 2, null_out = flags & 4, null_seqs = flags & 8;
  const bool null_pos = flags & 16, null_rows = flags & 32, out_over_q = flags & 64;
  const uint64_t used = stats().used_chunks;
  float* out_arg = null_out ? nullptr : out_over_q ? q.data() : out.data();
  float* lse_arg = null_lse ? nullptr : lse.data();
  const instinfer_seq* seqs_arg = null_seqs ? nullptr : seqs.data();
  const uint32_t* pos_arg = null_pos ? nullptr : positions.data();
  const uint32_t* rows_arg = null_rows ? nullptr : n_rows.data();
  const float* q_arg = null_q ? nullptr : q.data();
  const instinfer_status st =
      slice ? instinfer_attend_chunk_slice(cache_, layer, n_seq, seqs_arg, pos_arg, rows_arg, q_arg, out_arg, lse_arg,
                                           ith, nth)
            : instinfer_attend_chunk(cache_, layer, n_seq, seqs_arg, pos_arg, rows_arg, q_arg, out_arg, lse_arg);

  // The documented order: batch shape and pointers (C API), the slice, layer, then per sequence
  // in order: unknown, no rows, rows past the layer's length. Every slice checks the whole call;
  // a slice computes its own sequences, or on the host (a shared run, called alone) every row.
  if (n_seq == 0 || null_seqs || null_pos || null_rows || null_q || null_out)
    return expect(st, INSTINFER_E_INVALID_ARGUMENT, call);
  if (slice && (nth == 0 || ith >= nth))
    return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_attend_chunk_slice(ith, nth)");
  const bool sliced = slice && !(nth > 1 && !s_.ssd);
  const size_t begin = sliced ? n_seq * ith / nth : 0, end = sliced ? n_seq * (ith + 1) / nth : n_seq;
  if (layer >= s_.layers) return expect(st, INSTINFER_E_LAYER_OUT_OF_RANGE, call);
  for (size_t i = 0; i < n_seq; ++i) {
    if (!known(seqs[i])) return expect(st, INSTINFER_E_UNKNOWN_SEQUENCE, call);
    if (n_rows[i] == 0) return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_attend_chunk(0 rows)");
    if (uint64_t{positions[i]} + n_rows[i] > length_of(seqs[i], layer))
      return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_attend_chunk(rows past the end)");
  }
  expect(st, INSTINFER_OK, call);
  if (stats().used_chunks != used && !s_.sparf) die("%s changed used chunks", call);
  const float* o = out_over_q ? q.data() : out.data();
  for (size_t i = 0; i < n_seq; ++i)
    for (size_t j = 0; j < n_rows[i]; ++j) {
      const size_t r = first[i] + j;
      if (i < begin || i >= end) {
        if (!out_over_q && !std::isnan(out[r * per])) die("%s wrote a row of another slice", call);
        continue;
      }
      // Row j sees tokens [0, positions + j].
      check_row(call, seqs[i], layer, q_ref.data() + r * per, o + r * per,
                null_lse ? nullptr : lse.data() + r * s_.q_heads(), true, size_t{positions[i]} + j + 1);
    }
}

// prefetch: layer, count (0xff: 0), sel x count, flags (bit0: NULL seqs)
void session::op_prefetch(input& in) {
  const uint32_t layer = pick_layer(in.u8());
  const uint8_t count = in.u8();
  const size_t n_seq = count == 0xff ? 0 : count % 4 + 1;
  std::vector<instinfer_seq> seqs(std::max<size_t>(n_seq, 1));
  for (size_t i = 0; i < n_seq; ++i) seqs[i] = pick(in.u8());
  const bool null_seqs = in.u8() & 1;
  const instinfer_status st = instinfer_prefetch(cache_, layer, n_seq, null_seqs ? nullptr : seqs.data());
  if (n_seq == 0 || null_seqs) return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_prefetch(batch)");
  if (layer >= s_.layers) return expect(st, INSTINFER_E_LAYER_OUT_OF_RANGE, "instinfer_prefetch(layer)");
  expect(st, INSTINFER_OK, "instinfer_prefetch");  // unknown ids make it a no-op, not an error
}

void session::op_flush() {
  expect(instinfer_cache_flush(cache_), INSTINFER_OK, "instinfer_cache_flush");
  check_lengths("instinfer_cache_flush");
}

// stats: mode (0 current size, 1 the 0.1 size, 2 another size, 3 NULL)
void session::op_stats(input& in) {
  const uint8_t mode = in.u8() % 4;
  // Room past the struct: a 0.1-sized call must not write beyond its size.
  struct {
    instinfer_stats st;
    unsigned char guard[16];
  } buf;
  std::memset(&buf, 0xa5, sizeof buf);
  const uint32_t v01 = offsetof(instinfer_stats, sparf_pages_read);
  buf.st.struct_size = mode == 0 ? sizeof(instinfer_stats) : mode == 1 ? v01 : 12;
  const instinfer_status st = instinfer_cache_stats(cache_, mode == 3 ? nullptr : &buf.st);
  if (mode >= 2) return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_cache_stats(bad struct)");
  expect(st, INSTINFER_OK, "instinfer_cache_stats");
  const auto* bytes = reinterpret_cast<const unsigned char*>(&buf);
  for (size_t i = mode == 1 ? v01 : sizeof(instinfer_stats); i < sizeof buf; ++i)
    if (bytes[i] != 0xa5) die("instinfer_cache_stats wrote byte %zu past struct_size", i);
  const uint64_t chunk_bytes = 2ull * s_.kv_heads * s_.page_bytes;
  if (buf.st.chunk_bytes != chunk_bytes)
    die("stats: chunk_bytes %" PRIu64 ", want %" PRIu64, buf.st.chunk_bytes, chunk_bytes);
  if (buf.st.capacity_chunks != s_.capacity_chunks)
    die("stats: capacity %" PRIu64 " chunks, configured %" PRIu64, buf.st.capacity_chunks, s_.capacity_chunks);
  // The configuration it runs with: as created, the capacity in whole chunks.
  instinfer_config c{};
  c.struct_size = sizeof c;
  expect(instinfer_cache_config(cache_, &c), INSTINFER_OK, "instinfer_cache_config");
  if (c.page_bytes != s_.page_bytes || c.n_layers != s_.layers || c.kv_dtype != s_.dtype ||
      c.capacity_bytes != s_.capacity_chunks * chunk_bytes || c.int8_query_dot != (s_.int8_dot ? 1u : 0u))
    die("instinfer_cache_config: page %u, %u layers, capacity %" PRIu64 " differ from the configuration", c.page_bytes,
        c.n_layers, c.capacity_bytes);
  check_lengths("instinfer_cache_stats");
}

// Every entry point that takes a cache refuses NULL.
void session::op_null_cache(input& in) {
  instinfer_seq id = 0;
  uint64_t n = 0;
  size_t size = 0;
  float q[kHeadDim] = {}, out[kHeadDim] = {};
  const float k[kHeadDim] = {};
  const uint32_t pos = 0, rows = 1;
  instinfer_stats st{};
  st.struct_size = sizeof st;
  const instinfer_seq one = 1;
  instinfer_status got;
  switch (in.u8() % 19) {
    case 0: got = instinfer_seq_create(nullptr, &id); break;
    case 1: got = instinfer_seq_fork(nullptr, 1, &id); break;
    case 2: got = instinfer_seq_free(nullptr, 1); break;
    case 3: got = instinfer_seq_remove_range(nullptr, 1, 0, 1); break;
    case 4: got = instinfer_seq_length(nullptr, 1, 0, &n); break;
    case 5: got = instinfer_append(nullptr, 1, 0, 1, k, k, INSTINFER_DTYPE_F32); break;
    case 6: got = instinfer_attend(nullptr, 0, 1, &one, q, out, nullptr); break;
    case 7: got = instinfer_attend_sparse(nullptr, 0, 1, &one, q, out, nullptr, nullptr); break;
    case 8: got = instinfer_prefetch(nullptr, 0, 1, &one); break;
    case 9: got = instinfer_cache_stats(nullptr, &st); break;
    case 10: got = instinfer_append_at(nullptr, 1, 0, 0, 1, k, k, INSTINFER_DTYPE_F32); break;
    case 11: got = instinfer_seq_fork_at(nullptr, 1, 0, &id); break;
    case 12: got = instinfer_attend_chunk(nullptr, 0, 1, &one, &pos, &rows, q, out, nullptr); break;
    case 13: got = instinfer_attend_slice(nullptr, 0, 1, &one, q, out, nullptr, 0, 1); break;
    case 14: got = instinfer_attend_chunk_slice(nullptr, 0, 1, &one, &pos, &rows, q, out, nullptr, 0, 1); break;
    case 15: got = instinfer_seq_state_size(nullptr, 1, &size); break;
    case 16: got = instinfer_seq_state_save(nullptr, 1, q, sizeof q, &size); break;
    case 17: got = instinfer_seq_state_load(nullptr, q, sizeof q, &id); break;
    default: got = instinfer_seq_state_save_file(nullptr, 1, state_path().c_str()); break;
  }
  expect(got, INSTINFER_E_INVALID_ARGUMENT, "a call with a NULL cache");
  expect(instinfer_cache_flush(nullptr), INSTINFER_E_INVALID_ARGUMENT, "instinfer_cache_flush(NULL)");
  instinfer_config cfg{};
  cfg.struct_size = sizeof cfg;
  expect(instinfer_cache_config(nullptr, &cfg), INSTINFER_E_INVALID_ARGUMENT, "instinfer_cache_config(NULL)");
  expect(instinfer_seq_state_load_file(nullptr, state_path().c_str(), &id), INSTINFER_E_INVALID_ARGUMENT,
         "instinfer_seq_state_load_file(NULL)");
  instinfer_cache_destroy(nullptr);
}

void session::load(const std::vector<uint8_t>& b, const ref_seq* rows, instinfer_status want, const char* call) {
  const uint64_t used = stats().used_chunks;
  instinfer_seq id = 0;
  const instinfer_status st = instinfer_seq_state_load(cache_, b.data(), b.size(), &id);
  if (want != INSTINFER_OK) {
    expect(st, want, call);
    return check_unchanged(used, call);
  }
  expect_ok_or(st, {INSTINFER_E_OUT_OF_PAGES}, call);
  if (st != INSTINFER_OK) return check_unchanged(used, call);
  add_sequence(id, *rows, call);
  check_lengths(call);
}

// Sequence state: sel, mode, value byte. Modes: 0 save and load (in memory), 1 save into too small
// or NULL a buffer, 2 load a truncated state, 3 load a state with one byte changed, 4 load one with a
// K/V value changed and its checksum fixed, 5 load one of another shape (checksum fixed), 6 save to
// and load from a file, then a missing file, 7 NULL out pointers and paths.
void session::op_state(input& in) {
  const instinfer_seq id = pick(in.u8());
  const uint8_t mode = in.u8() % 8, a = in.u8();
  size_t size = 0;
  const instinfer_status sized = instinfer_seq_state_size(cache_, id, mode == 7 && (a & 1) ? nullptr : &size);
  if (mode == 7 && (a & 1)) return expect(sized, INSTINFER_E_INVALID_ARGUMENT, "instinfer_seq_state_size(NULL out)");
  if (!known(id)) {
    expect(sized, INSTINFER_E_UNKNOWN_SEQUENCE, "instinfer_seq_state_size(unknown)");
    std::vector<uint8_t> b(64);
    size_t written = 1;
    expect(instinfer_seq_state_save(cache_, id, b.data(), b.size(), &written), INSTINFER_E_UNKNOWN_SEQUENCE,
           "instinfer_seq_state_save(unknown)");
    if (written != 0) die("instinfer_seq_state_save(unknown) left out_written %zu", written);
    return;
  }
  expect(sized, INSTINFER_OK, "instinfer_seq_state_size");
  const ref_seq& src = live_.at(id);
  if (size != state_size(src)) die("instinfer_seq_state_size %zu, the format gives %" PRIu64, size, state_size(src));
  std::vector<uint8_t> b(size + 8, 0xee);
  size_t written = 0;
  if (mode == 1) {
    const size_t small = size - 1 - std::min<size_t>(a % 8, size - 1);
    expect(instinfer_seq_state_save(cache_, id, a & 128 ? nullptr : b.data(), small, &written),
           INSTINFER_E_INVALID_ARGUMENT, "instinfer_seq_state_save(small buffer)");
    if (written != 0) die("a failed instinfer_seq_state_save left out_written %zu", written);
    return;
  }
  if (mode == 6) {
    expect(instinfer_seq_state_save_file(cache_, id, state_path().c_str()), INSTINFER_OK,
           "instinfer_seq_state_save_file");
    const uint64_t used = stats().used_chunks;
    instinfer_seq loaded = 0;
    const instinfer_status st = instinfer_seq_state_load_file(cache_, state_path().c_str(), &loaded);
    expect_ok_or(st, {INSTINFER_E_OUT_OF_PAGES}, "instinfer_seq_state_load_file");
    if (st == INSTINFER_OK)
      add_sequence(loaded, src, "instinfer_seq_state_load_file");
    else
      check_unchanged(used, "instinfer_seq_state_load_file");
    ::unlink(state_path().c_str());
    return expect(instinfer_seq_state_load_file(cache_, state_path().c_str(), &loaded), INSTINFER_E_IO,
                  "instinfer_seq_state_load_file(missing)");
  }
  if (mode == 7) {
    instinfer_seq loaded = 0;
    expect(instinfer_seq_state_load(cache_, b.data(), b.size(), nullptr), INSTINFER_E_INVALID_ARGUMENT,
           "instinfer_seq_state_load(NULL out)");
    expect(instinfer_seq_state_load(cache_, nullptr, 8, &loaded), INSTINFER_E_INVALID_ARGUMENT,
           "instinfer_seq_state_load(NULL buf)");
    expect(instinfer_seq_state_load(cache_, nullptr, 0, &loaded), INSTINFER_E_CORRUPT_DATA,
           "instinfer_seq_state_load(nothing)");
    expect(instinfer_seq_state_save_file(cache_, id, nullptr), INSTINFER_E_INVALID_ARGUMENT,
           "instinfer_seq_state_save_file(NULL path)");
    return expect(instinfer_seq_state_load_file(cache_, nullptr, &loaded), INSTINFER_E_INVALID_ARGUMENT,
                  "instinfer_seq_state_load_file(NULL path)");
  }
  expect(instinfer_seq_state_save(cache_, id, b.data(), b.size(), &written), INSTINFER_OK, "instinfer_seq_state_save");
  if (written != size) die("instinfer_seq_state_save wrote %zu bytes of %zu", written, size);
  for (size_t i = size; i < b.size(); ++i)
    if (b[i] != 0xee) die("instinfer_seq_state_save wrote past its state");
  b.resize(size);
  ref_seq parsed;
  if (!parse_state(b, parsed)) die("instinfer_seq_state_save: not a state of this cache's shape");
  for (uint32_t l = 0; l < s_.layers; ++l)
    if (parsed[l].k != src[l].k || parsed[l].v != src[l].v)
      die("instinfer_seq_state_save: layer %u's rows differ from what was appended", l);

  switch (mode) {
    case 0: return load(b, &src, INSTINFER_OK, "instinfer_seq_state_load");
    case 2:
      b.resize(b.size() - 1 - a % std::min<size_t>(b.size(), 64));
      return load(b, nullptr, INSTINFER_E_CORRUPT_DATA, "instinfer_seq_state_load(truncated)");
    case 3:
      b[(size_t{a} * 2654435761u) % b.size()] ^= static_cast<uint8_t>(1u << (a % 8));
      return load(b, nullptr, INSTINFER_E_CORRUPT_DATA, "instinfer_seq_state_load(a byte changed)");
    case 4: {
      // A K/V byte whose change keeps values finite: a low mantissa byte of a dense element, an
      // integer of a quantized block.
      const size_t header = kStateFixed + 4ull * s_.layers, payload = b.size() - 4 - header;
      if (payload == 0) return load(b, &src, INSTINFER_OK, "instinfer_seq_state_load");
      const size_t unit = s_.dtype == INSTINFER_DTYPE_F32    ? 4
                          : s_.dtype == INSTINFER_DTYPE_Q8_0 ? 34
                          : s_.dtype == INSTINFER_DTYPE_Q4_0 ? 18
                                                             : 2;
      const size_t in_unit = quantized(s_.dtype) ? 2 + a % (unit - 2) : 0;
      const size_t at = header + (size_t{a} * 40503u % (payload / unit)) * unit + in_unit;
      b[at] ^= 1;
      fix_crc(b);
      ref_seq rows;
      if (!parse_state(b, rows)) die("the fuzzer's own state edit broke the state");
      return load(b, &rows, INSTINFER_OK, "instinfer_seq_state_load(a value changed)");
    }
    default: {  // 5: a shape field of another cache (q heads, kv heads, head_dim or dtype)
      b[20 + 4 * (a % 4)] ^= 1;
      fix_crc(b);
      return load(b, nullptr, INSTINFER_E_INVALID_ARGUMENT, "instinfer_seq_state_load(another shape)");
    }
  }
}

// Every live sequence of one layer in one batch, against the model.
void session::attend_all(uint32_t layer, const char* why) {
  if (live_.empty()) return;
  std::vector<instinfer_seq> seqs;
  for (const auto& [id, layers] : live_) seqs.push_back(id);
  splitmix g{(uint64_t{salt_} << 40) ^ (op_index_ << 8) ^ layer ^ 0xc0ffee};
  const size_t per = size_t{s_.q_heads()} * kHeadDim;
  std::vector<float> q(seqs.size() * per), out(q.size()), lse(seqs.size() * s_.q_heads());
  for (float& x : q) x = g.uniform(s_.magnitude);
  expect(instinfer_attend(cache_, layer, seqs.size(), seqs.data(), q.data(), out.data(), lse.data()), INSTINFER_OK,
         why);
  for (size_t i = 0; i < seqs.size(); ++i)
    check_row(why, seqs[i], layer, q.data() + i * per, out.data() + i * per, lse.data() + i * s_.q_heads(), true);
}

// The end of every input: everything reads back, then freeing every sequence frees every chunk.
void session::finish() {
  check_lengths("the last call");
  for (uint32_t l = 0; l < s_.layers; ++l) attend_all(l, "final attend");
  while (!live_.empty()) {
    expect(instinfer_seq_free(cache_, live_.begin()->first), INSTINFER_OK, "instinfer_seq_free (final)");
    live_.erase(live_.begin());
  }
  names_.clear();
  const instinfer_stats st = stats();
  if (st.n_sequences != 0 || st.used_chunks != 0 || st.shared_chunks != 0)
    die("after freeing every sequence: %" PRIu64 " sequences, %" PRIu64 " used and %" PRIu64 " shared chunks",
        st.n_sequences, st.used_chunks, st.shared_chunks);
}

// ---- configuration ------------------------------------------------------------------------------

std::string ssd_path() {
  return "/dev/shm/instinfer-fuzz-capi-" + std::to_string(::getpid()) + ".bin";
}

shape decode_shape(const uint8_t* h) {
  const uint8_t h0 = h[0], h1 = h[1], h2 = h[2];
  shape s;
  s.ssd = h0 & 1;
  const uint8_t dt = (h0 >> 1) & 3;
  s.dtype = dt == 0 ? INSTINFER_DTYPE_F32 : dt == 2 ? INSTINFER_DTYPE_BF16 : INSTINFER_DTYPE_F16;
  if (h2 & 32) s.dtype = h2 & 64 ? INSTINFER_DTYPE_Q4_0 : INSTINFER_DTYPE_Q8_0;
  s.sparf = h0 & 8;
  s.layers = h0 & 16 ? 2 : 1;
  s.kv_heads = h0 & 32 ? 2 : 1;
  s.group = h0 & 64 ? 2 : 1;
  s.softcap = h0 & 128 ? 20.0f : 0.0f;
  // Small pages on the host (many chunks per token); the ssd: file wants the direct-I/O alignment.
  static constexpr uint32_t kHostPages[] = {512, 1024, 2048, 4096};
  static constexpr uint32_t kSsdPages[] = {4096, 8192, 4096, 16384};
  s.page_bytes = (s.ssd ? kSsdPages : kHostPages)[h1 & 3];
  s.capacity_chunks = ((h1 >> 2) & 31) + 1;
  s.scale = h1 & 128 ? 0.3f : 0.0f;
  static constexpr float kMagnitudes[] = {0.5f, 1.0f, 2.0f, 4.0f};
  s.magnitude = kMagnitudes[h2 & 3];
  s.caller_threads = h2 & 128;
  s.int8_dot = s.dtype == INSTINFER_DTYPE_Q8_0 && (h[3] & 128);
  s.tpp = static_cast<uint32_t>(s.page_bytes / s.row_bytes());  // rows never straddle a page
  return s;
}

instinfer_config make_config(const shape& s, uint8_t h2, std::string& uri) {
  instinfer_config c;
  instinfer_config_init(&c);
  c.n_layers = s.layers;
  c.n_kv_heads = s.kv_heads;
  c.n_q_heads = s.q_heads();
  c.head_dim = kHeadDim;
  c.kv_dtype = s.dtype;
  c.page_bytes = s.page_bytes;
  c.capacity_bytes = s.capacity_chunks * 2ull * s.kv_heads * s.page_bytes;
  c.n_threads = h2 & 4 ? 2 : 1;
  c.caller_threads = s.caller_threads ? 1 : 0;
  c.int8_query_dot = s.int8_dot ? 1 : 0;
  c.scale = s.scale;
  c.logit_softcap = s.softcap;
  c.sparf = s.sparf ? 1 : 0;
  if (s.ssd) {
    static constexpr uint32_t kWriteBatch[] = {0, 1, 2, 4};
    uri = "ssd:" + ssd_path() + "?staging=131072&queue_depth=8";
    if (uint32_t wb = kWriteBatch[(h2 >> 3) & 3]) uri += "&write_batch=" + std::to_string(wb);
  } else {
    uri = "host";
  }
  c.backend = uri.c_str();
  return c;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return -1;  // not even a configuration
  const shape s = decode_shape(data);
  const uint8_t h2 = data[2], salt = data[3];
  input in(data + 4, size - 4);
  std::string uri;
  const instinfer_config cfg = make_config(s, h2, uri);
  instinfer_cache* cache = nullptr;
  const instinfer_status st = instinfer_cache_create(&cfg, &cache);
  if (st != INSTINFER_OK) {
    // Small pages cannot hold SparF's column pages (invalid); nothing else may fail here.
    if (cache != nullptr) die("instinfer_cache_create failed (%s) and left a handle", code_name(st));
    const bool columns_refused = s.sparf && st == INSTINFER_E_INVALID_ARGUMENT;
    if (!columns_refused) die("instinfer_cache_create(%s) returned %s", uri.c_str(), code_name(st));
    return 0;
  }
  session sess(s, cache, salt);
  for (size_t i = 0; i < kMaxOps && !in.empty(); ++i) sess.run_op(in.u8(), in);
  sess.finish();
  return 0;
}
