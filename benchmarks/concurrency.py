"""Many callers at once: calls one after another vs one static batch vs the engine's running batch.

    .venv/bin/python benchmarks/concurrency.py                  # the real pair, bf16 (about 25 minutes)
    .venv/bin/python benchmarks/concurrency.py --tiny           # a quick look on tiny random models

Sixteen requests (GSM8K questions; p: plain few-shot prompt, q*: its chat template; ``confidence_bet``,
temperature 0.7), each with its own seed and its own ``max_new_tokens`` drawn from 64-256 (EOS ignored,
so every configuration does the same work). Two arrival patterns: all at once, and staggered (Poisson,
mean gap ``--gap`` seconds). Three ways to serve them, measured side by side in one run:

- (a) **one after another**: each call waits for the previous one (the engine before continuous
      batching: one lock around every call);
- (b) **one static batch**: every prompt in one ``generate`` call, started when the last has arrived;
- (c) **concurrent calls on the engine**: one thread per request, each calling ``stream`` when its
      request arrives; all share the running batch.

Reported: throughput (new tokens / makespan), latency p50/p95 (arrival to last token) and time to first
token p50/p95. For (c) with staggered arrivals, each request's first-token time is compared with its own
prefill (measured alone) plus two decoding steps of the busy batch. Then the step cost of eight
*identical* prompts against one (best-of-n, the server's ``n``). Prints the CPU model and flags first.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from dataclasses import dataclass

from host import describe_host

from proxyalign.aligner import ProxyAligner
from proxyalign.engine.request import derive_seed

CRITERION = "confidence_bet"


@dataclass
class Timing:
    arrival: float
    first: float | None = None
    done: float | None = None
    tokens: int = 0

    @property
    def latency(self) -> float:
        assert self.done is not None
        return self.done - self.arrival

    @property
    def ttft(self) -> float:
        assert self.first is not None
        return self.first - self.arrival


@dataclass
class Workload:
    prompts: list
    lengths: list[int]
    seeds: list[int]
    arrivals: list[float]  #: seconds after the start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def options(work: Workload, i: int, temperature: float) -> dict:
    return {
        "max_new_tokens": work.lengths[i],
        "seed": work.seeds[i],
        "temperature": temperature,
        "criterion": CRITERION,
    }


def stream_one(aligner: ProxyAligner, prompt, opts: dict, timing: Timing, start: float) -> None:
    for chunk in aligner.stream(prompt, **opts):
        now = time.perf_counter() - start
        if chunk.token_ids and timing.first is None:
            timing.first = now
        if chunk.generation is not None:
            timing.done, timing.tokens = now, chunk.generation.stats.new_tokens


def wait_until(start: float, moment: float) -> None:
    delay = start + moment - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def sequential(aligner: ProxyAligner, work: Workload, temperature: float) -> list[Timing]:
    """(a): a single server thread takes the requests in arrival order, one at a time."""
    start = time.perf_counter()
    timings = [Timing(a) for a in work.arrivals]
    for i, prompt in enumerate(work.prompts):
        wait_until(start, work.arrivals[i])
        stream_one(aligner, prompt, options(work, i, temperature), timings[i], start)
    return timings


def static_batch(aligner: ProxyAligner, work: Workload, temperature: float) -> list[Timing]:
    """(b): one batch, started when the last request has arrived; per-prompt lengths and seeds."""
    start = time.perf_counter()
    timings = [Timing(a) for a in work.arrivals]
    wait_until(start, max(work.arrivals))
    calls = [(p, options(work, i, temperature)) for i, p in enumerate(work.prompts)]
    # Every prompt is submitted at once and nothing else runs: the engine decodes them as one batch.
    channel_start = time.perf_counter() - start
    for i, generation in aligner.as_completed(calls, in_flight=len(calls)):
        timings[i].done = time.perf_counter() - start
        timings[i].first = channel_start + (generation.stats.first_token_s or 0.0)
        timings[i].tokens = generation.stats.new_tokens
    return timings


def concurrent(aligner: ProxyAligner, work: Workload, temperature: float) -> list[Timing]:
    """(c): one thread per request, calling ``stream`` at its arrival time."""
    start = time.perf_counter()
    timings = [Timing(a) for a in work.arrivals]

    def client(i: int) -> None:
        wait_until(start, work.arrivals[i])
        stream_one(aligner, work.prompts[i], options(work, i, temperature), timings[i], start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(work.prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return timings


def report(label: str, timings: list[Timing]) -> dict:
    tokens = sum(t.tokens for t in timings)
    makespan = max(t.done for t in timings) - min(t.arrival for t in timings)  # type: ignore[type-var]
    latency = [t.latency for t in timings]
    ttft = [t.ttft for t in timings]
    row = {
        "label": label,
        "throughput": tokens / makespan,
        "tokens": tokens,
        "makespan": makespan,
        "p50": percentile(latency, 0.5),
        "p95": percentile(latency, 0.95),
        "ttft50": percentile(ttft, 0.5),
        "ttft95": percentile(ttft, 0.95),
    }
    print(
        f"| {label} | {row['throughput']:.2f} | {makespan:.1f} | {row['p50']:.1f} / {row['p95']:.1f} "
        f"| {row['ttft50']:.2f} / {row['ttft95']:.2f} |",
        flush=True,
    )
    return row


def prefill_alone(aligner: ProxyAligner, prompt, temperature: float) -> float:
    """Seconds from submission to the first token with nothing else running (prefill + one step)."""
    generation = aligner.generate(prompt, max_new_tokens=1, temperature=temperature, criterion=CRITERION)[0]
    return generation.stats.first_token_s or 0.0


def step_time(aligner: ProxyAligner, prompts: list, tokens: int) -> float:
    """Seconds per decoding step after the first token (prefill excluded), greedy, EOS ignored."""
    gens = aligner.generate(prompts, max_new_tokens=tokens, temperature=0, criterion=CRITERION)
    g = max(gens, key=lambda g: g.stats.elapsed_s)
    return (g.stats.elapsed_s - (g.stats.first_token_s or 0.0)) / max(g.stats.new_tokens - 1, 1)


def ttft_under_load(aligner: ProxyAligner, busy: list, newcomers: list, temperature: float) -> list[float]:
    """First-token time of single requests arriving, one at a time, while eight others decode: each
    divided by its own prefill alone plus two decoding steps of the busy batch (<= 1 meets the target)."""
    own = [prefill_alone(aligner, prompt, temperature) for prompt in newcomers]
    streams = [aligner.stream(p, max_new_tokens=4096 - 1024, temperature=temperature) for p in busy]
    stop = threading.Event()
    ticks: list[list[float]] = [[] for _ in busy]  # when each busy row got a token: one per step

    def drain(stream, row: int) -> None:
        for _ in stream:
            ticks[row].append(time.perf_counter())
            if stop.is_set():
                stream.close()
                return

    threads = [threading.Thread(target=drain, args=(s, i)) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    while aligner.status()["decoding"] < len(busy):
        time.sleep(0.05)
    time.sleep(3)
    recent = [b - a for row in ticks for a, b in zip(row[-6:], row[-5:], strict=False)]
    busy_step = sorted(recent)[len(recent) // 2]  # the busy batch's step, measured as it runs
    print(f"  busy batch of {len(busy)}: {busy_step:.2f}s per step", flush=True)
    rng = random.Random(1)
    ratios = []
    for prompt, alone in zip(newcomers, own, strict=True):
        time.sleep(rng.uniform(0, 2 * busy_step))  # arrive at a random moment of a step
        timing = Timing(0.0)
        start = time.perf_counter()
        stream_one(aligner, prompt, {"max_new_tokens": 1, "temperature": temperature}, timing, start)
        ratios.append(timing.ttft / (alone + 2 * busy_step))
        print(
            f"  newcomer: first token {timing.ttft:.2f}s; alone {alone:.2f}s + 2 busy steps "
            f"{2 * busy_step:.2f}s -> ratio {ratios[-1]:.2f}",
            flush=True,
        )
    stop.set()
    for t in threads:
        t.join()
    return ratios


def load(args: argparse.Namespace) -> tuple[ProxyAligner, list]:
    if args.tiny:
        from proxyalign.testing import tiny_aligner

        aligner = tiny_aligner("confidence_bet")
        for model in aligner.models.values():
            model.config.max_position_embeddings = 4096
        questions = [" ".join(f"w{4 + (i * 7 + k) % 50}" for k in range(3 + i % 9)) for i in range(64)]
        return aligner, questions
    from proxyalign.eval.data import load_gsm8k
    from proxyalign.eval.prompts import method_prompt
    from proxyalign.testing import real_pair_dirs

    dirs = real_pair_dirs("bfloat16")
    if dirs is None:
        raise SystemExit("the real pair is not fetched yet: run `proxyalign models fetch qwen2.5-coder-pair`")
    aligner = ProxyAligner.from_pretrained(*dirs, dtype="bfloat16", device="cpu")
    problems = load_gsm8k(limit=args.requests, shots=args.shots, progress=False)
    styles = {"base": "fewshot", "aligned": "chat-cot"}
    return aligner, [method_prompt(p, styles, ("base", "aligned"))[0] for p in problems]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--min-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--gap", type=float, default=4.0, help="mean seconds between staggered arrivals")
    parser.add_argument("--shots", type=int, default=1, help="few-shot examples in p's prompt")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny random models (a smoke run)")
    parser.add_argument("--only-ttft", action="store_true", help="only the first-token check under load")
    parser.add_argument(
        "--sequential",
        default="together",
        choices=("together", "both", "none"),
        help="arrival patterns to serve one after another too: (a) is the slowest by far, and with "
        "service times of minutes it hardly depends on arrivals (default: together only)",
    )
    args = parser.parse_args()
    if args.tiny:
        args.gap = min(args.gap, 0.02)
    print(f"host: {describe_host()}", flush=True)
    aligner, questions = load(args)
    rng = random.Random(args.seed)
    n = args.requests
    lengths = [rng.randint(args.min_tokens, args.max_tokens) for _ in range(n)]
    seeds = [derive_seed(args.seed, i) for i in range(n)]
    together = Workload(questions[:n], lengths, seeds, [0.0] * n)
    gaps = [rng.expovariate(1 / args.gap) for _ in range(n)]
    staggered = Workload(questions[:n], lengths, seeds, [sum(gaps[:i]) for i in range(n)])
    aligner.eos_token_ids = frozenset()  # every configuration does exactly the same work
    aligner.engine.eos_ids = frozenset()
    aligner.generate(questions[0], max_new_tokens=4, criterion=CRITERION)  # warm up

    results = {}
    if args.only_ttft:
        ratios = ttft_under_load(aligner, questions[:8], questions[8:13], args.temperature)
        print(f"worst ratio {max(ratios):.2f} (<= 1 meets the target)", flush=True)
        aligner.close()
        return
    for name, work in (("together", together), ("staggered", staggered)):
        print(f"\n{name}: {n} requests, {sum(lengths)} new tokens in all", flush=True)
        print("| serving | tokens/s | makespan s | latency p50 / p95 s | first token p50 / p95 s |")
        print("|---|---|---|---|---|")
        rows = {}
        if args.sequential == "both" or args.sequential == name:
            rows["a"] = report("(a) one after another", sequential(aligner, work, args.temperature))
        rows["b"] = report("(b) one static batch", static_batch(aligner, work, args.temperature))
        timings = concurrent(aligner, work, args.temperature)
        rows["c"] = report("(c) concurrent calls, one running batch", timings)
        if "a" in rows:
            print(
                f"(c) / (a) throughput: {rows['c']['throughput'] / rows['a']['throughput']:.2f}x", flush=True
            )
        print(f"(c) / (b) throughput: {rows['c']['throughput'] / rows['b']['throughput']:.2f}x", flush=True)
        results[name] = (rows, timings)

    # First token of a request arriving while the batch is busy: its own prefill plus two steps?
    print("\none request at a time arriving while 8 others decode:", flush=True)
    ratios = ttft_under_load(aligner, questions[:8], questions[8:13], args.temperature)
    print(f"worst ratio {max(ratios):.2f} (<= 1 meets the target)", flush=True)
    _, timings = results["staggered"]
    busy_step = step_time(aligner, questions[:8], 16)
    worst = 0.0
    for i, t in enumerate(timings[1:], start=1):
        own = prefill_alone(aligner, staggered.prompts[i], args.temperature)
        worst = max(worst, t.ttft / (own + 2 * busy_step))
    print(
        f"staggered arrivals (newcomers also queue behind each other's prefill): first token / (own "
        f"prefill + 2 steps at {busy_step:.2f}s): worst ratio {worst:.2f}",
        flush=True,
    )

    # Eight identical prompts (best-of-n): the step must cost at most 1.5x a batch-1 step.
    one = step_time(aligner, [questions[0]], 24)
    eight = step_time(aligner, [questions[0]] * 8, 24)
    print(f"identical prompts: step {one * 1000:.0f} ms at batch 1, {eight * 1000:.0f} ms at batch 8 "
          f"({eight / one:.2f}x; target <= 1.5x)", flush=True)  # fmt: skip
    aligner.close()


if __name__ == "__main__":
    main()
