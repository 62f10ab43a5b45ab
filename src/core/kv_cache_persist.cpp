// kv_cache calls added with C API 0.5: sequence names and the persistent store's commit and
// restore (backend/persistence.hpp, docs/persistence.md).
#include <algorithm>
#include <new>

#include "instinfer/kv/kv_cache.hpp"

namespace instinfer {

status kv_cache::restore() {
  const recovered_state& found = store_->recovered();
  const uint32_t tpp = config_.page.tokens_per_page;
  try {
    for (const persisted_sequence& p : found.sequences) {
      if (p.n_tokens.size() != config_.shape.n_layers || p.chunks.size() != config_.shape.n_layers)
        return {errc::kInternal, "restore: a recovered sequence has the wrong number of layers"};
      const seq_id id = next_seq_++;
      sequence& s = sequences_[id];
      s.name = p.name;
      s.layers.resize(config_.shape.n_layers);
      for (uint32_t l = 0; l < config_.shape.n_layers; ++l) {
        layer_table& t = s.layers[l];
        if (p.chunks[l].size() != (uint64_t{p.n_tokens[l]} + tpp - 1) / tpp)
          return {errc::kInternal, "restore: a recovered layer's chunks do not hold its tokens"};
        t.chunks = p.chunks[l];
        t.n_tokens = p.n_tokens[l];
        for (chunk_id c : t.chunks) {
          INSTINFER_TRY(track(c));
          retain(c);
          // Stored chunks are never appended to in place: the next append copies a partial tail.
          sealed_[c] = 1;
        }
      }
      names_[p.name] = id;
    }
    damaged_names_ = found.damaged;
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "restoring the persistent store's sequences"};
  }
  store_->forget_recovered();
  return {};
}

status kv_cache::commit_locked() {
  std::vector<persisted_sequence> named;
  try {
    named.reserve(names_.size());
    for (const auto& [name, id] : names_) {
      const sequence& s = sequences_.at(id);
      persisted_sequence p;
      p.name = name;
      p.n_tokens.reserve(s.layers.size());
      p.chunks.reserve(s.layers.size());
      for (const layer_table& t : s.layers) {
        p.n_tokens.push_back(t.n_tokens);
        p.chunks.push_back(t.chunks);
      }
      named.push_back(std::move(p));
    }
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "flush: the page tables to commit"};
  }
  std::sort(named.begin(), named.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  INSTINFER_TRY(store_->commit(named));
  damaged_names_.clear();  // the new commit no longer has their records
  return {};
}

status kv_cache::set_sequence_name(seq_id seq, uint64_t name) {
  std::lock_guard lock(mutex_);
  auto found = find(seq);
  if (!found.ok()) return found.error();
  sequence& s = *found.value();
  if (name == s.name) return {};
  if (name != 0) {
    if (auto it = names_.find(name); it != names_.end())
      return {errc::kInvalidArgument,
              "name " + std::to_string(name) + " already names sequence " + std::to_string(it->second)};
    try {
      names_[name] = seq;
    } catch (const std::bad_alloc&) {
      return {errc::kOutOfMemory, "sequence names"};
    }
    damaged_names_.erase(std::remove(damaged_names_.begin(), damaged_names_.end(), name), damaged_names_.end());
  }
  if (s.name != 0) names_.erase(s.name);
  s.name = name;
  return {};
}

result<uint64_t> kv_cache::sequence_name(seq_id seq) const {
  std::lock_guard lock(mutex_);
  auto found = find(seq);
  if (!found.ok()) return found.error();
  return found.value()->name;
}

result<seq_id> kv_cache::find_sequence(uint64_t name) const {
  std::lock_guard lock(mutex_);
  if (name == 0) return status{errc::kInvalidArgument, "sequence names are nonzero"};
  if (auto it = names_.find(name); it != names_.end()) return it->second;
  if (std::find(damaged_names_.begin(), damaged_names_.end(), name) != damaged_names_.end())
    return status{errc::kCorruptData, "the store's record of sequence name " + std::to_string(name) +
                                          " was damaged (checksum or consistency check failed at open); its "
                                          "tokens are not served"};
  return status{errc::kUnknownSequence, "no sequence is named " + std::to_string(name)};
}

std::vector<std::pair<uint64_t, seq_id>> kv_cache::named_sequences() const {
  std::lock_guard lock(mutex_);
  std::vector<std::pair<uint64_t, seq_id>> out(names_.begin(), names_.end());
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<uint64_t> kv_cache::damaged_sequences() const {
  std::lock_guard lock(mutex_);
  std::vector<uint64_t> out = damaged_names_;
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace instinfer
