#!/usr/bin/env python3
"""Golden data for instinfer-generate's tests, from an implementation independent of the C++ one.

  * tokenizer: Hugging Face `tokenizers` (Rust) configured from the GGUF vocabulary and merges
    with SmolLM2's pre-tokenizer (individual digits + GPT-2 byte-level regex) and its special tokens;
  * forward pass: numpy in float64, weights dequantized by the `gguf` package's own numpy
    dequantizers (gguf.quants), full causal attention recomputed from a plain K/V list.

Usage (development time only; the C++ tests read the files this writes and need no Python):
  python3 -m venv /tmp/gen-venv && /tmp/gen-venv/bin/pip install gguf==0.19.0 numpy tokenizers==0.23.3
  /tmp/gen-venv/bin/python scripts/golden/make_golden.py models/SmolLM2-135M-Instruct.Q4_1.gguf tests/data/model
"""
import sys
import time

import numpy as np
import gguf
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, AddedToken

N_STEPS = 32          # greedy steps per prompt
N_TOP = 8             # reference top-k logits stored per step
N_FIXED = 16          # logits of a fixed, seeded subset of the vocabulary stored per step
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# (chat?, text). Chat prompts are rendered with ChatML and the model's default system prompt.
PROMPTS = [
    (True, "What is the capital of France?"),
    (False, "The three most important parts of a computer are"),
    (True, "Write a short poem about a solid state drive."),
    (False, "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
]

TOKENIZER_CASES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, we've seen you'd do that.",
    "   leading spaces and trailing   ",
    "tabs\tand\t\tnewlines\n\nand\r\nCRLF",
    "multiple     spaces    between   words",
    "Digits: 0 12 345 6789 3.14159 1,000,000 and 2024-11-23",
    "Punctuation!?... (parens) [brackets] {braces} <angle> @#$%^&*_+=~`|\\/;:\"'",
    "Accented: café naïve résumé Zürich São Paulo Ångström façade",
    "CJK: 你好，世界。日本語のテキスト 한국어 텍스트",
    "Emoji: 🙂 👍🏽 👨‍👩‍👧 🇫🇷 ❤️",
    "Mixed: abc123def ümlaut😀x  \u00a0nbsp\u3000ideographic-space",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "",
    " ",
    "\n",
    "a",
]


def chatml(user: str) -> str:
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def field(r, key):
    f = r.fields[key]
    return f.contents()


def build_tokenizer(r):
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    merges = field(r, "tokenizer.ggml.merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(tokens[i], special=True, normalized=False)
                for i in range(len(tokens)) if types[i] == 3]  # 3 = control
    tok.add_special_tokens(specials)
    return tok


class Model:
    def __init__(self, r):
        arch = field(r, "general.architecture")
        assert arch == "llama", arch
        g = lambda k: field(r, f"llama.{k}")
        self.n_layers = int(g("block_count"))
        self.n_embd = int(g("embedding_length"))
        self.n_head = int(g("attention.head_count"))
        self.n_kv = int(g("attention.head_count_kv"))
        self.eps = float(g("attention.layer_norm_rms_epsilon"))
        self.theta = float(g("rope.freq_base"))
        self.hd = self.n_embd // self.n_head
        self.w = {}
        for t in r.tensors:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
            a = np.asarray(a, dtype=np.float64).reshape([int(x) for x in reversed(t.shape)])
            self.w[t.name] = a
        self.out_w = self.w.get("output.weight", self.w["token_embd.weight"])  # tied when absent

    def rmsnorm(self, x, w):
        return x / np.sqrt(np.mean(x * x) + self.eps) * w

    def rope(self, x, pos):  # x: [heads][hd]; GGUF llama = adjacent pairs (q/k were permuted at conversion)
        i = np.arange(self.hd // 2, dtype=np.float64)
        ang = pos * self.theta ** (-2.0 * i / self.hd)
        c, s = np.cos(ang), np.sin(ang)
        x0, x1 = x[:, 0::2], x[:, 1::2]
        y = np.empty_like(x)
        y[:, 0::2] = x0 * c - x1 * s
        y[:, 1::2] = x0 * s + x1 * c
        return y

    def step(self, tok, pos, cache):
        w = self.w
        x = w["token_embd.weight"][tok].copy()
        grp = self.n_head // self.n_kv
        for l in range(self.n_layers):
            p = f"blk.{l}."
            h = self.rmsnorm(x, w[p + "attn_norm.weight"])
            q = (w[p + "attn_q.weight"] @ h).reshape(self.n_head, self.hd)
            k = (w[p + "attn_k.weight"] @ h).reshape(self.n_kv, self.hd)
            v = (w[p + "attn_v.weight"] @ h).reshape(self.n_kv, self.hd)
            q, k = self.rope(q, pos), self.rope(k, pos)
            cache[l][0].append(k)
            cache[l][1].append(v)
            K = np.stack(cache[l][0])  # [t][kv][hd]
            V = np.stack(cache[l][1])
            o = np.empty((self.n_head, self.hd))
            for hh in range(self.n_head):
                kv = hh // grp
                s = K[:, kv, :] @ q[hh] / np.sqrt(self.hd)
                s = np.exp(s - s.max())
                o[hh] = (s / s.sum()) @ V[:, kv, :]
            x = x + w[p + "attn_output.weight"] @ o.reshape(-1)
            h = self.rmsnorm(x, w[p + "ffn_norm.weight"])
            gte = w[p + "ffn_gate.weight"] @ h
            up = w[p + "ffn_up.weight"] @ h
            x = x + w[p + "ffn_down.weight"] @ (gte / (1.0 + np.exp(-gte)) * up)
        h = self.rmsnorm(x, w["output_norm.weight"])
        return self.out_w @ h


def hexs(s: str) -> str:
    return s.encode("utf-8").hex() or "-"


def main():
    path, out_dir = sys.argv[1], sys.argv[2]
    r = gguf.GGUFReader(path)
    tok = build_tokenizer(r)

    with open(f"{out_dir}/tokenizer_golden.txt", "w") as f:
        f.write("# instinfer tokenizer golden data: one case per line: <utf-8 hex or '-'> <n> <ids...>\n")
        f.write("# produced by scripts/golden/make_golden.py (Hugging Face tokenizers, see README.md)\n")
        for s in TOKENIZER_CASES:
            ids = tok.encode(s, add_special_tokens=False).ids
            assert tok.decode(ids, skip_special_tokens=False) == s, s
            f.write(f"{hexs(s)} {len(ids)} {' '.join(map(str, ids))}\n".replace("  ", " "))

    t0 = time.time()
    m = Model(r)
    print(f"loaded + dequantized in {time.time() - t0:.1f}s", file=sys.stderr)
    vocab = m.out_w.shape[0]
    rng = np.random.default_rng(20241123)
    fixed = np.sort(rng.choice(vocab, N_FIXED, replace=False))
    min_gap = np.inf
    with open(f"{out_dir}/greedy_golden.txt", "w") as f:
        f.write("# instinfer greedy golden data, produced by scripts/golden/make_golden.py (see README.md)\n")
        f.write(f"steps {N_STEPS} top {N_TOP} fixed {N_FIXED} {' '.join(map(str, fixed))}\n")
        for chat, text in PROMPTS:
            full = chatml(text) if chat else text
            ids = tok.encode(full, add_special_tokens=False).ids
            f.write(f"prompt {hexs(full)} {len(ids)} {' '.join(map(str, ids))}\n")
            cache = [([], []) for _ in range(m.n_layers)]
            logits = None
            for pos, t in enumerate(ids):
                logits = m.step(t, pos, cache)
            pos = len(ids)
            for step in range(N_STEPS):
                order = np.argsort(-logits, kind="stable")
                nxt = int(order[0])
                min_gap = min(min_gap, logits[order[0]] - logits[order[1]])
                top = " ".join(f"{int(i)}:{logits[i]:.7g}" for i in order[:N_TOP])
                fx = " ".join(f"{logits[i]:.7g}" for i in fixed)
                f.write(f"step {step} {nxt} {top} | {fx}\n")
                logits = m.step(nxt, pos, cache)
                pos += 1
            print(f"prompt done ({len(ids)} tokens) at {time.time() - t0:.1f}s", file=sys.stderr)
    print(f"smallest top-1/top-2 logit gap over all steps: {min_gap:.4g}", file=sys.stderr)


if __name__ == "__main__":
    main()
