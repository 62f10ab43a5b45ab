#include "namespace_meta.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "instinfer/core/crc32c.hpp"

namespace instinfer::csd {
namespace {

constexpr char kMagic[8] = {'I', 'I', 'C', 'S', 'D', 'N', 'S', 'M'};
constexpr uint32_t kHeaderBytes = 80;

status errno_status(const std::string& what) {
  const int err = errno;
  return {err == ENOSPC || err == EDQUOT ? errc::kNoSpace : errc::kIoError, what + ": " + std::strerror(err)};
}

void put32(std::vector<std::byte>& out, uint32_t v) {
  const auto* p = reinterpret_cast<const std::byte*>(&v);
  out.insert(out.end(), p, p + 4);
}
void put64(std::vector<std::byte>& out, uint64_t v) {
  const auto* p = reinterpret_cast<const std::byte*>(&v);
  out.insert(out.end(), p, p + 8);
}

// The fields that must match between the file and the namespace being configured.
struct shape_fields {
  uint32_t v[10];
};
shape_fields shape_of(const namespace_config& c, const flash_params& f) {
  return {{c.n_layers, c.n_kv_heads, c.group_size, c.head_dim, c.page_bytes, c.kv_dtype, f.channels, f.dies_per_channel,
           f.blocks_per_die, f.pages_per_block}};
}
std::string describe(const shape_fields& s) {
  return "n_layers " + std::to_string(s.v[0]) + ", kv heads " + std::to_string(s.v[1]) + ", group " +
         std::to_string(s.v[2]) + ", head_dim " + std::to_string(s.v[3]) + ", page " + std::to_string(s.v[4]) +
         ", dtype " + std::to_string(s.v[5]) + ", flash " + std::to_string(s.v[6]) + "x" + std::to_string(s.v[7]) +
         "x" + std::to_string(s.v[8]) + "x" + std::to_string(s.v[9]);
}

status write_all(int fd, const std::vector<std::byte>& bytes, const std::string& path) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_status("writing '" + path + "'");
    done += static_cast<size_t>(n);
  }
  return {};
}

std::string dir_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

}  // namespace

status write_namespace_meta(const std::string& flash_path, const namespace_config& cfg, const flash_params& flash,
                            const namespace_meta& m) {
  const uint64_t n = m.ids.size();
  const uint64_t ppc = m.pages_per_chunk;
  if (m.tokens.size() != n || m.pages.size() != n * ppc || m.sums.size() != n * ppc)
    return {errc::kInternal, "namespace metadata: inconsistent tables"};
  std::vector<std::byte> out;
  out.reserve(kHeaderBytes + n * (8 + 8 * ppc) + m.tables.size() + 4);
  const auto* magic = reinterpret_cast<const std::byte*>(kMagic);
  out.insert(out.end(), magic, magic + 8);
  put32(out, kNamespaceMetaVersion);
  put32(out, kHeaderBytes);
  put64(out, m.generation);
  put64(out, m.count);
  const shape_fields s = shape_of(cfg, flash);
  for (uint32_t v : s.v) put32(out, v);
  put32(out, static_cast<uint32_t>(n));
  put32(out, static_cast<uint32_t>(m.tables.size()));
  for (uint64_t i = 0; i < n; ++i) {
    put32(out, m.ids[i]);
    put32(out, m.tokens[i]);
    for (uint64_t p = 0; p < ppc; ++p) put32(out, m.pages[i * ppc + p]);
    for (uint64_t p = 0; p < ppc; ++p) put32(out, m.sums[i * ppc + p]);
  }
  out.insert(out.end(), m.tables.begin(), m.tables.end());
  put32(out, crc32c(out.data(), out.size()));

  const std::string path = namespace_meta_path(flash_path);
  const std::string tmp = path + ".new";
  ::unlink(tmp.c_str());  // a leftover of a commit a crash interrupted
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return errno_status("creating '" + tmp + "'");
  status st = write_all(fd, out, tmp);
  if (st.ok() && ::fdatasync(fd) != 0) st = errno_status("fdatasync '" + tmp + "'");
  ::close(fd);
  // The rename is the commit point: before it a crash leaves the previous file, after it this one.
  if (st.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) st = errno_status("renaming '" + tmp + "'");
  if (!st.ok()) {
    ::unlink(tmp.c_str());
    return st;
  }
  const std::string dir = dir_of(path);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return errno_status("opening directory '" + dir + "'");
  const int rc = ::fsync(dfd);
  ::close(dfd);
  if (rc != 0) return errno_status("fsync of directory '" + dir + "'");
  return {};
}

result<namespace_meta_read> read_namespace_meta(const std::string& flash_path, const namespace_config& cfg,
                                                const flash_params& flash, uint32_t tokens_per_page) {
  const std::string path = namespace_meta_path(flash_path);
  const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return namespace_meta_read{};
    return errno_status("opening '" + path + "'");
  }
  std::vector<std::byte> bytes;
  std::byte buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      status s = errno_status("reading '" + path + "'");
      ::close(fd);
      return s;
    }
    if (n == 0) break;
    bytes.insert(bytes.end(), buf, buf + n);
  }
  ::close(fd);
  const status corrupt{errc::kCorruptData, "'" + path +
                                               "' is damaged (size, checksum or consistency check failed): the "
                                               "store cannot be opened; remove it and the flash file to start over"};
  if (bytes.size() < kHeaderBytes + 4 || std::memcmp(bytes.data(), kMagic, 8) != 0) return corrupt;
  const auto u32_at = [&](uint64_t off) {
    uint32_t v;
    std::memcpy(&v, bytes.data() + off, 4);
    return v;
  };
  const auto u64_at = [&](uint64_t off) {
    uint64_t v;
    std::memcpy(&v, bytes.data() + off, 8);
    return v;
  };
  if (crc32c(bytes.data(), bytes.size() - 4) != u32_at(bytes.size() - 4)) return corrupt;
  if (u32_at(8) > kNamespaceMetaVersion)
    return status{errc::kUnsupported, "'" + path + "' has format version " + std::to_string(u32_at(8)) +
                                          ", this drive reads up to " + std::to_string(kNamespaceMetaVersion)};
  if (u32_at(8) != kNamespaceMetaVersion || u32_at(12) != kHeaderBytes) return corrupt;
  namespace_meta_read r;
  r.found = true;
  namespace_meta& m = r.meta;
  m.generation = u64_at(16);
  m.count = u64_at(24);
  shape_fields have{};
  for (uint32_t i = 0; i < 10; ++i) have.v[i] = u32_at(32 + 4ull * i);
  const shape_fields want = shape_of(cfg, flash);
  if (std::memcmp(&have, &want, sizeof have) != 0)
    return status{errc::kInvalidArgument,
                  "'" + path + "' holds a store of " + describe(have) + "; opened with " + describe(want)};
  const uint64_t n = u32_at(72);
  const uint64_t table_bytes = u32_at(76);
  const uint64_t ppc = 2ull * cfg.n_kv_heads;
  m.pages_per_chunk = static_cast<uint32_t>(ppc);
  if (bytes.size() != kHeaderBytes + n * (8 + 8 * ppc) + table_bytes + 4) return corrupt;
  if (m.count == 0 || m.count > (uint64_t{1} << 26) || n > m.count) return corrupt;
  const uint64_t total_pages = flash.total_pages();
  m.ids.resize(n);
  m.tokens.resize(n);
  m.pages.resize(n * ppc);
  m.sums.resize(n * ppc);
  uint64_t off = kHeaderBytes;
  for (uint64_t i = 0; i < n; ++i) {
    m.ids[i] = u32_at(off);
    m.tokens[i] = u32_at(off + 4);
    off += 8;
    if (m.ids[i] >= m.count || m.tokens[i] == 0 || m.tokens[i] > tokens_per_page) return corrupt;
    for (uint64_t p = 0; p < ppc; ++p, off += 4) {
      m.pages[i * ppc + p] = u32_at(off);
      if (m.pages[i * ppc + p] >= total_pages) return corrupt;
    }
    for (uint64_t p = 0; p < ppc; ++p, off += 4) m.sums[i * ppc + p] = u32_at(off);
  }
  m.tables.assign(bytes.begin() + static_cast<ptrdiff_t>(off),
                  bytes.begin() + static_cast<ptrdiff_t>(off + table_bytes));
  return r;
}

}  // namespace instinfer::csd
