// Tokenizers built from GGUF metadata.
//
//  * "gpt2" (byte-level BPE; SmolLM2, Llama 3, ...): text is split at special tokens, then
//    pre-tokenized (SmolLM2 / "smollm": every \p{N} code point alone, then GPT-2's rule
//    's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+), each piece's
//    bytes mapped to GPT-2's printable byte alphabet and merged by merge rank.
//  * "llama" (SentencePiece BPE; Llama 1/2): spaces become U+2581, a leading one is added when
//    add_space_prefix says so, pieces are merged by score, unknown bytes fall back to <0xXX>.
//
// encode() never fails on any byte string (invalid UTF-8 is carried byte by byte), and
// decode(encode(s)) == s for the byte-level model.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "gguf.hpp"
#include "instinfer/core/status.hpp"

namespace instinfer::model {

using token_id = int32_t;

struct chat_message {
  std::string role;  // "system", "user", "assistant"
  std::string content;
};

class tokenizer {
 public:
  enum class kind { kByteLevelBpe, kSentencePiece };

  static result<std::unique_ptr<tokenizer>> from_gguf(const gguf_file& f);

  // Token ids of `text`. Special tokens written in the text (e.g. "<|im_start|>") are recognised
  // when parse_special is true; otherwise they are tokenized as plain text.
  std::vector<token_id> encode(std::string_view text, bool parse_special = true) const;
  // Bytes of one token (special tokens as their text).
  std::string decode_token(token_id id) const;
  std::string decode(const std::vector<token_id>& ids) const;

  // The prompt for a conversation, ending with the assistant's turn opened (ChatML when the
  // model's template uses it, else a plain "role: content" fallback).
  std::string apply_chat_template(const std::vector<chat_message>& messages) const;

  kind model() const noexcept { return kind_; }
  uint32_t vocab_size() const noexcept { return static_cast<uint32_t>(tokens_.size()); }
  token_id bos() const noexcept { return bos_; }
  token_id eos() const noexcept { return eos_; }
  bool add_bos() const noexcept { return add_bos_; }
  // True for tokens that end generation (eos, and ChatML's <|im_end|> / <|endoftext|>).
  bool is_end_of_generation(token_id id) const noexcept;
  const std::string& token_text(token_id id) const { return tokens_.at(static_cast<size_t>(id)); }

 private:
  tokenizer() = default;
  void encode_bpe_piece(std::string_view piece, std::vector<token_id>& out) const;
  void encode_text_gpt2(std::string_view text, std::vector<token_id>& out) const;
  void encode_text_spm(std::string_view text, bool at_start, std::vector<token_id>& out) const;

  kind kind_ = kind::kByteLevelBpe;
  std::vector<std::string> tokens_;
  std::vector<int32_t> types_;  // 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
  std::vector<float> scores_;
  std::unordered_map<std::string, token_id> vocab_;
  // byte-level BPE: (left id, right id) -> (rank, merged id)
  struct merge_rule {
    uint32_t rank;
    token_id merged;
  };
  std::unordered_map<uint64_t, merge_rule> merges_;
  token_id byte_token_[256] = {};                           // byte-level: id of the single mapped byte; spm: <0xXX>
  std::vector<std::pair<std::string, token_id>> specials_;  // longest first
  token_id bos_ = -1, eos_ = -1, eot_ = -1, im_end_ = -1;
  bool add_bos_ = false;
  bool add_space_prefix_ = false;
  std::string chat_template_;
  std::string default_system_;
};

}  // namespace instinfer::model
