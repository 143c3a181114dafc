"""The engine: one running batch that requests join and leave between decoding steps.

Every front end (``generate``/``stream`` from any thread, the async methods, the adapters, the
evaluation harness, the HTTP server) submits :class:`~proxyalign.engine.request.Request` objects here
and reads their chunks from a :class:`Channel`; nothing else touches models or caches. One background
thread runs :meth:`Engine.step` while there is work and exits when there is none:

1. take new requests and aborts (an aborted row leaves within one step, freeing its cache);
2. admit waiting requests while the batch has room (:mod:`proxyalign.engine.scheduler`);
3. prefill one chunk of newcomers' prompts; those done join their lane's caches;
4. advance every lane by one step and hand each row's tokens to its request.

A criterion that fails fails its own requests; an error in a forward pass fails the requests of that
lane; the engine itself keeps serving.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import queue
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from proxyalign.engine.auto import AutoLane, AutoPolicy, CostPolicy
from proxyalign.engine.constraint import RowConstraint
from proxyalign.engine.costs import ForwardCosts
from proxyalign.engine.gamma import AUTO_GAMMAS
from proxyalign.engine.lanes import Lane, LaneRow, TokenLane
from proxyalign.engine.memory import release_free_memory
from proxyalign.engine.output import RowOutput
from proxyalign.engine.request import LaneKey, Request
from proxyalign.engine.results import GenerationChunk, Source
from proxyalign.engine.scheduler import PrefillJob, SchedulerConfig, reserved_tokens
from proxyalign.engine.speculative import SpeculativeLane
from proxyalign.errors import EngineClosedError, InvalidParameterError

__all__ = ["Channel", "Engine", "Ticket", "make_lane"]


def make_lane(
    key: LaneKey,
    models: Mapping[str, Any],
    vocab_size: int,
    pad_id: int,
    windows: Mapping[str, int | None],
    policy: AutoPolicy | None = None,
) -> Lane:
    """An empty lane for ``key``'s kind over its models (``policy``: an auto lane's chooser)."""
    kind, roles = key
    window = min((w for role in roles if (w := windows.get(role))), default=None)
    if kind == "auto":
        if policy is None:
            policy = CostPolicy(ForwardCosts({role: models[role] for role in roles}))
        return AutoLane(key, dict(models), vocab_size, pad_id, window, policy)
    lane_class = TokenLane if kind == "token" else SpeculativeLane
    return lane_class(key, dict(models), vocab_size, pad_id, window)


class Channel:
    """Where the engine posts one call's events: ``(index, GenerationChunk)`` or ``(index, exception)``.

    Thread-safe and never blocking for the engine; read with :meth:`get` from any thread, or with
    :meth:`aget` from the event loop the channel was made in.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._sync: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._async: asyncio.Queue[tuple[int, Any]] | None = asyncio.Queue() if loop is not None else None

    def put(self, item: tuple[int, Any]) -> None:
        if self._loop is None:
            self._sync.put(item)
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._async.put_nowait, item)  # type: ignore[union-attr]

    def get(self, timeout: float | None = None) -> tuple[int, Any]:
        return self._sync.get(timeout=timeout)

    def get_nowait(self) -> tuple[int, Any] | None:
        try:
            return self._sync.get_nowait()
        except queue.Empty:
            return None

    async def aget(self) -> tuple[int, Any]:
        assert self._async is not None, "this channel was made without an event loop"
        return await self._async.get()


@dataclass(eq=False)
class Ticket:
    """A submitted request inside the engine."""

    request: Request
    channel: Channel
    output: RowOutput
    reserve: int
    submitted: float = field(default_factory=time.perf_counter)
    state: str = "waiting"  #: waiting -> prefilling -> running -> done
    aborted: bool = False
    lane: Lane | None = None
    admitted: float | None = None

    @property
    def finished(self) -> bool:
        return self.state == "done"


_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _close_engines() -> None:
    """At interpreter exit, stop every engine thread between two steps rather than killing it inside a
    torch operation (which aborts the process with "terminate called without an active exception")."""
    for engine in list(_ENGINES):
        engine.close(timeout=10.0)


class Engine:
    """Continuous batching over the models of one :class:`~proxyalign.ProxyAligner`."""

    def __init__(
        self,
        models: Mapping[str, Any],
        tokenizer: Any,
        *,
        vocab_size: int,
        eos_ids: frozenset[int],
        pad_id: int,
        windows: Mapping[str, int | None],
        config: SchedulerConfig | None = None,
        auto_run: bool = True,
    ) -> None:
        self.models = dict(models)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.windows = dict(windows)
        self.config = config or SchedulerConfig()
        self.auto_run = auto_run
        self._lock = threading.Lock()
        self._incoming: list[Ticket] = []
        self._aborts: set[Ticket] = set()
        self._waiting: deque[Ticket] = deque()
        self._jobs: deque[PrefillJob] = deque()
        self._lanes: dict[LaneKey, Lane] = {}
        self._reserved = 0
        self._thread: threading.Thread | None = None
        #: every engine thread that may still be running: one that has handed over (``_thread`` is None
        #: again) still frees memory before it ends, and ``close`` must wait for it too (a daemon thread
        #: inside native code at interpreter exit aborts the process)
        self._threads: list[threading.Thread] = []
        self._closed = False
        #: forward costs of this pair on this host (mode="auto"), measured once and kept
        self.costs = ForwardCosts(self.models)
        #: mode="auto"'s chooser per lane key; kept while lanes come and go, so what it learnt stays
        self.policies: dict[LaneKey, AutoPolicy] = {}
        self._totals: Counter[str] = Counter(decoded_tokens=0)  # the key exists before status() copies it
        self._snapshot: dict[str, Any] = {}
        self._publish()
        _ENGINES.add(self)

    # -- the callers' side (any thread) --------------------------------------------------------------
    def submit(self, requests: Sequence[Request], channel: Channel) -> list[Ticket]:
        """Queue requests; they join the running batch at the next step. All or none are accepted."""
        tickets = []
        for request in requests:
            reserve = reserved_tokens(request)
            if reserve > self.config.max_cached_tokens:
                raise InvalidParameterError(
                    f"prompt {request.index} needs {reserve} cached tokens per model (prompt "
                    f"{request.longest_prompt} + max_new_tokens {request.max_new_tokens}"
                    f"{' + one speculative round' if request.speculative else ''}), more than the "
                    f"engine's max_cached_tokens={self.config.max_cached_tokens}: it could never run; "
                    "shorten it or raise max_cached_tokens"
                )
            tickets.append(
                Ticket(request, channel, RowOutput(request, self.tokenizer, self.eos_ids), reserve)
            )
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            self._incoming.extend(tickets)
            self._totals["requests"] += len(tickets)
            if self.auto_run and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="proxyalign-engine", daemon=True)
                self._threads = [*(t for t in self._threads if t.is_alive()), self._thread]
                self._thread.start()
        return tickets

    def abort(self, tickets: Sequence[Ticket]) -> None:
        """Stop these requests: they leave the batch at the next step and post nothing more."""
        with self._lock:
            for ticket in tickets:
                if not ticket.finished and not ticket.aborted:
                    ticket.aborted = True
                    self._aborts.add(ticket)

    def status(self) -> dict[str, Any]:
        """``{"running": n, "waiting": m, ...}``: rows in the batch (decoding or prefilling), requests
        queued behind it, the lanes' sizes, reserved cache tokens and running totals."""
        with self._lock:
            snapshot = dict(self._snapshot)
            snapshot["waiting"] += len(self._incoming)
            snapshot["totals"] = dict(self._totals)
            return snapshot

    @property
    def in_engine_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def calibrate_auto(self, max_rows: int) -> float:
        """Measure now every forward cost ``mode="auto"`` may need up to ``max_rows`` rows (its longest
        round verifies ``max(AUTO_GAMMAS) + 1`` positions), so no request waits for it; returns the
        seconds spent. Meant for start-up (a server before it accepts requests): measured while the
        batch runs, the timings would include the batch's own forwards."""
        return self.costs.calibrate(max_rows, max(AUTO_GAMMAS) + 1)

    def close(self, timeout: float | None = 10.0) -> None:
        """Refuse new requests, abort the running ones and wait for the engine threads to end (``timeout``
        seconds each), the one that went idle just before included."""
        with self._lock:
            self._closed = True
            pending = [*self._incoming, *self._waiting, *(t for j in self._jobs for t in j.tickets)]
            pending += [row.ticket for lane in self._lanes.values() for row in lane.rows]
            threads = [t for t in self._threads if t is not threading.current_thread()]
        self.abort(pending)
        for thread in threads:
            thread.join(timeout)

    # -- the engine thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._lock:
                        if not self._has_work():
                            self._thread = None
                            break
                    try:
                        self.step()
                    except Exception as exc:  # a bug of ours: fail every request, keep the engine usable
                        self._fail_all(exc)
            release_free_memory()  # idle: give the caches' freed memory back (see engine.memory)
        finally:
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _has_work(self) -> bool:
        return bool(
            self._incoming or self._aborts or self._waiting or self._jobs or any(self._lanes.values())
        )

    def step(self) -> bool:
        """One iteration of the running batch; returns whether work remains. Called by the engine thread
        (or by a test driving an engine made with ``auto_run=False``)."""
        with self._lock:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
            aborts, self._aborts = self._aborts, set()
        if aborts:
            self._apply_aborts(aborts)
        self._admit()
        self._prefill()
        self._decode()
        with self._lock:
            self._publish()
            return self._has_work()

    # -- 1. aborts ---------------------------------------------------------------------------------
    def _apply_aborts(self, aborts: set[Ticket]) -> None:
        self._waiting = deque(t for t in self._waiting if t not in aborts)
        for job in self._jobs:
            keep = [i for i, t in enumerate(job.tickets) if t not in aborts]
            if len(keep) < len(job.tickets):
                job.retain(keep)
        self._jobs = deque(job for job in self._jobs if job.tickets)
        for key, lane in list(self._lanes.items()):
            keep = [i for i, row in enumerate(lane.rows) if row.ticket not in aborts]
            if len(keep) < len(lane.rows):
                self._shrink(key, lane, keep)
        for ticket in aborts:
            if not ticket.finished:
                self._release(ticket)
                self._totals["aborted"] += 1

    # -- 2. admission ------------------------------------------------------------------------------
    def _admit(self) -> None:
        config = self.config
        in_use = sum(len(lane) for lane in self._lanes.values()) + sum(len(j.tickets) for j in self._jobs)
        admitted: list[Ticket] = []
        while self._waiting:
            ticket = self._waiting[0]
            if in_use + 1 > config.max_rows or self._reserved + ticket.reserve > config.max_cached_tokens:
                break
            self._waiting.popleft()
            in_use += 1
            self._reserved += ticket.reserve
            ticket.state, ticket.admitted = "prefilling", time.perf_counter()
            ticket.output.stats.queued_s = ticket.admitted - ticket.submitted
            admitted.append(ticket)
        by_lane: dict[LaneKey, list[Ticket]] = {}
        for ticket in admitted:
            by_lane.setdefault(ticket.request.key, []).append(ticket)
        for key, tickets in by_lane.items():
            try:
                self._jobs.append(PrefillJob(key, tickets, self.models, self.pad_id))
            except Exception as exc:
                for ticket in tickets:
                    self._fail(ticket, exc)

    # -- 3. chunked prefill ------------------------------------------------------------------------
    def _prefill(self) -> None:
        budget = self.config.max_prefill_tokens
        while self._jobs and budget > 0:
            job = self._jobs[0]
            try:
                if not job.done:
                    used = job.advance(budget)
                    budget -= used
                    self._totals["prefill_tokens"] += used
                if not job.done:
                    return
                self._jobs.popleft()
                self._join(job)
            except Exception as exc:
                self._jobs.popleft()
                for ticket in job.tickets:
                    self._fail(ticket, exc)

    def _join(self, job: PrefillJob) -> None:
        lane = self._lanes.get(job.key)
        if lane is None:
            policy = None
            if job.key[0] == "auto":
                policy = self.policies.setdefault(job.key, CostPolicy(self.costs))
            lane = make_lane(job.key, self.models, self.vocab_size, self.pad_id, self.windows, policy)
            self._lanes[job.key] = lane
        rows = []
        for ticket in job.tickets:
            ticket.state, ticket.lane = "running", lane
            request = ticket.request
            constraint = RowConstraint(request.grammar) if request.grammar is not None else None
            rows.append(
                LaneRow(request, ticket, request.generator(), request.prompt_tokens, constraint=constraint)
            )
        lane.join(rows, job.finish())

    # -- 4. decoding -------------------------------------------------------------------------------
    def _decode(self) -> None:
        for key, lane in list(self._lanes.items()):
            if not lane.rows:
                del self._lanes[key]
                continue
            try:
                steps = lane.step()
            except Exception as exc:  # a forward pass failed: this lane's caches cannot be trusted
                for row in lane.rows:
                    self._fail(row.ticket, exc)
                del self._lanes[key]
                continue
            self._totals["steps"] += 1
            now = time.perf_counter()
            counts = lane.forward_counts()
            keep = []
            for i, (row, step) in enumerate(zip(lane.rows, steps, strict=True)):
                ticket: Ticket = row.ticket
                if ticket.aborted:
                    continue
                if step.error is not None:
                    self._fail(ticket, step.error)
                    continue
                output = ticket.output
                chunk = output.advance(step, now - ticket.submitted)
                self._totals["decoded_tokens"] += len(step.tokens)  # live, for progress lines
                if output.finish_reason is not None:
                    forwards = (counts[0] - row.forwards_at_join[0], counts[1] - row.forwards_at_join[1])
                    chunk.generation = output.generation(now - ticket.submitted, forwards)
                    self._count(chunk)
                    self._release(ticket)
                else:
                    keep.append(i)
                if chunk.token_ids or chunk.text or chunk.finish_reason:
                    ticket.channel.put((ticket.request.index, chunk))
            self._shrink(key, lane, keep)

    def _shrink(self, key: LaneKey, lane: Lane, keep: list[int]) -> None:
        if not keep:
            del self._lanes[key]  # frees every cache of the lane
        else:
            lane.retain(keep)

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _release(self, ticket: Ticket) -> None:
        if ticket.state in ("prefilling", "running"):
            self._reserved -= ticket.reserve
        ticket.state = "done"

    def _fail(self, ticket: Ticket, exc: BaseException) -> None:
        self._release(ticket)
        self._totals["failed"] += 1
        if not ticket.aborted:
            ticket.channel.put((ticket.request.index, exc))

    def _fail_all(self, exc: BaseException) -> None:
        tickets = [*self._waiting, *(t for j in self._jobs for t in j.tickets)]
        tickets += [row.ticket for lane in self._lanes.values() for row in lane.rows]
        self._waiting.clear()
        self._jobs.clear()
        self._lanes.clear()
        for ticket in tickets:
            self._fail(ticket, exc)
        with self._lock:
            self._publish()

    def _count(self, chunk: GenerationChunk) -> None:
        generation = chunk.generation
        assert generation is not None
        totals = self._totals
        totals["finished"] += 1
        totals[f"finish_{generation.finish_reason}"] += 1
        totals["prompt_tokens"] += generation.stats.prompt_tokens
        totals["new_tokens"] += generation.stats.new_tokens
        for source in generation.sources:
            totals[f"tokens_{Source(source)}"] += 1
        totals["drafts"] += generation.stats.drafts
        totals["rejected_drafts"] += generation.stats.rejected_drafts

    def _publish(self) -> None:
        """A consistent view for :meth:`status` (called with the lock held)."""
        lanes = {
            f"{kind}:{'+'.join(roles)}": len(lane) for (kind, roles), lane in self._lanes.items() if lane.rows
        }
        choices = {
            f"{kind}:{'+'.join(roles)}": {"choice": lane.choice.label, "reason": lane.choice.reason}
            for (kind, roles), lane in self._lanes.items()
            if isinstance(lane, AutoLane) and lane.rows and lane.choice is not None
        }
        decoding = sum(lanes.values())
        prefilling = sum(len(job.tickets) for job in self._jobs)
        self._snapshot = {
            "running": decoding + prefilling,
            "waiting": len(self._waiting),
            "decoding": decoding,
            "prefilling": prefilling,
            "lanes": lanes,
            "auto": choices,
            "reserved_tokens": self._reserved,
            "max_rows": self.config.max_rows,
            "max_cached_tokens": self.config.max_cached_tokens,
        }
