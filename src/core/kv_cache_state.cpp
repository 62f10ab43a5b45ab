// kv_cache's positions (append_at, fork_sequence_at) and sequence state (save / load, to memory
// and to files).
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <new>

#include "core/kv_cache_internal.hpp"
#include "instinfer/core/crc32c.hpp"
#include "instinfer/kv/kv_cache.hpp"
#include "sparf/sparse_attender.hpp"

namespace instinfer {

using namespace kv_cache_detail;

namespace {

// ---- the state format (little endian) ----------------------------------------------------------
//   magic "IIKVSEQ1" | u32 version | u32 header bytes | u32 n_layers, n_q_heads, n_kv_heads,
//   head_dim, dtype | u32 length[n_layers] | per layer: K rows, then V rows, [n][n_kv_heads][head_dim]
//   of the cache dtype | u32 crc32c of everything before it
constexpr char kMagic[8] = {'I', 'I', 'K', 'V', 'S', 'E', 'Q', '1'};
constexpr uint32_t kFormatVersion = 1;
constexpr size_t kFixedHeader = sizeof kMagic + 7 * sizeof(uint32_t);

void put_u32(std::byte* p, uint32_t v) noexcept {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xFFu);
}
uint32_t get_u32(const std::byte* p) noexcept {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t{static_cast<uint8_t>(p[i])} << (8 * i);
  return v;
}

status corrupt(const std::string& what) {
  return {errc::kCorruptData, "sequence state: " + what};
}

}  // namespace

// ---- positions -------------------------------------------------------------------------------

status kv_cache::append_at(seq_id seq, uint32_t layer, uint64_t pos, uint32_t n_tokens, const void* k, const void* v,
                           dtype src_dtype) {
  std::lock_guard lock(mutex_);
  INSTINFER_TRY(check_layer(layer));
  auto found = find(seq);
  if (!found.ok()) return found.error();
  layer_table& t = found.value()->layers[layer];
  if (pos != t.n_tokens)
    return {errc::kInvalidArgument, "append_at: position " + std::to_string(pos) + " of " + seq_name(seq) + " layer " +
                                        std::to_string(layer) + " is " + (pos > t.n_tokens ? "past" : "before") +
                                        " its end (length " + std::to_string(t.n_tokens) +
                                        "): appends must be contiguous"};
  return append_locked(seq, layer, n_tokens, k, v, src_dtype);
}

result<seq_id> kv_cache::fork_sequence_at(seq_id src, uint64_t pos) {
  {
    std::lock_guard lock(mutex_);
    auto found = find(src);
    if (!found.ok()) return found.error();
    for (uint32_t l = 0; l < found.value()->layers.size(); ++l)
      if (pos > found.value()->layers[l].n_tokens)
        return status{errc::kInvalidArgument, "fork at position " + std::to_string(pos) + ": layer " +
                                                  std::to_string(l) + " of " + seq_name(src) + " holds only " +
                                                  std::to_string(found.value()->layers[l].n_tokens) + " tokens"};
  }
  // The fork is an atomic snapshot, private until returned: check it again (src may have changed
  // in between) and cut it to [0, pos).
  auto forked = fork_sequence(src);
  if (!forked.ok()) return forked.error();
  const seq_id id = forked.value();
  status s;
  for (uint32_t l = 0; s.ok() && l < config_.shape.n_layers; ++l) {
    auto n = length(id, l);
    if (!n.ok()) {
      s = n.error();
    } else if (pos > n.value()) {
      s = status{errc::kInvalidArgument,
                 "fork at position " + std::to_string(pos) + ": " + seq_name(src) + " was truncated meanwhile"};
    }
  }
  if (s.ok()) s = remove_range(id, pos, UINT64_MAX);
  if (!s.ok()) {
    (void)free_sequence(id);
    return s;
  }
  return id;
}

// ---- sequence state ------------------------------------------------------------------------------

result<uint64_t> kv_cache::sequence_state_size(seq_id seq) const {
  std::lock_guard lock(mutex_);
  auto found = find(seq);
  if (!found.ok()) return found.error();
  const uint64_t row = uint64_t{config_.shape.n_kv_heads} * config_.page.row_bytes();
  uint64_t bytes = kFixedHeader + 4ull * config_.shape.n_layers + 4;
  for (const layer_table& t : found.value()->layers) bytes += 2 * row * t.n_tokens;
  return bytes;
}

status kv_cache::save_sequence(seq_id seq, std::vector<std::byte>& out) {
  auto size = sequence_state_size(seq);
  if (!size.ok()) return size.error();
  std::lock_guard lock(mutex_);
  auto found = find(seq);
  if (!found.ok()) return found.error();  // freed in between
  const sequence& s = *found.value();
  const uint64_t row = uint64_t{config_.shape.n_kv_heads} * config_.page.row_bytes();
  uint64_t bytes = kFixedHeader + 4ull * config_.shape.n_layers + 4;
  for (const layer_table& t : s.layers) bytes += 2 * row * t.n_tokens;
  std::vector<std::byte> k, v;
  try {
    out.assign(bytes, std::byte{0});
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "sequence state of " + std::to_string(bytes) + " bytes"};
  }
  std::byte* p = out.data();
  std::memcpy(p, kMagic, sizeof kMagic);
  p += sizeof kMagic;
  const uint32_t header = static_cast<uint32_t>(kFixedHeader + 4ull * config_.shape.n_layers);
  for (uint32_t x : {kFormatVersion, header, config_.shape.n_layers, config_.shape.n_q_heads, config_.shape.n_kv_heads,
                     config_.shape.head_dim, static_cast<uint32_t>(config_.shape.kv_dtype)}) {
    put_u32(p, x);
    p += 4;
  }
  for (const layer_table& t : s.layers) {
    put_u32(p, t.n_tokens);
    p += 4;
  }
  for (const layer_table& t : s.layers) {
    if (t.n_tokens == 0) continue;
    INSTINFER_TRY(read_layer(t, 0, t.n_tokens, k, v));
    std::memcpy(p, k.data(), k.size());
    p += k.size();
    std::memcpy(p, v.data(), v.size());
    p += v.size();
  }
  put_u32(p, crc32c(out.data(), static_cast<size_t>(p - out.data())));
  return {};
}

result<seq_id> kv_cache::load_sequence(std::span<const std::byte> state) {
  // Validate everything before touching the cache.
  if (state.size() < kFixedHeader + 4)
    return corrupt("truncated: " + std::to_string(state.size()) + " bytes is shorter than the header");
  if (std::memcmp(state.data(), kMagic, sizeof kMagic) != 0)
    return corrupt("bad magic (not an instinfer sequence state)");
  const std::byte* p = state.data() + sizeof kMagic;
  uint32_t f[7];
  for (uint32_t& x : f) {
    x = get_u32(p);
    p += 4;
  }
  const uint32_t version = f[0], header = f[1];
  if (version != kFormatVersion)
    return corrupt("format version " + std::to_string(version) + ", this library reads " +
                   std::to_string(kFormatVersion));
  const uint32_t n_layers = f[2];
  if (n_layers == 0 || n_layers > (1u << 20) || header != kFixedHeader + 4ull * n_layers)
    return corrupt("inconsistent header (" + std::to_string(n_layers) + " layers, " + std::to_string(header) +
                   " header bytes)");
  if (state.size() < uint64_t{header} + 4) return corrupt("truncated inside the header");
  const uint32_t stored_crc = get_u32(state.data() + state.size() - 4);
  if (crc32c(state.data(), state.size() - 4) != stored_crc)
    return corrupt("checksum mismatch (truncated or corrupted)");
  const kv_shape& sh = config_.shape;
  if (n_layers != sh.n_layers || f[3] != sh.n_q_heads || f[4] != sh.n_kv_heads || f[5] != sh.head_dim ||
      f[6] != static_cast<uint32_t>(sh.kv_dtype))
    return status{errc::kInvalidArgument,
                  "sequence state: shape (layers " + std::to_string(n_layers) + ", q heads " + std::to_string(f[3]) +
                      ", kv heads " + std::to_string(f[4]) + ", head_dim " + std::to_string(f[5]) + ", dtype " +
                      std::to_string(f[6]) + ") differs from this cache's (layers " + std::to_string(sh.n_layers) +
                      ", q heads " + std::to_string(sh.n_q_heads) + ", kv heads " + std::to_string(sh.n_kv_heads) +
                      ", head_dim " + std::to_string(sh.head_dim) + ", dtype " +
                      std::to_string(static_cast<uint32_t>(sh.kv_dtype)) + ")"};
  const uint64_t row = uint64_t{sh.n_kv_heads} * config_.page.row_bytes();
  std::vector<uint32_t> lengths(n_layers);
  uint64_t payload = 0;
  for (uint32_t l = 0; l < n_layers; ++l) {
    lengths[l] = get_u32(p);
    p += 4;
    if (lengths[l] > kMaxTokensPerLayer) return corrupt("layer " + std::to_string(l) + " length out of range");
    payload += 2 * row * lengths[l];
  }
  if (uint64_t{header} + payload + 4 != state.size())
    return corrupt(std::to_string(state.size()) + " bytes, the header describes " +
                   std::to_string(uint64_t{header} + payload + 4));

  std::lock_guard lock(mutex_);
  const seq_id id = next_seq_++;
  sequence seq;
  try {
    seq.layers.resize(n_layers);
  } catch (const std::bad_alloc&) {
    return status{errc::kOutOfMemory, "sequence table"};
  }
  const auto undo = [&](status s) -> result<seq_id> {
    for (auto& t : seq.layers) release_table(t);
    if (attender_) attender_->on_free(id);
    backend_->on_sequence_freed(id);
    return s;
  };
  for (uint32_t l = 0; l < n_layers; ++l) {
    if (lengths[l] == 0) continue;
    const uint64_t bytes = row * lengths[l];
    status s = append_to_table(id, l, seq.layers[l], lengths[l], p, p + bytes);
    if (!s.ok()) return undo(s);
    p += 2 * bytes;
  }
  try {
    sequences_.emplace(id, std::move(seq));
  } catch (const std::bad_alloc&) {
    return undo(status{errc::kOutOfMemory, "sequence table"});
  }
  return id;
}

status kv_cache::save_sequence_file(seq_id seq, const std::string& path) {
  std::vector<std::byte> bytes;
  INSTINFER_TRY(save_sequence(seq, bytes));
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return {errc::kIoError, "cannot open '" + path + "' for writing: " + std::strerror(errno)};
  const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  const bool closed = std::fclose(f) == 0;
  if (!ok || !closed) return {errc::kIoError, "cannot write '" + path + "'"};
  return {};
}

result<seq_id> kv_cache::load_sequence_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return status{errc::kIoError, "cannot open '" + path + "': " + std::strerror(errno)};
  std::vector<std::byte> bytes;
  status s;
  try {
    std::byte buf[1 << 16];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) bytes.insert(bytes.end(), buf, buf + n);
    if (std::ferror(f)) s = status{errc::kIoError, "cannot read '" + path + "'"};
  } catch (const std::bad_alloc&) {
    s = status{errc::kOutOfMemory, "reading '" + path + "'"};
  }
  std::fclose(f);
  if (!s.ok()) return s;
  return load_sequence(bytes);
}

}  // namespace instinfer
