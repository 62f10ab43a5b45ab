#include "tokenizer.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <queue>

#include "unicode_tables.hpp"

namespace instinfer::model {

namespace {

bool in_ranges(const code_point_range* r, size_t n, uint32_t cp) noexcept {
  const code_point_range* end = r + n;
  const code_point_range* it =
      std::upper_bound(r, end, cp, [](uint32_t v, const code_point_range& x) { return v < x.first; });
  return it != r && cp <= (it - 1)->last;
}
bool is_letter(uint32_t cp) noexcept {
  return in_ranges(kLetterRanges, std::size(kLetterRanges), cp);
}
bool is_number(uint32_t cp) noexcept {
  return in_ranges(kNumberRanges, std::size(kNumberRanges), cp);
}
// The Unicode White_Space property (what \s means in the tokenizers' regex engines).
bool is_space(uint32_t cp) noexcept {
  return (cp >= 0x09 && cp <= 0x0d) || cp == 0x20 || cp == 0x85 || cp == 0xa0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 || cp == 0x202f || cp == 0x205f || cp == 0x3000;
}

constexpr uint32_t kInvalid = 0xffffffffu;  // a byte that is not valid UTF-8: a class of its own ("other")

// Decode one code point at s[i]; len is its byte length (1 for invalid bytes).
uint32_t next_cp(std::string_view s, size_t i, size_t& len) noexcept {
  const auto b0 = static_cast<uint8_t>(s[i]);
  if (b0 < 0x80) {
    len = 1;
    return b0;
  }
  int n = 0;
  uint32_t cp = 0;
  if ((b0 & 0xe0) == 0xc0) {
    n = 2;
    cp = b0 & 0x1f;
  } else if ((b0 & 0xf0) == 0xe0) {
    n = 3;
    cp = b0 & 0x0f;
  } else if ((b0 & 0xf8) == 0xf0) {
    n = 4;
    cp = b0 & 0x07;
  } else {
    len = 1;
    return kInvalid;
  }
  if (i + static_cast<size_t>(n) > s.size()) {
    len = 1;
    return kInvalid;
  }
  for (int k = 1; k < n; ++k) {
    const auto b = static_cast<uint8_t>(s[i + static_cast<size_t>(k)]);
    if ((b & 0xc0) != 0x80) {
      len = 1;
      return kInvalid;
    }
    cp = (cp << 6) | (b & 0x3f);
  }
  static constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMin[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
    len = 1;
    return kInvalid;
  }
  len = static_cast<size_t>(n);
  return cp;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80)
    out += static_cast<char>(cp);
  else if (cp < 0x800) {
    out += static_cast<char>(0xc0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xe0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    out += static_cast<char>(0xf0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  }
}

// GPT-2's reversible map from bytes to printable code points.
uint32_t byte_to_cp(uint8_t b) noexcept {
  if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174) return b;
  uint32_t n = 0;  // rank of b among the remapped bytes
  for (uint32_t x = 0; x < b; ++x)
    if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174)) ++n;
  return 256 + n;
}

struct byte_maps {
  std::string enc[256];
  int dec[512];  // code point -> byte, -1 when not in the alphabet
  byte_maps() {
    std::fill(std::begin(dec), std::end(dec), -1);
    for (int b = 0; b < 256; ++b) {
      const uint32_t cp = byte_to_cp(static_cast<uint8_t>(b));
      append_utf8(enc[b], cp);
      dec[cp] = b;
    }
  }
};
const byte_maps& bytes_map() {
  static const byte_maps m;
  return m;
}

enum class cls { kLetter, kNumber, kSpace, kOther };
cls classify(uint32_t cp) noexcept {
  if (cp == kInvalid) return cls::kOther;
  if (is_letter(cp)) return cls::kLetter;
  if (is_number(cp)) return cls::kNumber;
  if (is_space(cp)) return cls::kSpace;
  return cls::kOther;
}

// Split `text` with GPT-2's pre-tokenizer rule, preceded by SmolLM2's "every digit alone" split.
template <class Emit>
void pretokenize(std::string_view text, Emit&& emit) {
  struct cpi {
    uint32_t cp;
    size_t pos, len;
    cls c;
  };
  std::vector<cpi> cps;
  for (size_t i = 0; i < text.size();) {
    size_t len = 1;
    const uint32_t cp = next_cp(text, i, len);
    cps.push_back({cp, i, len, classify(cp)});
    i += len;
  }
  const size_t n = cps.size();
  auto span_of = [&](size_t a, size_t b) {
    return text.substr(cps[a].pos, cps[b - 1].pos + cps[b - 1].len - cps[a].pos);
  };
  size_t i = 0;
  while (i < n) {
    const cpi& c = cps[i];
    if (c.c == cls::kNumber) {  // Digits(individual_digits): each number code point alone
      emit(span_of(i, i + 1));
      ++i;
      continue;
    }
    // Contractions (lower case only, as in GPT-2).
    if (c.cp == '\'' && i + 1 < n) {
      const uint32_t a = cps[i + 1].cp;
      const uint32_t b = i + 2 < n ? cps[i + 2].cp : 0;
      size_t take = 0;
      if (a == 's' || a == 't' || a == 'm' || a == 'd')
        take = 2;
      else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
        take = 3;
      if (take) {
        emit(span_of(i, i + take));
        i += take;
        continue;
      }
    }
    // " ?X+" for X in letters / other; numbers never follow here (they were split off above).
    size_t j = i;
    if (c.cp == ' ' && i + 1 < n && cps[i + 1].c != cls::kSpace && cps[i + 1].c != cls::kNumber) j = i + 1;
    const cls k = cps[j].c;
    if (k == cls::kLetter || k == cls::kOther) {
      size_t e = j + 1;
      while (e < n && cps[e].c == k) ++e;
      emit(span_of(i, e));
      i = e;
      continue;
    }
    // Whitespace: \s+(?!\S) keeps the last space of a run for the word after it; \s+ otherwise.
    size_t e = i + 1;
    while (e < n && cps[e].c == cls::kSpace) ++e;
    // A number code point ends the segment (it was split off), so (?!\S) holds before it.
    if (e < n && cps[e].c != cls::kNumber && e - i > 1) --e;
    emit(span_of(i, e));
    i = e;
  }
}

}  // namespace

result<std::unique_ptr<tokenizer>> tokenizer::from_gguf(const gguf_file& f) {
  std::unique_ptr<tokenizer> t(new tokenizer());
  auto model = f.get_string("tokenizer.ggml.model");
  if (!model.ok()) return model.error();
  if (*model == "gpt2")
    t->kind_ = kind::kByteLevelBpe;
  else if (*model == "llama")
    t->kind_ = kind::kSentencePiece;
  else
    return status{errc::kUnsupported, "tokenizer model '" + std::string(*model) + "' is not supported (gpt2 or llama)"};
  if (t->kind_ == kind::kByteLevelBpe) {
    if (auto pre = f.get_string("tokenizer.ggml.pre");
        pre.ok() && *pre != "smollm" && *pre != "default" && *pre != "gpt2")
      return status{errc::kUnsupported, "pre-tokenizer '" + std::string(*pre) + "' is not supported (smollm)"};
  }

  auto toks = f.get_string_array("tokenizer.ggml.tokens");
  if (!toks.ok()) return toks.error();
  if (toks->empty() || toks->size() > (1u << 24))
    return status{errc::kCorruptData,
                  "tokenizer: vocabulary size " + std::to_string(toks->size()) + " is out of range"};
  const size_t nv = toks->size();
  t->tokens_.reserve(nv);
  for (auto s : *toks) t->tokens_.emplace_back(s);
  if (auto types = f.get_int_array("tokenizer.ggml.token_type"); types.ok()) {
    if (types->size() != nv)
      return status{errc::kCorruptData, "tokenizer: token_type has " + std::to_string(types->size()) + " entries for " +
                                            std::to_string(nv) + " tokens"};
    t->types_.assign(types->begin(), types->end());
  } else {
    t->types_.assign(nv, 1);
  }
  if (auto scores = f.get_f32_array("tokenizer.ggml.scores"); scores.ok()) {
    if (scores->size() != nv) return status{errc::kCorruptData, "tokenizer: scores has the wrong length"};
    t->scores_ = std::move(*scores);
  } else if (t->kind_ == kind::kSentencePiece) {
    return scores.error();
  }
  t->vocab_.reserve(nv);
  for (size_t i = 0; i < nv; ++i) t->vocab_.emplace(t->tokens_[i], static_cast<token_id>(i));

  auto id_of = [&](const char* key, token_id& out) -> status {
    auto v = f.get_u64(key);
    if (!v.ok()) return {};
    if (*v >= nv)
      return {errc::kCorruptData, std::string("tokenizer: ") + key + " = " + std::to_string(*v) + " is not a token id"};
    out = static_cast<token_id>(*v);
    return {};
  };
  INSTINFER_TRY(id_of("tokenizer.ggml.bos_token_id", t->bos_));
  INSTINFER_TRY(id_of("tokenizer.ggml.eos_token_id", t->eos_));
  INSTINFER_TRY(id_of("tokenizer.ggml.eot_token_id", t->eot_));
  if (auto b = f.get_bool("tokenizer.ggml.add_bos_token"); b.ok())
    t->add_bos_ = *b;
  else
    t->add_bos_ = t->kind_ == kind::kSentencePiece;
  if (auto b = f.get_bool("tokenizer.ggml.add_space_prefix"); b.ok())
    t->add_space_prefix_ = *b;
  else
    t->add_space_prefix_ = t->kind_ == kind::kSentencePiece;
  if (auto it = t->vocab_.find("<|im_end|>"); it != t->vocab_.end()) t->im_end_ = it->second;

  for (size_t i = 0; i < nv; ++i)
    if ((t->types_[i] == 3 || t->types_[i] == 4) && !t->tokens_[i].empty())
      t->specials_.emplace_back(t->tokens_[i], static_cast<token_id>(i));
  std::stable_sort(t->specials_.begin(), t->specials_.end(),
                   [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });

  if (t->kind_ == kind::kByteLevelBpe) {
    const auto& bm = bytes_map();
    for (int b = 0; b < 256; ++b) {
      // Vocabularies may lack bytes that never occur in their training text (SmolLM2 lacks
      // 21, e.g. 0x04 and 0xff); those bytes are dropped, as the reference tokenizers do.
      auto it = t->vocab_.find(bm.enc[b]);
      t->byte_token_[b] = it == t->vocab_.end() ? -1 : it->second;
    }
    auto merges = f.get_string_array("tokenizer.ggml.merges");
    if (!merges.ok()) return merges.error();
    t->merges_.reserve(merges->size());
    std::string joined;
    for (size_t r = 0; r < merges->size(); ++r) {
      const std::string_view m = (*merges)[r];
      const size_t sp = m.find(' ', 1);  // byte-level tokens never contain ' ' (it maps to U+0120)
      if (sp == std::string_view::npos)
        return status{errc::kCorruptData, "tokenizer: merge " + std::to_string(r) + " has no separator"};
      const auto a = t->vocab_.find(std::string(m.substr(0, sp)));
      const auto b = t->vocab_.find(std::string(m.substr(sp + 1)));
      joined.assign(m.substr(0, sp));
      joined.append(m.substr(sp + 1));
      const auto c = t->vocab_.find(joined);
      if (a == t->vocab_.end() || b == t->vocab_.end() || c == t->vocab_.end())
        return status{errc::kCorruptData, "tokenizer: merge " + std::to_string(r) + " ('" + std::string(m) +
                                              "') refers to tokens not in the vocabulary"};
      const uint64_t key =
          (static_cast<uint64_t>(static_cast<uint32_t>(a->second)) << 32) | static_cast<uint32_t>(b->second);
      t->merges_.emplace(key, merge_rule{static_cast<uint32_t>(r), c->second});  // first (best) rank wins
    }
  } else {
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof name, "<0x%02X>", b);
      auto it = t->vocab_.find(name);
      t->byte_token_[b] = it == t->vocab_.end() ? -1 : it->second;
    }
  }

  if (auto tmpl = f.get_string("tokenizer.chat_template"); tmpl.ok()) {
    t->chat_template_ = std::string(*tmpl);
    const std::string open = "<|im_start|>system\n";
    if (size_t p = t->chat_template_.find(open); p != std::string::npos) {
      const size_t e = t->chat_template_.find("<|im_end|>", p);
      if (e != std::string::npos) t->default_system_ = t->chat_template_.substr(p + open.size(), e - p - open.size());
    }
  }
  return t;
}

bool tokenizer::is_end_of_generation(token_id id) const noexcept {
  return id == eos_ || (id >= 0 && (id == eot_ || id == im_end_));
}

void tokenizer::encode_bpe_piece(std::string_view piece, std::vector<token_id>& out) const {
  // Merge by rank with a heap of candidate pairs over a linked list of symbols: O(n log n), so a
  // long piece (a 100 KB word) cannot stall the tokenizer. Ties go to the leftmost pair.
  std::vector<token_id> id;
  id.reserve(piece.size());
  for (char ch : piece)
    if (const token_id b = byte_token_[static_cast<uint8_t>(ch)]; b >= 0) id.push_back(b);
  const int32_t n = static_cast<int32_t>(id.size());
  std::vector<int32_t> prev(static_cast<size_t>(n)), next(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) {
    prev[static_cast<size_t>(i)] = i - 1;
    next[static_cast<size_t>(i)] = i + 1 < n ? i + 1 : -1;
  }
  struct cand {
    uint32_t rank;
    int32_t left;
    token_id a, b, merged;
    bool operator>(const cand& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  std::priority_queue<cand, std::vector<cand>, std::greater<cand>> heap;
  auto consider = [&](int32_t l) {
    if (l < 0) return;
    const int32_t r = next[static_cast<size_t>(l)];
    if (r < 0) return;
    const token_id a = id[static_cast<size_t>(l)], b = id[static_cast<size_t>(r)];
    const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
    if (auto it = merges_.find(key); it != merges_.end()) heap.push({it->second.rank, l, a, b, it->second.merged});
  };
  for (int32_t i = 0; i + 1 < n; ++i) consider(i);
  while (!heap.empty()) {
    const cand c = heap.top();
    heap.pop();
    const auto l = static_cast<size_t>(c.left);
    const int32_t r = next[l];
    if (id[l] != c.a || r < 0 || id[static_cast<size_t>(r)] != c.b) continue;  // stale
    id[l] = c.merged;
    id[static_cast<size_t>(r)] = -1;
    next[l] = next[static_cast<size_t>(r)];
    if (next[l] >= 0) prev[static_cast<size_t>(next[l])] = c.left;
    consider(prev[l]);
    consider(c.left);
  }
  for (int32_t i = 0; i >= 0 && i < n; i = next[static_cast<size_t>(i)]) out.push_back(id[static_cast<size_t>(i)]);
}

void tokenizer::encode_text_gpt2(std::string_view text, std::vector<token_id>& out) const {
  pretokenize(text, [&](std::string_view piece) { encode_bpe_piece(piece, out); });
}

void tokenizer::encode_text_spm(std::string_view text, bool at_start, std::vector<token_id>& out) const {
  std::string s;
  if (at_start && add_space_prefix_) s = "\xe2\x96\x81";
  for (char ch : text) {
    if (ch == ' ')
      s += "\xe2\x96\x81";
    else
      s += ch;
  }
  // Symbols: UTF-8 characters; merge the adjacent pair with the best score while one exists.
  std::vector<std::string> sym;
  for (size_t i = 0; i < s.size();) {
    size_t len = 1;
    next_cp(s, i, len);
    sym.emplace_back(s.substr(i, len));
    i += len;
  }
  while (sym.size() > 1) {
    float best = -std::numeric_limits<float>::infinity();
    size_t at = SIZE_MAX;
    for (size_t i = 0; i + 1 < sym.size(); ++i) {
      auto it = vocab_.find(sym[i] + sym[i + 1]);
      if (it != vocab_.end() && scores_[static_cast<size_t>(it->second)] > best) {
        best = scores_[static_cast<size_t>(it->second)];
        at = i;
      }
    }
    if (at == SIZE_MAX) break;
    sym[at] += sym[at + 1];
    sym.erase(sym.begin() + static_cast<std::ptrdiff_t>(at) + 1);
  }
  for (const auto& p : sym) {
    if (auto it = vocab_.find(p); it != vocab_.end()) {
      out.push_back(it->second);
      continue;
    }
    for (char ch : p) {
      const token_id b = byte_token_[static_cast<uint8_t>(ch)];
      if (b >= 0) out.push_back(b);
    }
  }
}

std::vector<token_id> tokenizer::encode(std::string_view text, bool parse_special) const {
  std::vector<token_id> out;
  if (kind_ == kind::kSentencePiece && add_bos_ && bos_ >= 0) out.push_back(bos_);
  size_t pos = 0;
  bool at_start = true;
  auto plain = [&](std::string_view seg) {
    if (seg.empty()) return;
    if (kind_ == kind::kByteLevelBpe)
      encode_text_gpt2(seg, out);
    else
      encode_text_spm(seg, at_start, out);
    at_start = false;
  };
  // Next occurrence of each special token at or after pos, refreshed only once pos passes it,
  // so text with many special tokens stays linear in practice.
  std::vector<size_t> at(parse_special ? specials_.size() : 0, 0);
  for (size_t k = 0; k < at.size(); ++k) at[k] = text.find(specials_[k].first);
  while (pos < text.size()) {
    size_t best = std::string_view::npos;
    const std::pair<std::string, token_id>* hit = nullptr;
    for (size_t k = 0; k < at.size(); ++k) {  // longest first: ties at one position go to the longest
      if (at[k] != std::string_view::npos && at[k] < pos) at[k] = text.find(specials_[k].first, pos);
      if (at[k] != std::string_view::npos && (best == std::string_view::npos || at[k] < best)) {
        best = at[k];
        hit = &specials_[k];
      }
    }
    if (!hit) {
      plain(text.substr(pos));
      break;
    }
    plain(text.substr(pos, best - pos));
    out.push_back(hit->second);
    at_start = false;
    pos = best + hit->first.size();
  }
  return out;
}

std::string tokenizer::decode_token(token_id id) const {
  if (id < 0 || static_cast<size_t>(id) >= tokens_.size()) return {};
  const std::string& t = tokens_[static_cast<size_t>(id)];
  const int type = types_[static_cast<size_t>(id)];
  if (type == 3 || type == 4) return t;  // special tokens: their text
  std::string out;
  if (kind_ == kind::kByteLevelBpe) {
    const auto& bm = bytes_map();
    for (size_t i = 0; i < t.size();) {
      size_t len = 1;
      const uint32_t cp = next_cp(t, i, len);
      if (cp < 512 && bm.dec[cp] >= 0)
        out += static_cast<char>(bm.dec[cp]);
      else
        out.append(t, i, len);  // not in the byte alphabet: keep as is
      i += len;
    }
    return out;
  }
  if (type == 6 && t.size() == 6 && t.starts_with("<0x") && t[5] == '>') {
    auto hex = [](char c) {
      return c >= '0' && c <= '9'   ? c - '0'
             : c >= 'A' && c <= 'F' ? c - 'A' + 10
             : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                    : -1;
    };
    const int hi = hex(t[3]), lo = hex(t[4]);
    if (hi >= 0 && lo >= 0) return std::string(1, static_cast<char>(hi * 16 + lo));
  }
  for (size_t i = 0; i < t.size();) {
    if (t.compare(i, 3, "\xe2\x96\x81") == 0) {
      out += ' ';
      i += 3;
    } else
      out += t[i++];
  }
  return out;
}

std::string tokenizer::decode(const std::vector<token_id>& ids) const {
  std::string out;
  for (token_id id : ids) {
    if (kind_ == kind::kSentencePiece && id == bos_) continue;
    out += decode_token(id);
  }
  if (kind_ == kind::kSentencePiece && add_space_prefix_ && !out.empty() && out[0] == ' ') out.erase(0, 1);
  return out;
}

std::string tokenizer::apply_chat_template(const std::vector<chat_message>& messages) const {
  std::string out;
  if (chat_template_.find("<|im_start|>") != std::string::npos) {
    if (!default_system_.empty() && (messages.empty() || messages.front().role != "system"))
      out += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
    for (const auto& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
    out += "<|im_start|>assistant\n";
    return out;
  }
  for (const auto& m : messages) out += m.role + ": " + m.content + "\n";
  out += "assistant:";
  return out;
}

}  // namespace instinfer::model
