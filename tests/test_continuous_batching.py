"""One running batch for every caller: requests join and leave between steps, each exactly itself.

Exactness under concurrency: a request samples the distribution computed from the models' own logits
(independently of the engine) when it joins a batch already running, in token-level and speculative
modes; a seeded request gives the same tokens alone and beside others; aborted rows leave; many
threads and tasks share the batch and each gets what it would get alone.
"""

from __future__ import annotations

import asyncio
import gc
import platform
import threading
import time

import numpy as np
import pytest
import torch

import proxyalign
from proxyalign import Criterion, CriterionError, InvalidParameterError, TargetCriterion
from proxyalign.engine import core
from proxyalign.engine.core import Channel
from proxyalign.engine.memory import release_free_memory
from proxyalign.engine.runner import ModelRunner, keeps_a_hole, left_pad
from proxyalign.engine.scheduler import SchedulerConfig
from proxyalign.testing import tiny_model, tiny_tokenizer
from proxyalign.testing.lanes import manual_engine
from tests.reference import assert_checks, check, hybrid_pi
from tests.stats import assert_matches
from tests.test_sampling_filters import PROMPT as FILTER_PROMPT
from tests.test_sampling_filters import first_logits
from tests.test_speculative import assert_exact, exact_sequences, perturbed

PROMPT = "w9"
LONG = "w20 w21 w22 w23 w24 w25 w26 w27 w28 w29 w30"
N = 4000


@pytest.fixture(scope="module")
def pa():
    base = tiny_model(0, layers=2)
    return proxyalign.ProxyAligner(base, perturbed(base, 1), tiny_tokenizer(), small_base=perturbed(base, 2))


def drain(channel: Channel, into: dict[int, proxyalign.Generation]) -> None:
    while (item := channel.get_nowait()) is not None:
        index, event = item
        if isinstance(event, BaseException):
            raise event
        if event.generation is not None:
            into[index] = event.generation


def run(engine, channel, tickets, into) -> None:
    while not all(t.finished for t in tickets):
        engine.step()
        drain(channel, into)
    drain(channel, into)


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# -- exactness when joining a running batch ------------------------------------------------------------
JOIN_CASES = [
    ("token", "dual_kad", {"threshold": 0.2}, "confidence_bet"),
    ("token", "confidence_bet", {"margin": 0.1}, "dual_kad"),
    ("token", "implicit_reward", {}, "implicit_reward"),
    ("speculative", "confidence_bet", {"margin": 0.1}, "dual_kad"),
    ("speculative", "implicit_reward", {}, "implicit_reward"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "name", "params", "neighbour"), JOIN_CASES)
def test_newcomers_joining_a_running_batch_sample_the_exact_distribution(pa, mode, name, params, neighbour):
    """Rows already decoding (longer prompts, other criteria, several steps in) do not change what a
    newcomer samples: its first tokens follow the exact distribution."""
    criterion = proxyalign.get_criterion(name, **params)
    engine = manual_engine(pa, max_rows=N + 64, max_prefill_tokens=1 << 20)
    running = pa.requests(
        [LONG, "w7 w8", LONG + " w31 w32"] * 4, max_new_tokens=60, seed=3, criterion=neighbour, mode=mode
    )
    engine.submit(running, Channel())
    for _ in range(3):
        engine.step()
    n = 3 if mode == "speculative" else 2
    newcomers = pa.requests([PROMPT] * N, max_new_tokens=n, seed=5, criterion=criterion, mode=mode, gamma=2)
    channel, done = Channel(), {}
    tickets = engine.submit(newcomers, channel)
    run(engine, channel, tickets, done)
    assert engine.status()["running"] > 0, "the earlier rows should still be decoding"
    gens = [done[i] for i in range(N)]
    assert_exact(gens, exact_sequences(pa, PROMPT, criterion, n), n, f"{mode} {name} joining")


@pytest.mark.slow
@pytest.mark.parametrize("prompt", [PROMPT, "w5 w6 w7"])
@pytest.mark.parametrize(
    ("name", "params"), [("dual_kad", {"threshold": 0.2}), ("confidence_bet", {"margin": 0.1})]
)
def test_newcomers_joining_a_lane_whose_q_star_lags(pa, prompt, name, params):
    """Running rows decode with ``base`` (lazy, never rejects), so q*'s queue grows by a token per step
    and newcomers' q* queues are padded with holes when they join; a newcomer with a longer prompt also
    brings a cache of its own to merge. Their first two tokens must still follow the exact distribution."""
    criterion = proxyalign.get_criterion(name, **params)
    engine = manual_engine(pa, max_rows=N + 64, max_prefill_tokens=1 << 20)
    running = pa.requests([LONG, "w7 w8", LONG + " w31 w32"] * 4, max_new_tokens=60, seed=3, criterion="base")
    engine.submit(running, Channel())
    for _ in range(3):
        engine.step()
    lag = engine._lanes[("token", ("base", "aligned"))].runners["aligned"].lag
    assert lag >= 3, f"q* should lag behind: lag {lag}"
    newcomers = pa.requests([prompt] * N, max_new_tokens=2, seed=5, criterion=criterion)
    channel, done = Channel(), {}
    run(engine, channel, engine.submit(newcomers, channel), done)
    assert engine.status()["running"] > 0
    exact = exact_sequences(pa, prompt, criterion, 2)
    assert_exact([done[i] for i in range(N)], exact, 2, f"{name} joining a lagging lane after {prompt!r}")


# -- every row its own settings ------------------------------------------------------------------------
SETTINGS_CASES = [  # (the leading row's settings, the N rows' settings, criterion)
    ({"temperature": 2.0}, {"temperature": 0.5}, ("dual_kad", {"threshold": 0.1})),
    ({"temperature": 0.0}, {"temperature": 0.6}, ("base", {})),
    ({"temperature": 1.0}, {"temperature": 0.5, "top_k": 5}, ("confidence_bet", {"margin": 0.1})),
    ({"temperature": 0.4, "top_p": 0.5}, {"temperature": 1.5, "top_p": 0.95}, ("aligned", {})),
]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["token", "speculative"])
@pytest.mark.parametrize(("leader", "mine", "criterion"), SETTINGS_CASES)
def test_rows_beside_a_row_with_other_settings_sample_their_own(aligner, leader, mine, criterion, mode):
    """A row with other sampling settings is row 0 of the batch; the N rows behind it follow pi computed
    independently (float64 numpy, tests/reference.py) with *their* temperature, top-k and top-p."""
    name, params = criterion
    criterion = proxyalign.get_criterion(name, **params)
    if mode == "speculative" and name == "aligned":
        pytest.skip("q* alone decodes token by token")
    engine = manual_engine(aligner, max_rows=N + 8, max_prefill_tokens=1 << 20)
    first = aligner.requests(["w9 w10"], max_new_tokens=40, seed=1, criterion=criterion, mode=mode, **leader)
    engine.submit(first, Channel())
    rows = aligner.requests(
        [FILTER_PROMPT] * N, max_new_tokens=1, seed=2, criterion=criterion, mode=mode, **mine
    )
    channel, done = Channel(), {}
    run(engine, channel, engine.submit(rows, channel), done)
    assert engine.status()["running"] == 1, "the leading row should decode beside them to the end"
    pi = hybrid_pi(
        criterion, first_logits(aligner), mine["temperature"], mine.get("top_k"), mine.get("top_p")
    )
    tokens = np.array([done[i].token_ids[0] for i in range(N)])
    assert_checks([check(tokens, pi, f"{name} {mine} beside {leader}")])


# -- seeds ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["token", "speculative"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_seeded_request_samples_the_same_alone_and_beside_others(pa, mode, temperature):
    options = {"max_new_tokens": 24, "temperature": temperature, "mode": mode, "criterion": "confidence_bet"}
    if mode == "speculative":
        options["gamma"] = "adaptive"
    (mine,) = pa.requests(["w5 w6 w7"], seed=123, **options)

    engine, channel, alone = manual_engine(pa), Channel(), {}
    run(engine, channel, engine.submit([mine], channel), alone)

    engine, crowd = manual_engine(pa), {}
    others = Channel()
    before = pa.requests([LONG, "w9", "w30 w31", "w12"], seed=7, **{**options, "criterion": "dual_kad"})
    after = pa.requests(["w40 w41 w42", LONG, "w3"], seed=8, **{**options, "max_new_tokens": 30})
    engine.submit(before, others)
    engine.step()
    engine.step()
    tickets = engine.submit([mine], channel)
    engine.step()
    engine.submit(after, others)
    run(engine, channel, tickets, crowd)
    assert engine.status()["running"] > 0, "others should be decoding beside it to the end"
    assert crowd[0].token_ids == alone[0].token_ids
    assert crowd[0].sources == alone[0].sources


def test_the_first_prompt_of_a_seeded_call_matches_the_same_prompt_alone(pa):
    options = {"max_new_tokens": 20, "seed": 42, "criterion": "dual_kad"}
    alone = pa.generate("w5 w6", **options)[0]
    together = pa.generate(["w5 w6", LONG, "w5 w6"], **options)
    assert together[0].token_ids == alone.token_ids
    assert together[2].token_ids != together[0].token_ids, "the other rows get their own seeds"


# -- scheduling ------------------------------------------------------------------------------------------
def test_rows_beyond_max_rows_wait_and_then_run(pa):
    engine, channel, done = manual_engine(pa, max_rows=2), Channel(), {}
    prompts = ["w5", "w6 w7", LONG, "w8 w9 w10", "w11"]
    requests = pa.requests(prompts, max_new_tokens=8, temperature=0, criterion="dual_kad")
    tickets = engine.submit(requests, channel)
    assert engine.status()["waiting"] == 5
    engine.step()
    status = engine.status()
    assert (status["running"], status["waiting"]) == (2, 3)
    run(engine, channel, tickets, done)
    alone = pa.generate(prompts, max_new_tokens=8, temperature=0, criterion="dual_kad")
    assert [done[i].token_ids for i in range(5)] == [g.token_ids for g in alone]
    assert all(done[i].stats.queued_s >= 0 for i in range(5)) and done[4].stats.queued_s > 0


def test_a_request_that_can_never_fit_is_refused_at_once(pa):
    small = proxyalign.ProxyAligner(
        pa.models["base"],
        pa.models["aligned"],
        tiny_tokenizer(),
        scheduler=SchedulerConfig(max_cached_tokens=20),
    )
    with pytest.raises(InvalidParameterError, match="max_cached_tokens=20"):
        small.generate(LONG, max_new_tokens=16)
    assert small.status()["running"] == small.status()["waiting"] == 0
    assert small.generate("w5", max_new_tokens=4, temperature=0)[0].stats.new_tokens == 4


def test_requests_that_do_not_fit_now_queue_behind_the_cache_bound(pa):
    engine, channel, done = manual_engine(pa, max_cached_tokens=40), Channel(), {}
    requests = pa.requests(["w5 w6", "w7", "w8 w9 w10"], max_new_tokens=20, temperature=0)
    tickets = engine.submit(requests, channel)
    engine.step()
    assert engine.status()["running"] == 1 and engine.status()["reserved_tokens"] <= 40
    run(engine, channel, tickets, done)
    assert sorted(done) == [0, 1, 2]


def test_a_long_newcomer_is_prefilled_in_chunks_while_the_others_decode(pa):
    engine, done = manual_engine(pa, max_prefill_tokens=3), {}
    first, late = Channel(), Channel()
    running = engine.submit(pa.requests(["w5"], max_new_tokens=40, temperature=0), first)
    engine.step()
    newcomer = engine.submit(pa.requests([LONG + " " + LONG], max_new_tokens=6, temperature=0), late)
    steps_to_first_token = 0
    tokens_meanwhile = 0
    while not newcomer[0].output.token_ids:
        before = len(running[0].output.token_ids)
        engine.step()
        steps_to_first_token += 1
        tokens_meanwhile += len(running[0].output.token_ids) - before
    assert steps_to_first_token >= 7, "21 prompt tokens at 3 per step"
    assert tokens_meanwhile == steps_to_first_token, "the running row gained a token every step"
    run(engine, late, newcomer, done)
    assert done[0].token_ids == pa.generate(LONG + " " + LONG, max_new_tokens=6, temperature=0)[0].token_ids


def test_models_with_prompts_of_different_lengths_are_prefilled_in_chunks():
    """p gets plain text, q* its chat template (longer): one model's prefill ends chunks before the
    other's. Every row then decodes exactly as alone."""
    aligner = proxyalign.testing.tiny_aligner(prompt_formats={"base": "plain", "aligned": "chat"})
    engine, channel, done = manual_engine(aligner, max_prefill_tokens=3), Channel(), {}
    prompts = ["w5 w6 w7 w8 w9 w10", "w11"]
    options = {"max_new_tokens": 8, "temperature": 0, "criterion": "confidence_bet"}
    tickets = engine.submit(aligner.requests(prompts, **options), channel)
    run(engine, channel, tickets, done)
    assert [done[i].token_ids for i in range(2)] == [
        g.token_ids for g in aligner.generate(prompts, **options)
    ]


def test_a_newcomer_gets_its_first_token_in_the_step_after_it_arrives(pa):
    engine, channel = manual_engine(pa), Channel()
    engine.submit(pa.requests([LONG] * 3, max_new_tokens=30), Channel())
    engine.step()
    engine.step()
    engine.submit(pa.requests(["w5 w6"], max_new_tokens=5), channel)
    engine.step()
    index, chunk = channel.get_nowait()
    assert index == 0 and len(chunk.token_ids) == 1


# -- failures stay with their requests -------------------------------------------------------------------
class NaNMu(Criterion):
    name = "nan_mu_cb_test"
    reads = frozenset({"p"})

    def rejection(self, p, q_star=None, q=None):
        return torch.full_like(p, float("nan"))


class NegativeTarget(TargetCriterion):
    name = "negative_target_cb_test"
    reads = frozenset({"p", "q_star"})

    def target(self, p, q_star, q=None):
        return p - q_star


class NaNTarget(TargetCriterion):
    name = "nan_target_cb_test"
    reads = frozenset({"p", "q_star"})

    def target(self, p, q_star, q=None):
        return torch.full_like(p, float("nan"))


@pytest.mark.parametrize("mode", ["token", "speculative"])
@pytest.mark.parametrize("broken", [NaNMu(), NegativeTarget(), NaNTarget()])
def test_a_broken_criterion_fails_its_own_request_only(pa, mode, broken):
    engine, channel, done = manual_engine(pa), Channel(), {}
    good = pa.requests(["w5 w6", LONG], max_new_tokens=12, temperature=0, criterion="dual_kad", mode=mode)
    bad = pa.requests(["w7"], max_new_tokens=12, criterion=broken, mode=mode)
    bad_channel = Channel()
    tickets = engine.submit(good, channel)
    engine.submit(bad, bad_channel)
    run(engine, channel, tickets, done)
    _, error = bad_channel.get_nowait()
    assert isinstance(error, CriterionError)
    assert broken.name in str(error) and "package tests" in str(error) and "invalid" in str(error)
    alone = pa.generate(["w5 w6", LONG], max_new_tokens=12, temperature=0, criterion="dual_kad", mode=mode)
    assert [done[0].token_ids, done[1].token_ids] == [g.token_ids for g in alone]


# -- aborts ------------------------------------------------------------------------------------------------
class Slow(Criterion):
    """p alone, slowly: keeps a request decoding long enough to abort it mid-way."""

    name = "slow_cb_test"
    reads = frozenset({"p"})

    def rejection(self, p, q_star=None, q=None):
        time.sleep(0.01)
        return torch.zeros_like(p)


@pytest.fixture
def fresh():
    """An aligner of its own, so other tests' requests do not show in its status."""
    aligner = proxyalign.testing.tiny_aligner("dual_kad")
    yield aligner
    aligner.close()


def idle(aligner) -> bool:
    status = aligner.status()
    return status["running"] == 0 and status["waiting"] == 0


def test_closing_a_stream_aborts_its_row_and_the_batch_goes_on(fresh):
    reference = fresh.generate(LONG, max_new_tokens=30, temperature=0, criterion=Slow())[0]
    result = {}
    neighbour = threading.Thread(
        target=lambda: result.update(
            g=fresh.generate(LONG, max_new_tokens=30, temperature=0, criterion=Slow())[0]
        )
    )
    neighbour.start()
    stream = fresh.stream(PROMPT, max_new_tokens=200, criterion=Slow())
    next(stream)
    next(stream)
    wait_until(lambda: fresh.status()["running"] == 2)
    stream.close()
    wait_until(lambda: fresh.status()["running"] <= 1)
    neighbour.join()
    assert result["g"].token_ids == reference.token_ids
    wait_until(lambda: idle(fresh))
    assert fresh.status()["totals"]["aborted"] == 1


def test_an_abandoned_iterator_aborts_its_row(fresh):
    stream = fresh.stream(PROMPT, max_new_tokens=200, criterion=Slow())
    next(stream)
    assert fresh.status()["running"] == 1
    del stream
    gc.collect()
    wait_until(lambda: idle(fresh))
    assert fresh.generate("w5", max_new_tokens=3, temperature=0)[0].stats.new_tokens == 3


@pytest.mark.parametrize("mode", ["token", "speculative"])
def test_an_aborted_row_leaves_the_batch_at_the_next_step_and_posts_nothing_more(pa, mode):
    engine = manual_engine(pa)
    others = engine.submit(pa.requests([LONG, "w5"], max_new_tokens=50, seed=1, mode=mode), Channel())
    channel = Channel()
    (victim,) = engine.submit(pa.requests(["w7 w8"], max_new_tokens=200, seed=2, mode=mode), channel)
    for _ in range(3):
        engine.step()
    assert engine.status()["decoding"] == 3
    produced = len(victim.output.token_ids)
    while channel.get_nowait() is not None:
        pass
    engine.abort([victim])
    engine.step()
    assert engine.status()["decoding"] == 2, "the aborted row should have left the batch"
    assert all(row.ticket is not victim for lane in engine._lanes.values() for row in lane.rows)
    for _ in range(3):
        engine.step()
    assert len(victim.output.token_ids) == produced, "an aborted row must not decode on"
    assert channel.get_nowait() is None, "an aborted row must post nothing more"
    assert engine.status()["totals"]["aborted"] == 1 and not any(t.finished for t in others)


async def test_a_cancelled_or_timed_out_agenerate_aborts_its_rows(fresh):
    task = asyncio.create_task(fresh.agenerate([PROMPT, LONG], max_new_tokens=200, criterion=Slow()))
    while fresh.status()["running"] < 2:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    while not idle(fresh):
        await asyncio.sleep(0.005)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(fresh.agenerate(PROMPT, max_new_tokens=200, criterion=Slow()), timeout=0.1)
    while not idle(fresh):
        await asyncio.sleep(0.005)
    assert fresh.status()["totals"]["aborted"] == 3
    done = await fresh.agenerate("w5", max_new_tokens=3, temperature=0)
    assert done[0].stats.new_tokens == 3


async def test_breaking_out_of_astream_aborts_the_row(fresh):
    async for _chunk in fresh.astream(PROMPT, max_new_tokens=200, criterion=Slow()):
        break
    while not idle(fresh):
        await asyncio.sleep(0.005)


# -- many callers at once -----------------------------------------------------------------------------------
CRITERIA = ["dual_kad", "confidence_bet", "nudging", "primal_kad", "base", "aligned", "implicit_reward"]


def mixed_calls(n: int) -> list[tuple[str, dict]]:
    """Prompts with mixed criteria, modes, lengths and stop strings (greedy, so "alone" is well defined)."""
    calls = []
    for i in range(n):
        criterion = CRITERIA[i % len(CRITERIA)]
        options = {"max_new_tokens": 6 + (i * 5) % 20, "temperature": 0, "criterion": criterion}
        if i % 3 == 1:
            options.update(mode="speculative", gamma=[2, 3, "adaptive"][(i // 3) % 3])
        if criterion == "implicit_reward" and i % 2:
            options.update(mode="sss")
        if i % 5 == 4:
            options["stop"] = ["w12", "w40 w41"]
        prompt = " ".join(f"w{4 + (i * 7 + k) % 50}" for k in range(1 + i % 6))
        calls.append((prompt, options))
    return calls


def test_32_threads_share_the_running_batch_and_each_gets_its_own_result(pa):
    calls = mixed_calls(32)
    start = pa.status()["totals"].get("steps", 0)
    alone = [pa.generate(prompt, **options)[0] for prompt, options in calls]
    serial_steps = pa.status()["totals"]["steps"] - start
    results: list = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def call(i):
        prompt, options = calls[i]
        barrier.wait()
        results[i] = pa.generate(prompt, **options)[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    start = pa.status()["totals"]["steps"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    together_steps = pa.status()["totals"]["steps"] - start
    for i, (got, want) in enumerate(zip(results, alone, strict=True)):
        assert (got.token_ids, got.sources, got.text) == (want.token_ids, want.sources, want.text), calls[i]
    # one after another, the calls need the sum of their steps; sharing the batch, about the longest
    assert together_steps < 0.5 * serial_steps, (together_steps, serial_steps)


async def test_32_tasks_share_the_running_batch_and_each_gets_its_own_result(pa):
    calls = mixed_calls(32)[::-1]
    alone = [pa.generate(prompt, **options)[0] for prompt, options in calls]
    start = pa.status()["totals"]["steps"]
    results = await asyncio.gather(*(pa.agenerate(prompt, **options) for prompt, options in calls))
    together_steps = pa.status()["totals"]["steps"] - start
    for i, (got, want) in enumerate(zip(results, alone, strict=True)):
        assert (got[0].token_ids, got[0].sources) == (want.token_ids, want.sources), calls[i]
    assert together_steps < 0.5 * sum(g.stats.new_tokens for g in alone)


def test_the_engine_thread_ends_when_idle_and_restarts_on_demand(fresh):
    fresh.generate("w5", max_new_tokens=2)
    wait_until(lambda: fresh.engine._thread is None)
    assert fresh.generate("w5", max_new_tokens=2)[0].stats.new_tokens == 2


def test_close_waits_for_an_engine_thread_still_freeing_memory(fresh, monkeypatch):
    """The engine thread hands over (``_thread`` is None) before it frees memory; close() (and so the
    atexit hook) must still wait for it: at interpreter exit a daemon thread inside native code (glibc's
    malloc_trim, after large frees) aborted the process with "terminate called without an active
    exception" (seen with mode="auto" on the real pair, bf16 emulated)."""
    trimming, finish, engine_threads = threading.Event(), threading.Event(), []

    def slow_release() -> bool:
        engine_threads.append(threading.current_thread())
        trimming.set()
        finish.wait(5)
        return True

    monkeypatch.setattr(core, "release_free_memory", slow_release)
    fresh.generate("w5", max_new_tokens=2)
    assert trimming.wait(5) and fresh.engine._thread is None
    threading.Timer(0.3, finish.set).start()
    started = time.monotonic()
    fresh.close()
    assert time.monotonic() - started >= 0.25, "close() returned while the engine thread was running"
    assert not engine_threads[0].is_alive()


def test_a_closed_aligner_refuses_new_calls(fresh):
    fresh.close()
    with pytest.raises(proxyalign.ProxyAlignError, match="closed"):
        fresh.generate("w5", max_new_tokens=2)


def test_status_counts_running_and_waiting(fresh):
    stream = fresh.stream(PROMPT, max_new_tokens=100, criterion=Slow())
    next(stream)
    status = fresh.status()
    assert status["running"] == 1 and status["waiting"] == 0 and status["lanes"] == {"token:base+aligned": 1}
    stream.close()


# -- implicit_reward in log space -------------------------------------------------------------------------
def test_implicit_reward_uses_exact_log_probabilities_where_q_underflows():
    """q with very sharp logits: many of its probabilities underflow to 0 in float32. The target
    p q*/q computed from exact log-probabilities (float64 here, independently) is what is sampled."""
    base = tiny_model(0, layers=1)
    q = tiny_model(2, layers=1, scale=400.0)
    pa = proxyalign.ProxyAligner(base, tiny_model(1, layers=1), tiny_tokenizer(), small_base=q)
    ids = torch.tensor([tiny_tokenizer()(PROMPT)["input_ids"]])
    with torch.no_grad():
        logs = {
            role: torch.log_softmax(m(ids).logits[0, -1, :64].double(), -1) for role, m in pa.models.items()
        }
    q_probs = torch.softmax(pa.models["small_base"](ids).logits[0, -1, :64].float(), -1)
    assert (q_probs == 0).sum() > 10, "the test needs q to underflow in float32"
    expected = torch.softmax(logs["base"] + logs["aligned"] - logs["small_base"], -1)
    gens = pa.generate([PROMPT] * N, max_new_tokens=1, seed=5, criterion="implicit_reward")
    assert_matches(torch.tensor([g.token_ids[0] for g in gens]), expected, "implicit_reward, q underflowing")


def test_cpu_batches_keep_one_masked_column_only_with_several_rows(pa):
    """On CPU a batch of several rows keeps one masked column (transformers would drop an all-ones mask
    and SDPA is slow without one), a single row keeps none (the unmasked path is faster there); joining
    and leaving move between the two, and the logits stay those of each row alone."""
    model = pa.models["base"]
    tokens = [5, 6, 7, 8]

    def alone_logits(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1]

    def prefilled(rows):
        ids, mask = left_pad([tokens] * rows, 2, "cpu", lead=int(keeps_a_hole("cpu", rows)))
        runner = ModelRunner(model, ids, mask)
        runner.feed(len(tokens) - 1)
        return runner

    single = prefilled(1)
    assert bool(single.attention_mask.all()), "one row: no hole"
    single.join(prefilled(1), pad_id=2)  # equal widths, no holes: the join adds one
    assert single.rows == 2 and not bool(single.attention_mask[:, 0].any())
    assert torch.allclose(single.next_logits(), alone_logits(tokens).expand(2, -1), atol=1e-5)
    single.push(torch.tensor([9, 10]))
    single.retain(torch.tensor([1]))  # back to one row: the hole goes
    assert single.rows == 1 and bool(single.attention_mask.all())
    assert torch.allclose(single.next_logits()[0], alone_logits([*tokens, 10]), atol=1e-5)
    assert not keeps_a_hole("cuda", 8) and keeps_a_hole("cpu", 2)


def test_going_idle_gives_freed_memory_back_where_the_c_library_can():
    """glibc keeps freed cache blocks in its heaps (a server would sit at its largest batch's memory);
    the engine trims them when idle. Elsewhere the call is a no-op that says so."""
    assert release_free_memory() is (platform.libc_ver()[0] == "glibc")
