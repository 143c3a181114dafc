"""Grammar-constrained decoding backends side by side on CPU: xgrammar and llguidance (issue #15).

    .venv/bin/python benchmarks/grammar_backends.py            # about a minute on 2 cores
    .venv/bin/python benchmarks/grammar_backends.py --quick    # a smoke run, numbers not stable

Needs both libraries: ``.venv/bin/pip install -e ".[grammar-bench]"``.

Loads only the real pair's tokenizer (q*'s; p shares it) and builds masks at the models' logits width,
151,936 (151,665 real tokens; the GGUF-converted tokenizer names the padding rows ``[PAD<id>]``, which
the engine masks on its own). Each library's tokenizer object is built the documented way from the HF
tokenizer, with both EOS tokens of the chat model (``<|im_end|>``, ``<|endoftext|>``) as stop tokens:

- setup: the library's tokenizer object (vocabulary, token trie) built from the HF tokenizer;
- compile time of four grammars (any JSON value, a nested JSON schema, an OpenAI-style tool call,
  a regex), each compiled fresh (xgrammar's compiler cache off), and the time from the compiled
  grammar to the first filled mask (matcher creation + first mask);
- per-token cost along a real valid output (the document tokenized by the real tokenizer, then EOS):
  filling the next-token bitmask (median / p95 over every step of every pass) and accepting the token;
  the filled mask is checked to allow the token that comes next;
- the same fill for 8 rows at once with each library's batch API (8 matchers in lockstep);
- applying a filled bitmask to float32 logits [1, V] and [8, V] with each library's own function, and
  with a few plain torch ops for reference; every result is checked against the mask;
- rollback of k = 1..4 tokens at every position of the nested-schema document (checked: the mask after
  rollback equals the mask before the tokens were accepted), and fork/deep-copy of a matcher;
- behaviour: what the mask holds when the grammar is complete, how termination is reported, what an
  invalid token does to the matcher, and how an uncompilable schema or regex surfaces;
- whether compiling in one thread lets another Python thread run (the GIL released or not).

Run it on an otherwise idle machine: the load average at the start is printed after the host line.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.metadata
import itertools
import json
import os
import re
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable

# llguidance applies masks with a torch.compile'd function: give it an empty compile cache, so that its
# "first call" figure is what a fresh install pays (set TORCHINDUCTOR_CACHE_DIR to reuse a warm one)
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="grammar-backends-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import numpy as np
import torch
from host import describe_host

VOCAB = 151_936  # the models' logits width (lm_head rows), not the tokenizer's 151,665

ANY_JSON: dict = {}  # any JSON value
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}(-[0-9]{4})?$"},
            },
            "required": ["street", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "address", "tags"],
    "additionalProperties": False,
}
TOOL = {  # an OpenAI-style function definition; the grammar constrains a call of it
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "days", "unit"],
            "additionalProperties": False,
        },
    },
}
TOOL_CALL = {
    "type": "object",
    "properties": {
        "name": {"const": TOOL["function"]["name"]},
        "arguments": TOOL["function"]["parameters"],
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
REGEX = r"\d{3}-\d{4}"

# (label, kind, spec, a valid output)
GRAMMARS = [
    (
        "any JSON",
        "json",
        ANY_JSON,
        json.dumps(
            {
                "id": 40213,
                "title": "Grammar-constrained decoding",
                "ok": True,
                "score": -3.25e-2,
                "items": [{"k": "alpha", "v": [1, 2, 3]}, {"k": "beta", "v": []}],
                "note": None,
                "text": 'café ✓ "quoted"\nsecond line',
            },
            ensure_ascii=False,
        ),
    ),
    (
        "nested schema",
        "json",
        PERSON,
        json.dumps(
            {
                "name": "Ada Lovelace",
                "age": 36,
                "address": {"street": "12 St James's Square", "zip": "02139-4307"},
                "tags": ["mathematician", "writer", "analyst"],
            }
        ),
    ),
    (
        "tool call",
        "json",
        TOOL_CALL,
        json.dumps({"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "unit": "celsius"}}),
    ),
    ("regex", "regex", REGEX, "555-1234"),
]
BAD_SCHEMA = {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}
BAD_REGEX = "a(b"


# ---------------------------------------------------------------------------------------------------
# The two libraries behind one small interface (names as the engine would call them)


class XGrammar:
    name = "xgrammar"

    def __init__(self) -> None:
        import xgrammar

        self.xgr = xgrammar

    def setup(self, tokenizer, stop: list[int]) -> None:
        info = self.xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB, stop_token_ids=stop)
        # cache off so every compile below is a real compile; an engine keeps the cache on
        self.compiler = self.xgr.GrammarCompiler(
            info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False
        )
        self.batcher = self.xgr.BatchGrammarMatcher()

    def compile(self, kind: str, spec):
        if kind == "regex":
            return self.compiler.compile_regex(spec)
        return self.compiler.compile_json_schema(spec)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask: torch.Tensor, row: int = 0) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.batcher.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)

    def rollback(self, matcher, k: int) -> None:
        matcher.rollback(k)

    def fork(self, matcher):
        return matcher.fork()

    def terminated(self, matcher) -> bool:
        return matcher.is_terminated()

    def complete(self, matcher) -> bool:
        return matcher.is_completed()

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)

    def error_state(self, matcher) -> str:
        return "n/a (no error state; accept_token returns False and leaves the state unchanged)"


class LLGuidance:
    name = "llguidance"

    def __init__(self) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance

    def setup(self, tokenizer, stop: list[int]) -> None:
        self.tokenizer = self.llg.hf.from_tokenizer(tokenizer, n_vocab=VOCAB, eos_token=stop)
        self.executor = self.llg.LLExecutor()

    def compile(self, kind: str, spec):
        """llguidance compiles when a matcher is built; rows get deep copies of this first matcher."""
        matcher_cls = self.llg.LLMatcher
        if kind == "regex":
            grammar = matcher_cls.grammar_from_regex(spec)
        else:
            grammar = matcher_cls.grammar_from_json_schema(spec)
        matcher = matcher_cls(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matcher, bitmask: torch.Tensor, row: int = 0) -> None:
        self.llg.torch.fill_next_token_bitmask(matcher, bitmask, row)

    def fill_batch(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.llg.torch.fill_next_token_bitmask_par(
            self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask
        )

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)

    def rollback(self, matcher, k: int) -> None:
        if not matcher.rollback(k):
            raise RuntimeError(matcher.get_error())

    def fork(self, matcher):
        return matcher.deep_copy()

    def terminated(self, matcher) -> bool:
        return matcher.is_stopped()

    def complete(self, matcher) -> bool:
        return matcher.is_accepting()

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.llg.torch.apply_token_bitmask_inplace(logits, bitmask)

    def error_state(self, matcher) -> str:
        return f"is_error()={matcher.is_error()}"


_SHIFTS = torch.arange(32, dtype=torch.int32)


def torch_apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Reference: unpack the bits with plain torch ops and fill the forbidden logits with -inf."""
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS.to(bitmask.device)) & 1
    allowed = bits.reshape(bitmask.shape[0], -1)[:, : logits.shape[-1]].bool()
    logits.masked_fill_(~allowed, float("-inf"))


# ---------------------------------------------------------------------------------------------------
# Helpers


def allocate(rows: int) -> torch.Tensor:
    return torch.full((rows, (VOCAB + 31) // 32), -1, dtype=torch.int32)


def allowed_ids(bitmask: torch.Tensor, row: int = 0) -> np.ndarray:
    bits = np.unpackbits(bitmask[row].numpy().view(np.uint8), bitorder="little")[:VOCAB]
    return np.flatnonzero(bits)


def is_allowed(bitmask: torch.Tensor, token: int, row: int = 0) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def repeat(fn: Callable[[], object], *, min_reps: int, budget_s: float, max_reps: int = 50) -> list[float]:
    """One warm-up call, then at least ``min_reps`` timed calls, more while within ``budget_s``."""
    fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - started < budget_s):
        times.append(timed(fn))
    return times


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def med_p95_us(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e6:.1f} / {pct(values, 95) * 1e6:.1f}"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def first_line(text: str, limit: int = 120) -> str:
    """The first non-empty line, without the ``[hh:mm:ss] /source/file.cc:123: `` prefix of C++ logs."""
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    line = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Measurements


def walk(backend, compiled, tokens: list[int], passes: int) -> tuple[list[float], list[float], float]:
    """Fill + check + accept along ``tokens``; returns per-step fill and accept seconds (after a
    warm-up pass), and the total fill seconds of the first pass (right after compiling: a library that
    builds its automata lazily pays for that there)."""
    fills: list[float] = []
    accepts: list[float] = []
    first = 0.0
    bitmask = allocate(1)
    for index in range(passes + 1):
        matcher = backend.matcher(compiled)
        for step, token in enumerate(tokens):
            t0 = time.perf_counter()
            backend.fill(matcher, bitmask)
            t1 = time.perf_counter()
            ok = backend.accept(matcher, token)
            t2 = time.perf_counter()
            if not is_allowed(bitmask, token) or not ok:
                raise SystemExit(f"{backend.name}: step {step}: token {token} not allowed/accepted")
            if index:
                fills.append(t1 - t0)
                accepts.append(t2 - t1)
            else:
                first += t1 - t0
        if not backend.terminated(matcher):
            raise SystemExit(f"{backend.name}: not terminated after EOS")
    return fills, accepts, first


def walk_batch(backend, compiled, tokens: list[int], passes: int, rows: int = 8) -> list[float]:
    times: list[float] = []
    bitmask = allocate(rows)
    for index in range(passes + 1):
        matchers = [backend.matcher(compiled) for _ in range(rows)]
        for token in tokens[:-1]:  # the last step (EOS) is measured by walk()
            elapsed = timed(lambda matchers=matchers: backend.fill_batch(matchers, bitmask))
            for row, matcher in enumerate(matchers):
                if not is_allowed(bitmask, token, row) or not backend.accept(matcher, token):
                    raise SystemExit(f"{backend.name}: batch row {row}: token {token} not allowed")
            if index:
                times.append(elapsed)
    return times


def rollbacks(backend, compiled, tokens: list[int], passes: int) -> tuple[dict[int, list[float]], list]:
    """Roll back k = 1..4 tokens at every position; checks the restored mask. Also times fork."""
    out: dict[int, list[float]] = {k: [] for k in range(1, 5)}
    forks: list[float] = []
    before, after = allocate(1), allocate(1)
    body = tokens[:-1]  # not across EOS
    for index in range(passes + 1):
        matcher = backend.matcher(compiled)
        for position in range(len(body) - 4):
            backend.fill(matcher, before)
            for k in range(1, 5):
                for token in body[position : position + k]:
                    if not backend.accept(matcher, token):
                        raise SystemExit(f"{backend.name}: rollback walk rejected {token}")
                start = time.perf_counter()
                backend.rollback(matcher, k)
                elapsed = time.perf_counter() - start
                if index:
                    out[k].append(elapsed)
                if index == 0:
                    backend.fill(matcher, after)
                    if not torch.equal(before, after):
                        raise SystemExit(f"{backend.name}: mask differs after rolling back {k}")
            start = time.perf_counter()
            backend.fork(matcher)
            elapsed = time.perf_counter() - start
            if index:
                forks.append(elapsed)
            backend.accept(matcher, body[position])
    return out, forks


def apply_times(apply: Callable, bitmask_row: torch.Tensor, rows: int, reps: int) -> tuple[float, list]:
    """First call (seconds: includes any JIT compile) and steady per-call seconds; checks the result."""
    bitmask = bitmask_row.expand(rows, -1).contiguous()
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, VOCAB, generator=generator)
    first = timed(lambda: apply(logits, bitmask))
    allowed = np.zeros(VOCAB, dtype=bool)
    allowed[allowed_ids(bitmask)] = True
    for row in range(rows):
        if not np.array_equal(torch.isfinite(logits[row]).numpy(), allowed):
            raise SystemExit(f"{apply}: applied mask differs from the bitmask (row {row})")
    base = torch.randn(rows, VOCAB, generator=generator)
    times = []
    for _ in range(reps):
        fresh = base.clone()
        times.append(timed(lambda fresh=fresh: apply(fresh, bitmask)))
    return first, times


def gil_probe(compile_once: Callable[[], object], seconds: float = 1.0) -> tuple[float, float, int, float]:
    """A pure-Python loop in the main thread, alone and then while another thread compiles again and
    again: its longest stall each time (seconds). A compiler that holds the GIL stalls the loop for a
    whole compile; one that releases it only competes for a core. Also returns how many compiles ran
    meanwhile and the median time of one."""

    def spin(until: float) -> float:
        longest, last = 0.0, time.perf_counter()
        while last < until:
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now
        return longest

    one = statistics.median(timed(compile_once) for _ in range(3))
    alone = spin(time.perf_counter() + seconds)
    stop = threading.Event()
    done = [0]

    def work() -> None:
        while not stop.is_set():
            compile_once()
            done[0] += 1

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    time.sleep(0.05)
    started = done[0]
    during = spin(time.perf_counter() + seconds)
    compiles = done[0] - started
    stop.set()
    worker.join()
    return alone, during, compiles, one


def concurrent_compiles(backend, tokenizer, stop: list[int]) -> str:
    """Compile the three JSON grammars from several threads at once (one shared compiler/tokenizer),
    then drive each result along its document: the engine's callers may compile concurrently."""
    jobs = [g for g in GRAMMARS if g[1] == "json"] * 2
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = backend.compile(jobs[index][1], jobs[index][2])
        except BaseException as error:
            errors.append(error)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        return f"failed: {type(errors[0]).__name__}: {first_line(errors[0])}"
    for (_, _, _, text), compiled in zip(jobs, results, strict=True):
        walk(backend, compiled, [*tokenizer.encode(text, add_special_tokens=False), stop[0]], passes=0)
    return f"{len(jobs)} compiles in {len(jobs)} threads at once: all matchers valid"


def compare_masks(backends: list, tokenizer, stop: list[int]) -> dict[str, str]:
    """Steps of each document where the two libraries' masks differ, with a few example tokens (as
    vocabulary entries: byte-level, `Ġ` is a space)."""
    first, second = backends
    added = set(tokenizer.added_tokens_decoder)
    out: dict[str, str] = {}
    for label, kind, spec, text in GRAMMARS:
        tokens = [*tokenizer.encode(text, add_special_tokens=False), stop[0]]
        matchers = [b.matcher(b.compile(kind, spec)) for b in backends]
        masks = [allocate(1), allocate(1)]
        only: list[set] = [set(), set()]
        differ = 0
        for token in tokens:
            for backend, matcher, mask in zip(backends, matchers, masks, strict=True):
                backend.fill(matcher, mask)
            a, b = (set(allowed_ids(m).tolist()) for m in masks)
            if a != b:
                differ += 1
                only[0] |= a - b
                only[1] |= b - a
            for backend, matcher in zip(backends, matchers, strict=True):
                backend.accept(matcher, token)

        def show(ids: set) -> str:
            special = ids & added
            plain = sorted(ids - added)
            sample = ", ".join(f"`{t}`" for t in tokenizer.convert_ids_to_tokens(plain[:6]))
            more = " ..." if len(plain) > 6 else ""
            return f"{len(ids)} ids ({len(special)} added special tokens; others e.g. {sample}{more})"

        text = f"{differ} of {len(tokens)} steps"
        for backend, ids in zip((first, second), only, strict=True):
            if ids:
                text += f"; only {backend.name} allows {show(ids)}"
        out[label] = text
    return out


def behaviour(backend, tokenizer, stop: list[int]) -> dict[str, str]:
    notes: dict[str, str] = {}
    bitmask = allocate(1)
    compiled = backend.compile("regex", REGEX)
    matcher = backend.matcher(compiled)
    for token in tokenizer.encode("555-1234", add_special_tokens=False):
        backend.accept(matcher, token)
    backend.fill(matcher, bitmask)
    ids = allowed_ids(bitmask)
    notes["mask when the grammar is complete"] = (
        f"{len(ids)} token(s) allowed: {ids.tolist()[:4]}; complete={backend.complete(matcher)}, "
        f"terminated={backend.terminated(matcher)}"
    )
    backend.accept(matcher, stop[0])
    try:
        backend.fill(matcher, bitmask)
        after = f"fill returns a mask of {len(allowed_ids(bitmask))} token(s)"
    except Exception as error:
        after = f"fill raises {type(error).__name__}: {first_line(error, 90)}"
    late = backend.accept(matcher, tokenizer.encode("5", add_special_tokens=False)[0])
    notes["after accepting EOS"] = f"terminated={backend.terminated(matcher)}; {after}; accept -> {late}"

    matcher = backend.matcher(compiled)
    bad = tokenizer.encode("x", add_special_tokens=False)[0]
    good = tokenizer.encode("5", add_special_tokens=False)[0]
    rejected = backend.accept(matcher, bad)
    state = backend.error_state(matcher)
    recovers = backend.accept(matcher, good)
    backend.fill(matcher, bitmask)
    notes["invalid token"] = (
        f"accept -> {rejected}; {state}; next valid token accepted -> {recovers}; "
        f"mask then allows {len(allowed_ids(bitmask))} token(s)"
    )
    # inside a JSON string: ids past the real vocabulary (GGUF placeholders named "[PAD<id>]") and the
    # added special tokens ("<|im_start|>", "<tool_call>", ...) are text to a library that takes them as is
    from proxyalign.models import real_vocab_size

    real = real_vocab_size(tokenizer)
    special = set(tokenizer.added_tokens_decoder) - set(stop)
    matcher = backend.matcher(backend.compile("json", ANY_JSON))
    for token in tokenizer.encode('{"a": "x', add_special_tokens=False):
        backend.accept(matcher, token)
    backend.fill(matcher, bitmask)
    ids = allowed_ids(bitmask)
    notes["inside a JSON string"] = (
        f"{len(ids)} allowed, of which {int((ids >= real).sum())} padding ids (>= {real}) and "
        f"{len(special.intersection(ids.tolist()))} of the {len(special)} added special tokens"
    )
    for label, kind, spec in (("uncompilable schema", "json", BAD_SCHEMA), ("bad regex", "regex", BAD_REGEX)):
        notes[label] = native_error(backend, kind, spec)
    return notes


def native_error(backend, kind: str, spec) -> str:
    """How an uncompilable grammar surfaces through the library's own API (not our wrapper)."""
    if isinstance(backend, LLGuidance):
        matcher_cls = backend.llg.LLMatcher
        try:
            grammar = (
                matcher_cls.grammar_from_regex(spec)
                if kind == "regex"
                else matcher_cls.grammar_from_json_schema(spec)
            )
            matcher = matcher_cls(backend.tokenizer, grammar, log_level=0)
        except Exception as error:
            return f"raises {type(error).__name__}: {first_line(error)}"
        message = first_line(matcher.get_error())
        return f"no exception; LLMatcher.is_error()={matcher.is_error()}, get_error(): {message}"
    try:
        backend.compile(kind, spec)
    except Exception as error:
        return f"raises {type(error).__module__}.{type(error).__name__}: {first_line(error)}"
    return "no error"


# ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run")
    parser.add_argument("--passes", type=int, default=None, help="timed passes over each document")
    args = parser.parse_args()
    passes = args.passes or (2 if args.quick else 20)
    min_reps, budget = (2, 0.3) if args.quick else (7, 3.0)
    apply_reps = 20 if args.quick else 300

    print(describe_host())
    load = os.getloadavg()
    versions = ", ".join(f"{p} {version(p)}" for p in ("xgrammar", "llguidance", "transformers"))
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {versions}")
    print()

    from transformers import AutoTokenizer

    from proxyalign.testing import real_pair_dirs

    dirs = real_pair_dirs("bfloat16")
    if dirs is None:
        raise SystemExit("the real pair is not fetched yet: run `proxyalign models fetch qwen2.5-coder-pair`")
    tokenizer = AutoTokenizer.from_pretrained(dirs[1])
    stop = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    documents = {
        label: [*tokenizer.encode(text, add_special_tokens=False), stop[0]] for label, _, _, text in GRAMMARS
    }

    try:
        backends = [XGrammar(), LLGuidance()]
    except ImportError as error:
        raise SystemExit(f"{error}: install both libraries first (pip install xgrammar llguidance)") from None
    setup_s: dict[str, list[float]] = {}
    compile_rows: dict[str, list[str]] = {label: [label] for label, *_ in GRAMMARS}
    token_rows: dict[str, list[str]] = {label: [label, str(len(documents[label]))] for label, *_ in GRAMMARS}
    batch_row, apply_rows, rollback_rows, gil_row = [], [], {k: [f"rollback {k}"] for k in range(1, 5)}, []
    fork_row: list[str] = ["fork / deep copy"]
    notes: dict[str, dict[str, str]] = {}
    person = next(g for g in GRAMMARS if g[0] == "nested schema")

    for backend in backends:
        setup_s[backend.name] = [
            timed(lambda backend=backend: backend.setup(tokenizer, stop)) for _ in range(3)
        ]
        for label, kind, spec, _ in GRAMMARS:
            compile_times = repeat(
                lambda backend=backend, kind=kind, spec=spec: backend.compile(kind, spec),
                min_reps=min_reps,
                budget_s=budget,
            )

            def first_mask(backend=backend, kind=kind, spec=spec) -> float:
                compiled = backend.compile(kind, spec)
                bitmask = allocate(1)
                return timed(lambda: backend.fill(backend.matcher(compiled), bitmask))

            firsts = [first_mask() for _ in range(min_reps)]
            compile_rows[label] += [
                f"{statistics.median(compile_times) * 1e3:.2f}",
                f"{statistics.median(firsts) * 1e3:.2f}",
            ]
            compiled = backend.compile(kind, spec)
            fills, accepts, first = walk(backend, compiled, documents[label], passes)
            later = sum(fills) / passes
            token_rows[label] += [
                med_p95_us(fills),
                f"{statistics.median(accepts) * 1e6:.1f}",
                f"{first * 1e3:.2f} / {later * 1e3:.2f}",
            ]

        compiled = backend.compile(person[1], person[2])
        batch = walk_batch(backend, compiled, documents["nested schema"], max(1, passes // 4))
        batch_row.append(med_p95_us(batch))
        backs, forks = rollbacks(backend, compiled, documents["nested schema"], max(1, passes // 4))
        for k, times in backs.items():
            rollback_rows[k].append(med_p95_us(times))
        fork_row.append(med_p95_us(forks))

        alone, during, compiles, one = gil_probe(lambda b=backend: b.compile(person[1], person[2]))
        gil_row.append(
            f"{alone * 1e3:.2f} ms alone, {during * 1e3:.2f} ms during {compiles} compiles "
            f"of {one * 1e3:.1f} ms each"
        )
        notes[backend.name] = behaviour(backend, tokenizer, stop)
        notes[backend.name]["concurrent compiles"] = concurrent_compiles(backend, tokenizer, stop)

    agreement = compare_masks(backends, tokenizer, stop)

    # two real masks of the nested-schema document: the one allowing most tokens (inside a string) and
    # the one allowing fewest (EOS only, at the end)
    steps = []
    matcher = backends[0].matcher(backends[0].compile(person[1], person[2]))
    for token in documents["nested schema"]:
        steps.append(allocate(1))
        backends[0].fill(matcher, steps[-1])
        backends[0].accept(matcher, token)
    by_count = sorted(steps, key=lambda m: len(allowed_ids(m)))
    masks = [by_count[-1], by_count[0]]
    for label, apply in (
        ("xgrammar `apply_token_bitmask_inplace` (C++ CPU kernel)", backends[0].apply),
        ("llguidance `torch.apply_token_bitmask_inplace` (torch.compile)", backends[1].apply),
        ("plain torch ops (reference, no library)", torch_apply),
    ):
        cells = [label]
        firsts = []
        for rows, mask in itertools.product((1, 8), masks):
            try:
                first, times = apply_times(apply, mask, rows, apply_reps)
            except Exception as error:  # e.g. torch.compile without a C++ compiler
                cells.append(f"failed: {type(error).__name__}")
                continue
            cells.append(med_p95_us(times))
            firsts.append(first)
        cells.append(f"{firsts[0] * 1e3:.1f}" if firsts else "-")
        apply_rows.append(cells)

    names = [b.name for b in backends]
    print(
        "Setup (tokenizer info, vocabulary 151,936), median of 3: "
        + ", ".join(f"{n} {statistics.median(setup_s[n]) * 1e3:.0f} ms" for n in names)
    )
    print()
    print("Compile (fresh each time) and compiled grammar -> first mask, median, ms")
    print()
    header = ["grammar"] + [f"{n} {what}" for n in names for what in ("compile", "first mask")]
    print(table(header, list(compile_rows.values())))
    print()
    print(
        f"Per token along a valid output (+EOS), {passes} passes after a first one: fill bitmask "
        "median / p95 µs, accept median µs; all fills of the document, first pass / later passes, ms"
    )
    print()
    header = ["grammar", "tokens"] + [
        f"{n} {what}" for n in names for what in ("fill", "accept", "document fills")
    ]
    print(table(header, list(token_rows.values())))
    print()
    print("8 rows in lockstep (nested schema), one batch fill per step: median / p95 µs")
    print()
    print(table(["", *names], [["batch fill, 8 rows", *batch_row]]))
    print()
    print(f"Apply a filled bitmask to float32 logits in place: median / p95 µs over {apply_reps} calls")
    print()
    counts = [len(allowed_ids(m)) for m in masks]
    header = [
        "function",
        *(f"[{rows}, 151936], {n} allowed" for rows in (1, 8) for n in counts),
        "first call ms",
    ]
    print(table(header, apply_rows))
    print()
    print(
        "Rollback of k accepted tokens / fork, at every position of the nested-schema document: "
        "median / p95 µs"
    )
    print()
    print(table(["", *names], [*rollback_rows.values(), fork_row]))
    print()
    print(
        "Longest stall of a pure-Python loop in the main thread, alone and while another thread compiles "
        "the nested schema again and again (a compile that held the GIL would stall it for a whole compile)"
    )
    print()
    print(table(["", *names], [["main thread's longest stall", *gil_row]]))
    print()
    print("Behaviour")
    print()
    keys = list(notes[names[0]])
    print(table(["", *names], [[key, *(notes[n][key] for n in names)] for key in keys]))

    print()
    print("Where the two masks differ along each document")
    print()
    print(table(["grammar", "steps whose masks differ"], [[k, v] for k, v in agreement.items()]))
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
