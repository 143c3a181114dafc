"""Load test of ``proxyalign serve`` over loopback: throughput, latency and memory as clients are added.

    .venv/bin/python benchmarks/serve_load.py                  # the real pair, bf16: 1, 4, 16, 32 clients
    .venv/bin/python benchmarks/serve_load.py --tiny           # a quick smoke run on tiny random models

Starts the server as a subprocess (``python -m proxyalign.cli serve``, criterion ``confidence_bet``,
margin 0.2), warms it up, then runs each concurrency level for ``--duration`` seconds: every client
sends streamed chat requests one after another (mixed prompt lengths and ``max_tokens``, temperature 0.7,
a seed each) until the time is up; requests still running then finish and count. Reported per level:
requests/s, output tokens/s (usage from ``stream_options.include_usage``), p50/p95 latency and time to
first token, failed requests, and the server's RSS once it is idle after each level; growth is the last
level's idle RSS against the idle RSS after a warm-up that runs the largest batch once.

Targets (checked on the real pair, reported with --tiny): at 16 clients at least 5x the output tokens/s
of 1 client; RSS growth under 5%; zero failed requests. Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from host import describe_host

REAL_QUESTIONS = [
    "Write a Python function that returns the square of a number.",
    "Explain what a Python list comprehension is, with one example.",
    "Write a function that checks whether a string is a palindrome.",
    "What is the difference between a tuple and a list in Python?",
    "Write a Python function that merges two sorted lists into one sorted list, and explain its running "
    "time. Then show how to test it with pytest, including the case of empty lists and of duplicates.",
    "Implement binary search in Python. The function takes a sorted list and a target and returns the "
    "index of the target or -1. Explain each step, then discuss what happens with duplicate values and "
    "how you would return the first occurrence instead of any occurrence.",
    "Write a class Stack with push, pop, peek and is_empty methods.",
    "Given this code:\n\n    def f(xs):\n        out = []\n        for x in xs:\n            if x % 2 == 0:\n"
    "                out.append(x * x)\n        return out\n\nrewrite it as a list comprehension and explain "
    "why both versions are equivalent. Then write a generator version and say when it is better.",
]
REAL_MAX_TOKENS = (32, 64, 128, 192)
TINY_MAX_TOKENS = (8, 16, 32, 48)
TARGET_SPEEDUP = 5.0  # output tokens/s at 16 clients over 1 client
TARGET_RSS_GROWTH = 0.05


@dataclass
class Outcome:
    ok: bool
    latency: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    error: str = ""


@dataclass
class Level:
    clients: int
    wall_s: float
    outcomes: list[Outcome] = field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        good = [o for o in self.outcomes if o.ok]
        latencies = sorted(o.latency for o in good)
        ttfts = sorted(o.ttft for o in good if o.ttft is not None)
        tokens = sum(o.tokens for o in good)
        return {
            "clients": self.clients,
            "requests": len(good),
            "failed": len(self.outcomes) - len(good),
            "requests_per_s": len(good) / self.wall_s,
            "output_tokens_per_s": tokens / self.wall_s,
            "latency_p50_s": percentile(latencies, 50),
            "latency_p95_s": percentile(latencies, 95),
            "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p95_s": percentile(ttfts, 95),
            "wall_s": self.wall_s,
        }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_questions() -> list[str]:
    rng = random.Random(0)
    return [" ".join(f"w{rng.randrange(4, 58)}" for _ in range(length)) for length in (2, 4, 8, 16, 24, 40)]


def start_server(args: argparse.Namespace, base: str, aligned: str, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "proxyalign.cli", "serve", "--base", base, "--aligned", aligned]
    command += ["--criterion", "confidence_bet", "--param", "margin=0.2", "--dtype", args.dtype]
    command += ["--port", str(port), "--max-rows", str(max(args.clients)), "--log-level", "warning"]
    command += ["--max-waiting", str(4 * max(args.clients))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, env=env)


async def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the server exited with status {process.returncode}")
            try:
                if (await client.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up in time")
            await asyncio.sleep(0.5)


async def one_request(client: httpx.AsyncClient, question: str, max_tokens: int, seed: int) -> Outcome:
    body = {
        "model": "proxyalign",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft, tokens, done = None, 0, False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return Outcome(
                    False, error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                )
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return Outcome(False, error=str(event["error"])[:200])
                if ttft is None and any(c["delta"].get("content") for c in event.get("choices", [])):
                    ttft = time.perf_counter() - started
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return Outcome(False, error=f"{type(exc).__name__}: {exc}")
    if not done:
        return Outcome(False, error="the stream ended without [DONE]")
    return Outcome(True, time.perf_counter() - started, ttft, tokens)


async def idle_rss(url: str, pid: int) -> int:
    """The server's RSS once nothing is decoding (the engine returns freed memory to the OS when idle)."""
    async with httpx.AsyncClient() as client:
        while (await client.get(f"{url}/health")).json()["running"]:
            await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    return rss_bytes(pid)


async def run_level(
    url: str, clients: int, duration: float, questions: list[str], lengths: tuple[int, ...]
) -> Level:
    rng = random.Random(clients)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(600.0)
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        started = time.perf_counter()
        stop_at = started + duration

        async def loop(index: int) -> None:
            while time.perf_counter() < stop_at:
                question, max_tokens = rng.choice(questions), rng.choice(lengths)
                outcomes.append(await one_request(client, question, max_tokens, rng.randrange(2**31)))

        await asyncio.gather(*(loop(i) for i in range(clients)))
        wall = time.perf_counter() - started
    return Level(clients, wall, outcomes)


async def main_async(args: argparse.Namespace) -> int:
    if args.tiny:
        from proxyalign.testing import save_tiny_pair

        workdir = tempfile.mkdtemp(prefix="proxyalign-serve-load-")
        base, aligned = save_tiny_pair(workdir)
        questions, lengths = tiny_questions(), TINY_MAX_TOKENS
    else:
        from proxyalign.testing import real_pair_dirs

        dirs = real_pair_dirs(args.dtype)
        if dirs is None:
            raise SystemExit("the real pair is not cached: run `proxyalign models fetch qwen2.5-coder-pair`")
        base, aligned = str(dirs[0]), str(dirs[1])
        questions, lengths = REAL_QUESTIONS, REAL_MAX_TOKENS
    print(f"host: {describe_host()}", flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(args, base, aligned, port)
    try:
        await wait_healthy(url, process, timeout=600)
        rss_idle = rss_bytes(process.pid)
        print(f"server up (pid {process.pid}, {rss_idle / 2**20:.0f} MiB); warming up", flush=True)
        # One request alone, then one per client of the largest level at once: the allocator's growth up
        # to the largest batch is not a leak, so "before" is measured after it.
        limits = httpx.Limits(max_connections=max(args.clients) + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            warm = [await one_request(client, questions[0], lengths[0], 0)]
            warm += await asyncio.gather(
                *(
                    one_request(client, questions[i % len(questions)], max(lengths), i)
                    for i in range(max(args.clients))
                )
            )
            if not all(w.ok for w in warm):
                raise SystemExit(f"warm-up failed: {next(w.error for w in warm if not w.ok)}")
        rss_before = await idle_rss(url, process.pid)
        levels = []
        rss_levels = []
        for clients in args.clients:
            level = await run_level(url, clients, args.duration, questions, lengths)
            levels.append(level)
            s = level.summary()
            print(
                f"{clients:>3} clients: {s['requests']:>4} requests ({s['failed']} failed), "
                f"{s['requests_per_s']:.2f} req/s, {s['output_tokens_per_s']:.1f} output tok/s, "
                f"latency p50 {s['latency_p50_s']:.2f} s p95 {s['latency_p95_s']:.2f} s, "
                f"TTFT p50 {s['ttft_p50_s']:.3f} s p95 {s['ttft_p95_s']:.3f} s",
                flush=True,
            )
            for outcome in level.outcomes:
                if not outcome.ok:
                    print(f"    failed: {outcome.error}")
            rss_levels.append(await idle_rss(url, process.pid))
            print(f"    server RSS when idle: {rss_levels[-1] / 2**20:.0f} MiB", flush=True)
        rss_after = rss_levels[-1]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    summaries = [level.summary() for level in levels]
    by_clients = {s["clients"]: s for s in summaries}
    growth = (rss_after - rss_before) / rss_before
    failed = sum(int(s["failed"]) for s in summaries)
    print(
        f"server RSS: {rss_idle / 2**20:.0f} MiB idle, {rss_before / 2**20:.0f} MiB after warm-up "
        f"(before the levels), {rss_after / 2**20:.0f} MiB after them ({growth:+.1%})"
    )
    checks = {"zero failed requests": failed == 0, "RSS growth under 5%": growth < TARGET_RSS_GROWTH}
    if 1 in by_clients and 16 in by_clients:
        speedup = by_clients[16]["output_tokens_per_s"] / max(by_clients[1]["output_tokens_per_s"], 1e-9)
        print(f"output tokens/s at 16 clients: {speedup:.1f}x one client's")
        checks[f"16 clients >= {TARGET_SPEEDUP:g}x one client's output tokens/s"] = speedup >= TARGET_SPEEDUP
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        payload = {
            "mode": "tiny" if args.tiny else f"real pair, {args.dtype}",
            "duration_s": args.duration,
            "levels": summaries,
            "rss_idle_bytes": rss_idle,
            "rss_before_bytes": rss_before,
            "rss_after_bytes": rss_after,
            "rss_after_each_level_bytes": rss_levels,
            "checks": checks,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.tiny:
        return 0 if failed == 0 else 1  # tiny models: throughput targets are not meaningful
    return 0 if all(checks.values()) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a quick smoke run")
    parser.add_argument(
        "--clients", default=None, help="comma-separated levels (default 1,4,16,32; tiny: 1,4)"
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds per level (default 60; tiny: 3)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    default_clients = "1,4" if args.tiny else "1,4,16,32"
    args.clients = [int(c) for c in (args.clients or default_clients).split(",")]
    if any(c < 1 for c in args.clients):
        parser.error("--clients must be positive integers")
    args.duration = args.duration if args.duration is not None else (3.0 if args.tiny else 60.0)
    if args.tiny:
        args.dtype = "float32"
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
