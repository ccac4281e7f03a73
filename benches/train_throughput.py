#!/usr/bin/env python3
"""Training-throughput benchmark helpers: PyTorch/PEFT reference, trace generation, report.

Subcommands (driven by train_throughput.sh):
  matmul                       f32 matmul GFLOP/s (peak reference)      -> JSON on stdout
  torch-train                  LoRA SFT steps with transformers + peft  -> JSON on stdout
  make-traces OUT.jsonl        trace records of ~500-512 tokens each
  report RESULTS_DIR           print the comparison table
"""
import json
import os
import resource
import sys
import time

MODEL_DIR = os.environ.get(
    "BENCH_MODEL_DIR", "/work/main/.cache/models/smollm2-135m-instruct"
)
GGUF_FILE = os.environ.get("BENCH_GGUF_FILE", "SmolLM2-135M-Instruct.Q4_1.gguf")
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
BATCH = 4
SEQ = 512
LORA_R = 16
LORA_ALPHA = 32
LORA_DROPOUT = float(os.environ.get("BENCH_LORA_DROPOUT", "0"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP_STEPS = 1
TIMED_STEPS = int(os.environ.get("BENCH_TIMED_STEPS", "3"))
# Training FLOPs per token: forward (2N) + backward (4N) over N parameters.
N_PARAMS = 134.5e6
FLOPS_PER_TOKEN = 6 * N_PARAMS


def peak_rss_mib():
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cmd_matmul():
    import torch

    torch.set_num_threads(THREADS)
    out = {"threads": torch.get_num_threads()}
    for n in (2048, 4096):
        a = torch.randn(n, n, dtype=torch.float32)
        b = torch.randn(n, n, dtype=torch.float32)
        torch.matmul(a, b)  # warm-up
        reps = 5 if n == 2048 else 2
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        dt = (time.perf_counter() - t0) / reps
        out[f"gflops_{n}"] = 2 * n**3 / dt / 1e9
    print(json.dumps(out))


def cmd_torch_train():
    import torch
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, gguf_file=GGUF_FILE, torch_dtype=torch.float32
    )
    load_s = time.perf_counter() - t_load
    model.config.use_cache = False
    cfg = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4
    )
    g = torch.Generator().manual_seed(1234)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    step_times = []
    losses = []
    for i in range(WARMUP_STEPS + TIMED_STEPS):
        t0 = time.perf_counter()
        losses.append(step())
        step_times.append(time.perf_counter() - t0)
    timed = step_times[WARMUP_STEPS:]
    tok_s = BATCH * SEQ * len(timed) / sum(timed)
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "load_s": load_s,
                "trainable_params": trainable,
                "total_params": total,
                "step_s": step_times,
                "losses": losses,
                "tokens_per_s": tok_s,
                "peak_rss_mib": peak_rss_mib(),
            }
        )
    )


def cmd_make_traces(path, n_samples=16, lo=500, hi=512):
    """Writes trace records whose chat-rendered length is lo..hi tokens.

    Lengths are measured with the model's own tokenizer and chat template (via
    transformers' GGUF loader); distill's per-step token count in metrics.jsonl
    is the ground truth and is reported alongside.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=GGUF_FILE)

    def n_tokens(user, completion):
        msgs = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": completion},
        ]
        text = tok.apply_chat_template(msgs, tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    lines = []
    lengths = []
    for i in range(n_samples):
        user = f"Compute the running total of the numbers from {i + 1} upward, step by step."
        sentences = []
        total = 0
        k = i + 1
        completion = ""
        # Grow the completion one sentence at a time until it reaches lo tokens.
        while len(sentences) < 1000:
            total += k
            sentences.append(f"Adding {k} gives {total}.")
            k += 1
            cand = " ".join(sentences) + f"\n#### {total}"
            n = n_tokens(user, cand)
            if n > hi:
                break
            completion = cand
            if n >= lo:
                break
        lengths.append(n_tokens(user, completion))
        lines.append(
            {
                "id": f"bench{i}",
                "problem_id": f"p{i}",
                "sample_index": 0,
                "messages": [{"role": "user", "content": user}],
                "completion": completion,
                "teacher": {"backend": "openai", "model": "teacher"},
                "sampling": {"temperature": 0.7, "top_p": 1.0, "max_tokens": 1024},
                "created_at": "2025-01-01T00:00:00Z",
            }
        )
    with open(path, "w") as f:
        for rec in lines:
            f.write(json.dumps(rec) + "\n")
    print(json.dumps({"samples": n_samples, "tokens_min": min(lengths), "tokens_max": max(lengths)}))


def _load_json(path):
    try:
        with open(path) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except Exception:
        return None


def _time_v_rss_mib(path):
    try:
        with open(path) as f:
            for line in f:
                if "Maximum resident set size" in line:
                    return int(line.rsplit(":", 1)[1]) / 1024.0
    except OSError:
        pass
    return None


def _distill_metrics(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    try:
        rows = [json.loads(l) for l in open(path) if l.strip()]
    except OSError:
        return None
    if not rows:
        return None
    timed = [r for r in rows if r["step"] > 1] or rows
    # Aggregate: total tokens / total time over the timed steps.
    secs = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    toks = sum(r["tokens"] for r in timed)
    return {
        "steps": [r["step"] for r in rows],
        "tokens_per_step": [r["tokens"] for r in rows],
        "step_s": [round(r["tokens"] / r["tokens_per_s"], 2) for r in rows],
        "losses": [round(r["loss"], 4) for r in rows],
        "tokens_per_s": toks / secs if secs > 0 else None,
    }


def cmd_report(res):
    mm = _load_json(os.path.join(res, "matmul.json"))
    pt = _load_json(os.path.join(res, "torch_train.json"))
    peak = None
    if mm:
        peak = max(mm["gflops_2048"], mm["gflops_4096"])
        print(
            f"torch f32 matmul ({mm['threads']} threads): 2048x2048 {mm['gflops_2048']:.1f} GFLOP/s, "
            f"4096x4096 {mm['gflops_4096']:.1f} GFLOP/s -> peak reference {peak:.1f} GFLOP/s"
        )
    print(f"LoRA r={LORA_R} alpha={LORA_ALPHA} dropout={LORA_DROPOUT} on {len(TARGETS)} projections")
    print(
        f"FLOPs/token = 6 x {N_PARAMS:.4g} = {FLOPS_PER_TOKEN:.4g}; "
        "% peak = tokens/s x FLOPs/token / peak matmul FLOP/s"
    )
    if pt:
        print(
            f"pytorch: torch {pt['torch']}, trainable {pt['trainable_params']}, "
            f"step_s {[round(s, 2) for s in pt['step_s']]}, losses {[round(l, 3) for l in pt['losses']]}"
        )
    rows = []
    if pt:
        rows.append(("pytorch+peft  bs4x512", pt["tokens_per_s"], pt["peak_rss_mib"]))
    else:
        rows.append(("pytorch+peft  bs4x512", None, None))
    for tag, label in (("bs4", "distill  bs4 ga1"), ("bs1", "distill  bs1 ga4")):
        d = os.path.join(res, f"distill_{tag}")
        m = _distill_metrics(d)
        rss = _time_v_rss_mib(os.path.join(res, f"distill_{tag}.time"))
        if m is None and rss is None:
            continue
        if m:
            print(
                f"{label}: steps {m['steps']} tokens/step {m['tokens_per_step']} "
                f"step_s {m['step_s']} losses {m['losses']}"
            )
        rows.append((label, m["tokens_per_s"] if m else None, rss))
    base = rows[0][1]
    print()
    hdr = f"{'trainer':<24}{'tokens/s':>10}{'peak RSS MiB':>14}{'vs PyTorch':>12}{'% matmul peak':>15}"
    print(hdr)
    print("-" * len(hdr))
    for label, tps, rss in rows:
        f = lambda v, fmt: (fmt % v) if v is not None else "n/a"
        ratio = tps / base if (tps and base) else None
        pct = 100 * tps * FLOPS_PER_TOKEN / (peak * 1e9) if (tps and peak) else None
        print(
            f"{label:<24}{f(tps, '%.1f'):>10}{f(rss, '%.0f'):>14}"
            f"{f(ratio, '%.3fx'):>12}{f(pct, '%.1f%%'):>15}"
        )


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd = sys.argv[1]
    if cmd == "matmul":
        cmd_matmul()
    elif cmd == "torch-train":
        cmd_torch_train()
    elif cmd == "make-traces":
        cmd_make_traces(sys.argv[2])
    elif cmd == "report":
        cmd_report(sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
