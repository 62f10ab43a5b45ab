#include "instinfer/kv/kv_cache.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

namespace instinfer {

namespace {
constexpr uint32_t kMaxTokensPerLayer = 1u << 30;  // keeps every token index far from overflow

uint32_t ceil_div(uint64_t a, uint64_t b) {
  return static_cast<uint32_t>((a + b - 1) / b);
}

std::string seq_name(seq_id seq) {
  return "sequence " + std::to_string(seq);
}
}  // namespace

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
  const uint32_t page_bytes = options.page_bytes ? options.page_bytes : b->preferred_page_bytes();
  auto geometry = page_geometry::make(page_bytes, options.shape.head_dim, options.shape.kv_dtype);
  if (!geometry.ok()) return geometry.error();

  backend_config config;
  config.shape = options.shape;
  config.page = geometry.value();
  config.capacity_bytes = options.capacity_bytes;
  config.n_threads = options.n_threads;
  config.scale = options.scale;
  config.softcap = options.softcap;
  sparf_config sparf;
  if (options.sparf) {  // resolved before configure: a backend that runs SparF needs the column layout
    auto cfg = sparf_config::make(config.layout(), options.sparf_channels_per_page, options.shape.group_size(),
                                  options.scale, options.softcap);
    if (!cfg.ok()) return cfg.error();
    sparf = cfg.value();
    config.sparf = true;
    config.sparf_channels_per_page = sparf.columns.channels_per_page;
  }
  INSTINFER_TRY(b->configure(config));
  std::unique_ptr<kv_cache> cache;
  try {
    cache.reset(new kv_cache(config, std::move(b)));
  } catch (const std::bad_alloc&) {
    return status{errc::kOutOfMemory, "kv_cache"};
  }
  if (options.sparf) {
    cache->sparf_config_ = sparf;
    cache->sparf_enabled_ = true;
    cache->sparf_native_ = cache->backend_->runs_sparf();
    cache->sparf_store_columns_ = !cache->sparf_native_ && !cache->backend_->host_addressable();
  }
  return cache;
}

result<std::unique_ptr<sparf_index>> kv_cache::new_sparf_index() const {
  auto index = sparf_index::create(sparf_config_.columns);
  if (!index.ok()) return index.error();
  try {
    return std::make_unique<sparf_index>(std::move(index).value());
  } catch (const std::bad_alloc&) {
    return status{errc::kOutOfMemory, "SparF index"};
  }
}

status kv_cache::copy_sparf_index(const layer_table& from, layer_table& to) const {
  if (!from.sparf) return {};
  try {
    to.sparf = std::make_unique<sparf_index>(*from.sparf);
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "SparF index copy"};
  }
  return {};
}

kv_cache::kv_cache(backend_config config, std::unique_ptr<backend> b) : config_(config), backend_(std::move(b)) {}

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
  for (chunk_id id : t.column_chunks) release(id);
  t.column_chunks.clear();
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
    if (s.ok()) s = copy_sparf_index(a, b);
    if (s.ok()) {  // stored column blocks are immutable: shared like full chunks
      try {
        b.column_chunks = a.column_chunks;
        for (chunk_id cid : b.column_chunks) retain(cid);
      } catch (const std::bad_alloc&) {
        s = status{errc::kOutOfMemory, "fork column blocks"};
      }
    }
    if (!s.ok()) {
      for (auto& t : copy.layers) release_table(t);
      return s;
    }
    b.n_tokens = a.n_tokens;
  }
  sequences_.emplace(id, std::move(copy));
  return id;
}

status kv_cache::free_sequence(seq_id seq) {
  std::lock_guard lock(mutex_);
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) return {errc::kUnknownSequence, seq_name(seq) + " does not exist"};
  for (auto& t : it->second.layers) release_table(t);
  sequences_.erase(it);
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

status kv_cache::append_to_table(seq_id seq, uint32_t layer, layer_table& t, uint32_t n, const std::byte* k,
                                 const std::byte* v) {
  const uint32_t tpp = config_.page.tokens_per_page;
  const uint64_t row_stride = uint64_t{config_.shape.n_kv_heads} * config_.page.row_bytes();
  const uint32_t fill = t.n_tokens % tpp;
  const bool has_partial = fill != 0;
  const bool cow = has_partial && !writable(t.chunks.back());
  const uint32_t room = has_partial ? tpp - fill : 0;
  const uint32_t fresh_needed = (n > room ? ceil_div(n - room, tpp) : 0) + (cow ? 1 : 0);
  if (backend_->free_chunks() < fresh_needed)
    return {errc::kOutOfPages, "appending " + std::to_string(n) + " tokens needs " + std::to_string(fresh_needed) +
                                   " free chunks, " + std::to_string(backend_->free_chunks()) + " left"};

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

  // The SparF index follows the same tokens; it is the last step that can fail. (A backend that
  // runs SparF itself builds its own from write_tokens.)
  if (sparf_enabled_ && !sparf_native_) {
    status s;
    if (!t.sparf) {
      auto fresh_index = new_sparf_index();
      if (fresh_index.ok())
        t.sparf = std::move(fresh_index).value();
      else
        s = fresh_index.error();
    }
    if (s.ok()) s = t.sparf->append(n, k, v);
    if (!s.ok()) {
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
  store_sealed_columns(seq, layer, t);
  return {};
}

// SparF on a storage backend: sealed column blocks go to the device as whole chunks (the column
// pages packed into chunk pages), the host keeps the tail block and the V sums. Best effort: a
// block that cannot be stored now stays in host memory and is tried again on the next append.
void kv_cache::store_sealed_columns(seq_id seq, uint32_t layer, layer_table& t) noexcept {
  if (!sparf_store_columns_ || !t.sparf) return;
  const channel_layout& cl = sparf_config_.columns;
  const chunk_layout lay = layout();
  const uint32_t per_block = column_store_chunks();
  const uint32_t tpp = lay.tokens(), H = config_.shape.n_kv_heads;
  const uint64_t row = config_.page.row_bytes(), page = lay.page.page_bytes;
  try {
    std::vector<std::byte> k(uint64_t{tpp} * H * row), v(k.size());
    for (uint32_t b = static_cast<uint32_t>(t.column_chunks.size() / per_block); b < t.sparf->sealed_blocks(); ++b) {
      const std::byte* blk = t.sparf->block(b);
      if (blk == nullptr) break;
      std::vector<chunk_id> ids;
      status s;
      for (uint32_t j = 0; j < per_block && s.ok(); ++j) {
        // Chunk page P holds column page j * 2H + P: as token rows, K page h = rows of head h.
        std::fill(k.begin(), k.end(), std::byte{0});
        std::fill(v.begin(), v.end(), std::byte{0});
        for (uint32_t p = 0; p < 2 * H; ++p) {
          const uint64_t cp = uint64_t{j} * 2 * H + p;
          if (cp >= cl.pages_per_block()) break;
          std::byte* dst = p < H ? k.data() : v.data();
          const uint32_t h = p % H;
          for (uint32_t r = 0; r < tpp; ++r)
            std::memcpy(dst + (uint64_t{r} * H + h) * row, blk + cp * page + uint64_t{r} * row, row);
        }
        const chunk_hint hint{seq | kColumnStream, layer, static_cast<uint32_t>(t.column_chunks.size() + j)};
        auto id = backend_->allocate_chunk(hint);
        if (!id.ok()) {
          s = id.error();
          break;
        }
        s = track(id.value());
        if (s.ok()) s = backend_->write_tokens(id.value(), hint, 0, tpp, k.data(), v.data());
        if (!s.ok()) {
          backend_->release_chunk(id.value());
          break;
        }
        ids.push_back(id.value());
      }
      if (!s.ok()) {
        for (chunk_id id : ids) backend_->release_chunk(id);
        return;
      }
      for (chunk_id id : ids) {
        refcount_[id] = 1;
        sealed_[id] = 1;
        t.column_chunks.push_back(id);
      }
      t.sparf->drop_block_memory(b);
    }
  } catch (const std::bad_alloc&) {
  }
}

uint32_t kv_cache::column_store_chunks() const noexcept {
  const uint32_t per_chunk = layout().pages_per_chunk();
  return (sparf_config_.columns.pages_per_block() + per_chunk - 1) / per_chunk;
}

status kv_cache::append(seq_id seq, uint32_t layer, uint32_t n_tokens, const void* k, const void* v, dtype src_dtype) {
  std::lock_guard lock(mutex_);
  INSTINFER_TRY(check_layer(layer));
  auto found = find(seq);
  if (!found.ok()) return found.error();
  if (n_tokens == 0) return {errc::kInvalidArgument, "n_tokens must be > 0"};
  if (!k || !v) return {errc::kInvalidArgument, "K and V rows must not be null"};
  if (!is_valid_dtype(src_dtype)) return {errc::kInvalidArgument, "unknown source dtype"};
  if (src_dtype != config_.shape.kv_dtype && src_dtype != dtype::kF32)
    return {errc::kUnsupported, "rows must be f32 or the cache dtype (" +
                                    std::string(dtype_name(config_.shape.kv_dtype)) + "), got " +
                                    std::string(dtype_name(src_dtype))};
  layer_table& t = found.value()->layers[layer];
  if (n_tokens > kMaxTokensPerLayer || t.n_tokens > kMaxTokensPerLayer - n_tokens)
    return {errc::kInvalidArgument, "a layer may hold at most " + std::to_string(kMaxTokensPerLayer) + " tokens"};

  const auto* kb = static_cast<const std::byte*>(k);
  const auto* vb = static_cast<const std::byte*>(v);
  if (src_dtype != config_.shape.kv_dtype) {
    const size_t elems = size_t{n_tokens} * config_.shape.n_kv_heads * config_.shape.head_dim;
    const size_t bytes = elems * dtype_size(config_.shape.kv_dtype);
    try {
      if (convert_buffer_.size() < 2 * bytes) convert_buffer_.resize(2 * bytes);
    } catch (const std::bad_alloc&) {
      return {errc::kOutOfMemory, "conversion buffer"};
    }
    convert_elements(k, src_dtype, convert_buffer_.data(), config_.shape.kv_dtype, elems);
    convert_elements(v, src_dtype, convert_buffer_.data() + bytes, config_.shape.kv_dtype, elems);
    kb = convert_buffer_.data();
    vb = convert_buffer_.data() + bytes;
  }
  return append_to_table(seq, layer, t, n_tokens, kb, vb);
}

status kv_cache::read_layer(seq_id seq, uint32_t layer, const layer_table& t, uint32_t begin, uint32_t end,
                            std::vector<std::byte>& k, std::vector<std::byte>& v) {
  (void)seq;
  (void)layer;
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
    for (uint32_t i = 0; i < in_chunk; ++i) {
      const uint32_t pos = c * tpp + i;
      if (pos < begin || pos >= end) continue;
      for (uint32_t h = 0; h < heads; ++h) {
        const size_t dst = (size_t{pos - begin} * heads + h) * row;
        std::memcpy(k.data() + dst, chunk.data() + lay.offset(kv_kind::kKey, h, i, 0), row);
        std::memcpy(v.data() + dst, chunk.data() + lay.offset(kv_kind::kValue, h, i, 0), row);
      }
    }
  }
  return {};
}

status kv_cache::read_tokens(seq_id seq, uint32_t layer, std::vector<std::byte>& k, std::vector<std::byte>& v) {
  std::lock_guard lock(mutex_);
  INSTINFER_TRY(check_layer(layer));
  auto found = find(seq);
  if (!found.ok()) return found.error();
  const layer_table& t = found.value()->layers[layer];
  return read_layer(seq, layer, t, 0, t.n_tokens, k, v);
}

status kv_cache::remove_range(seq_id seq, uint64_t begin, uint64_t end) {
  std::lock_guard lock(mutex_);
  auto found = find(seq);
  if (!found.ok()) return found.error();
  if (begin > end)
    return {errc::kInvalidArgument, "remove_range: begin " + std::to_string(begin) + " > end " + std::to_string(end)};
  sequence& s = *found.value();
  const uint32_t tpp = config_.page.tokens_per_page;

  // Build every layer's new table first, commit only when all succeeded: all or nothing.
  std::vector<layer_table> rebuilt(s.layers.size());
  std::vector<bool> changed(s.layers.size(), false);
  status failure;
  for (uint32_t l = 0; l < s.layers.size() && failure.ok(); ++l) {
    const layer_table& t = s.layers[l];
    if (begin >= t.n_tokens || begin == end) continue;
    const uint32_t b = static_cast<uint32_t>(begin);
    const uint32_t e = static_cast<uint32_t>(std::min<uint64_t>(end, t.n_tokens));
    layer_table& nt = rebuilt[l];
    changed[l] = true;
    const uint32_t keep = ceil_div(b, tpp);
    try {
      nt.chunks.assign(t.chunks.begin(), t.chunks.begin() + keep);
    } catch (const std::bad_alloc&) {
      failure = {errc::kOutOfMemory, "remove_range"};
      break;
    }
    for (chunk_id id : nt.chunks) retain(id);
    nt.n_tokens = b;
    if (t.sparf) {
      // The index keeps the first b tokens; its new tail block needs the V rows it holds.
      failure = copy_sparf_index(t, nt);
      const uint32_t block = sparf_config_.columns.tokens_per_page;
      std::vector<std::byte> tail_k, tail_v;
      if (failure.ok() && b % block != 0) failure = read_layer(seq, l, t, b - b % block, b, tail_k, tail_v);
      if (failure.ok())
        failure = nt.sparf->truncate(b, b % block ? tail_v.data() : nullptr, b % block ? tail_k.data() : nullptr);
      if (failure.ok() && !t.column_chunks.empty()) {  // stored blocks wholly before b stay shared
        const size_t keep_blocks = std::min<size_t>(b / block, t.column_chunks.size() / column_store_chunks());
        try {
          nt.column_chunks.assign(
              t.column_chunks.begin(),
              t.column_chunks.begin() + static_cast<ptrdiff_t>(keep_blocks * column_store_chunks()));
          for (chunk_id cid : nt.column_chunks) retain(cid);
        } catch (const std::bad_alloc&) {
          failure = {errc::kOutOfMemory, "remove_range column blocks"};
        }
      }
      if (!failure.ok()) break;
    }
    if (e < t.n_tokens) {
      // Interior range: re-append the surviving suffix (a shared or sealed tail is copied first).
      std::vector<std::byte> k, v;
      failure = read_layer(seq, l, t, e, t.n_tokens, k, v);
      if (failure.ok()) failure = append_to_table(seq, l, nt, t.n_tokens - e, k.data(), v.data());
    }
  }
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

status kv_cache::attend(uint32_t layer, std::span<const seq_id> seqs, const float* q, float* out, float* lse) {
  std::lock_guard lock(mutex_);
  INSTINFER_TRY(check_layer(layer));
  if (seqs.empty()) return {errc::kInvalidArgument, "attend needs at least one sequence"};
  if (!q || !out) return {errc::kInvalidArgument, "q and out must not be null"};
  INSTINFER_TRY(fill_items(layer, seqs, q, out, lse, nullptr));
  return backend_->attend(layer, std::span<const attend_item>(items_.data(), seqs.size()));
}

// items_ for a batch of one layer; with `sparse`, each sequence's SparF plan is checked first
// (k > tokens is refused here, before anything reaches the backend).
status kv_cache::fill_items(uint32_t layer, std::span<const seq_id> seqs, const float* q, float* out, float* lse,
                            const sparf_params* sparse) {
  const size_t q_stride = size_t{config_.shape.n_q_heads} * config_.shape.head_dim;
  try {
    items_.resize(seqs.size());
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "attend batch"};
  }
  for (size_t i = 0; i < seqs.size(); ++i) {
    auto found = find(seqs[i]);
    if (!found.ok()) return found.error();
    const layer_table& t = found.value()->layers[layer];
    if (sparse) {
      auto plan = sparf_resolve(*sparse, config_.shape.head_dim, t.n_tokens);
      if (!plan.ok()) return {plan.error().code(), seq_name(seqs[i]) + ": " + plan.error().message()};
    }
    items_[i] = attend_item{seqs[i],
                            std::span<const chunk_id>(t.chunks),
                            t.n_tokens,
                            q + i * q_stride,
                            out + i * q_stride,
                            lse ? lse + i * config_.shape.n_q_heads : nullptr};
  }
  return {};
}

status kv_cache::attend_sparse(uint32_t layer, std::span<const seq_id> seqs, const float* q, float* out, float* lse,
                               const sparf_params& params) {
  std::lock_guard lock(mutex_);
  if (!sparf_enabled_)
    return {errc::kUnsupported, "attend_sparse needs a cache created with cache_options::sparf = true"};
  INSTINFER_TRY(check_layer(layer));
  if (seqs.empty()) return {errc::kInvalidArgument, "attend_sparse needs at least one sequence"};
  if (!q || !out) return {errc::kInvalidArgument, "q and out must not be null"};
  INSTINFER_TRY(params.validate(config_.shape.head_dim));
  const kv_shape& shape = config_.shape;
  const size_t q_stride = size_t{shape.n_q_heads} * shape.head_dim;
  const chunk_layout lay = layout();
  sparf_counters counters;

  if (sparf_native_) {  // the backend keeps the index and runs SparF next to its data
    INSTINFER_TRY(fill_items(layer, seqs, q, out, lse, &params));
    INSTINFER_TRY(
        backend_->attend_sparse(layer, std::span<const attend_item>(items_.data(), seqs.size()), params, &counters));
    sparf_totals_.add(counters);
    return {};
  }

  // One sequence at a time: select, fetch just the pages holding selected tokens, attend. The
  // per-call arrays live in sparf_scratch_ and only grow: the steady state allocates nothing.
  sparf_scratch& sc = sparf_scratch_;
  const uint32_t H = shape.n_kv_heads;
  try {
    for (size_t i = 0; i < seqs.size(); ++i) {
      auto found = find(seqs[i]);
      if (!found.ok()) return found.error();
      const layer_table& t = found.value()->layers[layer];
      auto plan = sparf_resolve(params, shape.head_dim, t.n_tokens);
      if (!plan.ok()) return {plan.error().code(), seq_name(seqs[i]) + ": " + plan.error().message()};
      const uint32_t k_stride = std::max<uint32_t>(plan->k, 1);
      sc.selected.assign(size_t{H} * k_stride, 0);
      sc.n_selected.assign(H, 0);
      sc.ptrs.assign(t.chunks.size(), nullptr);
      sc.alpha.assign(shape.n_q_heads, 1.0f);
      sparf_work w;
      w.chunks = sc.ptrs.data();
      w.n_chunks = static_cast<uint32_t>(t.chunks.size());
      w.n_tokens = t.n_tokens;
      w.column_blocks = t.sparf ? t.sparf->block_pointers() : nullptr;
      w.n_column_blocks = t.sparf ? t.sparf->n_blocks() : 0;
      if (t.sparf) {
        w.v_mean = t.sparf->v_mean();
      } else {
        sc.zero_mean.assign(size_t{H} * shape.head_dim, 0.0f);  // an empty layer
        w.v_mean = sc.zero_mean.data();
      }
      w.q = q + i * q_stride;
      w.out = out + i * q_stride;
      w.lse = lse ? lse + i * shape.n_q_heads : nullptr;
      w.selected = sc.selected.data();
      w.n_selected = sc.n_selected.data();
      w.alpha = sc.alpha.data();
      if (!t.column_chunks.empty() && t.sparf) {
        INSTINFER_TRY(fetch_column_pages(t, *plan, params, w.q, sc.column_pages));
        w.column_pages = sc.column_pages.data();
      }
      sparf_counters select_counters;  // added only once the attend succeeded
      if (t.n_tokens > 0)
        INSTINFER_TRY(
            sparf_select(sparf_config_, params, std::span<const sparf_work>(&w, 1), sparf_ws_, &select_counters));
      // Per chunk, which kv heads selected a token in it (the K and V pages of those heads are needed).
      sc.head_needs.assign(t.chunks.size() * H, 0);
      sc.slot.assign(t.chunks.size(), UINT32_MAX);  // staging slot of a needed chunk
      uint32_t n_needed = 0;
      for (uint32_t h = 0; h < H; ++h)
        for (uint32_t j = 0; j < sc.n_selected[h]; ++j) {
          const uint32_t c = sc.selected[size_t{h} * k_stride + j] / lay.tokens();
          if (c >= t.chunks.size()) continue;
          sc.head_needs[size_t{c} * H + h] = 1;
          if (sc.slot[c] == UINT32_MAX) sc.slot[c] = n_needed++;
        }
      const bool in_place = !t.chunks.empty() && backend_->chunk_address(t.chunks[0]) != nullptr;
      if (in_place) {
        for (size_t c = 0; c < t.chunks.size(); ++c)
          if (sc.slot[c] != UINT32_MAX) sc.ptrs[c] = backend_->chunk_address(t.chunks[c]);
      } else if (n_needed > 0) {
        if (sparf_staging_.size() < n_needed * lay.chunk_bytes()) sparf_staging_.resize(n_needed * lay.chunk_bytes());
        sc.reads.clear();
        for (size_t c = 0; c < t.chunks.size(); ++c) {
          if (sc.slot[c] == UINT32_MAX) continue;
          std::byte* dst = sparf_staging_.data() + size_t{sc.slot[c]} * lay.chunk_bytes();
          sc.ptrs[c] = dst;
          const uint32_t in_chunk =
              std::min<uint32_t>(lay.tokens(), t.n_tokens - static_cast<uint32_t>(c) * lay.tokens());
          for (uint32_t h = 0; h < H; ++h)
            if (sc.head_needs[c * H + h])
              for (kv_kind kind : {kv_kind::kKey, kv_kind::kValue})
                sc.reads.push_back({t.chunks[c], in_chunk, lay.page_index(kind, h), dst + lay.page_offset(kind, h)});
        }
        status s = backend_->read_pages(sc.reads);
        if (s.code() == errc::kUnsupported) {  // whole chunks, then
          s = {};
          for (size_t c = 0; c < t.chunks.size() && s.ok(); ++c) {
            if (sc.slot[c] == UINT32_MAX) continue;
            const uint32_t in_chunk =
                std::min<uint32_t>(lay.tokens(), t.n_tokens - static_cast<uint32_t>(c) * lay.tokens());
            s = backend_->read_chunk(t.chunks[c], in_chunk,
                                     sparf_staging_.data() + size_t{sc.slot[c]} * lay.chunk_bytes());
          }
        }
        INSTINFER_TRY(s);
      }
      w.preselected = true;  // the exact pass reuses the selection (and alpha) made above
      INSTINFER_TRY(sparf_attend(sparf_config_, params, std::span<const sparf_work>(&w, 1), sparf_ws_, &counters));
      counters.add(select_counters);
    }
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "attend_sparse: host scratch"};
  }
  sparf_totals_.add(counters);
  return {};
}

// Dual-step loading for column blocks stored on the device: per kv head, only the column pages of
// the channels SparF will choose (sparf_choose_channels, the algorithm's own step one), read as one
// batch; resident blocks (the tail, blocks not stored yet) are used in place. pages: one pointer
// per column page of every block, as sparf_work::column_pages. Keep-all plans read nothing.
status kv_cache::fetch_column_pages(const layer_table& t, const sparf_plan& plan, const sparf_params& params,
                                    const float* q, std::vector<const std::byte*>& pages) {
  const channel_layout& cl = sparf_config_.columns;
  const chunk_layout lay = layout();
  const uint32_t ppb = cl.pages_per_block(), per_block = column_store_chunks(), per_chunk = lay.pages_per_chunk();
  const uint32_t H = config_.shape.n_kv_heads, d = config_.shape.head_dim, G = config_.shape.group_size();
  const uint64_t page = lay.page.page_bytes;
  const uint32_t n_blocks = t.sparf->n_blocks();
  const uint32_t stored = static_cast<uint32_t>(t.column_chunks.size() / per_block);
  sparf_scratch& sc = sparf_scratch_;
  std::vector<page_read>& reads = sc.column_reads;
  try {
    reads.clear();
    sc.channels.resize(d);
    sc.weight.resize(d);
    sc.channel_scratch.resize(d);
    pages.assign(size_t{n_blocks} * ppb, nullptr);
    for (uint32_t b = 0; b < n_blocks; ++b)
      if (const std::byte* blk = t.sparf->block(b))
        for (uint32_t p = 0; p < ppb; ++p) pages[size_t{b} * ppb + p] = blk + p * page;
    if (plan.k >= plan.n_tokens || stored == 0) return {};
    std::vector<uint32_t>& chosen = sc.chosen;  // column page indices inside a block
    chosen.clear();
    for (uint32_t h = 0; h < H; ++h) {
      const sparf_channel_choice c =
          sparf_choose_channels(sparf_config_, plan, params.whole_pages, q + size_t{h} * G * d, sc.channels.data(),
                                sc.weight.data(), sc.channel_scratch.data());
      for (uint32_t j = 0; j < c.n_channels; ++j)
        if (j == 0 || cl.group_of(sc.channels[j]) != cl.group_of(sc.channels[j - 1]))
          chosen.push_back(cl.page_index(h, cl.group_of(sc.channels[j])));
    }
    const size_t need = size_t{stored} * chosen.size() * page;
    if (sparf_column_staging_.size() < need) sparf_column_staging_.resize(need);
    std::byte* dst = sparf_column_staging_.data();
    for (uint32_t b = 0; b < stored; ++b)
      for (uint32_t p : chosen) {
        const chunk_id id = t.column_chunks[size_t{b} * per_block + p / per_chunk];
        reads.push_back({id, lay.tokens(), p % per_chunk, dst});
        pages[size_t{b} * ppb + p] = dst;
        dst += page;
      }
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "SparF column pages"};
  }
  status s = backend_->read_pages(reads);
  if (s.code() != errc::kUnsupported) return s;
  // Whole chunks, then: each stored chunk read once, its chosen pages copied out.
  try {
    if (sparf_staging_.size() < lay.chunk_bytes()) sparf_staging_.resize(lay.chunk_bytes());
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "SparF staging"};
  }
  chunk_id loaded = kInvalidChunk;
  for (const page_read& r : reads) {  // grouped by chunk: built block by block, page by page
    if (r.chunk != loaded) {
      INSTINFER_TRY(backend_->read_chunk(r.chunk, r.n_tokens, sparf_staging_.data()));
      loaded = r.chunk;
    }
    std::memcpy(r.dst, sparf_staging_.data() + uint64_t{r.page} * page, page);
  }
  return {};
}

void kv_cache::prefetch(uint32_t layer, std::span<const seq_id> seqs) {
  std::lock_guard lock(mutex_);
  if (layer >= config_.shape.n_layers || seqs.empty()) return;
  std::vector<attend_item> items;
  for (seq_id s : seqs) {
    auto found = find(s);
    if (!found.ok()) return;
    const layer_table& t = found.value()->layers[layer];
    items.push_back(attend_item{s, std::span<const chunk_id>(t.chunks), t.n_tokens, nullptr, nullptr, nullptr});
  }
  backend_->prefetch(layer, items);
}

status kv_cache::page_table(uint32_t layer, std::span<const seq_id> seqs, csr_page_table& out) const {
  std::lock_guard lock(mutex_);
  INSTINFER_TRY(check_layer(layer));
  const uint32_t tpp = config_.page.tokens_per_page;
  try {
    out.tokens_per_page = tpp;
    out.indptr.assign(1, 0);
    out.indices.clear();
    out.last_page_len.clear();
    for (seq_id s : seqs) {
      auto found = find(s);
      if (!found.ok()) return found.error();
      const layer_table& t = found.value()->layers[layer];
      out.indices.insert(out.indices.end(), t.chunks.begin(), t.chunks.end());
      out.indptr.push_back(static_cast<uint32_t>(out.indices.size()));
      out.last_page_len.push_back(t.n_tokens == 0 ? 0
                                                  : t.n_tokens - (static_cast<uint32_t>(t.chunks.size()) - 1) * tpp);
    }
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "page table"};
  }
  return {};
}

status kv_cache::flush() {
  std::lock_guard lock(mutex_);
  return backend_->flush();
}

cache_stats kv_cache::stats() const {
  std::lock_guard lock(mutex_);
  cache_stats s;
  s.n_sequences = sequences_.size();
  s.chunk_bytes = config_.layout().chunk_bytes();
  for (uint32_t c : refcount_) s.shared_chunks += c > 1;
  s.backend = backend_->stats();
  s.sparf = sparf_totals_;
  for (const auto& [id, seq] : sequences_)
    for (const auto& t : seq.layers)
      if (t.sparf) s.sparf_column_bytes += t.sparf->resident_bytes();
  return s;
}

}  // namespace instinfer
