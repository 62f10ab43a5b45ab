// llama-instinfer-compare: greedy decoding with stock llama.cpp memory and with the instinfer memory
// (LLAMA_INSTINFER=<backend>), in one process, on the same model; reports the first token where they
// diverge, stock's top-2 logit gap there, and the largest |logit difference| before it.
//
//   llama-instinfer-compare -m model.gguf [-p PROMPT | -f FILE] [-n 32] [--kv host] [--type f32]
//                           [-t THREADS] [-b N_BATCH] [--state-to URI] [--fa-reference] [--gap G] [-v]
//
// --fa-reference: also compares stock with flash attention against stock without (how far two
// correct f32 attentions drift apart on this model), --gap G: the top-2 gap below which a divergence
// is a near-tie (default 1e-3)
//
// --state-to URI: halfway through decoding, the instinfer run saves its sequence state
// (llama_state_seq_get_data), continues in a new context on backend URI from the loaded state.
// llama-instinfer-compare --make-f32 IN.gguf OUT.gguf: writes IN with every tensor dequantized to f32.
// Exit status 0 when the tokens are identical (or diverge only where stock's top-2 gap <= 1e-3).

#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

struct run_result {
    std::vector<llama_token>        tokens;
    std::vector<std::vector<float>> logits; // per generated token, the distribution it was chosen from
    double t_prefill = 0.0;
    double t_decode  = 0.0;
    bool   ok        = false;
};

struct options {
    std::string model;
    std::string prompt = "The capital of France is a city that";
    int         n_gen     = 32;
    std::string kv        = "host";
    std::string state_to;
    ggml_type   type      = GGML_TYPE_F32;
    int         n_threads = 2;
    int         n_batch   = 512;
    bool        verbose   = false;
    bool        fa_ref    = false; // also compare stock with flash attention against stock (the noise floor)
    float       max_gap   = 1e-3f; // a divergence counts only where stock's top-2 gap exceeds this
};

static bool g_verbose = false;

static void log_cb(ggml_log_level level, const char * text, void *) {
    if (g_verbose || level >= GGML_LOG_LEVEL_WARN) {
        fputs(text, stderr);
    }
}

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static llama_context * make_ctx(llama_model * model, const options & o, const char * instinfer_uri, int n_ctx, bool flash_attn = false) {
    if (instinfer_uri) {
        setenv("LLAMA_INSTINFER", instinfer_uri, 1);
    } else {
        unsetenv("LLAMA_INSTINFER");
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx           = n_ctx;
    cp.n_batch         = o.n_batch;
    cp.n_ubatch        = o.n_batch;
    cp.n_seq_max       = 1;
    cp.n_threads       = o.n_threads;
    cp.n_threads_batch = o.n_threads;
    cp.type_k          = o.type;
    cp.type_v          = o.type;
    // stock: no flash attention, so f32 attention throughout (the reference run: flash attention)
    cp.flash_attn_type = flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf         = true;
    llama_context * ctx = llama_init_from_model(model, cp);
    unsetenv("LLAMA_INSTINFER");
    return ctx;
}

static bool decode(llama_context * ctx, llama_token * toks, int n, int n_batch) {
    for (int i = 0; i < n; i += n_batch) {
        const int m = std::min(n_batch, n - i);
        if (llama_decode(ctx, llama_batch_get_one(toks + i, m)) != 0) {
            fprintf(stderr, "llama_decode failed at token %d\n", i);
            return false;
        }
    }
    return true;
}

static run_result run(llama_model * model, const options & o, const std::vector<llama_token> & prompt, const char * uri, bool flash_attn = false) {
    run_result r;
    const llama_vocab * vocab   = llama_model_get_vocab(model);
    const int           n_vocab = llama_vocab_n_tokens(vocab);
    const int           n_ctx   = (int) prompt.size() + o.n_gen + 8;

    llama_context * ctx = make_ctx(model, o, uri, n_ctx, flash_attn);
    if (!ctx) {
        fprintf(stderr, "cannot create a context (%s)\n", uri ? uri : "stock");
        return r;
    }

    std::vector<llama_token> toks = prompt;
    double t0 = now_s();
    if (!decode(ctx, toks.data(), (int) toks.size(), o.n_batch)) {
        llama_free(ctx);
        return r;
    }
    r.t_prefill = now_s() - t0;

    t0 = now_s();
    for (int i = 0; i < o.n_gen; ++i) {
        const float * lg = llama_get_logits_ith(ctx, -1);
        r.logits.emplace_back(lg, lg + n_vocab);
        const llama_token tok = (llama_token) (std::max_element(lg, lg + n_vocab) - lg);
        r.tokens.push_back(tok);
        if (i + 1 == o.n_gen) {
            break;
        }
        if (uri && !o.state_to.empty() && i == o.n_gen/2) {
            // move the sequence to another backend through its saved state
            std::vector<uint8_t> state(llama_state_seq_get_size(ctx, 0));
            const size_t n = llama_state_seq_get_data(ctx, state.data(), state.size(), 0);
            llama_free(ctx);
            ctx = make_ctx(model, o, o.state_to.c_str(), n_ctx);
            if (!ctx || n == 0 || llama_state_seq_set_data(ctx, state.data(), n, 0) != n) {
                fprintf(stderr, "moving the state to %s failed\n", o.state_to.c_str());
                if (ctx) {
                    llama_free(ctx);
                }
                return r;
            }
            fprintf(stderr, "state: %zu bytes moved from %s to %s after %d tokens\n", n, uri, o.state_to.c_str(), i + 1);
        }
        llama_token t = tok;
        if (llama_decode(ctx, llama_batch_get_one(&t, 1)) != 0) {
            fprintf(stderr, "llama_decode failed at generated token %d\n", i);
            llama_free(ctx);
            return r;
        }
    }
    r.t_decode = now_s() - t0;
    r.ok       = true;
    llama_free(ctx);
    return r;
}

static std::string piece(const llama_vocab * vocab, llama_token t) {
    char buf[256];
    const int n = llama_token_to_piece(vocab, t, buf, sizeof(buf), 0, true);
    return n > 0 ? std::string(buf, n) : std::string();
}

// first divergence of b from a, stock's top-2 gap there, and the max |logit diff| up to it
struct verdict {
    int   diverge;  // first divergent generated token, -1 if none
    bool  strict;   // identical, or diverging at a near-tie (top-2 gap <= --gap)
};

static verdict compare(const options & o, const llama_vocab * vocab, const run_result & a, const run_result & b, const char * name) {
    int   diverge  = -1;
    float max_diff = 0.0f;
    float gap      = 0.0f;
    for (int i = 0; i < o.n_gen; ++i) {
        float step_diff = 0.0f;
        for (size_t j = 0; j < a.logits[i].size(); ++j) {
            step_diff = std::max(step_diff, std::fabs(a.logits[i][j] - b.logits[i][j]));
        }
        max_diff = std::max(max_diff, step_diff);
        if (o.verbose) {
            printf("  step %d: tokens %d %d, max |logit diff| %.6g\n", i, a.tokens[i], b.tokens[i], step_diff);
        }
        if (a.tokens[i] != b.tokens[i]) {
            diverge = i;
            std::vector<float> s = a.logits[i];
            std::partial_sort(s.begin(), s.begin() + 2, s.end(), std::greater<float>());
            gap = s[0] - s[1];
            break;
        }
    }
    printf("%s:\n", name);
    if (diverge < 0) {
        printf("  tokens: identical (%d of %d)\n", o.n_gen, o.n_gen);
    } else {
        printf("  tokens: first divergence at generated token %d (stock %d '%s', other %d '%s'), stock top-2 gap %.6g\n",
                diverge, a.tokens[diverge], piece(vocab, a.tokens[diverge]).c_str(), b.tokens[diverge],
                piece(vocab, b.tokens[diverge]).c_str(), gap);
    }
    printf("  max |logit diff| (up to the divergence): %.6g\n", max_diff);
    return { diverge, diverge < 0 || gap <= o.max_gap };
}

int main(int argc, char ** argv) {
    // --make-f32 IN OUT: the model with every tensor dequantized to f32 (llama_model_quantize), so
    // that no matmul quantizes its activations and the comparison sees attention's own rounding
    if (argc == 4 && std::string(argv[1]) == "--make-f32") {
        llama_backend_init();
        llama_model_quantize_params qp = llama_model_quantize_default_params();
        qp.ftype                  = LLAMA_FTYPE_ALL_F32;
        qp.allow_requantize       = true;
        qp.quantize_output_tensor = true;
        qp.pure                   = true;
        qp.output_tensor_type     = GGML_TYPE_F32;
        qp.token_embedding_type   = GGML_TYPE_F32;
        const uint32_t rc = llama_model_quantize(argv[2], argv[3], &qp);
        llama_backend_free();
        return rc == 0 ? 0 : 1;
    }
    options o;
    for (int i = 1; i < argc; ++i) {
        const std::string a    = argv[i];
        auto              next = [&]() -> std::string {
            if (i + 1 >= argc) {
                fprintf(stderr, "%s needs a value\n", a.c_str());
                exit(2);
            }
            return argv[++i];
        };
        if (a == "-m") {
            o.model = next();
        } else if (a == "-p") {
            o.prompt = next();
        } else if (a == "-f") {
            std::ifstream     f(next());
            std::stringstream ss;
            ss << f.rdbuf();
            o.prompt = ss.str();
        } else if (a == "-n") {
            o.n_gen = std::stoi(next());
        } else if (a == "--kv") {
            o.kv = next();
        } else if (a == "--state-to") {
            o.state_to = next();
        } else if (a == "--type") {
            const std::string t = next();
            o.type = t == "f16" ? GGML_TYPE_F16 : t == "bf16" ? GGML_TYPE_BF16 : GGML_TYPE_F32;
        } else if (a == "-t") {
            o.n_threads = std::stoi(next());
        } else if (a == "-b") {
            o.n_batch = std::stoi(next());
        } else if (a == "--fa-reference") {
            o.fa_ref = true;
        } else if (a == "--gap") {
            o.max_gap = std::stof(next());
        } else if (a == "-v") {
            o.verbose = true;
        } else {
            fprintf(stderr, "unknown argument %s\n", a.c_str());
            return 2;
        }
    }
    if (o.model.empty() || o.n_gen < 1) {
        fprintf(stderr, "usage: %s -m MODEL [-p PROMPT | -f FILE] [-n N] [--kv URI] [--type f32|f16|bf16] [-t N] [-b N] [--state-to URI] [--fa-reference] [--gap G] [-v]\n", argv[0]);
        return 2;
    }
    g_verbose = o.verbose;
    llama_log_set(log_cb, nullptr);
    llama_backend_init();

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers        = 0;
    llama_model * model    = llama_model_load_from_file(o.model.c_str(), mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", o.model.c_str());
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);

    std::vector<llama_token> prompt(o.prompt.size() + 16);
    const int n_prompt = llama_tokenize(vocab, o.prompt.c_str(), (int32_t) o.prompt.size(), prompt.data(), (int32_t) prompt.size(), true, true);
    if (n_prompt <= 0) {
        fprintf(stderr, "tokenization failed\n");
        return 1;
    }
    prompt.resize(n_prompt);

    const run_result a = run(model, o, prompt, nullptr);
    const run_result b = run(model, o, prompt, o.kv.c_str());
    if (!a.ok || !b.ok) {
        return 1;
    }

    std::string text;
    for (llama_token t : a.tokens) {
        text += piece(vocab, t);
    }
    printf("prompt tokens: %d, generated: %d, KV %s, threads %d\n", n_prompt, o.n_gen, ggml_type_name(o.type), o.n_threads);
    printf("stock text: %s\n", text.c_str());

    const std::string name = "instinfer (" + o.kv + (o.state_to.empty() ? "" : " -> " + o.state_to) + ")";
    const verdict v = compare(o, vocab, a, b, name.c_str());
    printf("  prefill: stock %.3f s, instinfer %.3f s (ratio stock/instinfer %.3f)\n", a.t_prefill, b.t_prefill, a.t_prefill/b.t_prefill);
    printf("  decode:  stock %.3f s, instinfer %.3f s (ratio stock/instinfer %.3f)\n", a.t_decode, b.t_decode, a.t_decode/b.t_decode);
    bool pass = v.strict;
    if (o.fa_ref) {
        // with --fa-reference: instinfer passes when it stays with stock at least as long as stock's
        // own flash attention does (both are exact f32-accumulated attention; their rounding differs)
        const run_result c = run(model, o, prompt, nullptr, true);
        if (!c.ok) {
            return 1;
        }
        const verdict r = compare(o, vocab, a, c, "reference: stock with flash attention");
        const bool rel = v.diverge < 0 || (r.diverge >= 0 && v.diverge >= r.diverge);
        printf("verdict: strict %s, against the flash-attention reference %s\n", v.strict ? "PASS" : "FAIL", rel ? "PASS" : "FAIL");
        pass = rel;
    }

    llama_model_free(model);
    llama_backend_free();

    printf("%s\n", pass ? "PASS" : "FAIL");
    return pass ? 0 : 1;
}
