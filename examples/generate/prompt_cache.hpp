// A prompt cache for the generator (instinfer-generate --prompt-cache PATH): after a prompt is
// prefilled, its token ids and the sequence's K/V (kv_cache::save_sequence) are written to one
// file; a later run with the same prompt, or one that starts the same way (the same system prompt
// and another question), loads that state into its own cache (any backend: a file saved from host
// restores into ssd:), truncates it to the longest common prefix of token ids and prefills only
// the rest.
//
// File (little endian): "IIPROMPT" | u32 version | u32 header bytes | u64 model fingerprint |
// u32 kv dtype | u32 n_tokens | u64 state bytes | u64 FNV-1a 64 of the header (this field zero)
// and the token ids | i32 tokens[n_tokens] | zero padding to a multiple of 4096 | the sequence
// state (its own magic, shape and CRC32C). It is written to a temporary name, fsynced and renamed
// (a crash leaves the old file or the new one, never a torn one), mode 0600, and its pages are
// dropped from the page cache; it is read back with O_DIRECT where the filesystem allows, so a
// restore after a restart reads the device, not the page cache.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "gguf.hpp"
#include "instinfer/kv/kv_cache.hpp"
#include "llama_model.hpp"

namespace instinfer::model::prompt_cache {

// Identity of the model a cache belongs to: file size, every tensor's name, type, shape and
// offset, the metadata keys with the values of the scalar ones and the first 256 bytes of
// every tensor's data (FNV-1a 64). Cheap (no pass over the weights) and changes with any
// re-quantization or different file.
uint64_t model_fingerprint(const gguf_file& file);

struct restore_result {
  seq_id seq = 0;             // valid when restored > 0
  uint32_t restored = 0;      // prompt tokens taken from the file (0: nothing, prefill cold)
  uint32_t cached = 0;        // tokens in the file (0 when unreadable or not matching)
  bool direct_io = false;     // the file was read with O_DIRECT
  double read_seconds = 0.0;  // reading and checking the file, and (when restored) loading and truncating it
  std::string note;           // why nothing was restored, for the user; empty when restored
};

// Restore the longest prefix of `prompt` the file at `path` holds into a new sequence of
// `cache`, leaving at least one prompt token to prefill (its logits start generation). A missing
// file, another model or KV dtype, a cache that shares no prefix, and a corrupt or truncated file
// all give restored == 0 with a note, and leave the cache as it was. Only a failure of the cache
// itself (out of space, a backend error) is an error.
result<restore_result> restore(kv_cache& cache, const std::string& path, uint64_t fingerprint,
                               std::span<const token_id> prompt);

// Save sequence `seq` (holding exactly `prompt`) to `path`, replacing any older file atomically.
status save(kv_cache& cache, seq_id seq, const std::string& path, uint64_t fingerprint,
            std::span<const token_id> prompt);

// The tokens a file holds (for tests and tools); an error names what is wrong with it.
result<std::vector<token_id>> read_tokens(const std::string& path, uint64_t fingerprint, dtype kv_dtype);

}  // namespace instinfer::model::prompt_cache
