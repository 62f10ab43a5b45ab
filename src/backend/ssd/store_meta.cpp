#include "store_meta.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <new>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "instinfer/core/crc32c.hpp"
#include "instinfer/io/storage_file.hpp"

namespace instinfer::ssd {

namespace {

// ---- the format (little endian), version 1 ----------------------------------------------------
//   header (kHeaderBytes): magic "IIKVMETA" | u32 version | u32 header bytes | u64 generation |
//     u64 capacity_chunks | u64 chunk_bytes | u32 page_bytes, tokens_per_page, n_layers, n_kv_heads,
//     head_dim, dtype | u32 n_records | u32 0
//   table: n_records x { u64 name | u64 offset (from the file's start) | u32 bytes | u32 crc32c }
//   u32 crc32c of header and table
//   records: per layer { u32 n_tokens | u32 n_chunks | n_chunks x { u32 slot | u32 written tokens |
//     u32 page crc x pages_per_chunk } }
constexpr char kMagic[8] = {'I', 'I', 'K', 'V', 'M', 'E', 'T', 'A'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 8 + 4 + 4 + 8 + 8 + 8 + 6 * 4 + 4 + 4;
constexpr size_t kTableEntryBytes = 24;
constexpr uint32_t kMaxRecords = 1u << 24;

void put32(std::byte*& p, uint32_t v) noexcept {
  for (int i = 0; i < 4; ++i) *p++ = static_cast<std::byte>((v >> (8 * i)) & 0xFFu);
}
void put64(std::byte*& p, uint64_t v) noexcept {
  put32(p, static_cast<uint32_t>(v));
  put32(p, static_cast<uint32_t>(v >> 32));
}
uint32_t get32(const std::byte*& p) noexcept {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t{static_cast<uint8_t>(*p++)} << (8 * i);
  return v;
}
uint64_t get64(const std::byte*& p) noexcept {
  const uint64_t lo = get32(p);
  return lo | (uint64_t{get32(p)} << 32);
}

status corrupt(const std::string& why) {
  return {errc::kCorruptData, "ssd store metadata: " + why};
}

size_t record_bytes(const persisted_sequence& s, uint32_t pages) noexcept {
  size_t n = 0;
  for (const auto& c : s.chunks) n += 8 + c.size() * (8 + 4 * size_t{pages});
  return n;
}

}  // namespace

// ---- chunk sums ------------------------------------------------------------------------------

uint32_t chunk_sums::page_sum(chunk_id id, uint32_t page, const std::byte* page_data,
                              uint32_t n_tokens) const noexcept {
  const uint32_t seed[3] = {id, page, n_tokens};
  return crc32c(page_data, size_t{n_tokens} * layout_.page.row_bytes(), crc32c(seed, sizeof seed));
}

void chunk_sums::compute(chunk_id id, const std::byte* chunk, uint32_t n_tokens, uint32_t* out) const noexcept {
  for (uint32_t p = 0; p < pages(); ++p)
    out[p] = page_sum(id, p, chunk + uint64_t{p} * layout_.page.page_bytes, n_tokens);
}

status chunk_sums::record(chunk_id id, const std::byte* chunk, uint32_t n_tokens) noexcept {
  try {
    auto& e = sums_[id];
    e.resize(1 + pages());
    e[0] = n_tokens;
    compute(id, chunk, n_tokens, e.data() + 1);
  } catch (const std::bad_alloc&) {
    sums_.erase(id);
    return {errc::kOutOfMemory, "ssd backend: chunk checksums"};
  }
  return {};
}

status chunk_sums::adopt(chunk_id id, std::span<const uint32_t> entry) noexcept {
  try {
    sums_[id].assign(entry.begin(), entry.end());
  } catch (const std::bad_alloc&) {
    sums_.erase(id);
    return {errc::kOutOfMemory, "ssd backend: chunk checksums"};
  }
  return {};
}

std::span<const uint32_t> chunk_sums::find(chunk_id id) const noexcept {
  auto it = sums_.find(id);
  if (it == sums_.end()) return {};
  return it->second;
}

status chunk_sums::verify_page(chunk_id id, uint32_t page, const std::byte* page_data,
                               const std::string& where) const noexcept {
  const auto e = find(id);
  if (e.empty()) return {};
  if (page_sum(id, page, page_data, e[0]) == e[1 + page]) return {};
  try {
    return {errc::kCorruptData, "ssd backend: chunk " + std::to_string(id) + " (page " + std::to_string(page) +
                                    ") read from '" + where +
                                    "' does not match its checksum: torn or corrupt data, not served"};
  } catch (...) {
    return {errc::kCorruptData, "ssd backend: a chunk does not match its checksum"};
  }
}

status chunk_sums::verify_chunk(chunk_id id, const std::byte* chunk, const std::string& where) const noexcept {
  if (find(id).empty()) return {};
  for (uint32_t p = 0; p < pages(); ++p)
    INSTINFER_TRY(verify_page(id, p, chunk + uint64_t{p} * layout_.page.page_bytes, where));
  return {};
}

// ---- encoding --------------------------------------------------------------------------------

status encode_meta(uint64_t generation, const meta_geometry& g, std::span<const persisted_sequence> sequences,
                   const chunk_sums& sums, std::vector<std::byte>& out) noexcept {
  const uint32_t pages = sums.pages();
  if (sequences.size() > kMaxRecords)
    return {errc::kInvalidArgument, "ssd store: more than " + std::to_string(kMaxRecords) + " named sequences"};
  const size_t table_end = kHeaderBytes + sequences.size() * kTableEntryBytes + 4;
  size_t total = table_end;
  for (const auto& s : sequences) total += record_bytes(s, pages);
  try {
    out.assign(total, std::byte{0});
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "ssd store: metadata of " + std::to_string(total) + " bytes"};
  }
  std::byte* p = out.data();
  std::memcpy(p, kMagic, sizeof kMagic);
  p += sizeof kMagic;
  put32(p, kVersion);
  put32(p, static_cast<uint32_t>(kHeaderBytes));
  put64(p, generation);
  put64(p, g.capacity_chunks);
  put64(p, g.chunk_bytes);
  for (uint32_t v : {g.page_bytes, g.tokens_per_page, g.n_layers, g.n_kv_heads, g.head_dim, g.dtype}) put32(p, v);
  put32(p, static_cast<uint32_t>(sequences.size()));
  put32(p, 0);

  std::byte* table = p;
  std::byte* rec = out.data() + table_end;
  for (const auto& s : sequences) {
    std::byte* const begin = rec;
    for (size_t l = 0; l < s.chunks.size(); ++l) {
      put32(rec, s.n_tokens[l]);
      put32(rec, static_cast<uint32_t>(s.chunks[l].size()));
      for (chunk_id id : s.chunks[l]) {
        const auto e = sums.find(id);
        if (e.size() != 1 + size_t{pages})
          return {errc::kInternal, "ssd store: chunk " + std::to_string(id) + " of sequence name " +
                                       std::to_string(s.name) + " has no checksum after the flush"};
        put32(rec, id);
        for (uint32_t v : e) put32(rec, v);
      }
    }
    const auto bytes = static_cast<uint32_t>(rec - begin);
    put64(table, s.name);
    put64(table, static_cast<uint64_t>(begin - out.data()));
    put32(table, bytes);
    put32(table, crc32c(begin, bytes));
  }
  put32(table, crc32c(out.data(), table_end - 4));
  return {};
}

// ---- decoding --------------------------------------------------------------------------------

result<meta_header> decode_meta_header(std::span<const std::byte> file) noexcept {
  if (file.size() < kHeaderBytes + 4) return corrupt("the file is shorter than its header (truncated)");
  if (std::memcmp(file.data(), kMagic, sizeof kMagic) != 0) return corrupt("bad magic (not an instinfer store)");
  const std::byte* p = file.data() + sizeof kMagic;
  const uint32_t version = get32(p);
  const uint32_t header_bytes = get32(p);
  meta_header h;
  h.generation = get64(p);
  h.geometry.capacity_chunks = get64(p);
  h.geometry.chunk_bytes = get64(p);
  h.geometry.page_bytes = get32(p);
  h.geometry.tokens_per_page = get32(p);
  h.geometry.n_layers = get32(p);
  h.geometry.n_kv_heads = get32(p);
  h.geometry.head_dim = get32(p);
  h.geometry.dtype = get32(p);
  h.n_records = get32(p);
  const uint64_t table_end = kHeaderBytes + uint64_t{h.n_records} * kTableEntryBytes + 4;
  // The checksum first: a damaged version field must read as damage, not as a newer format.
  if (h.n_records > kMaxRecords || table_end > file.size())
    return corrupt("the record table is cut off (truncated) or its size is damaged");
  const std::byte* c = file.data() + table_end - 4;
  if (crc32c(file.data(), table_end - 4) != get32(c))
    return corrupt("the header or record table does not match its checksum");
  if (version > kVersion)
    return status{errc::kUnsupported, "ssd store metadata: format version " + std::to_string(version) +
                                          " is newer than this instinfer's (" + std::to_string(kVersion) + ")"};
  if (version != kVersion || header_bytes != kHeaderBytes) return corrupt("unknown format version");
  return h;
}

status decode_meta_records(std::span<const std::byte> file, const meta_header& header, chunk_sums& sums,
                           recovered_state& out) noexcept {
  const meta_geometry& g = header.geometry;
  const uint32_t pages = sums.pages();
  const size_t entry_words = 2 + size_t{pages};  // slot, tokens, sums
  try {
    std::unordered_map<chunk_id, std::vector<uint32_t>> seen;  // this file's chunks: slot -> entry
    std::vector<uint32_t> entry(1 + pages);
    const std::byte* t = file.data() + kHeaderBytes;
    for (uint32_t r = 0; r < header.n_records; ++r) {
      const uint64_t name = get64(t);
      const uint64_t offset = get64(t);
      const uint32_t bytes = get32(t);
      const uint32_t crc = get32(t);
      const auto damaged = [&] { out.damaged.push_back(name); };
      if (offset > file.size() || bytes > file.size() - offset || crc32c(file.data() + offset, bytes) != crc) {
        damaged();
        continue;
      }
      // Parse into a candidate; it is kept only when every check passes.
      persisted_sequence s;
      s.name = name;
      s.n_tokens.resize(g.n_layers);
      s.chunks.resize(g.n_layers);
      std::vector<std::pair<chunk_id, std::vector<uint32_t>>> fresh;
      const std::byte* p = file.data() + offset;
      const std::byte* const end = p + bytes;
      bool ok = true;
      for (uint32_t l = 0; l < g.n_layers && ok; ++l) {
        if (end - p < 8) {
          ok = false;
          break;
        }
        const uint32_t n = get32(p), n_chunks = get32(p);
        const uint64_t need = (uint64_t{n} + g.tokens_per_page - 1) / g.tokens_per_page;
        if (n_chunks != need || uint64_t(end - p) < uint64_t{n_chunks} * entry_words * 4) {
          ok = false;
          break;
        }
        s.n_tokens[l] = n;
        s.chunks[l].resize(n_chunks);
        for (uint32_t c = 0; c < n_chunks && ok; ++c) {
          const chunk_id slot = get32(p);
          for (auto& v : entry) v = get32(p);
          const uint32_t needed = c + 1 < n_chunks ? g.tokens_per_page : n - c * g.tokens_per_page;
          if (slot >= g.capacity_chunks || entry[0] > g.tokens_per_page || entry[0] < needed) ok = false;
          auto it = seen.find(slot);
          if (it != seen.end() && it->second != entry) ok = false;  // two records disagree on one chunk
          if (it == seen.end()) fresh.emplace_back(slot, entry);
          s.chunks[l][c] = slot;
        }
      }
      if (!ok || p != end) {
        damaged();
        continue;
      }
      for (auto& [slot, e] : fresh) seen.emplace(slot, e);
      out.sequences.push_back(std::move(s));
    }
    for (const auto& [slot, e] : seen) INSTINFER_TRY(sums.adopt(slot, e));
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "ssd store: reading the metadata"};
  }
  out.generation = header.generation;
  return {};
}

// ---- the file ---------------------------------------------------------------------------------

status read_meta_file(const std::string& meta_path, std::vector<std::byte>& bytes, bool& exists) noexcept {
  exists = false;
  const int fd = ::open(meta_path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return {};
    if (errno == ELOOP)
      return {errc::kInvalidArgument, "ssd store: '" + meta_path + "' is a symbolic link; refusing to follow it"};
    return io::errno_status(errno, "ssd store: opening '" + meta_path + "'");
  }
  struct stat st {};
  status s;
  if (::fstat(fd, &st) != 0) {
    s = io::errno_status(errno, "ssd store: stat of '" + meta_path + "'");
  } else if (!S_ISREG(st.st_mode)) {
    s = {errc::kInvalidArgument, "ssd store: '" + meta_path + "' is not a regular file"};
  } else {
    try {
      bytes.resize(static_cast<size_t>(st.st_size));
      size_t done = 0;
      while (done < bytes.size() && s.ok()) {
        const ssize_t r = ::read(fd, bytes.data() + done, bytes.size() - done);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) s = io::errno_status(errno, "ssd store: reading '" + meta_path + "'");
        if (r == 0) bytes.resize(done);  // shrank meanwhile: the checks see a short file
        if (r <= 0) break;
        done += static_cast<size_t>(r);
      }
    } catch (const std::bad_alloc&) {
      s = {errc::kOutOfMemory, "ssd store: metadata of " + std::to_string(st.st_size) + " bytes"};
    }
  }
  ::close(fd);
  exists = s.ok();
  return s;
}

namespace {
std::string directory_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

status sync_directory(const std::string& path) noexcept {
  const int dir = ::open(directory_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir < 0) return io::errno_status(errno, "ssd store: opening the directory of '" + path + "'");
  const int rc = ::fsync(dir);
  const int err = errno;
  ::close(dir);
  if (rc != 0) return io::errno_status(err, "ssd store: syncing the directory of '" + path + "'");
  return {};
}
}  // namespace

status write_meta_file(const std::string& meta_path, std::span<const std::byte> bytes) noexcept {
  try {
    const std::string tmp = meta_path + ".new";
    // A leftover of an interrupted commit (or anything planted there) goes; the new file is
    // created exclusively, 0600, never through a link.
    if (::unlink(tmp.c_str()) != 0 && errno != ENOENT)
      return io::errno_status(errno, "ssd store: removing '" + tmp + "'");
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) return io::errno_status(errno, "ssd store: creating '" + tmp + "'");
    status s;
    size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        s = io::errno_status(w < 0 ? errno : EIO, "ssd store: writing '" + tmp + "'");
        break;
      }
      done += static_cast<size_t>(w);
    }
    if (s.ok() && ::fdatasync(fd) != 0) s = io::errno_status(errno, "ssd store: syncing '" + tmp + "'");
    ::close(fd);
    if (s.ok() && ::rename(tmp.c_str(), meta_path.c_str()) != 0)
      s = io::errno_status(errno, "ssd store: replacing '" + meta_path + "'");
    if (!s.ok()) {
      ::unlink(tmp.c_str());
      return s;
    }
    return sync_directory(meta_path);
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "ssd store: metadata path"};
  }
}

status remove_meta_file(const std::string& meta_path) noexcept {
  try {
    for (const std::string& p : {meta_path, meta_path + ".new"})
      if (::unlink(p.c_str()) != 0 && errno != ENOENT)
        return io::errno_status(errno, "ssd store: removing '" + p + "'");
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "ssd store: metadata path"};
  }
  return {};
}

}  // namespace instinfer::ssd
