#include "prompt_cache.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace instinfer::model::prompt_cache {
namespace {

constexpr char kMagic[8] = {'I', 'I', 'P', 'R', 'O', 'M', 'P', 'T'};
constexpr uint32_t kVersion = 1;
constexpr uint32_t kAlign = 4096;  // O_DIRECT: offsets, lengths and the buffer on this boundary

struct header {
  char magic[8];
  uint32_t version;
  uint32_t header_bytes;
  uint64_t fingerprint;
  uint32_t kv_dtype;
  uint32_t n_tokens;
  uint64_t state_bytes;
  uint64_t checksum;  // FNV-1a 64 of this header (checksum zero) and the token ids
};
static_assert(sizeof(header) == 48);

constexpr uint64_t kFnvBasis = 0xcbf29ce484222325ull;
uint64_t fnv1a(uint64_t h, const void* data, size_t n) noexcept {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}
template <typename T>
uint64_t fnv1a_value(uint64_t h, const T& v) noexcept {
  return fnv1a(h, &v, sizeof v);
}

uint64_t round_up(uint64_t n) noexcept {
  return (n + kAlign - 1) / kAlign * kAlign;
}
uint64_t tokens_end(uint32_t n_tokens) noexcept {
  return sizeof(header) + uint64_t{n_tokens} * sizeof(token_id);
}

uint64_t checksum_of(header h, std::span<const token_id> tokens) noexcept {
  h.checksum = 0;
  return fnv1a(fnv1a(kFnvBasis, &h, sizeof h), tokens.data(), tokens.size_bytes());
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct aligned_free {
  void operator()(std::byte* p) const noexcept { std::free(p); }
};
using aligned_bytes = std::unique_ptr<std::byte, aligned_free>;

// The whole file in a 4 KiB-aligned buffer, read with O_DIRECT where the filesystem takes it
// (tmpfs and some others refuse it: then buffered).
struct file_image {
  aligned_bytes data;
  uint64_t size = 0;
  bool direct = false;
};

// Aligned reads of [0, want) into buf (want a multiple of kAlign); returns the bytes read.
status read_at_start(int fd, std::byte* buf, uint64_t want, uint64_t& done, const std::string& path) {
  done = 0;
  while (done < want) {
    const uint64_t piece = std::min<uint64_t>(want - done, 64ull << 20);
    const ssize_t n = ::pread(fd, buf + done, piece, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return {errc::kIoError, "cannot read '" + path + "': " + std::strerror(errno)};
    if (n == 0) break;  // end of file (the last aligned piece returns the tail)
    done += static_cast<uint64_t>(n);
  }
  return {};
}

// max_bytes(header) bounds the size a file with that header may have: the header is read first,
// so a hostile or foreign file is refused before anything of its size is allocated.
template <typename Bound>
status read_file(const std::string& path, file_image& out, Bound max_bytes) {
  // O_NONBLOCK: a FIFO at the path must not hang the open (fstat then refuses it).
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC | O_NONBLOCK);
  out.direct = fd >= 0;
  if (fd < 0 && errno == EINVAL) fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return {errc::kIoError, "cannot open '" + path + "': " + std::strerror(errno)};
  const auto done_with = [fd](status s) {
    ::close(fd);
    return s;
  };
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
    return done_with({errc::kInvalidArgument, "'" + path + "' is not a regular file"});
  out.size = static_cast<uint64_t>(st.st_size);
  if (out.size < sizeof(header)) return done_with({errc::kCorruptData, "shorter than its header"});
  aligned_bytes first(static_cast<std::byte*>(std::aligned_alloc(kAlign, kAlign)));
  if (!first) return done_with({errc::kOutOfMemory, "reading '" + path + "'"});
  uint64_t got = 0;
  if (status s = read_at_start(fd, first.get(), kAlign, got, path); !s.ok()) return done_with(s);
  if (got < sizeof(header)) return done_with({errc::kCorruptData, "'" + path + "' ended early"});
  header h;
  std::memcpy(&h, first.get(), sizeof h);
  if (out.size > max_bytes(h))
    return done_with({errc::kCorruptData, std::to_string(out.size) + " bytes, more than its header accounts for"});
  const uint64_t capacity = round_up(out.size);
  out.data.reset(static_cast<std::byte*>(std::aligned_alloc(kAlign, capacity)));
  if (!out.data)
    return done_with({errc::kOutOfMemory, "reading '" + path + "' (" + std::to_string(out.size) + " bytes)"});
  if (status s = read_at_start(fd, out.data.get(), capacity, got, path); !s.ok()) return done_with(s);
  if (got < out.size) return done_with({errc::kCorruptData, "'" + path + "' ended early"});
  return done_with({});
}

// The checked header and tokens of an image; the state follows at round_up(tokens_end).
struct parsed {
  header h{};
  std::vector<token_id> tokens;
  std::span<const std::byte> state;
};

status parse(const file_image& img, uint64_t fingerprint, dtype kv_dtype, parsed& out) {
  const auto corrupt = [](const std::string& what) { return status{errc::kCorruptData, what}; };
  if (img.size < sizeof(header)) return corrupt("shorter than its header");
  std::memcpy(&out.h, img.data.get(), sizeof(header));
  const header& h = out.h;
  if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0) return corrupt("not a prompt cache (bad magic)");
  if (h.version != kVersion)
    return {errc::kUnsupported,
            "format version " + std::to_string(h.version) + ", this program reads " + std::to_string(kVersion)};
  if (h.header_bytes != sizeof(header)) return corrupt("bad header size");
  const uint64_t state_at = round_up(tokens_end(h.n_tokens));
  if (h.n_tokens == 0 || state_at > img.size || h.state_bytes != img.size - state_at)
    return corrupt("token count or state size does not match the file size");
  out.tokens.resize(h.n_tokens);
  std::memcpy(out.tokens.data(), img.data.get() + sizeof(header), out.tokens.size() * sizeof(token_id));
  if (checksum_of(h, out.tokens) != h.checksum) return corrupt("header or token ids fail their checksum");
  if (h.fingerprint != fingerprint) return {errc::kInvalidArgument, "made with another model file"};
  if (h.kv_dtype != static_cast<uint32_t>(kv_dtype)) {
    const auto d = static_cast<dtype>(h.kv_dtype);
    return {errc::kInvalidArgument,
            "made with KV dtype " +
                (h.kv_dtype <= 255 && is_valid_dtype(d) ? std::string(dtype_name(d)) : std::to_string(h.kv_dtype)) +
                ", this run uses " + std::string(dtype_name(kv_dtype))};
  }
  out.state = {img.data.get() + state_at, h.state_bytes};
  return {};
}

status write_all(int fd, const std::byte* p, size_t n) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return {errc::kIoError, std::string("write failed: ") + (w < 0 ? std::strerror(errno) : "no space")};
    p += w;
    n -= static_cast<size_t>(w);
  }
  return {};
}

}  // namespace

uint64_t model_fingerprint(const gguf_file& file) {
  uint64_t h = fnv1a_value(kFnvBasis, file.file_size());
  for (const gguf_kv& kv : file.metadata()) {
    h = fnv1a(h, kv.key.data(), kv.key.size());
    h = fnv1a_value(h, kv.type);
    h = fnv1a_value(h, kv.u);
    h = fnv1a_value(h, kv.i);
    h = fnv1a_value(h, kv.f);
    h = fnv1a(h, kv.str.data(), kv.str.size());
    h = fnv1a_value(h, kv.count);
  }
  for (const gguf_tensor& t : file.tensors()) {
    h = fnv1a(h, t.name.data(), t.name.size());
    h = fnv1a_value(h, t.type);
    h = fnv1a(h, t.ne, sizeof t.ne);
    h = fnv1a_value(h, t.offset);
    if (t.data) h = fnv1a(h, t.data, std::min<uint64_t>(t.n_bytes, 256));
  }
  return h;
}

result<std::vector<token_id>> read_tokens(const std::string& path, uint64_t fingerprint, dtype kv_dtype) {
  file_image img;
  INSTINFER_TRY(read_file(path, img, [](const header&) { return UINT64_MAX; }));
  parsed p;
  INSTINFER_TRY(parse(img, fingerprint, kv_dtype, p));
  return std::move(p.tokens);
}

result<restore_result> restore(kv_cache& cache, const std::string& path, uint64_t fingerprint,
                               std::span<const token_id> prompt) {
  restore_result r;
  const double t0 = now_s();
  if (struct stat st{}; ::stat(path.c_str(), &st) != 0 && errno == ENOENT) {
    r.note = "no cache file yet";
    return r;
  }  // any other failure is reported by read_file
  // A file of this cache's shape holds at most its tokens' K/V rows plus the state's own header
  // (per-layer lengths and checksum: far below 1 MiB).
  const kv_shape& shape = cache.shape();
  const uint64_t token_bytes =
      uint64_t{shape.n_layers} * 2 * shape.n_kv_heads * dtype_row_bytes(shape.kv_dtype, shape.head_dim);
  const auto max_bytes = [&](const header& h) {
    return round_up(tokens_end(h.n_tokens)) + uint64_t{h.n_tokens} * token_bytes + (1ull << 20);
  };
  file_image img;
  parsed p;
  status s = read_file(path, img, max_bytes);
  if (s.ok()) s = parse(img, fingerprint, cache.shape().kv_dtype, p);
  r.read_seconds = now_s() - t0;
  r.direct_io = img.direct;
  if (!s.ok()) {
    r.note = "'" + path + "' not used: " + s.message();
    return r;
  }
  r.cached = p.h.n_tokens;
  // The longest common prefix, keeping at least the prompt's last token to prefill.
  const size_t common =
      std::mismatch(p.tokens.begin(), p.tokens.end(), prompt.begin(), prompt.end()).first - p.tokens.begin();
  const size_t keep = std::min(common, prompt.empty() ? 0 : prompt.size() - 1);
  if (keep == 0) {
    r.note = "the cached prompt shares no prefix with this one";
    return r;
  }
  auto seq = cache.load_sequence(p.state);
  if (!seq.ok()) {
    // A state that fails its own checks is a bad file; anything else is the cache's failure.
    if (seq.error().code() == errc::kCorruptData || seq.error().code() == errc::kInvalidArgument) {
      r.note = "'" + path + "' not used: " + seq.error().to_string();
      return r;
    }
    return seq.error();
  }
  for (uint32_t l = 0; l < cache.shape().n_layers; ++l) {
    auto len = cache.length(*seq, l);
    if (!len.ok() || *len != p.h.n_tokens) {
      (void)cache.free_sequence(*seq);
      r.note = "'" + path + "' not used: its state holds " + (len.ok() ? std::to_string(*len) : "?") +
               " tokens in layer " + std::to_string(l) + ", its header " + std::to_string(p.h.n_tokens);
      return r;
    }
  }
  if (keep < p.h.n_tokens) {
    if (status rm = cache.remove_range(*seq, keep, UINT64_MAX); !rm.ok()) {
      (void)cache.free_sequence(*seq);
      return rm;
    }
  }
  r.seq = *seq;
  r.restored = static_cast<uint32_t>(keep);
  r.read_seconds = now_s() - t0;
  return r;
}

status save(kv_cache& cache, seq_id seq, const std::string& path, uint64_t fingerprint,
            std::span<const token_id> prompt) {
  if (prompt.empty() || prompt.size() > UINT32_MAX) return {errc::kInvalidArgument, "prompt cache: bad prompt length"};
  for (uint32_t l = 0; l < cache.shape().n_layers; ++l) {
    auto len = cache.length(seq, l);
    if (!len.ok()) return len.error();
    if (*len != prompt.size())
      return {errc::kInvalidArgument, "prompt cache: the sequence holds " + std::to_string(*len) + " tokens in layer " +
                                          std::to_string(l) + ", the prompt " + std::to_string(prompt.size())};
  }
  std::vector<std::byte> state;
  INSTINFER_TRY(cache.save_sequence(seq, state));
  header h{};
  std::memcpy(h.magic, kMagic, sizeof kMagic);
  h.version = kVersion;
  h.header_bytes = sizeof(header);
  h.fingerprint = fingerprint;
  h.kv_dtype = static_cast<uint32_t>(cache.shape().kv_dtype);
  h.n_tokens = static_cast<uint32_t>(prompt.size());
  h.state_bytes = state.size();
  h.checksum = checksum_of(h, prompt);
  std::vector<std::byte> head(round_up(tokens_end(h.n_tokens)), std::byte{0});
  std::memcpy(head.data(), &h, sizeof h);
  std::memcpy(head.data() + sizeof h, prompt.data(), prompt.size_bytes());

  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return {errc::kIoError, "cannot create '" + tmp + "': " + std::strerror(errno)};
  status s = write_all(fd, head.data(), head.size());
  if (s.ok()) s = write_all(fd, state.data(), state.size());
  if (s.ok() && ::fsync(fd) != 0) s = {errc::kIoError, std::string("fsync failed: ") + std::strerror(errno)};
  // Written and synced: its pages are clean, so they can be dropped and a restore after a
  // restart reads the device (buffered readers included, where O_DIRECT is refused).
  if (s.ok()) (void)::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  if (::close(fd) != 0 && s.ok()) s = {errc::kIoError, std::string("close failed: ") + std::strerror(errno)};
  if (s.ok() && ::rename(tmp.c_str(), path.c_str()) != 0)
    s = {errc::kIoError, "cannot rename to '" + path + "': " + std::strerror(errno)};
  if (!s.ok()) {
    ::unlink(tmp.c_str());
    return {s.code(), "prompt cache '" + path + "': " + s.message()};
  }
  // The rename itself survives a crash once the directory is synced.
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  if (const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
  return {};
}

}  // namespace instinfer::model::prompt_cache
