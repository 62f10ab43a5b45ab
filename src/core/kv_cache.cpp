#include "instinfer/kv/kv_cache.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <system_error>
#include <thread>

#include "core/kv_cache_internal.hpp"
#include "core/slice_gate.hpp"
#include "instinfer/core/thread_pool.hpp"
#include "sparf/sparse_attender.hpp"

namespace instinfer {

using namespace kv_cache_detail;

result<std::unique_ptr<kv_cache>> kv_cache::create(const cache_options& options) {
  auto b = make_backend(options.backend_uri);
  if (!b.ok()) return b.error();
  return create(options, std::move(b).value());
}

result<std::unique_ptr<kv_cache>> kv_cache::create(const cache_options& options, std::unique_ptr<backend> b) {
  if (!b) return status{errc::kInvalidArgument, "no backend"};
  INSTINFER_TRY(options.shape.validate());
  if (!(options.scale >= 0.0f) || !std::isfinite(options.scale))
    return status{errc::kInvalidArgument, "scale must be finite and >= 0 (0 means 1/sqrt(head_dim))"};
  if (std::isnan(options.softcap) || std::isinf(options.softcap))
    return status{errc::kInvalidArgument, "softcap must be finite (<= 0 disables it)"};
  // Page and capacity rules are the backend's (its page_geometry, then its configure): a refusal
  // names the backend, "csd: page_bytes must be ...".
  const std::string name(b->name());
  const auto named = [&](const status& s) {
    const std::string& m = s.message();
    if (m.compare(0, name.size(), name) == 0) return s;
    return status{s.code(), name + ": " + m};
  };
  const uint32_t page_bytes = options.page_bytes ? options.page_bytes : b->preferred_page_bytes();
  auto geometry = page_geometry::make(page_bytes, options.shape.head_dim, options.shape.kv_dtype);
  if (!geometry.ok()) return named(geometry.error());

  backend_config config;
  config.shape = options.shape;
  config.page = geometry.value();
  config.capacity_bytes = options.capacity_bytes;
  config.n_threads = options.caller_threads ? 1 : options.n_threads;  // 1 worker: the calling thread
  config.scale = options.scale;
  config.softcap = options.softcap;
  if (options.int8_query_dot && options.shape.kv_dtype != dtype::kQ8_0)
    return status{errc::kUnsupported,
                  "int8_query_dot needs a q8_0 cache, got " + std::string(dtype_name(options.shape.kv_dtype))};
  config.int8_query_dot = options.int8_query_dot;
  try {  // one compute pool for the backend's decode and the sparse attenders
    config.pool = std::make_shared<thread_pool>(config.n_threads ? config.n_threads
                                                                 : std::max(1u, std::thread::hardware_concurrency()));
  } catch (const std::system_error& e) {
    return status{errc::kOutOfMemory, "kv_cache: cannot start the compute threads: " + std::string(e.what())};
  } catch (const std::bad_alloc&) {
    return status{errc::kOutOfMemory, "kv_cache: compute pool"};
  }
  sparf_config sparf;
  if (options.sparf ||
      options.page_summaries) {  // resolved before configure: a backend that runs SparF needs the column layout
    auto cfg = sparf_config::make(config.layout(), options.sparf_channels_per_page, options.shape.group_size(),
                                  options.scale, options.softcap);
    if (!cfg.ok()) return cfg.error();
    sparf = cfg.value();
    if (options.sparf) {
      config.sparf = true;
      config.sparf_channels_per_page = sparf.columns.channels_per_page;
    }
    config.page_summaries = options.page_summaries;
  }
  if (status s = b->configure(config); !s.ok()) return named(s);
  std::unique_ptr<kv_cache> cache;
  try {
    cache.reset(new kv_cache(config, std::move(b)));
  } catch (const std::bad_alloc&) {
    return status{errc::kOutOfMemory, "kv_cache"};
  }
  if (persistent_store* store = cache->backend_->persistence()) {
    if (options.sparf || options.page_summaries)
      return status{errc::kUnsupported, name +
                                            ": a persistent store does not keep a sparse policy's state (SparF's "
                                            "channel-indexed copy, page summaries); use neither with persist=1"};
    cache->store_ = store;
    INSTINFER_TRY(cache->restore());
  }
  if (options.sparf || options.page_summaries) {
    auto attender = make_sparse_attender(*cache->backend_, config, sparf, options.sparf, options.page_summaries);
    if (!attender.ok()) return attender.error();
    cache->attender_ = std::move(attender).value();
  }
  return cache;
}

kv_cache::kv_cache(backend_config config, std::unique_ptr<backend> b)
    : config_(config), backend_(std::move(b)), slices_(std::make_unique<slice_gate>(mutex_)) {}

kv_cache::~kv_cache() {
  for (auto& [id, seq] : sequences_) {
    for (auto& t : seq.layers) release_table(t);
  }
}

status kv_cache::check_layer(uint32_t layer) const {
  if (layer >= config_.shape.n_layers)
    return {errc::kLayerOutOfRange,
            "layer " + std::to_string(layer) + " >= n_layers " + std::to_string(config_.shape.n_layers)};
  return {};
}

result<kv_cache::sequence*> kv_cache::find(seq_id seq) {
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) return status{errc::kUnknownSequence, seq_name(seq) + " does not exist"};
  return &it->second;
}

result<const kv_cache::sequence*> kv_cache::find(seq_id seq) const {
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) return status{errc::kUnknownSequence, seq_name(seq) + " does not exist"};
  return &it->second;
}

status kv_cache::track(chunk_id id) {
  if (id == kInvalidChunk) return {errc::kInternal, "backend returned an invalid chunk id"};
  if (refcount_.size() > id) return {};
  try {
    const size_t grow = std::max<size_t>(size_t{id} + 1, refcount_.size() * 2);
    refcount_.resize(grow, 0);
    sealed_.resize(grow, 0);
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "chunk refcounts"};
  }
  return {};
}

void kv_cache::retain(chunk_id id) noexcept {
  ++refcount_[id];
}

void kv_cache::release(chunk_id id) noexcept {
  if (--refcount_[id] == 0) {
    sealed_[id] = 0;
    backend_->release_chunk(id);
  }
}

void kv_cache::release_table(layer_table& t) noexcept {
  for (chunk_id id : t.chunks) release(id);
  t.chunks.clear();
  t.n_tokens = 0;
}

bool kv_cache::writable(chunk_id id) const noexcept {
  return refcount_[id] == 1 && !sealed_[id];
}

bool kv_cache::contains(seq_id seq) const {
  std::lock_guard lock(mutex_);
  return sequences_.count(seq) != 0;
}

result<seq_id> kv_cache::create_sequence() {
  std::lock_guard lock(mutex_);
  try {
    const seq_id id = next_seq_++;
    sequences_[id].layers.resize(config_.shape.n_layers);
    return id;
  } catch (const std::bad_alloc&) {
    return status{errc::kOutOfMemory, "sequence table"};
  }
}

result<seq_id> kv_cache::fork_sequence(seq_id src) {
  std::lock_guard lock(mutex_);
  auto found = find(src);
  if (!found.ok()) return found.error();
  const sequence& from = *found.value();
  const uint32_t tpp = config_.page.tokens_per_page;

  uint64_t partial_tails = 0;
  for (const auto& t : from.layers) partial_tails += (t.n_tokens % tpp) != 0;
  if (backend_->free_chunks() < partial_tails)
    return status{errc::kOutOfPages, "fork of " + seq_name(src) + " needs " + std::to_string(partial_tails) +
                                         " free chunks, " + std::to_string(backend_->free_chunks()) + " left"};
  const seq_id id = next_seq_++;
  sequence copy;
  try {
    copy.layers.resize(from.layers.size());
    for (auto& t : copy.layers) t.chunks.reserve(1);
  } catch (const std::bad_alloc&) {
    return status{errc::kOutOfMemory, "fork"};
  }
  for (uint32_t l = 0; l < from.layers.size(); ++l) {
    const layer_table& a = from.layers[l];
    layer_table& b = copy.layers[l];
    const uint32_t fill = a.n_tokens % tpp;
    const size_t shared = fill ? a.chunks.size() - 1 : a.chunks.size();
    status s;
    try {
      b.chunks.reserve(a.chunks.size());
    } catch (const std::bad_alloc&) {
      s = status{errc::kOutOfMemory, "fork page table"};
    }
    for (size_t i = 0; s.ok() && i < shared; ++i) {
      retain(a.chunks[i]);
      b.chunks.push_back(a.chunks[i]);
    }
    if (s.ok() && fill) {
      const chunk_hint hint{id, l, static_cast<uint32_t>(a.chunks.size() - 1)};
      auto fresh = backend_->allocate_chunk(hint);
      if (fresh.ok() && !(s = track(fresh.value())).ok()) backend_->release_chunk(fresh.value());
      if (!fresh.ok()) {
        s = fresh.error();
      } else if (s.ok()) {
        s = backend_->copy_tokens(fresh.value(), hint, a.chunks.back(), fill);
        if (s.ok()) {
          refcount_[fresh.value()] = 1;
          b.chunks.push_back(fresh.value());
        } else {
          backend_->release_chunk(fresh.value());
        }
      }
    }
    if (!s.ok()) {
      for (auto& t : copy.layers) release_table(t);
      return s;
    }
    b.n_tokens = a.n_tokens;
  }
  if (attender_) {
    if (status s = attender_->on_fork(src, id); !s.ok()) {
      for (auto& t : copy.layers) release_table(t);
      return s;
    }
  }
  try {
    sequences_.emplace(id, std::move(copy));
  } catch (const std::bad_alloc&) {
    if (attender_) attender_->on_free(id);
    for (auto& t : copy.layers) release_table(t);
    return status{errc::kOutOfMemory, "sequence table"};
  }
  return id;
}

status kv_cache::free_sequence(seq_id seq) {
  std::lock_guard lock(mutex_);
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) return {errc::kUnknownSequence, seq_name(seq) + " does not exist"};
  for (auto& t : it->second.layers) release_table(t);
  if (it->second.name != 0) names_.erase(it->second.name);
  sequences_.erase(it);
  if (attender_) attender_->on_free(seq);
  backend_->on_sequence_freed(seq);
  return {};
}

result<uint32_t> kv_cache::length(seq_id seq, uint32_t layer) const {
  std::lock_guard lock(mutex_);
  INSTINFER_TRY(check_layer(layer));
  auto found = find(seq);
  if (!found.ok()) return found.error();
  return found.value()->layers[layer].n_tokens;
}

uint32_t kv_cache::fresh_chunks_needed(const layer_table& t, uint32_t n) const noexcept {
  const uint32_t tpp = config_.page.tokens_per_page;
  const uint32_t fill = t.n_tokens % tpp;
  const bool cow = fill != 0 && !writable(t.chunks.back());
  const uint32_t room = fill != 0 ? tpp - fill : 0;
  return (n > room ? ceil_div(n - room, tpp) : 0) + (cow ? 1 : 0);
}

status kv_cache::check_free_chunks(const layer_table& t, uint32_t n) const {
  const uint32_t needed = fresh_chunks_needed(t, n);
  if (backend_->free_chunks() < needed)
    return {errc::kOutOfPages, "appending " + std::to_string(n) + " tokens needs " + std::to_string(needed) +
                                   " free chunks, " + std::to_string(backend_->free_chunks()) + " left"};
  return {};
}

status kv_cache::append_to_table(seq_id seq, uint32_t layer, layer_table& t, uint32_t n, const std::byte* k,
                                 const std::byte* v, bool notify) {
  const uint32_t tpp = config_.page.tokens_per_page;
  const uint64_t row_stride = uint64_t{config_.shape.n_kv_heads} * config_.page.row_bytes();
  const uint32_t fill = t.n_tokens % tpp;
  const bool has_partial = fill != 0;
  const bool cow = has_partial && !writable(t.chunks.back());
  const uint32_t room = has_partial ? tpp - fill : 0;
  const uint32_t fresh_needed = fresh_chunks_needed(t, n);
  INSTINFER_TRY(check_free_chunks(t, n));

  std::vector<chunk_id> fresh;
  try {
    fresh.reserve(fresh_needed);
    t.chunks.reserve(t.chunks.size() + fresh_needed);
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "page table growth"};
  }
  const uint32_t first_index = static_cast<uint32_t>(t.chunks.size()) - (has_partial ? 1 : 0);
  const auto undo = [&](status s) {
    for (chunk_id id : fresh) backend_->release_chunk(id);
    return s;
  };
  for (uint32_t i = 0; i < fresh_needed; ++i) {
    const uint32_t index = cow ? first_index + i : first_index + (has_partial ? 1 : 0) + i;
    auto id = backend_->allocate_chunk({seq, layer, index});
    if (!id.ok()) return undo(id.error());
    if (status s = track(id.value()); !s.ok()) {
      backend_->release_chunk(id.value());
      return undo(s);
    }
    fresh.push_back(id.value());
  }

  size_t next_fresh = 0;
  chunk_id tail = has_partial ? t.chunks.back() : kInvalidChunk;
  if (cow) {
    const chunk_id copy = fresh[next_fresh++];
    status s = backend_->copy_tokens(copy, {seq, layer, first_index}, tail, fill);
    if (!s.ok()) return undo(s);
    tail = copy;
  }
  uint32_t written = 0;
  if (has_partial) {
    const uint32_t w = std::min(n, room);
    status s = backend_->write_tokens(tail, {seq, layer, first_index}, fill, w, k, v);
    if (!s.ok()) {
      // The backend may hold part of the write beyond the visible length: never append to it again.
      if (!cow) sealed_[tail] = 1;
      return undo(s);
    }
    written = w;
  }
  for (size_t i = next_fresh; i < fresh.size(); ++i) {
    const uint32_t w = std::min(tpp, n - written);
    const uint32_t index = first_index + (has_partial ? 1 : 0) + static_cast<uint32_t>(i - next_fresh);
    status s =
        backend_->write_tokens(fresh[i], {seq, layer, index}, 0, w, k + written * row_stride, v + written * row_stride);
    if (!s.ok()) {
      if (has_partial && !cow) sealed_[tail] = 1;
      return undo(s);
    }
    written += w;
  }

  // The sparse attender follows the same tokens; it is the last step that can fail.
  if (notify && attender_) {
    if (status s = attender_->on_append(seq, layer, t.n_tokens, n, k, v); !s.ok()) {
      if (has_partial && !cow) sealed_[tail] = 1;
      return undo(s);
    }
  }

  // Commit: nothing below can fail.
  if (cow) {
    release(t.chunks.back());
    t.chunks.back() = tail;
    refcount_[tail] = 1;
  }
  if (has_partial && fill + std::min(n, room) == tpp) sealed_[tail] = 1;
  uint32_t placed = has_partial ? std::min(n, room) : 0;
  for (size_t i = next_fresh; i < fresh.size(); ++i) {
    const uint32_t w = std::min(tpp, n - placed);
    refcount_[fresh[i]] = 1;
    sealed_[fresh[i]] = w == tpp;
    t.chunks.push_back(fresh[i]);
    placed += w;
  }
  t.n_tokens += n;
  return {};
}

status kv_cache::append(seq_id seq, uint32_t layer, uint32_t n_tokens, const void* k, const void* v, dtype src_dtype) {
  std::lock_guard lock(mutex_);
  return append_locked(seq, layer, n_tokens, k, v, src_dtype);
}

status kv_cache::append_locked(seq_id seq, uint32_t layer, uint32_t n_tokens, const void* k, const void* v,
                               dtype src_dtype) {
  INSTINFER_TRY(check_layer(layer));
  auto found = find(seq);
  if (!found.ok()) return found.error();
  if (n_tokens == 0) return {errc::kInvalidArgument, "n_tokens must be > 0"};
  if (!k || !v) return {errc::kInvalidArgument, "K and V rows must not be null"};
  if (!is_valid_dtype(src_dtype)) return {errc::kInvalidArgument, "unknown source dtype"};
  if (!is_convertible(src_dtype, config_.shape.kv_dtype))
    return {errc::kUnsupported, "rows must be f32" +
                                    std::string(is_quantized(config_.shape.kv_dtype) ? ", f16, bf16" : "") +
                                    " or the cache dtype (" + std::string(dtype_name(config_.shape.kv_dtype)) +
                                    "), got " + std::string(dtype_name(src_dtype))};
  layer_table& t = found.value()->layers[layer];
  if (n_tokens > kMaxTokensPerLayer || t.n_tokens > kMaxTokensPerLayer - n_tokens)
    return {errc::kInvalidArgument, "a layer may hold at most " + std::to_string(kMaxTokensPerLayer) + " tokens"};

  // Every check that needs no rows comes before the conversion reads them: a call that cannot
  // succeed must not read n_tokens rows (the caller's buffers may be shorter than claimed).
  INSTINFER_TRY(check_free_chunks(t, n_tokens));

  const std::byte* kb = nullptr;
  const std::byte* vb = nullptr;
  INSTINFER_TRY(convert_rows(n_tokens, k, v, src_dtype, kb, vb));
  return append_to_table(seq, layer, t, n_tokens, kb, vb);
}

// The conversion step of append: rows of src_dtype as the cache stores them (kb, vb point at k, v
// when they are in the cache dtype, else into convert_buffer_). Quantizing refuses a block with
// a non-finite value or one too large for the format's f16 scale (ggml would store garbage).
status kv_cache::convert_rows(uint32_t n_tokens, const void* k, const void* v, dtype src_dtype, const std::byte*& kb,
                              const std::byte*& vb) {
  kb = static_cast<const std::byte*>(k);
  vb = static_cast<const std::byte*>(v);
  const dtype to = config_.shape.kv_dtype;
  if (src_dtype == to) return {};
  const size_t elems = size_t{n_tokens} * config_.shape.n_kv_heads * config_.shape.head_dim;
  const size_t bytes = dtype_row_bytes(to, elems);
  try {
    if (convert_buffer_.size() < 2 * bytes) convert_buffer_.resize(2 * bytes);
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "conversion buffer"};
  }
  const bool k_ok = convert_elements(k, src_dtype, convert_buffer_.data(), to, elems);
  const bool v_ok = convert_elements(v, src_dtype, convert_buffer_.data() + bytes, to, elems);
  if (!k_ok || !v_ok)
    return {errc::kInvalidArgument, std::string(k_ok ? "V" : "K") + " rows hold a value that " +
                                        std::string(dtype_name(to)) +
                                        " cannot store (not finite, or beyond its f16 block scale)"};
  kb = convert_buffer_.data();
  vb = convert_buffer_.data() + bytes;
  return {};
}

status kv_cache::read_layer(const layer_table& t, uint32_t begin, uint32_t end, std::vector<std::byte>& k,
                            std::vector<std::byte>& v) {
  const chunk_layout lay = layout();
  const uint32_t tpp = lay.tokens();
  const uint32_t heads = lay.n_kv_heads;
  const uint32_t row = lay.page.row_bytes();
  std::vector<std::byte> chunk;
  try {
    k.assign(size_t{end - begin} * heads * row, std::byte{0});
    v.assign(size_t{end - begin} * heads * row, std::byte{0});
    chunk.resize(lay.chunk_bytes());
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "read buffer"};
  }
  for (uint32_t c = begin / tpp; c < ceil_div(end, tpp); ++c) {
    const uint32_t in_chunk = std::min(tpp, t.n_tokens - c * tpp);
    INSTINFER_TRY(backend_->read_chunk(t.chunks[c], in_chunk, chunk.data()));
    const uint32_t first = std::max(begin, c * tpp), last = std::min(end, c * tpp + in_chunk);
    const size_t dst = size_t{first - begin} * heads * row;
    lay.gather_rows(chunk.data(), first - c * tpp, last - first, k.data() + dst, v.data() + dst);
  }
  return {};
}

status kv_cache::read_tokens(seq_id seq, uint32_t layer, std::vector<std::byte>& k, std::vector<std::byte>& v) {
  std::lock_guard lock(mutex_);
  INSTINFER_TRY(check_layer(layer));
  auto found = find(seq);
  if (!found.ok()) return found.error();
  const layer_table& t = found.value()->layers[layer];
  return read_layer(t, 0, t.n_tokens, k, v);
}

// The table of layer `layer` without tokens [begin, end) (end <= t.n_tokens): the chunks wholly
// before begin stay shared, the surviving suffix of an interior range is re-appended (a shared or
// sealed tail is copied first). The attender stages the same change. On failure `rebuilt` holds
// what was built so far (the caller releases it).
status kv_cache::rebuild_layer(seq_id seq, uint32_t layer, const layer_table& t, uint32_t begin, uint32_t end,
                               layer_table& rebuilt) {
  const uint32_t keep = ceil_div(begin, config_.page.tokens_per_page);
  try {
    rebuilt.chunks.assign(t.chunks.begin(), t.chunks.begin() + keep);
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "remove_range"};
  }
  for (chunk_id id : rebuilt.chunks) retain(id);
  rebuilt.n_tokens = begin;
  std::vector<std::byte> k, v;
  if (end < t.n_tokens) {
    INSTINFER_TRY(read_layer(t, end, t.n_tokens, k, v));
    INSTINFER_TRY(append_to_table(seq, layer, rebuilt, t.n_tokens - end, k.data(), v.data(), false));
  } else if (begin % config_.page.tokens_per_page != 0) {
    // The kept tail was cut inside: it still holds the removed rows on the device, so it must never
    // be appended to in place (storage is append-only); the next append copies it first.
    sealed_[rebuilt.chunks.back()] = 1;
  }
  if (!attender_) return {};
  const stored_rows_reader old_rows = [&](uint32_t lo, uint32_t hi, std::vector<std::byte>& rk,
                                          std::vector<std::byte>& rv) { return read_layer(t, lo, hi, rk, rv); };
  return attender_->on_truncate(seq, layer, begin, old_rows, t.n_tokens - end, k.data(), v.data());
}

status kv_cache::remove_range(seq_id seq, uint64_t begin, uint64_t end) {
  std::lock_guard lock(mutex_);
  auto found = find(seq);
  if (!found.ok()) return found.error();
  if (begin > end)
    return {errc::kInvalidArgument, "remove_range: begin " + std::to_string(begin) + " > end " + std::to_string(end)};
  sequence& s = *found.value();

  // Build every layer's new table first, commit only when all succeeded: all or nothing.
  std::vector<layer_table> rebuilt;
  std::vector<bool> changed;
  try {
    rebuilt.resize(s.layers.size());
    changed.assign(s.layers.size(), false);
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "remove_range"};
  }
  status failure;
  for (uint32_t l = 0; l < s.layers.size() && failure.ok(); ++l) {
    const layer_table& t = s.layers[l];
    if (begin >= t.n_tokens || begin == end) continue;
    changed[l] = true;
    failure = rebuild_layer(seq, l, t, static_cast<uint32_t>(begin),
                            static_cast<uint32_t>(std::min<uint64_t>(end, t.n_tokens)), rebuilt[l]);
  }
  if (attender_) attender_->on_truncate_end(seq, failure.ok());
  if (!failure.ok()) {
    for (uint32_t l = 0; l < rebuilt.size(); ++l)
      if (changed[l]) release_table(rebuilt[l]);
    return failure;
  }
  for (uint32_t l = 0; l < s.layers.size(); ++l) {
    if (!changed[l]) continue;
    release_table(s.layers[l]);
    s.layers[l] = std::move(rebuilt[l]);
  }
  return {};
}

}  // namespace instinfer
