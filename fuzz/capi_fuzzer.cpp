// Stateful fuzzer of the C API (instinfer.h): the input decodes into a cache configuration and a
// sequence of calls, each checked against a small reference model kept here (per sequence and
// layer, the rows appended, as the cache dtype stores them; fork and remove_range as documented):
//
//   - every call returns INSTINFER_OK or a code the call may return; when the arguments decide the
//     outcome (an unknown id, a layer out of range, a NULL pointer, p0 > p1, ...) it must be
//     exactly the documented code, checked in the documented order;
//   - on OK, lengths match the model and attention matches a float64 attention over the model's
//     rows (SparF: dense at compression 1, otherwise inside the convex hull of the V rows);
//   - a failed call changes nothing: the model stays, and the lengths and used chunks agree;
//   - at the end every sequence is attended and freed, and the cache holds no chunk (no leak).
//
// Backends: host, and ssd: with its file on tmpfs (/dev/shm). Input layout (fuzz/corpus/make_seeds.py
// writes the same):
//   header h0 h1 h2 h3:
//     h0: bit0 ssd, bits1-2 kv dtype (f32, f16, bf16; 3 = f16), bit3 SparF, bit4 two layers,
//         bit5 two kv heads, bit6 GQA group 2, bit7 soft cap 20
//     h1: bits0-1 page size, bits2-6 capacity in chunks - 1, bit7 scale 0.3 (else 1/sqrt(d))
//     h2: bits0-1 value magnitude, bit2 two threads, bits3-4 ssd write_batch
//     h3: salt of the value generator
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

#include "instinfer/core/dtype.hpp"
#include "instinfer/instinfer.h"

// fuzz/capi_c_calls.c: instinfer_append with any int as the dtype, as a C caller may pass.
extern "C" instinfer_status fuzz_append_raw_dtype(instinfer_cache* cache, instinfer_seq seq, uint32_t layer,
                                                  uint32_t n_tokens, const void* k, const void* v, int src_dtype);

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

// Bytes from the front (the seed script writes them in this order); zeros once exhausted.
class input {
 public:
  input(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  bool empty() const { return n_ == 0; }
  uint8_t u8() {
    if (n_ == 0) return 0;
    --n_;
    return *p_++;
  }

 private:
  const uint8_t* p_;
  size_t n_;
};

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

// The rows of one (sequence, layer): [n][n_kv_heads][head_dim], the values the cache stores.
struct ref_layer {
  std::vector<float> k, v;
};
using ref_seq = std::vector<ref_layer>;

struct shape {
  uint32_t layers = 1, kv_heads = 1, group = 1, page_bytes = 4096, tpp = 0;
  uint64_t capacity_chunks = 1;
  instinfer_dtype dtype = INSTINFER_DTYPE_F16;
  bool ssd = false, sparf = false;
  float scale = 0.0f, softcap = 0.0f, magnitude = 1.0f;
  uint32_t q_heads() const { return kv_heads * group; }
  size_t row_floats() const { return size_t{kv_heads} * kHeadDim; }  // one token of every kv head
};

class session {
 public:
  session(const shape& s, instinfer_cache* c, uint8_t salt) : s_(s), cache_(c), salt_(salt) {}
  ~session() { instinfer_cache_destroy(cache_); }

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
    expect(instinfer_cache_stats(cache_, &st), INSTINFER_OK, "instinfer_cache_stats");
    return st;
  }
  uint64_t free_chunks() const {
    const instinfer_stats st = stats();
    return st.capacity_chunks - st.used_chunks;
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
        expect(instinfer_seq_length(cache_, id, l, &n), INSTINFER_OK, "instinfer_seq_length");
        const uint64_t want = layers[l].k.size() / s_.row_floats();
        if (n != want)
          die("after %s: sequence %" PRIu64 " layer %u holds %" PRIu64 " tokens, model %" PRIu64, after, id, l, n,
              want);
      }
  }

  // ---- rows ----
  // n tokens of K or V as the caller passes them (src) and as the cache stores them (ref).
  void make_rows(splitmix& g, uint32_t n, instinfer_dtype src, std::vector<std::byte>& bytes,
                 std::vector<float>& ref) const {
    const size_t count = size_t{n} * s_.row_floats();
    std::vector<float> f(count);
    for (float& x : f) x = g.uniform(s_.magnitude);
    const auto cache_t = static_cast<instinfer::dtype>(s_.dtype);
    ref.resize(count);  // rounded to the cache dtype, as stored
    std::vector<std::byte> stored(count * instinfer::dtype_size(cache_t));
    instinfer::convert_elements(f.data(), instinfer::dtype::kF32, stored.data(), cache_t, count);
    instinfer::convert_elements(stored.data(), cache_t, ref.data(), instinfer::dtype::kF32, count);
    if (src == INSTINFER_DTYPE_F32) {
      bytes.resize(count * sizeof(float));
      std::memcpy(bytes.data(), f.data(), bytes.size());
    } else {
      bytes = std::move(stored);
    }
  }

  // ---- attention reference ----
  struct expected_row {
    std::vector<double> out, lse;  // [q_heads][d], [q_heads]
    std::vector<double> vmin, vmax, vmag;
  };
  expected_row reference(const ref_layer& r, const float* q) const {
    const uint32_t d = kHeadDim, hq = s_.q_heads();
    const size_t n = r.k.size() / s_.row_floats();
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
  // One output row [q_heads][d] (+ lse) against the model. dense: exact attention; otherwise
  // SparF's estimate, a blend of convex combinations of V rows.
  void check_row(const char* call, instinfer_seq id, uint32_t layer, const float* q, const float* out, const float* lse,
                 bool dense) const {
    const ref_layer& r = live_.at(id)[layer];
    const uint32_t d = kHeadDim, hq = s_.q_heads();
    const bool empty = r.k.empty();
    const expected_row e = reference(r, q);
    for (uint32_t h = 0; h < hq; ++h) {
      const double tol = kTol * std::max(e.vmag[h], 1e-3);
      for (uint32_t x = 0; x < d; ++x) {
        const double got = out[size_t{h} * d + x];
        const size_t i = size_t{h} * d + x;
        bool ok;
        if (empty)
          ok = got == 0.0;
        else if (dense)
          ok = std::fabs(got - e.out[i]) <= tol;
        else
          ok = got >= e.vmin[i] - tol && got <= e.vmax[i] + tol;
        if (!ok)
          die("%s: sequence %" PRIu64 " layer %u (%zu tokens) head %u dim %u: got %.9g, want %.9g (range [%g, %g])",
              call, id, layer, r.k.size() / s_.row_floats(), h, x, got, e.out[i], e.vmin[i], e.vmax[i]);
      }
      if (!lse) continue;
      const double got = lse[h];
      bool ok;
      if (empty)
        ok = std::isinf(got) && got < 0;
      else if (dense)
        ok = std::fabs(got - e.lse[h]) <= kTol * std::max(1.0, std::fabs(e.lse[h]));
      else
        ok = std::isfinite(got);
      if (!ok) die("%s: sequence %" PRIu64 " layer %u head %u: lse %.9g, want %.9g", call, id, layer, h, got, e.lse[h]);
    }
  }

  // ---- ops ----
  void op_create(input& in);
  void op_fork(input& in);
  void op_free(input& in);
  void op_remove_range(input& in);
  void op_length(input& in);
  void op_append(input& in);
  void op_attend(input& in, bool sparse);
  void op_prefetch(input& in);
  void op_flush();
  void op_stats(input& in);
  void op_null_cache(input& in);
  void attend_all(uint32_t layer, const char* why);

  shape s_;
  instinfer_cache* cache_;
  uint8_t salt_;
  uint64_t op_index_ = 0;
  std::map<instinfer_seq, ref_seq> live_;
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
    case kAppend: return op_append(in);
    case kAttend: return op_attend(in, false);
    case kAttendSparse: return op_attend(in, true);
    case kPrefetch: return op_prefetch(in);
    case kFlush: return op_flush();
    case kStats: return op_stats(in);
    case kNullCache: return op_null_cache(in);
    case kCheck: return attend_all(in.u8() % s_.layers, "check");
  }
}

void session::op_create(input&) {
  instinfer_seq id = 0;
  const instinfer_status st = instinfer_seq_create(cache_, &id);
  expect(st, INSTINFER_OK, "instinfer_seq_create");
  if (id == 0 || id <= max_id_ || known(id)) die("instinfer_seq_create returned id %" PRIu64 " again or 0", id);
  max_id_ = id;
  live_[id] = ref_seq(s_.layers);
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
    uint64_t tails = 0;
    for (const ref_layer& r : live_.at(src)) tails += (r.k.size() / s_.row_floats()) % s_.tpp != 0;
    if (s_.sparf == false && s_.capacity_chunks - used >= tails)
      die("instinfer_seq_fork: out of pages with %" PRIu64 " free chunks for %" PRIu64 " tails",
          s_.capacity_chunks - used, tails);
    return check_unchanged(used, "instinfer_seq_fork");
  }
  if (id == 0 || id <= max_id_ || known(id)) die("instinfer_seq_fork returned id %" PRIu64 " again or 0", id);
  max_id_ = id;
  live_[id] = live_.at(src);
}

void session::op_free(input& in) {
  const instinfer_seq id = pick(in.u8());
  const instinfer_status st = instinfer_seq_free(cache_, id);
  if (!known(id)) return expect(st, INSTINFER_E_UNKNOWN_SEQUENCE, "instinfer_seq_free(unknown)");
  expect(st, INSTINFER_OK, "instinfer_seq_free");
  live_.erase(id);
  freed_.push_back(id);
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
  if (n != live_.at(id)[layer].k.size() / s_.row_floats()) die("instinfer_seq_length disagrees with the model");
}

// append: sel, layer, n, dtype flags (bits0-1: f32, cache dtype, another dtype, not a dtype;
// bit2: NULL k; bit3: NULL v), value seed
void session::op_append(input& in) {
  const instinfer_seq id = pick(in.u8());
  const uint32_t layer = pick_layer(in.u8());
  const uint32_t n = in.u8() % (3 * s_.tpp + 2);
  const uint8_t flags = in.u8();
  splitmix g{(uint64_t{salt_} << 40) ^ (op_index_ << 8) ^ in.u8()};
  const uint8_t which = flags & 3;
  const instinfer_dtype other = s_.dtype == INSTINFER_DTYPE_BF16 ? INSTINFER_DTYPE_F16 : INSTINFER_DTYPE_BF16;
  const instinfer_dtype src = which == 0 ? INSTINFER_DTYPE_F32 : which == 1 ? s_.dtype : other;
  int raw = static_cast<int>(src);
  if (which == 3) raw = 3 + (flags >> 4);  // not a dtype: the C API reads the raw int
  const bool null_k = flags & 4, null_v = flags & 8;

  std::vector<std::byte> kb, vb;
  std::vector<float> kr, vr;
  make_rows(g, std::max(n, 1u), which == 3 ? INSTINFER_DTYPE_F32 : src, kb, kr);
  make_rows(g, std::max(n, 1u), which == 3 ? INSTINFER_DTYPE_F32 : src, vb, vr);
  const uint64_t used = stats().used_chunks;
  const instinfer_status st =
      fuzz_append_raw_dtype(cache_, id, layer, n, null_k ? nullptr : kb.data(), null_v ? nullptr : vb.data(), raw);
  // The documented order: the dtype's value (C API), layer, sequence, n_tokens, K/V, dtype pairing.
  if (which == 3) return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_append(not a dtype)");
  if (layer >= s_.layers) return expect(st, INSTINFER_E_LAYER_OUT_OF_RANGE, "instinfer_append(layer)");
  if (!known(id)) return expect(st, INSTINFER_E_UNKNOWN_SEQUENCE, "instinfer_append(unknown)");
  if (n == 0) return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_append(0 tokens)");
  if (null_k || null_v) return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_append(NULL rows)");
  if (src != INSTINFER_DTYPE_F32 && src != s_.dtype)
    return expect(st, INSTINFER_E_UNSUPPORTED, "instinfer_append(dtype pairing)");
  expect_ok_or(st, {INSTINFER_E_OUT_OF_PAGES}, "instinfer_append");
  ref_layer& r = live_.at(id)[layer];
  if (st != INSTINFER_OK) {
    // Out of pages only when the fresh chunks the tokens need (besides a copied tail) are missing.
    const uint32_t have = static_cast<uint32_t>(r.k.size() / s_.row_floats());
    const uint32_t room = have % s_.tpp ? s_.tpp - have % s_.tpp : 0;
    const uint64_t need = n > room ? (n - room + s_.tpp - 1) / s_.tpp : 0;
    if (!s_.sparf && s_.capacity_chunks - used > need)
      die("instinfer_append: out of pages for %u tokens (%" PRIu64 " chunks) with %" PRIu64 " free", n, need,
          s_.capacity_chunks - used);
    return check_unchanged(used, "instinfer_append");
  }
  r.k.insert(r.k.end(), kr.begin(), kr.end());
  r.v.insert(r.v.end(), vr.begin(), vr.end());
}

// attend / attend_sparse: layer, count (0xff: n_seq 0), sel x count, flags (bit0 lse NULL, bit1 q
// NULL, bit2 out NULL, bit3 seqs NULL), query seed; attend_sparse then a params byte (see below).
void session::op_attend(input& in, bool sparse) {
  const char* call = sparse ? "instinfer_attend_sparse" : "instinfer_attend";
  const uint32_t layer = pick_layer(in.u8());
  const uint8_t count = in.u8();
  const size_t n_seq = count == 0xff ? 0 : count % 4 + 1;
  std::vector<instinfer_seq> seqs(std::max<size_t>(n_seq, 1));
  for (size_t i = 0; i < n_seq; ++i) seqs[i] = pick(in.u8());
  const uint8_t flags = in.u8();
  splitmix g{(uint64_t{salt_} << 40) ^ (op_index_ << 8) ^ in.u8() ^ 0x5a5a};
  const size_t per = size_t{s_.q_heads()} * kHeadDim;
  std::vector<float> q(std::max<size_t>(n_seq, 1) * per);
  for (float& x : q) x = g.uniform(s_.magnitude);
  std::vector<float> out(q.size(), std::numeric_limits<float>::quiet_NaN());
  std::vector<float> lse(std::max<size_t>(n_seq, 1) * s_.q_heads(), std::numeric_limits<float>::quiet_NaN());
  const bool null_lse = flags & 1, null_q = flags & 2, null_out = flags & 4, null_seqs = flags & 8;

  // SparF parameters: 0 NULL (defaults), 1 compression 1 (dense), 2 compression c / 255,
  // 3 explicit r and k, 4 a bad struct_size, 5 whole_pages 2, 6 page_spread 0.5, 7 single channels.
  instinfer_sparf_params p;
  instinfer_sparf_params_init(&p);
  uint8_t mode = 0;
  bool dense = !sparse;
  if (sparse) {
    mode = in.u8() % 8;
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
      default: break;
    }
    dense = mode == 1;
  }
  const uint64_t used = stats().used_chunks;
  const instinfer_seq* seqs_arg = null_seqs ? nullptr : seqs.data();
  const float* q_arg = null_q ? nullptr : q.data();
  float* out_arg = null_out ? nullptr : out.data();
  float* lse_arg = null_lse ? nullptr : lse.data();
  const instinfer_status st =
      sparse ? instinfer_attend_sparse(cache_, layer, n_seq, seqs_arg, q_arg, out_arg, lse_arg, mode ? &p : nullptr)
             : instinfer_attend(cache_, layer, n_seq, seqs_arg, q_arg, out_arg, lse_arg);

  bool all_known = true;
  for (size_t i = 0; i < n_seq; ++i) all_known &= known(seqs[i]);
  // The documented order: batch shape and pointers (C API), SparF's struct checks, SparF off,
  // layer, parameter values, sequences, then k against each sequence's tokens.
  if (n_seq == 0 || null_seqs || null_q || null_out) return expect(st, INSTINFER_E_INVALID_ARGUMENT, call);
  if (sparse && (mode == 4 || mode == 5 || (mode == 3 && (p.r == 0) != (p.k == 0))))
    return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_attend_sparse(params struct)");
  if (sparse && !s_.sparf) return expect(st, INSTINFER_E_UNSUPPORTED, "instinfer_attend_sparse(SparF off)");
  if (layer >= s_.layers) return expect(st, INSTINFER_E_LAYER_OUT_OF_RANGE, call);
  if (sparse && (mode == 6 || (mode == 2 && p.compression <= 0.0) || (mode == 3 && p.r > kHeadDim)))
    return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_attend_sparse(params values)");
  if (!all_known) return expect(st, INSTINFER_E_UNKNOWN_SEQUENCE, call);
  if (sparse && mode == 3 && p.k > 0) {
    bool too_few = false;
    for (size_t i = 0; i < n_seq; ++i) {
      const size_t n = live_.at(seqs[i])[layer].k.size() / s_.row_floats();
      too_few |= n > 0 && p.k > n;
    }
    if (too_few) return expect(st, INSTINFER_E_INVALID_ARGUMENT, "instinfer_attend_sparse(k > tokens)");
  }
  expect(st, INSTINFER_OK, call);
  if (stats().used_chunks != used && !s_.sparf) die("%s changed used chunks", call);
  for (size_t i = 0; i < n_seq; ++i)
    check_row(call, seqs[i], layer, q.data() + i * per, out.data() + i * per,
              null_lse ? nullptr : lse.data() + i * s_.q_heads(), dense);
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
  check_lengths("instinfer_cache_stats");
}

// Every entry point that takes a cache refuses NULL.
void session::op_null_cache(input& in) {
  instinfer_seq id = 0;
  uint64_t n = 0;
  float q[kHeadDim] = {}, out[kHeadDim] = {};
  const float k[kHeadDim] = {};
  instinfer_stats st{};
  st.struct_size = sizeof st;
  const instinfer_seq one = 1;
  instinfer_status got;
  switch (in.u8() % 10) {
    case 0: got = instinfer_seq_create(nullptr, &id); break;
    case 1: got = instinfer_seq_fork(nullptr, 1, &id); break;
    case 2: got = instinfer_seq_free(nullptr, 1); break;
    case 3: got = instinfer_seq_remove_range(nullptr, 1, 0, 1); break;
    case 4: got = instinfer_seq_length(nullptr, 1, 0, &n); break;
    case 5: got = instinfer_append(nullptr, 1, 0, 1, k, k, INSTINFER_DTYPE_F32); break;
    case 6: got = instinfer_attend(nullptr, 0, 1, &one, q, out, nullptr); break;
    case 7: got = instinfer_attend_sparse(nullptr, 0, 1, &one, q, out, nullptr, nullptr); break;
    case 8: got = instinfer_prefetch(nullptr, 0, 1, &one); break;
    default: got = instinfer_cache_stats(nullptr, &st); break;
  }
  expect(got, INSTINFER_E_INVALID_ARGUMENT, "a call with a NULL cache");
  expect(instinfer_cache_flush(nullptr), INSTINFER_E_INVALID_ARGUMENT, "instinfer_cache_flush(NULL)");
  instinfer_cache_destroy(nullptr);
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
  const instinfer_stats st = stats();
  if (st.n_sequences != 0 || st.used_chunks != 0 || st.shared_chunks != 0)
    die("after freeing every sequence: %" PRIu64 " sequences, %" PRIu64 " used and %" PRIu64 " shared chunks",
        st.n_sequences, st.used_chunks, st.shared_chunks);
}

// ---- configuration ------------------------------------------------------------------------------

std::string ssd_path() {
  return "/dev/shm/instinfer-fuzz-capi-" + std::to_string(::getpid()) + ".bin";
}

shape decode_shape(input& in) {
  const uint8_t h0 = in.u8(), h1 = in.u8(), h2 = in.u8();
  shape s;
  s.ssd = h0 & 1;
  const uint8_t dt = (h0 >> 1) & 3;
  s.dtype = dt == 0 ? INSTINFER_DTYPE_F32 : dt == 2 ? INSTINFER_DTYPE_BF16 : INSTINFER_DTYPE_F16;
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
  s.tpp =
      s.page_bytes / (kHeadDim * static_cast<uint32_t>(instinfer::dtype_size(static_cast<instinfer::dtype>(s.dtype))));
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
  input in(data, size);
  const uint8_t h2 = data[2], salt = data[3];
  shape s = decode_shape(in);
  (void)in.u8();  // h3 (salt)
  std::string uri;
  const instinfer_config cfg = make_config(s, h2, uri);
  instinfer_cache* cache = nullptr;
  const instinfer_status st = instinfer_cache_create(&cfg, &cache);
  if (st != INSTINFER_OK) {
    // Small pages cannot hold SparF's column pages (invalid), nothing else may fail here.
    if (cache != nullptr) die("instinfer_cache_create failed (%s) and left a handle", code_name(st));
    if (!(s.sparf && st == INSTINFER_E_INVALID_ARGUMENT))
      die("instinfer_cache_create(%s) returned %s", uri.c_str(), code_name(st));
    return 0;
  }
  session sess(s, cache, salt);
  for (size_t i = 0; i < kMaxOps && !in.empty(); ++i) sess.run_op(in.u8(), in);
  sess.finish();
  return 0;
}
