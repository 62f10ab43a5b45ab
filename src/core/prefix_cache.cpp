#include "instinfer/kv/prefix_cache.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <list>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#include "instinfer/core/crc32c.hpp"

namespace instinfer {

namespace {

// splitmix64's finaliser: every input bit reaches every output bit.
constexpr uint64_t mix(uint64_t x) noexcept {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t chain(uint64_t parent, std::span<const int32_t> group) noexcept {
  uint64_t h = mix(parent ^ 0x9e3779b97f4a7c15ull);
  for (const int32_t t : group) h = mix(h ^ static_cast<uint32_t>(t));
  return mix(h ^ group.size());
}

// The index file (prefix_cache::save): a header, then per hidden sequence its name, group count
// and token ids, then the groups in LRU order (most recent first) as (hidden sequence, depth).
constexpr uint64_t kIndexMagic = 0x3176786670696969ull;  // "iiipfxv1"
constexpr uint32_t kIndexVersion = 1;
struct index_header {
  uint64_t magic = kIndexMagic;
  uint32_t version = kIndexVersion;
  uint32_t tokens_per_group = 0;
  uint64_t fingerprint = 0;
  uint64_t n_holders = 0;
  uint64_t n_nodes = 0;
  uint64_t payload_bytes = 0;
  uint32_t payload_crc = 0;
  uint32_t header_crc = 0;  // over the fields above
};
struct index_holder {
  uint64_t name = 0;
  uint32_t groups = 0;
  uint32_t reserved = 0;
};
struct index_node {
  uint32_t holder = 0;  // index into the holders
  uint32_t depth = 0;
};

status write_all(int fd, const void* data, size_t n, const std::string& path) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return {errc::kIoError, "prefix cache: writing '" + path + "': " + std::strerror(errno)};
    p += w;
    n -= static_cast<size_t>(w);
  }
  return {};
}

// The whole file at `path` into `out`; false when it does not exist.
result<bool> read_file(const std::string& path, std::vector<std::byte>& out) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    if (errno == ENOENT) return false;
    return status{errc::kIoError, "prefix cache: opening '" + path + "': " + std::strerror(errno)};
  }
  std::byte buf[65536];
  status failure;
  for (;;) {
    const ssize_t r = ::read(fd, buf, sizeof buf);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      failure = {errc::kIoError, "prefix cache: reading '" + path + "': " + std::strerror(errno)};
      break;
    }
    if (r == 0) break;
    if (out.size() + static_cast<size_t>(r) > (1ull << 32)) {
      failure = {errc::kCorruptData, "prefix cache: index '" + path + "' is larger than 4 GiB"};
      break;
    }
    out.insert(out.end(), buf, buf + r);
  }
  ::close(fd);
  if (!failure.ok()) return failure;
  return true;
}

}  // namespace

struct prefix_cache::impl {
  struct holder {
    seq_id seq = 0;
    uint32_t groups = 0;  // groups the hidden sequence holds
    uint32_t refs = 0;    // indexed groups that point at it
  };
  struct node {
    uint64_t parent = 0;  // the previous group's key (the fingerprint for group 0)
    uint32_t depth = 0;   // group index
    uint32_t children = 0;
    uint64_t holder = 0;
    std::vector<int32_t> tokens;
    std::list<uint64_t>::iterator lru;
  };

  kv_cache& cache;
  prefix_cache_options options;
  uint32_t tpp = 0;
  uint64_t fp = 0;
  mutable std::mutex mutex;
  std::unordered_map<uint64_t, node> nodes;
  std::unordered_map<uint64_t, holder> holders;
  uint64_t next_holder = 1;
  std::list<uint64_t> lru;  // front: most recently used; an ancestor is never behind a descendant
  prefix_cache_stats counters{};

  impl(kv_cache& c, prefix_cache_options o) : cache(c), options(std::move(o)) {}

  std::span<const int32_t> group(std::span<const int32_t> tokens, uint64_t g) const noexcept {
    return tokens.subspan(g * tpp, tpp);
  }

  // Keys of the indexed groups that prefix `tokens` (at most max_groups), in order.
  std::vector<uint64_t> walk(std::span<const int32_t> tokens, uint64_t max_groups) const {
    std::vector<uint64_t> path;
    uint64_t prev = fp;
    for (uint64_t g = 0; g < max_groups; ++g) {
      const auto grp = group(tokens, g);
      const uint64_t key = chain(prev, grp);
      const auto it = nodes.find(key);
      // Same key, other tokens (a collision): not this prefix.
      if (it == nodes.end() || it->second.parent != prev ||
          !std::equal(grp.begin(), grp.end(), it->second.tokens.begin()))
        break;
      path.push_back(key);
      prev = key;
    }
    return path;
  }

  // Most recent first, root last: ancestors stay ahead of their descendants.
  void touch(const std::vector<uint64_t>& path) {
    for (auto it = path.rbegin(); it != path.rend(); ++it) {
      node& n = nodes.at(*it);
      lru.splice(lru.begin(), lru, n.lru);
    }
  }

  void evict(uint64_t key) noexcept {
    auto it = nodes.find(key);
    node& n = it->second;
    if (n.depth > 0) {
      auto p = nodes.find(n.parent);
      if (p != nodes.end()) --p->second.children;
    }
    auto h = holders.find(n.holder);
    if (h != holders.end()) {
      if (--h->second.refs == 0) {
        (void)cache.free_sequence(h->second.seq);
        holders.erase(h);
      } else if (n.depth < h->second.groups) {
        // n is the deepest group of its holder (a deeper one would be its child): give the
        // chunks past it back. Best effort: on failure they stay held until the holder goes.
        if (cache.remove_range(h->second.seq, uint64_t{n.depth} * tpp, UINT64_MAX).ok()) h->second.groups = n.depth;
      }
    }
    lru.erase(n.lru);
    nodes.erase(it);
    ++counters.evicted_groups;
  }

  // Evict the least recently used leaf that is not on `keep`; false when there is none.
  bool evict_one(const std::vector<uint64_t>& keep) noexcept {
    for (auto it = lru.rbegin(); it != lru.rend(); ++it) {
      const node& n = nodes.at(*it);
      if (n.children != 0 || std::find(keep.begin(), keep.end(), *it) != keep.end()) continue;
      evict(*it);
      return true;
    }
    return false;
  }

  // Rebuild the index from options.index_path (see the header); nothing changes on failure.
  status load() {
    std::vector<std::byte> file;
    auto exists = read_file(options.index_path, file);
    if (!exists.ok()) return exists.error();
    if (!exists.value()) return {};  // no index yet
    const std::string where = "prefix cache: index '" + options.index_path + "'";
    index_header h;
    if (file.size() < sizeof h) return {errc::kCorruptData, where + " is truncated"};
    std::memcpy(&h, file.data(), sizeof h);
    if (h.magic != kIndexMagic) return {errc::kCorruptData, where + " is not a prefix cache index"};
    if (crc32c(&h, offsetof(index_header, header_crc)) != h.header_crc)
      return {errc::kCorruptData, where + ": header checksum mismatch"};
    if (h.version != kIndexVersion)
      return {errc::kCorruptData, where + ": format version " + std::to_string(h.version) + " (this library reads " +
                                      std::to_string(kIndexVersion) + ")"};
    if (h.fingerprint != fp || h.tokens_per_group != tpp)
      return {errc::kInvalidArgument, where + " belongs to another model, shape or page size"};
    if (h.payload_bytes != file.size() - sizeof h)
      return {errc::kCorruptData, where + " is truncated or has trailing bytes"};
    const std::byte* p = file.data() + sizeof h;
    if (crc32c(p, h.payload_bytes) != h.payload_crc) return {errc::kCorruptData, where + ": checksum mismatch"};
    // Parse (sizes were covered by the checksum, but are still bounded before use).
    struct loaded_holder {
      uint64_t name;
      uint32_t groups;
      std::vector<uint64_t> keys;
      const int32_t* tokens;  // groups * tpp ids, in `file`
      seq_id seq = 0;
      bool present = false;
    };
    std::vector<loaded_holder> hs;
    uint64_t left = h.payload_bytes;
    const auto take = [&](uint64_t n) -> const std::byte* {
      if (n > left) return nullptr;
      const std::byte* at = p;
      p += n;
      left -= n;
      return at;
    };
    if (h.n_holders > left / sizeof(index_holder)) return {errc::kCorruptData, where + ": bad holder count"};
    hs.reserve(h.n_holders);
    for (uint64_t i = 0; i < h.n_holders; ++i) {
      index_holder ih;
      const std::byte* at = take(sizeof ih);
      if (!at) return {errc::kCorruptData, where + " is truncated"};
      std::memcpy(&ih, at, sizeof ih);
      const std::byte* ids = take(uint64_t{ih.groups} * tpp * sizeof(int32_t));
      if (!ids || ih.name < kPrefixNameBase || ih.groups == 0)
        return {errc::kCorruptData, where + ": bad hidden sequence record"};
      loaded_holder lh{ih.name, ih.groups, {}, reinterpret_cast<const int32_t*>(ids)};
      hs.push_back(std::move(lh));
    }
    if (h.n_nodes != left / sizeof(index_node) || left % sizeof(index_node) != 0)
      return {errc::kCorruptData, where + ": bad group count"};
    std::vector<index_node> order(h.n_nodes);
    if (!order.empty()) std::memcpy(order.data(), p, left);
    // Which hidden sequences the store still has, with all their tokens.
    for (auto& lh : hs) {
      auto seq = cache.find_sequence(lh.name);
      if (!seq.ok()) continue;  // lost (an older commit) or damaged: its groups go
      bool whole = true;
      for (uint32_t l = 0; l < cache.shape().n_layers && whole; ++l) {
        auto n = cache.length(seq.value(), l);
        whole = n.ok() && n.value() >= uint64_t{lh.groups} * tpp;
      }
      if (!whole) continue;
      lh.seq = seq.value();
      lh.present = true;
      uint64_t prev = fp;
      lh.keys.resize(lh.groups);
      for (uint32_t g = 0; g < lh.groups; ++g) {
        std::span<const int32_t> ids(lh.tokens, uint64_t{lh.groups} * tpp);
        prev = chain(prev, group(ids, g));
        lh.keys[g] = prev;
      }
    }
    // The groups, most recent first; one whose parent is gone goes too (parents come first in
    // depth order, so a pass per depth settles it).
    for (const index_node& in : order) {
      if (in.holder >= hs.size() || !hs[in.holder].present || in.depth >= hs[in.holder].groups) continue;
      const loaded_holder& lh = hs[in.holder];
      const uint64_t key = lh.keys[in.depth];
      if (nodes.count(key) != 0) continue;
      node n;
      n.parent = in.depth == 0 ? fp : lh.keys[in.depth - 1];
      n.depth = in.depth;
      n.holder = lh.name & ~kPrefixNameBase;
      const std::span<const int32_t> ids(lh.tokens, uint64_t{lh.groups} * tpp);
      const auto grp = group(ids, in.depth);
      n.tokens.assign(grp.begin(), grp.end());
      lru.push_back(key);
      n.lru = std::prev(lru.end());
      nodes.emplace(key, std::move(n));
    }
    for (bool dropped = true; dropped;) {
      dropped = false;
      for (auto it = nodes.begin(); it != nodes.end();) {
        if (it->second.depth > 0 && nodes.count(it->second.parent) == 0) {
          lru.erase(it->second.lru);
          it = nodes.erase(it);
          dropped = true;
        } else {
          ++it;
        }
      }
    }
    for (auto& [key, n] : nodes)
      if (n.depth > 0) ++nodes.at(n.parent).children;
    for (const auto& lh : hs) {
      if (!lh.present) continue;
      const uint64_t hid = lh.name & ~kPrefixNameBase;
      holders.emplace(hid, holder{lh.seq, lh.groups, 0});
      next_holder = std::max(next_holder, hid + 1);
    }
    for (auto& [key, n] : nodes) ++holders.at(n.holder).refs;
    // Hidden sequences no group needs, and reserved-range names the index does not list.
    for (auto it = holders.begin(); it != holders.end();) {
      if (it->second.refs == 0) {
        (void)cache.free_sequence(it->second.seq);
        it = holders.erase(it);
      } else {
        ++it;
      }
    }
    for (const auto& [name, seq] : cache.named_sequences())
      if (name >= kPrefixNameBase && holders.count(name & ~kPrefixNameBase) == 0) (void)cache.free_sequence(seq);
    while (nodes.size() > options.capacity_groups && evict_one({})) {
    }
    return {};
  }

  uint64_t host_bytes() const noexcept {
    // Per group: the node in its hash map (with a bucket), its token ids and its LRU list entry.
    const uint64_t per_node = sizeof(std::pair<const uint64_t, node>) + 2 * sizeof(void*) +
                              uint64_t{tpp} * sizeof(int32_t) + sizeof(uint64_t) + 2 * sizeof(void*);
    const uint64_t per_holder = sizeof(std::pair<const uint64_t, holder>) + 2 * sizeof(void*);
    return sizeof(impl) + nodes.size() * per_node + holders.size() * per_holder + nodes.bucket_count() * sizeof(void*) +
           holders.bucket_count() * sizeof(void*);
  }
};

result<std::unique_ptr<prefix_cache>> prefix_cache::create(kv_cache& cache, const prefix_cache_options& options) {
  if (options.capacity_groups == 0)
    return status{errc::kInvalidArgument, "prefix cache: capacity_groups must be at least 1"};
  if (options.capacity_groups > (1ull << 32))
    return status{errc::kInvalidArgument, "prefix cache: capacity_groups must be at most 2^32"};
  std::unique_ptr<impl> m(new (std::nothrow) impl(cache, options));
  if (!m) return status{errc::kOutOfMemory, "prefix cache"};
  m->tpp = cache.page().tokens_per_page;
  if (m->tpp == 0) return status{errc::kInternal, "prefix cache: the cache has no page geometry"};
  // The fingerprint: everything that makes stored K/V bytes of the same tokens differ.
  const kv_shape& s = cache.shape();
  uint64_t fp = mix(0x696e7374696e6672ull);  // "instinfr"
  for (const uint64_t v : {uint64_t{s.n_layers}, uint64_t{s.n_q_heads}, uint64_t{s.n_kv_heads}, uint64_t{s.head_dim},
                           static_cast<uint64_t>(s.kv_dtype), uint64_t{cache.page().page_bytes}, uint64_t{m->tpp},
                           uint64_t{options.model_id.size()}})
    fp = mix(fp ^ v);
  for (const char ch : options.model_id) fp = mix(fp ^ static_cast<unsigned char>(ch));
  m->fp = fp;
  m->counters.capacity_groups = options.capacity_groups;
  m->counters.tokens_per_group = m->tpp;
  if (!options.index_path.empty()) {
    status loaded;
    try {
      loaded = m->load();
    } catch (const std::bad_alloc&) {
      loaded = {errc::kOutOfMemory, "prefix cache: loading the index"};
    }
    if (!loaded.ok()) {
      // Nothing of the index stays: the hidden sequences found so far are the store's again.
      m->nodes.clear();
      m->holders.clear();
      m->lru.clear();
      return loaded;
    }
  }
  return std::unique_ptr<prefix_cache>(new prefix_cache(std::move(m)));
}

prefix_cache::prefix_cache(std::unique_ptr<impl> m) : impl_(std::move(m)) {}

prefix_cache::~prefix_cache() {
  // With an index the hidden sequences stay in the cache (named, so a persistent store commits
  // them and the next create() finds them); without one they are freed.
  if (impl_->options.index_path.empty()) clear();
}

status prefix_cache::save() {
  impl& m = *impl_;
  std::lock_guard lock(m.mutex);
  const std::string& path = m.options.index_path;
  if (path.empty()) return {errc::kInvalidArgument, "prefix cache: save() needs prefix_cache_options::index_path"};
  std::vector<std::byte> payload;
  try {
    // Each hidden sequence's token ids come from the path to its deepest group.
    std::unordered_map<uint64_t, uint64_t> deepest;  // holder -> key of its group groups-1
    for (const auto& [key, n] : m.nodes)
      if (n.depth + 1 == m.holders.at(n.holder).groups) deepest[n.holder] = key;
    std::unordered_map<uint64_t, uint32_t> index_of;
    std::vector<int32_t> ids;
    uint32_t n_holders = 0;
    for (const auto& [hid, h] : m.holders) {
      const auto d = deepest.find(hid);
      if (d == deepest.end()) continue;  // cannot happen (leaves go first); its groups are not saved
      const uint64_t name = kPrefixNameBase | hid;
      auto current = m.cache.sequence_name(h.seq);
      if (!current.ok()) return current.error();
      if (current.value() != name) INSTINFER_TRY(m.cache.set_sequence_name(h.seq, name));
      ids.assign(uint64_t{h.groups} * m.tpp, 0);
      for (uint64_t key = d->second;;) {
        const impl::node& n = m.nodes.at(key);
        std::copy(n.tokens.begin(), n.tokens.end(), ids.begin() + uint64_t{n.depth} * m.tpp);
        if (n.depth == 0) break;
        key = n.parent;
      }
      const index_holder ih{name, h.groups, 0};
      const auto* a = reinterpret_cast<const std::byte*>(&ih);
      payload.insert(payload.end(), a, a + sizeof ih);
      const auto* b = reinterpret_cast<const std::byte*>(ids.data());
      payload.insert(payload.end(), b, b + ids.size() * sizeof(int32_t));
      index_of[hid] = n_holders++;
    }
    for (const uint64_t key : m.lru) {
      const impl::node& n = m.nodes.at(key);
      const auto it = index_of.find(n.holder);
      if (it == index_of.end()) continue;
      const index_node in{it->second, n.depth};
      const auto* a = reinterpret_cast<const std::byte*>(&in);
      payload.insert(payload.end(), a, a + sizeof in);
    }
    index_header h;
    h.tokens_per_group = m.tpp;
    h.fingerprint = m.fp;
    h.n_holders = n_holders;
    h.n_nodes = 0;
    for (const uint64_t key : m.lru) h.n_nodes += index_of.count(m.nodes.at(key).holder);
    h.payload_bytes = payload.size();
    h.payload_crc = crc32c(payload.data(), payload.size());
    h.header_crc = crc32c(&h, offsetof(index_header, header_crc));
    // The store first: the index may then only name sequences the store has committed.
    INSTINFER_TRY(m.cache.flush());
    const std::string tmp = path + ".tmp";
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) return {errc::kIoError, "prefix cache: creating '" + tmp + "': " + std::strerror(errno)};
    status w = write_all(fd, &h, sizeof h, tmp);
    if (w.ok()) w = write_all(fd, payload.data(), payload.size(), tmp);
    if (w.ok() && ::fsync(fd) != 0) w = {errc::kIoError, "prefix cache: fsync '" + tmp + "': " + std::strerror(errno)};
    ::close(fd);
    if (w.ok() && ::rename(tmp.c_str(), path.c_str()) != 0)
      w = {errc::kIoError, "prefix cache: renaming to '" + path + "': " + std::strerror(errno)};
    if (!w.ok()) {
      ::unlink(tmp.c_str());
      return w;
    }
    const auto slash = path.find_last_of('/');
    const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
    if (const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) {
      (void)::fsync(dfd);
      ::close(dfd);
    }
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "prefix cache: building the index"};
  }
  return {};
}

void prefix_cache::clear() noexcept {
  impl& m = *impl_;
  std::lock_guard lock(m.mutex);
  for (auto& [id, h] : m.holders) (void)m.cache.free_sequence(h.seq);
  m.counters.evicted_groups += m.nodes.size();
  m.holders.clear();
  m.nodes.clear();
  m.lru.clear();
}

uint64_t prefix_cache::fingerprint() const noexcept {
  return impl_->fp;
}

status prefix_cache::insert(seq_id seq, std::span<const int32_t> tokens) {
  impl& m = *impl_;
  std::lock_guard lock(m.mutex);
  // Only groups that every layer of seq holds.
  uint64_t held = tokens.size();
  for (uint32_t l = 0; l < m.cache.shape().n_layers; ++l) {
    auto n = m.cache.length(seq, l);
    if (!n.ok()) return n.error();
    held = std::min<uint64_t>(held, n.value());
  }
  const uint64_t n_groups = held / m.tpp;
  std::vector<uint64_t> path = m.walk(tokens, n_groups);
  m.touch(path);
  const uint64_t existing = path.size();
  // Keys of the groups to add; a key already present here is a collision (walk stopped before
  // it): the prefix cannot be indexed past it.
  std::vector<uint64_t> keys;
  for (uint64_t g = existing, prev = existing ? path.back() : m.fp; g < n_groups; ++g) {
    const uint64_t key = chain(prev, m.group(tokens, g));
    if (m.nodes.count(key) != 0) break;
    keys.push_back(key);
    prev = key;
  }
  while (!keys.empty() && m.nodes.size() + keys.size() > m.options.capacity_groups && m.evict_one(path)) {
  }
  const uint64_t room = m.options.capacity_groups - std::min<uint64_t>(m.nodes.size(), m.options.capacity_groups);
  if (keys.size() > room) keys.resize(room);
  const uint64_t fresh = keys.size();
  if (fresh == 0) return {};
  const uint64_t end = existing + fresh;
  // The hidden sequence: seq forked at the last new group's end (full chunks shared, none copied).
  auto f = m.cache.fork_sequence_at(seq, end * m.tpp);
  if (!f.ok()) return f.error();
  const uint64_t hid = m.next_holder++;
  try {
    m.holders.emplace(hid, impl::holder{f.value(), static_cast<uint32_t>(end), static_cast<uint32_t>(fresh)});
    uint64_t prev = existing ? path.back() : m.fp;
    for (uint64_t g = existing; g < end; ++g) {
      const auto grp = m.group(tokens, g);
      const uint64_t key = keys[g - existing];
      impl::node n;
      n.parent = prev;
      n.depth = static_cast<uint32_t>(g);
      n.holder = hid;
      n.tokens.assign(grp.begin(), grp.end());
      m.lru.push_front(key);
      n.lru = m.lru.begin();
      m.nodes.emplace(key, std::move(n));
      if (g > 0) ++m.nodes.at(prev).children;
      path.push_back(key);
      prev = key;
    }
  } catch (const std::bad_alloc&) {
    // Undo: the new groups were appended to path after the existing ones; then the holder.
    for (uint64_t i = path.size(); i-- > existing;) {
      auto it = m.nodes.find(path[i]);
      if (it == m.nodes.end()) continue;
      if (it->second.depth > 0) --m.nodes.at(it->second.parent).children;
      m.lru.erase(it->second.lru);
      m.nodes.erase(it);
    }
    m.holders.erase(hid);
    (void)m.cache.free_sequence(f.value());
    return status{errc::kOutOfMemory, "prefix cache: indexing"};
  }
  m.touch(path);
  m.counters.inserted_groups += fresh;
  return {};
}

result<prefix_match> prefix_cache::lookup(std::span<const int32_t> tokens) {
  impl& m = *impl_;
  std::lock_guard lock(m.mutex);
  ++m.counters.lookups;
  const std::vector<uint64_t> path = m.walk(tokens, tokens.size() / m.tpp);
  if (path.empty()) return prefix_match{};
  m.touch(path);
  const impl::node& last = m.nodes.at(path.back());
  const impl::holder& h = m.holders.at(last.holder);
  const uint64_t n = path.size() * m.tpp;
  auto f = m.cache.fork_sequence_at(h.seq, n);
  if (!f.ok()) return f.error();
  ++m.counters.hits;
  m.counters.hit_tokens += n;
  return prefix_match{f.value(), n};
}

prefix_cache_stats prefix_cache::stats() const {
  const impl& m = *impl_;
  std::lock_guard lock(m.mutex);
  prefix_cache_stats s = m.counters;
  s.groups = m.nodes.size();
  s.held_sequences = m.holders.size();
  s.host_bytes = m.host_bytes();
  return s;
}

}  // namespace instinfer
