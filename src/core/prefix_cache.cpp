#include "instinfer/kv/prefix_cache.hpp"

#include <algorithm>
#include <cstring>
#include <list>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

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
  return std::unique_ptr<prefix_cache>(new prefix_cache(std::move(m)));
}

prefix_cache::prefix_cache(std::unique_ptr<impl> m) : impl_(std::move(m)) {}

prefix_cache::~prefix_cache() {
  clear();
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
