"""llama.cpp batched inference speed through llama-cpp-python's low-level API.

Run by benches/engine_llamacpp.sh (which sets up the venv); see that file for what is measured.

Per sequence count S, one llama.cpp context with n_seq_max = S and a KV cache sized for
S x (longest prompt + max_tokens) is created (so the peak RSS after a row reflects that S),
warmed up with one untimed prefill + decode step, cleared, then timed:
  prefill: all S prompts in one llama_batch (each token tagged with its sequence's seq_id,
           logits only for each prompt's last token), one llama_decode call;
  decode:  max_tokens - 1 steps of one llama_decode over S tokens (one per sequence), argmax of
           each sequence's logits with numpy. The first new token comes from the prefill logits,
           so each sequence gets max_tokens new tokens; EOS is ignored.
prompt tok/s = prompt tokens / prefill time; decode tok/s = S x (max_tokens - 1) / decode time;
TTFT = prefill time (including the argmax of the first tokens).
"""

import argparse
import ctypes
import os
import random
import resource
import sys
import time

import numpy as np

import llama_cpp as L


def api(*names):
    """The first of `names` the installed llama_cpp exports (names moved across 0.3.x releases)."""
    for n in names:
        f = getattr(L, n, None)
        if f is not None:
            return f
    raise AttributeError("llama_cpp exports none of: " + ", ".join(names))


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # ru_maxrss is KiB on Linux


def pad256(n):
    return (n + 255) // 256 * 256


# ---------------------------------------------------------------------------------------------
# Prompts

NAMES = ["Mia", "Noah", "Liam", "Emma", "Olivia", "Lucas", "Ava", "Ethan", "Sofia", "Leo",
         "Chloe", "Mason", "Zoe", "Owen", "Lily", "Jack"]
ITEMS = [("apples", "bags", "bag"), ("pencils", "boxes", "box"), ("stickers", "packs", "pack"),
         ("cookies", "jars", "jar"), ("marbles", "pouches", "pouch"), ("eggs", "cartons", "carton"),
         ("cards", "decks", "deck"), ("beads", "strings", "string")]


def make_prompt(i, rng):
    name = NAMES[i % len(NAMES)]
    item, groups, group = ITEMS[(i // len(NAMES) + i) % len(ITEMS)]
    pron = "She" if name in ("Mia", "Emma", "Olivia", "Ava", "Sofia", "Chloe", "Zoe", "Lily") else "He"
    have, bags, per, give = rng.randint(5, 40), rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 5)
    text = (f"{name} has {have} {item}. {pron} buys {bags} {groups} with {per} {item} in each "
            f"{group} and gives {give} {item} away to a friend. "
            f"How many {item} does {name} have now? Think step by step, then give the final "
            f"answer as a number.")
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------------
# llama.cpp helpers


class Model:
    def __init__(self, path, threads):
        self.threads = threads
        mparams = L.llama_model_default_params()
        load = api("llama_model_load_from_file", "llama_load_model_from_file")
        self.model = load(path.encode(), mparams)
        if not self.model:
            sys.exit(f"failed to load {path}")
        get_vocab = getattr(L, "llama_model_get_vocab", None)
        self.vocab = get_vocab(self.model) if get_vocab else self.model
        n_vocab = api("llama_vocab_n_tokens", "llama_n_vocab")
        self.n_vocab = n_vocab(self.vocab)
        self._eog = api("llama_vocab_is_eog", "llama_token_is_eog")

    def tokenize(self, text):
        b = text.encode()
        buf = (L.llama_token * (len(b) + 16))()
        n = L.llama_tokenize(self.vocab, b, len(b), buf, len(buf), True, True)
        if n < 0:
            sys.exit(f"tokenize failed ({n})")
        return list(buf[:n])

    def detokenize(self, tokens):
        out = b""
        buf = ctypes.create_string_buffer(256)
        for t in tokens:
            n = L.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, False)
            out += buf.raw[:max(n, 0)]
        return out.decode("utf-8", errors="replace")

    def context(self, n_seq, n_ctx_seq, n_batch):
        p = L.llama_context_default_params()
        p.n_ctx = n_seq * n_ctx_seq
        p.n_seq_max = n_seq
        p.n_batch = n_batch
        p.n_ubatch = min(n_batch, 512)
        p.n_threads = self.threads
        p.n_threads_batch = self.threads
        if hasattr(p, "no_perf"):
            p.no_perf = True
        init = api("llama_init_from_model", "llama_new_context_with_model")
        ctx = init(self.model, p)
        if not ctx:
            sys.exit(f"failed to create a context (n_seq_max={n_seq}, n_ctx={p.n_ctx})")
        return ctx

    def free(self):
        api("llama_model_free", "llama_free_model")(self.model)


def kv_clear(ctx):
    if hasattr(L, "llama_memory_clear") and hasattr(L, "llama_get_memory"):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
    else:
        api("llama_kv_self_clear", "llama_kv_cache_clear")(ctx)


def fill(batch, entries):
    """entries: (token, pos, seq_id, want_logits) tuples."""
    for i, (tok, pos, seq, logits) in enumerate(entries):
        batch.token[i] = tok
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = 1 if logits else 0
    batch.n_tokens = len(entries)


def decode(ctx, batch):
    rc = L.llama_decode(ctx, batch)
    if rc != 0:
        sys.exit(f"llama_decode failed ({rc})")


def argmax_at(ctx, i, n_vocab):
    ptr = L.llama_get_logits_ith(ctx, i)
    return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))


def prefill(ctx, batch, prompts, n_vocab):
    """All prompts in one batch; returns the first greedy token of each sequence."""
    entries, last = [], []
    for s, toks in enumerate(prompts):
        for j, t in enumerate(toks):
            entries.append((t, j, s, j == len(toks) - 1))
        last.append(len(entries) - 1)
    fill(batch, entries)
    decode(ctx, batch)
    return [argmax_at(ctx, i, n_vocab) for i in last]


def run_batched(model, prompts, max_tokens):
    """Prefill + greedy decode of len(prompts) sequences together. Returns timings and tokens."""
    n_seq = len(prompts)
    n_prompt = sum(len(p) for p in prompts)
    n_ctx_seq = pad256(max(len(p) for p in prompts) + max_tokens + 1)
    n_batch = max(n_prompt, n_seq)
    ctx = model.context(n_seq, n_ctx_seq, n_batch)
    batch = L.llama_batch_init(n_batch, 0, 1)
    nv = model.n_vocab
    try:
        # warm-up: one prefill and one decode step, untimed
        first = prefill(ctx, batch, prompts, nv)
        fill(batch, [(first[s], len(p), s, True) for s, p in enumerate(prompts)])
        decode(ctx, batch)
        kv_clear(ctx)

        t0 = time.perf_counter()
        cur = prefill(ctx, batch, prompts, nv)
        t_prefill = time.perf_counter() - t0
        out = [[t] for t in cur]
        pos = [len(p) for p in prompts]
        t0 = time.perf_counter()
        for _ in range(max_tokens - 1):
            fill(batch, [(cur[s], pos[s], s, True) for s in range(n_seq)])
            decode(ctx, batch)
            cur = [argmax_at(ctx, s, nv) for s in range(n_seq)]
            for s in range(n_seq):
                out[s].append(cur[s])
                pos[s] += 1
        t_decode = time.perf_counter() - t0
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    return {
        "n_prompt": n_prompt,
        "prompt_tps": n_prompt / t_prefill,
        "decode_tps": n_seq * (max_tokens - 1) / t_decode if max_tokens > 1 else float("nan"),
        "ttft": t_prefill,
        "rss": peak_rss_mb(),
        "tokens": out,
    }


def run_pp(model, tokens, repeats):
    """One prompt of len(tokens) tokens in one llama_decode; median tok/s over `repeats`."""
    n = len(tokens)
    ctx = model.context(1, pad256(n + 1), n)
    batch = L.llama_batch_init(n, 0, 1)
    try:
        entries = [(t, j, 0, j == n - 1) for j, t in enumerate(tokens)]
        times = []
        for r in range(repeats + 1):  # the first run is a warm-up
            kv_clear(ctx)
            fill(batch, entries)
            t0 = time.perf_counter()
            decode(ctx, batch)
            argmax_at(ctx, n - 1, model.n_vocab)
            if r:
                times.append(time.perf_counter() - t0)
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    return n / float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("BENCH_GGUF"))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    ap.add_argument("--seqs", default="1,8,32", help="comma-separated sequence counts")
    ap.add_argument("--pp-tokens", type=int, default=512)
    ap.add_argument("--pp-repeats", type=int, default=3)
    ap.add_argument("--verbose", action="store_true", help="keep llama.cpp's own log")
    args = ap.parse_args()
    if not args.model or not os.path.isfile(args.model):
        sys.exit(f"model not found: {args.model} (pass --model PATH or set BENCH_GGUF)")
    seqs = [int(s) for s in args.seqs.split(",")]
    if args.max_tokens < 2:
        sys.exit("--max-tokens must be at least 2")

    if not args.verbose:
        quiet = L.llama_log_callback(lambda level, text, user_data: None)
        L.llama_log_set(quiet, ctypes.c_void_p())
    L.llama_backend_init()
    model = Model(args.model, args.threads)

    rng = random.Random(0)
    prompts = [model.tokenize(make_prompt(i, rng)) for i in range(max(seqs))]
    lens = [len(p) for p in prompts]

    # a 512-token prompt: prompt texts back to back, cut to length
    text, pp = "", []
    i = 0
    while len(pp) < args.pp_tokens:
        text += make_prompt(i, rng)
        i += 1
        pp = model.tokenize(text)
    pp = pp[:args.pp_tokens]

    rows = {}
    for s in seqs:
        rows[s] = run_batched(model, prompts[:s], args.max_tokens)
    pp_tps = run_pp(model, pp, args.pp_repeats)

    print(f"llama.cpp (llama-cpp-python {L.__version__}), {os.path.basename(args.model)}, "
          f"{args.threads} threads")
    print(f"  prompts {min(lens)}-{max(lens)} tokens (mean {sum(lens) / len(lens):.0f}), "
          f"{args.max_tokens} new tokens per sequence, greedy, EOS ignored")
    print("  seqs | prompt tok/s | decode tok/s | TTFT s | peak RSS MB")
    for s in seqs:
        r = rows[s]
        print(f"  {s:4d} | {r['prompt_tps']:12.1f} | {r['decode_tps']:12.1f} | "
              f"{r['ttft']:6.3f} | {r['rss']:11.0f}")
    print(f"  one {len(pp)}-token prompt: {pp_tps:.1f} tok/s")
    print(f"  (TTFT = prefill of all S prompts in one batch; decode tok/s = S x "
          f"{args.max_tokens - 1} steps / decode time; peak RSS is cumulative, rows run in order)")

    first = rows[seqs[0]]["tokens"][0]
    words = model.detokenize(first).split()
    print(f"  seq 0 text (S={seqs[0]}): {' '.join(words[:16])}{' ...' if len(words) > 16 else ''}")
    if 1 in rows and 8 in rows:
        a, b = rows[1]["tokens"][0], rows[8]["tokens"][0]
        if a == b:
            print(f"  seq 0 greedy tokens identical at S=1 and S=8 ({len(a)} tokens)")
        else:
            k = next(j for j in range(len(a)) if a[j] != b[j])
            print(f"  WARNING: seq 0 greedy tokens differ between S=1 and S=8 from token {k} "
                  f"of {len(a)}")

    model.free()
    L.llama_backend_free()


if __name__ == "__main__":
    main()
