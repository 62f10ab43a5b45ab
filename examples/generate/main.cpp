// instinfer-generate: run a Llama-architecture GGUF model on the host with its KV cache in
// instinfer (host RAM, SSD, computational storage or GPU memory).
//
//   scripts/fetch-model && build/bin/instinfer-generate --chat --prompt "What is a KV cache?"
//   build/bin/instinfer-generate --kv ssd:/tmp/kv.bin --prompt "Once upon a time" --max-tokens 64
//   build/bin/instinfer-generate --batch 8 --prompts prompts.txt --chat --max-tokens 128
//   build/bin/instinfer-generate --chat --prompt-file long.txt --prompt-cache /tmp/long.cache   # run twice
//   build/bin/instinfer-generate --perplexity builtin --kv-dtype q8_0
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

#include "cli.hpp"
#include "gguf.hpp"
#include "llama_model.hpp"
#include "perplexity.hpp"
#include "prompt_cache.hpp"
#include "sampler.hpp"
#include "sparf_eval.hpp"
#include "tokenizer.hpp"

using namespace instinfer;
using namespace instinfer::model;

namespace {

using cli::now_s;
using cli::parse_float;
using cli::parse_fraction;
using cli::parse_u32;

// Each causal chunk re-reads the sequence's KV so far, and on ssd: and csd: every chunk is a
// device read (and, for csd:, commands over the link) per layer: longer chunks cut both (2,022
// tokens: 64 chunks of 32 read 1.41 GiB from the ssd, 8 of 256 read 0.16 GiB). Host memory has
// neither cost, and 32 rows keep the prefill's activations small.
uint32_t default_prefill_chunk(std::string_view kv) {
  return kv.starts_with("ssd:") || kv.starts_with("csd:") ? 256 : 32;
}

struct options {
  std::string model = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  std::string prompt;
  std::string system;
  bool chat = false;
  uint32_t max_tokens = 128;
  sampler_options sampling;
  std::string kv = "host";
  dtype kv_dtype = dtype::kF16;
  bool int8_dot = false;  // cache_options::int8_query_dot (q8_0 KV)
  uint32_t page_bytes = 0;
  uint32_t threads = 0;
  uint32_t chunk = 0;  // 0: default_prefill_chunk(kv)
  uint32_t batch = 0;
  std::string prompts_file;
  bool ignore_eos = false;
  bool scalar = false;
  bool quiet = false;
  bool verbose = false;
  double sparf = 0.0;                                       // SparF compression in (0, 1]; 0: dense attention
  double sparf_share = sparf_params::kDefaultChannelShare;  // SparF's budget share for K columns
  std::string perplexity;          // text file to score ("builtin": sparf_eval.hpp's text); empty: generate
  uint32_t window = 0;             // perplexity window in tokens (0: the model's context)
  std::string prompt_cache;        // file of a prefilled prompt's K/V (prompt_cache.hpp); empty: none
  uint64_t model_fingerprint = 0;  // prompt_cache::model_fingerprint of the model file
};

void usage(FILE* out) {
  std::fprintf(out,
               "usage: instinfer-generate [options]\n"
               "  --model PATH        GGUF file (default models/SmolLM2-135M-Instruct.Q4_1.gguf; scripts/fetch-model)\n"
               "  --prompt TEXT       the prompt (or the user message with --chat)\n"
               "  --prompt-file FILE  the prompt read from a file\n"
               "  --chat              wrap the prompt in the model's chat template\n"
               "  --system TEXT       system message for --chat (default: the template's)\n"
               "  --max-tokens N      tokens to generate per sequence (default 128)\n"
               "  --temperature T     0 = greedy (default 0)\n"
               "  --top-p P           nucleus sampling mass (default 1)\n"
               "  --seed N            sampling seed (default 42)\n"
               "  --kv URI            KV cache backend: host | ssd:PATH | csd:PATH | cuda:N (default host)\n"
               "  --kv-dtype T        f16 | bf16 | f32 | q8_0 | q4_0 (default f16; q8_0 / q4_0: ggml's\n"
               "                      block formats, quantized as the KV is appended)\n"
               "  --int8-dot          q8_0 KV: score Q.K with integer dot products of the query rounded\n"
               "                      to q8_0 (cache_options::int8_query_dot; host and ssd)\n"
               "  --page-bytes N      KV page size (default: the backend's)\n"
               "  --threads N         compute threads (default: all cores)\n"
               "  --chunk N           prefill chunk / most tokens per forward call (default 32 on host\n"
               "                      and cuda, 256 on ssd: and csd:)\n"
               "  --batch N           offline mode: decode N sequences together, prompts from --prompts\n"
               "  --prompts FILE      one prompt per line (with --batch)\n"
               "  --ignore-eos        keep generating after the end-of-generation token\n"
               "  --prompt-cache PATH restore the longest cached prefix of the prompt from PATH instead of\n"
               "                      prefilling it; save this prompt's K/V there after prefill\n"
               "  --sparf C           SparF sparse decode attention at compression C in (0, 1] (0.125 or 1/8;\n"
               "                      1 = dense through the SparF path); the prompt is prefilled densely\n"
               "  --sparf-share S     with --sparf: the budget's share for K columns, in (0, 1) (default 0.5;\n"
               "                      r = 2 S C d channels, k = (1 - S) C n tokens)\n"
               "  --perplexity FILE   score FILE's text (\"builtin\": the lighthouse text of sparf_eval.hpp)\n"
               "                      instead of generating: perplexity over every predicted token\n"
               "  --window N          perplexity window in tokens (default: the model's context)\n"
               "  --scalar            use the scalar kernels (no SIMD)\n"
               "  --quiet             no streaming text (stats only)\n"
               "  --verbose           print the prompt's and the generated token ids\n"
               "  --list-backends     print the KV backends built into this binary and exit\n");
}

int fail(const std::string& msg) {
  std::fprintf(stderr, "instinfer-generate: %s\n", msg.c_str());
  return 1;
}

double peak_rss_mib() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;
}

struct timing {
  uint64_t prefill_tokens = 0, decode_tokens = 0;
  double prefill_s = 0.0, decode_s = 0.0;
  uint64_t peak_chunks = 0;  // most KV chunks held at once
  void sample(const kv_cache& c) { peak_chunks = std::max(peak_chunks, c.stats().backend.used_chunks); }
};

void print_stats(const timing& t, const kv_cache& cache, const llama_model& m, const std::string& kv) {
  const cache_stats s = cache.stats();
  const auto& b = s.backend;
  std::fprintf(
      stderr,
      "\n[stats] prefill %llu tok in %.3f s (%.1f tok/s) | decode %llu tok in %.3f s (%.1f tok/s) | "
      "kv %s: %.2f MiB appended, peak %.2f MiB in %llu chunks, device written %.2f MiB, read %.2f MiB",
      static_cast<unsigned long long>(t.prefill_tokens), t.prefill_s,
      t.prefill_s > 0 ? t.prefill_tokens / t.prefill_s : 0.0, static_cast<unsigned long long>(t.decode_tokens),
      t.decode_s, t.decode_s > 0 ? t.decode_tokens / t.decode_s : 0.0, kv.c_str(), b.kv_bytes_appended / 1048576.0,
      static_cast<double>(std::max(t.peak_chunks, b.used_chunks)) * static_cast<double>(s.chunk_bytes) / 1048576.0,
      static_cast<unsigned long long>(std::max(t.peak_chunks, b.used_chunks)), b.device_bytes_written / 1048576.0,
      b.device_bytes_read / 1048576.0);
  if (b.device_read_requests)
    std::fprintf(stderr, " in %llu requests (%llu prefetched)", static_cast<unsigned long long>(b.device_read_requests),
                 static_cast<unsigned long long>(b.device_reads_prefetched));
  if (b.link_bytes_host_to_device || b.link_bytes_device_to_host)
    std::fprintf(stderr, " | link h2d %.2f MiB, d2h %.2f MiB", b.link_bytes_host_to_device / 1048576.0,
                 b.link_bytes_device_to_host / 1048576.0);
  if (b.modelled_device_seconds > 0) std::fprintf(stderr, " | modelled device time %.3f s", b.modelled_device_seconds);
  if (s.sparf.items)
    std::fprintf(stderr, " | SparF read %.1f%% of the dense pages, used %.1f%% of the dense bytes",
                 100.0 * s.sparf.page_fraction(), 100.0 * s.sparf.byte_fraction());
  std::fprintf(stderr, " | weights %.1f MiB mapped, peak RSS %.1f MiB | %u threads, %s kernels\n",
               m.weight_bytes() / 1048576.0, peak_rss_mib(), m.n_threads(),
               std::string(kernel_isa_name(m.isa())).c_str());
}

std::string render(const tokenizer& tok, const options& o, const std::string& text) {
  if (!o.chat) return text;
  std::vector<chat_message> msgs;
  if (!o.system.empty()) msgs.push_back({"system", o.system});
  msgs.push_back({"user", text});
  return tok.apply_chat_template(msgs);
}

int run_single(const options& o, const tokenizer& tok, llama_model& m, kv_cache& cache) {
  const std::vector<token_id> ids = tok.encode(render(tok, o, o.prompt));
  if (ids.empty()) return fail("the prompt is empty");
  if (o.verbose) {
    std::fprintf(stderr, "[prompt] %zu tokens:", ids.size());
    for (token_id id : ids) std::fprintf(stderr, " %d", id);
    std::fprintf(stderr, "\n");
  }
  if (ids.size() + o.max_tokens > m.hparams().n_ctx_train)
    return fail("prompt (" + std::to_string(ids.size()) + " tokens) + --max-tokens exceed the model's context of " +
                std::to_string(m.hparams().n_ctx_train));
  sampler smp(o.sampling);
  timing t;
  std::vector<float> logits;
  const double start = now_s();
  // The prompt cache's longest matching prefix, if any; the rest of the prompt is prefilled.
  prompt_cache::restore_result cached;
  if (!o.prompt_cache.empty()) {
    auto r = prompt_cache::restore(cache, o.prompt_cache, o.model_fingerprint, ids);
    if (!r.ok()) return fail("prompt cache: " + r.error().to_string());
    cached = std::move(*r);
    if (!cached.restored) std::fprintf(stderr, "[prompt-cache] %s: prefilling the whole prompt\n", cached.note.c_str());
  }
  seq_id seq = cached.seq;
  if (!cached.restored) {
    auto created = cache.create_sequence();
    if (!created.ok()) return fail(created.error().to_string());
    seq = *created;
  }
  double t0 = now_s();
  const std::span<const token_id> rest = std::span<const token_id>(ids).subspan(cached.restored);
  if (status s = m.prefill(cache, seq, rest, cached.restored, logits); !s.ok())
    return fail("prefill: " + s.to_string());
  t.prefill_s = now_s() - t0;
  t.prefill_tokens = rest.size();
  if (!o.quiet) {
    std::fputs(o.chat ? "" : o.prompt.c_str(), stdout);
    std::fflush(stdout);
  }
  uint32_t pos = static_cast<uint32_t>(ids.size());
  t0 = now_s();
  std::vector<forward_item> item(1);
  std::vector<token_id> generated;
  double first_token_s = 0.0, save_s = 0.0;
  // Save before decoding appends to the sequence; not needed when the file covered the prompt.
  const auto save_prompt = [&] {
    if (o.prompt_cache.empty() || cached.restored + 1 >= ids.size()) return;
    const double s0 = now_s();
    if (status s = prompt_cache::save(cache, seq, o.prompt_cache, o.model_fingerprint, ids); !s.ok()) {
      std::fprintf(stderr, "[prompt-cache] not saved: %s\n", s.to_string().c_str());
      return;
    }
    save_s = now_s() - s0;
    t0 += save_s;  // not decode time
  };
  if (o.max_tokens == 0) {  // nothing to generate: the prompt's logits are the first "token"
    first_token_s = now_s() - start;
    save_prompt();
  }
  for (uint32_t n = 0; n < o.max_tokens; ++n) {
    const token_id next = smp.sample(logits);
    if (n == 0) {
      first_token_s = now_s() - start;
      save_prompt();
    }
    if (!o.ignore_eos && tok.is_end_of_generation(next)) break;
    generated.push_back(next);
    if (!o.quiet) {
      const std::string piece = tok.decode_token(next);
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
    ++t.decode_tokens;
    if (n + 1 == o.max_tokens) break;  // the last sampled token needs no forward pass
    item[0] = {seq, pos++, next, true};
    if (status s = m.forward(cache, item, logits); !s.ok()) return fail("decode: " + s.to_string());
  }
  t.decode_s = now_s() - t0;
  t.sample(cache);
  if (!o.quiet) std::fputc('\n', stdout);
  if (o.verbose) {
    std::fprintf(stderr, "[generated] %zu tokens:", generated.size());
    for (token_id id : generated) std::fprintf(stderr, " %d", id);
    std::fprintf(stderr, "\n");
  }
  print_stats(t, cache, m, o.kv);
  std::fprintf(stderr, "[prompt] %zu tokens: %u restored, %llu prefilled | time to first token %.3f s", ids.size(),
               cached.restored, static_cast<unsigned long long>(t.prefill_tokens), first_token_s);
  if (!o.prompt_cache.empty()) {
    if (cached.restored)
      std::fprintf(stderr, " | prompt cache read%s and loaded in %.3f s",
                   cached.direct_io ? " (O_DIRECT)" : " (buffered)", cached.read_seconds);
    if (save_s > 0) std::fprintf(stderr, " | saved in %.3f s", save_s);
  }
  std::fprintf(stderr, "\n");
  return 0;
}

// Perplexity of a text (perplexity.hpp).
int run_perplexity(const options& o, const tokenizer& tok, llama_model& m, kv_cache& cache) {
  std::string text;
  if (o.perplexity == "builtin") {
    text = sparf_eval::kLongText;
  } else {
    std::ifstream in(o.perplexity, std::ios::binary);
    if (!in) return fail("cannot read --perplexity file '" + o.perplexity + "'");
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  std::vector<token_id> ids;
  if (tok.add_bos() && tok.bos() >= 0) ids.push_back(tok.bos());
  const std::vector<token_id> body = tok.encode(text, false);
  ids.insert(ids.end(), body.begin(), body.end());
  if (ids.size() < 2) return fail("the --perplexity text has fewer than 2 tokens");
  const size_t window = std::min<size_t>(o.window ? o.window : m.hparams().n_ctx_train, m.hparams().n_ctx_train);
  const double t0 = now_s();
  auto r = evaluate_perplexity(m, cache, ids, window, o.chunk);
  if (!r.ok()) return fail(r.error().to_string());
  const double el = now_s() - t0;
  std::printf(
      "[perplexity] %s: %zu tokens, %llu predicted in %llu window(s) of <= %zu | kv %s %s | "
      "perplexity %.4f (mean NLL %.5f nats) | %.1f s, %.1f tok/s\n",
      o.perplexity.c_str(), ids.size(), static_cast<unsigned long long>(r->predicted),
      static_cast<unsigned long long>(r->windows), window, o.kv.c_str(),
      std::string(dtype_name(cache.shape().kv_dtype)).c_str(), r->perplexity(), r->mean_nll(), el, ids.size() / el);
  return 0;
}

int run_batch(const options& o, const tokenizer& tok, llama_model& m, kv_cache& cache) {
  std::ifstream in(o.prompts_file);
  if (!in) return fail("cannot read --prompts file '" + o.prompts_file + "'");
  std::vector<std::string> prompts;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) prompts.push_back(line);
  if (prompts.empty()) return fail("--prompts file '" + o.prompts_file + "' has no prompts");

  struct slot {
    size_t prompt = 0;
    seq_id seq = 0;
    uint32_t pos = 0, generated = 0;
    token_id next = 0;
    bool active = false;
  };
  std::vector<slot> slots(o.batch);
  std::vector<std::vector<token_id>> outputs(prompts.size());
  std::vector<sampler> samplers;
  for (size_t i = 0; i < prompts.size(); ++i)
    samplers.emplace_back(sampler_options{o.sampling.temperature, o.sampling.top_p, o.sampling.seed + i});
  size_t next_prompt = 0, done = 0;
  timing t;
  std::vector<float> logits;
  std::vector<forward_item> items;
  const double start = now_s();
  double last_progress = 0.0;
  const bool tty = isatty(STDERR_FILENO);
  auto progress = [&](bool final) {
    // Redraw in place on a terminal at most 5 times a second; a log file gets 10 lines at most.
    static size_t logged_tenths = 0;
    if (!final) {
      if (tty && now_s() - last_progress < 0.2) return;
      if (!tty && done * 10 / prompts.size() <= logged_tenths) return;
    }
    last_progress = now_s();
    logged_tenths = done * 10 / prompts.size();
    const int width = 40;
    const int filled = static_cast<int>(width * done / prompts.size());
    const double el = now_s() - start;
    std::fprintf(stderr, "%s[%.*s%*s] %zu/%zu sequences, %llu tokens, %.1f tok/s%s", tty ? "\r" : "", filled,
                 "########################################", width - filled, "", done, prompts.size(),
                 static_cast<unsigned long long>(t.decode_tokens), el > 0 ? t.decode_tokens / el : 0.0,
                 tty ? " " : "\n");
  };
  // Continuous batching: a finished sequence's slot takes the next prompt (prefilled alone), and
  // all active slots decode together, one attend call per layer.
  for (;;) {
    for (auto& s : slots) {
      if (s.active || next_prompt == prompts.size()) continue;
      const std::vector<token_id> ids = tok.encode(render(tok, o, prompts[next_prompt]));
      if (ids.empty() || ids.size() + o.max_tokens > m.hparams().n_ctx_train)
        return fail("prompt " + std::to_string(next_prompt + 1) + " is empty or too long");
      auto seq = cache.create_sequence();
      if (!seq.ok()) return fail(seq.error().to_string());
      const double t0 = now_s();
      if (status st = m.prefill(cache, *seq, ids, 0, logits); !st.ok()) return fail("prefill: " + st.to_string());
      t.prefill_s += now_s() - t0;
      t.prefill_tokens += ids.size();
      s = {next_prompt, *seq, static_cast<uint32_t>(ids.size()), 0, samplers[next_prompt].sample(logits), true};
      ++next_prompt;
    }
    items.clear();
    for (auto& s : slots) {
      if (!s.active) continue;
      const bool end = (!o.ignore_eos && tok.is_end_of_generation(s.next)) || s.generated == o.max_tokens;
      if (!end) {
        outputs[s.prompt].push_back(s.next);
        ++s.generated;
        ++t.decode_tokens;
      }
      if (end || s.generated == o.max_tokens) {
        s.active = false;
        ++done;
        if (status st = cache.free_sequence(s.seq); !st.ok()) return fail(st.to_string());
        continue;
      }
      items.push_back({s.seq, s.pos++, s.next, true});
    }
    if (items.empty()) {
      if (next_prompt == prompts.size()) break;
      continue;
    }
    const double t0 = now_s();
    if (status st = m.forward(cache, items, logits); !st.ok()) return fail("decode: " + st.to_string());
    t.decode_s += now_s() - t0;
    t.sample(cache);
    size_t k = 0;
    for (auto& s : slots)
      if (s.active)
        s.next = samplers[s.prompt].sample(
            std::span<const float>(logits).subspan(k++ * m.hparams().n_vocab, m.hparams().n_vocab));
    progress(false);
  }
  progress(true);
  const double total = now_s() - start;
  if (tty) std::fprintf(stderr, "\n");
  if (!o.quiet)
    for (size_t i = 0; i < prompts.size(); ++i)
      std::printf("=== %zu: %s\n%s\n", i + 1, prompts[i].c_str(), tok.decode(outputs[i]).c_str());
  print_stats(t, cache, m, o.kv);
  std::fprintf(
      stderr,
      "[batch] %zu sequences, batch %u: %llu generated tokens in %.3f s = %.1f tok/s overall (prefill included)\n",
      prompts.size(), o.batch, static_cast<unsigned long long>(t.decode_tokens), total, t.decode_tokens / total);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  cli::flags args("instinfer-generate", argc, argv);
  while (args.next()) {
    const std::string& a = args.flag();
    const auto need = [&](const char* what) { return args.need(what); };
    const auto bad = [&](const char* v) { args.bad(v); };
    if (a == "--help" || a == "-h") {
      usage(stdout);
      return 0;
    } else if (a == "--list-backends") {
      std::printf("%s\n", describe_backends().c_str());
      return 0;
    } else if (a == "--model")
      o.model = need("a path");
    else if (a == "--prompt")
      o.prompt = need("text");
    else if (a == "--prompt-file") {
      const char* v = need("a file");
      std::ifstream in(v, std::ios::binary);
      if (!in) return fail(std::string("cannot read --prompt-file '") + v + "'");
      o.prompt.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    } else if (a == "--perplexity")
      o.perplexity = need("a text file or 'builtin'");
    else if (a == "--window") {
      const char* v = need("a number");
      if (!parse_u32(v, o.window) || o.window < 2) bad(v);
    } else if (a == "--system")
      o.system = need("text");
    else if (a == "--chat")
      o.chat = true;
    else if (a == "--max-tokens") {
      const char* v = need("a number");
      if (!parse_u32(v, o.max_tokens)) bad(v);
    } else if (a == "--temperature") {
      const char* v = need("a number");
      if (!parse_float(v, o.sampling.temperature) || o.sampling.temperature < 0) bad(v);
    } else if (a == "--top-p") {
      const char* v = need("a number");
      if (!parse_float(v, o.sampling.top_p) || o.sampling.top_p <= 0 || o.sampling.top_p > 1) bad(v);
    } else if (a == "--seed") {
      const char* v = need("a number");
      char* e = nullptr;
      o.sampling.seed = std::strtoull(v, &e, 10);
      if (e == v || *e) bad(v);
    } else if (a == "--kv")
      o.kv = need("a backend URI");
    else if (a == "--kv-dtype") {
      const char* v = need("f16, bf16, f32, q8_0 or q4_0");
      auto d = parse_dtype(v);
      if (!d) bad(v);
      o.kv_dtype = *d;
    } else if (a == "--int8-dot") {
      o.int8_dot = true;
    } else if (a == "--page-bytes") {
      const char* v = need("a number");
      if (!parse_u32(v, o.page_bytes)) bad(v);
    } else if (a == "--threads") {
      const char* v = need("a number");
      if (!parse_u32(v, o.threads) || o.threads > 256) bad(v);
    } else if (a == "--chunk") {
      const char* v = need("a number");
      if (!parse_u32(v, o.chunk) || o.chunk == 0 || o.chunk > 1024) bad(v);
    } else if (a == "--batch") {
      const char* v = need("a number");
      if (!parse_u32(v, o.batch) || o.batch == 0 || o.batch > 1024) bad(v);
    } else if (a == "--prompts")
      o.prompts_file = need("a file");
    else if (a == "--prompt-cache")
      o.prompt_cache = need("a path");
    else if (a == "--ignore-eos")
      o.ignore_eos = true;
    else if (a == "--sparf") {
      const char* v = need("a compression in (0, 1]");
      if (!parse_fraction(v, o.sparf)) bad(v);
    } else if (a == "--sparf-share") {
      const char* v = need("a number in (0, 1)");
      if (!parse_fraction(v, o.sparf_share) || !(o.sparf_share > 0.0 && o.sparf_share < 1.0)) bad(v);
    } else if (a == "--scalar")
      o.scalar = true;
    else if (a == "--quiet")
      o.quiet = true;
    else if (a == "--verbose")
      o.verbose = true;
    else {
      std::fprintf(stderr, "instinfer-generate: unknown option '%s'\n", a.c_str());
      usage(stderr);
      return 2;
    }
  }
  if (o.batch && o.prompts_file.empty()) return fail("--batch needs --prompts FILE");
  if (!o.prompt_cache.empty() && (o.batch || !o.perplexity.empty()))
    return fail("--prompt-cache works with a single --prompt (not with --batch or --perplexity)");
  if (!o.batch && o.perplexity.empty() && o.prompt.empty())
    return fail("--prompt is required (or --batch N --prompts FILE); see --help");

  auto file = gguf_file::open(o.model);
  if (!file.ok()) {
    std::string hint;
    if (file.error().code() == errc::kIoError)
      hint = "\n  (fetch the default model with scripts/fetch-model, or pass --model PATH)";
    return fail(file.error().to_string() + hint);
  }
  if (!o.prompt_cache.empty()) o.model_fingerprint = prompt_cache::model_fingerprint(**file);
  auto tok = tokenizer::from_gguf(**file);
  if (!tok.ok()) return fail(tok.error().to_string());
  if (o.chunk == 0) o.chunk = default_prefill_chunk(o.kv);
  model_options mo;
  mo.n_threads = o.threads;
  mo.max_batch = std::max(o.chunk, o.batch);
  if (o.scalar) mo.isa = kernel_isa::kScalar;
  auto m = llama_model::load(**file, mo);
  if (!m.ok()) return fail(m.error().to_string());
  cache_options co = (*m)->kv_options(o.kv, o.kv_dtype, o.sparf > 0.0);
  if (o.sparf > 0.0) {
    sparf_params sp = sparf_params::with_compression(o.sparf);
    sp.channel_share = o.sparf_share;
    (*m)->set_sparse_attention(sp);
  }
  co.page_bytes = o.page_bytes;
  co.int8_query_dot = o.int8_dot;
  auto cache = kv_cache::create(co);
  if (!cache.ok()) {
    const std::string msg = cache.error().to_string();
    const std::string avail = describe_backends();
    return fail("KV cache on '" + o.kv + "': " + msg +
                (msg.find(avail) == std::string::npos ? " (built: " + avail + ")" : ""));
  }
  const auto& hp = (*m)->hparams();
  std::fprintf(stderr, "[model] %s: %u layers, %u heads (%u kv), head %u, vocab %u, %s output | kv %s %s, page %u B",
               o.model.c_str(), hp.n_layers, hp.n_head, hp.n_kv_head, hp.head_dim, hp.n_vocab,
               hp.tied_output ? "tied" : "separate", o.kv.c_str(), std::string(dtype_name(o.kv_dtype)).c_str(),
               (*cache)->page().page_bytes);
  if (o.sparf > 0.0)
    std::fprintf(stderr, " | SparF decode attention, compression %g, channel share %g", o.sparf, o.sparf_share);
  std::fprintf(stderr, "\n");
  if (!o.perplexity.empty()) return run_perplexity(o, **tok, **m, **cache);
  return o.batch ? run_batch(o, **tok, **m, **cache) : run_single(o, **tok, **m, **cache);
}
