// The C API: sequence state (save and load, to memory and to files) and named sequences.
#include <cstddef>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "capi_internal.hpp"

using namespace instinfer::capi;
using instinfer::errc;
using instinfer::status;

extern "C" {

instinfer_status instinfer_seq_state_size(instinfer_cache* cache, instinfer_seq seq, size_t* out_size) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!out_size) return fail(errc::kInvalidArgument, "out_size is NULL");
    auto r = cache->cache->sequence_state_size(seq);
    if (!r.ok()) return report(r.error());
    if (r.value() > SIZE_MAX) return fail(errc::kOutOfMemory, "the sequence state does not fit a size_t");
    *out_size = static_cast<size_t>(r.value());
    return INSTINFER_OK;
  });
}

instinfer_status instinfer_seq_state_save(instinfer_cache* cache, instinfer_seq seq, void* buf, size_t buf_size,
                                          size_t* out_written) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (out_written) *out_written = 0;
    if (!buf) return fail(errc::kInvalidArgument, "buf is NULL (instinfer_seq_state_size gives the size)");
    std::vector<std::byte> bytes;
    if (status s = cache->cache->save_sequence(seq, bytes); !s.ok()) return report(s);
    if (bytes.size() > buf_size)
      return fail(errc::kInvalidArgument, "buf_size " + std::to_string(buf_size) + " is smaller than the state's " +
                                              std::to_string(bytes.size()) + " bytes");
    std::memcpy(buf, bytes.data(), bytes.size());
    if (out_written) *out_written = bytes.size();
    return INSTINFER_OK;
  });
}

instinfer_status instinfer_seq_state_load(instinfer_cache* cache, const void* buf, size_t size,
                                          instinfer_seq* out_seq) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!out_seq) return fail(errc::kInvalidArgument, "out_seq is NULL");
    if (!buf && size > 0) return fail(errc::kInvalidArgument, "buf is NULL");
    auto r =
        cache->cache->load_sequence(std::span<const std::byte>(static_cast<const std::byte*>(buf), buf ? size : 0));
    if (!r.ok()) return report(r.error());
    *out_seq = r.value();
    return INSTINFER_OK;
  });
}

instinfer_status instinfer_seq_state_save_file(instinfer_cache* cache, instinfer_seq seq, const char* path) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!path) return fail(errc::kInvalidArgument, "path is NULL");
    return report(cache->cache->save_sequence_file(seq, path));
  });
}

instinfer_status instinfer_seq_state_load_file(instinfer_cache* cache, const char* path, instinfer_seq* out_seq) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!path) return fail(errc::kInvalidArgument, "path is NULL");
    if (!out_seq) return fail(errc::kInvalidArgument, "out_seq is NULL");
    return deliver(cache->cache->load_sequence_file(path), out_seq);
  });
}

// ---- 0.5: named sequences, persistent stores -----------------------------------------------------

instinfer_status instinfer_seq_set_name(instinfer_cache* cache, instinfer_seq seq, uint64_t name) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    return report(cache->cache->set_sequence_name(seq, name));
  });
}

instinfer_status instinfer_seq_find(instinfer_cache* cache, uint64_t name, instinfer_seq* out_seq) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!out_seq) return fail(errc::kInvalidArgument, "out_seq is NULL");
    return deliver(cache->cache->find_sequence(name), out_seq);
  });
}

instinfer_status instinfer_seq_names(instinfer_cache* cache, uint64_t* names, instinfer_seq* seqs, size_t capacity,
                                     size_t* out_count) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!out_count) return fail(errc::kInvalidArgument, "out_count is NULL");
    if (capacity > 0 && (!names || !seqs))
      return fail(errc::kInvalidArgument, "names and seqs must not be NULL when capacity > 0");
    const auto named = cache->cache->named_sequences();
    for (size_t i = 0; i < named.size() && i < capacity; ++i) {
      names[i] = named[i].first;
      seqs[i] = named[i].second;
    }
    *out_count = named.size();
    return INSTINFER_OK;
  });
}

}  // extern "C"
