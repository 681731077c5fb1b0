"""The engine's scheduling features on a ~1.1 GB Grok-shaped random model, in one process and one
run: prefix caching (time to first token), prefill beside running streams (inter-token latency
while a long prompt is admitted) and prompt-lookup speculative decoding (tokens/s at batch 1).

The model is bench/bench_engine.py's default at vocab 8192 (D=2048, 2 layers, 8 experts of ffn
10928, 16/4 heads x 128) with random 8-bit weights, in the CPU weight format (the default on one
CPU device), with a longer context. Every number is driven through `grok.serving.engine.Engine`.

1. prefix: a prompt of `--prefix` shared tokens and 64 of its own, then a second such prompt with
   other 64 tokens; TTFT of each, with the prefix cache on (the second restores the prefix) and
   off. Target: second / first <= 0.25.
2. stall: 8 streams decode; then a `--long`-token prompt arrives. The streams' inter-token
   latency (ITL) p50/p99/max while it is prefilled, against their median ITL just before it
   came, for several prefill budgets ("whole" prefills the whole prompt before the next decode
   step: what the engine did before budgets; "auto" is serve's default). Target: p99 <= 3x the
   median before.
3. speculate: one greedy stream, `--new` tokens, with prompt lookup off and on. The random model
   has two regimes, each measured: at its stock embedding scale its greedy output is one token
   repeated (every proposal right: a copied span), and at a small scale (0.05) it is varied text
   without repeats (few proposals, mostly wrong). Targets: >= 1.5x on copies, >= 0.95x without.
   Each run also says how many leading tokens equal those without speculation.

    PYTHONPATH=. .venv/bin/python bench/bench_scheduling.py                 # all three, ~10 min
    PYTHONPATH=. .venv/bin/python bench/bench_scheduling.py --sections stall --budgets whole 64
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import bench_engine  # noqa: E402

SECTIONS = ("prefix", "stall", "speculate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--prefix", type=int, default=1536, help="shared prompt tokens (prefix section)")
    p.add_argument("--long", type=int, default=4096, help="the newcomer's prompt tokens (stall section)")
    p.add_argument("--streams", type=int, default=8, help="streams decoding when it comes (stall section)")
    p.add_argument("--budgets", nargs="+", default=["whole", "auto", "512", "128", "32"],
                   help="prefill budgets (tokens per step while streams decode, 'auto', or 'whole': the "
                   "whole prompt first) for the stall section")
    p.add_argument("--new", type=int, default=96, help="tokens generated (speculate section)")
    p.add_argument("--speculate", type=int, nargs="+", default=[2, 4, 8], help="tokens proposed per step")
    p.add_argument("--repeat", type=int, default=3, help="runs of each speculation setting, the best kept")
    p.add_argument("--json", type=Path, help="also write every number to this file")
    return p.parse_args(argv)


def load(scale: float | None, cache_len: int):
    from grok import Grok

    config = bench_engine.make_config(bench_engine.parse_args(["--cache-len", str(cache_len), "--vocab", "8192"]))
    if scale is not None:
        config = config.replace(embedding_multiplier_scale=scale)
    start = time.perf_counter()
    grok = Grok(config, bench_engine.random_weights(config), None, cpu_format=True)
    print(f"model: D={config.emb_size}, {config.num_layers} layers, {config.num_experts} experts, "
          f"vocab {config.vocab_size}, embedding scale {config.embedding_multiplier_scale:.3g} "
          f"(loaded in {time.perf_counter() - start:.0f} s)", flush=True)
    return grok


def engine(grok, max_batch: int, cache_len: int, **scheduling):
    from grok.serving.engine import Engine, Scheduling

    e = Engine(grok, max_batch=max_batch, cache_len=cache_len, scheduling=Scheduling(**scheduling))
    e.warm_up()
    return e


def prompt(rng, n: int, vocab: int) -> list[int]:
    return rng.integers(3, vocab, n).tolist()


def first_token_s(e, request) -> float:
    """Time from submit to the first token; the rest of the request then runs to its end."""
    start = time.perf_counter()
    stream = e.submit(request)
    events = iter(stream)
    next(events)
    ttft = time.perf_counter() - start
    for _ in events:
        pass
    return ttft


def bench_prefix(grok, args, rng) -> dict:
    import jax

    from grok.model import transformer
    from grok.serving.engine import Request
    from grok.serving.prefix_cache import block_hashes, bytes_per_block
    from grok.serving.sampling import SamplingParams

    greedy = SamplingParams(temperature=0)
    vocab = grok.config.vocab_size
    shared = prompt(rng, args.prefix, vocab)
    first, second = shared + prompt(rng, 64, vocab), shared + prompt(rng, 64, vocab)
    out = {}
    for name, budget in (("off", 0), ("on", 256 << 20)):
        e = engine(grok, 1, args.prefix + 256, prefix_cache_bytes=budget)
        ttft = [first_token_s(e, Request(p, 2, greedy)) for p in (first, second)]
        out[name] = {"first_s": ttft[0], "second_s": ttft[1], "ratio": ttft[1] / ttft[0],
                     "hit_tokens": e.stats["prefix_hit_tokens"]}
        print(f"prefix cache {name:3}: TTFT first {ttft[0] * 1e3:7.0f} ms, second {ttft[1] * 1e3:7.0f} ms, "
              f"second/first {ttft[1] / ttft[0]:.3f} ({e.stats['prefix_hit_tokens']} tokens restored)", flush=True)
        if e.prefix_cache is not None:  # the copy alone: what a block table would save
            rows = e.prefix_cache.match(block_hashes(shared, e.prefix_cache.block_size))
            e.executor.restore(0, rows)
            jax.block_until_ready(e._memory)
            start = time.perf_counter()
            e.executor.restore(0, rows)
            jax.block_until_ready(e._memory)
            copy_s = time.perf_counter() - start
            nbytes = len(rows) * bytes_per_block(grok.config, e.prefix_cache.block_size, grok.config.num_kv_heads,
                                                 transformer.cache_dtype())
            out[name].update(copy_s=copy_s, copy_bytes=nbytes)
            print(f"  copying the {len(rows)} blocks into a slot alone: {copy_s * 1e3:.1f} ms for "
                  f"{nbytes / 1e6:.1f} MB ({copy_s / ttft[0]:.2%} of the first TTFT)", flush=True)
        del e
    return out


def bench_stall(grok, args, rng) -> dict:
    from grok.serving.engine import Request
    from grok.serving.sampling import SamplingParams

    greedy = SamplingParams(temperature=0)
    vocab, cache_len = grok.config.vocab_size, args.long + 256
    out = {}
    for budget in args.budgets:
        tokens = {"whole": args.long, "auto": None}[budget] if budget in ("whole", "auto") else int(budget)
        e = engine(grok, args.streams + 1, cache_len, prefill_budget=tokens)
        e.start()
        times = [[] for _ in range(args.streams)]
        streams = [e.submit(Request(prompt(rng, 32, vocab), cache_len, greedy)) for _ in range(args.streams)]

        def consume(stream, seen):
            for event in stream:
                seen.append(time.perf_counter())

        threads = [threading.Thread(target=consume, args=(s, t)) for s, t in zip(streams, times)]
        for t in threads:
            t.start()
        while min(len(t) for t in times) < 4:
            time.sleep(0.01)
        before_start = time.perf_counter()
        while min(len(t) for t in times) < 24:
            time.sleep(0.01)
        arrival = time.perf_counter()
        ttft = first_token_s(e, Request(prompt(rng, args.long, vocab), 1, greedy))
        done = time.perf_counter()
        while min(t[-1] for t in times) <= done:  # every stream's first token after the prefill
            time.sleep(0.01)
        for s in streams:
            s.cancel()
        for t in threads:
            t.join()
        e.stop()
        # Before: gaps inside the quiet window. During: every gap that overlaps the prefill.
        quiet = [b - a for t in times for a, b in zip(t, t[1:]) if before_start <= a and b <= arrival]
        during = [b - a for t in times for a, b in zip(t, t[1:]) if b > arrival and a < done]
        median = float(np.median(quiet))
        p50, p99, worst = (float(np.percentile(during, q)) for q in (50, 99, 100))
        out[budget] = {"median_before_s": median, "p50_s": p50, "p99_s": p99, "max_s": worst,
                       "p99_ratio": p99 / median, "newcomer_ttft_s": ttft}
        print(f"budget {budget:>5}: ITL before {median * 1e3:6.0f} ms; while prefilling p50 {p50 * 1e3:6.0f} "
              f"p99 {p99 * 1e3:6.0f} max {worst * 1e3:6.0f} ms; p99/median {p99 / median:5.2f}; "
              f"newcomer TTFT {ttft:5.1f} s", flush=True)
        del e
        gc.collect()
    return out


def bench_speculate(grok, args, rng, workload: str) -> dict:
    """Tokens/s of one greedy stream with each proposal count, best of `--repeat` runs taken in
    turn (off, 2, 4, ..., off, 2, 4, ...), so a burst of load elsewhere hits every setting alike."""
    from grok.serving.engine import Request
    from grok.serving.sampling import SamplingParams

    greedy = SamplingParams(temperature=0)
    text = prompt(rng, 64, grok.config.vocab_size)
    engines = {n: engine(grok, 1, 1024, speculate=n) for n in [0, *args.speculate]}
    out = {n: {"tokens_s": 0.0} for n in engines}
    for _ in range(args.repeat):
        for n, e in engines.items():
            e.stats.clear()
            start = time.perf_counter()
            result = e.generate([Request(text, args.new, greedy)])[0]
            rate = len(result.token_ids) / (time.perf_counter() - start)
            if rate > out[n]["tokens_s"]:
                out[n].update(tokens_s=rate, tokens=result.token_ids, proposed=e.stats["proposed"],
                              accepted=e.stats["accepted"], steps=e.stats["decode_steps"])
    for n, row in out.items():
        row["same_tokens"] = _same_prefix(row["tokens"], out[0]["tokens"])
        print(f"{workload:>8}, speculate {n}: {row['tokens_s']:6.2f} tokens/s ({row['tokens_s'] / out[0]['tokens_s']:4.2f}x), "
              f"{row['steps']} steps, {row['accepted']}/{row['proposed']} proposals accepted, "
              f"{row['same_tokens']}/{len(row['tokens'])} tokens as without", flush=True)
    for row in out.values():
        del row["tokens"]
    return out


def _same_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two outputs share. A verify step computes N + 1 positions in one
    product, a decode step one; in bf16 a near-tie of the two likeliest tokens can round the
    other way, and the outputs part there (see the README)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv=None) -> None:
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    results = {}
    grok = load(None, args.long + 256)
    if "prefix" in args.sections:
        results["prefix"] = bench_prefix(grok, args, rng)
    if "stall" in args.sections:
        results["stall"] = bench_stall(grok, args, rng)
    if "speculate" in args.sections:
        results["speculate_copies"] = bench_speculate(grok, args, rng, "copies")
        del grok
        gc.collect()
        grok = load(0.05, 1024)
        results["speculate_fresh"] = bench_speculate(grok, args, rng, "fresh")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
