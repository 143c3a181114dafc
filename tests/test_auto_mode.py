"""mode="auto": whatever it chooses per step it samples the exact distribution; it chooses by the
host's measured costs and the drafts' acceptance, and says why.

Exactness is checked as for the fixed modes (tests/test_speculative.py): the first tokens' histogram
against the distribution enumerated from the models' own logits (TV within the noise floor and a
chi-square that does not reject), and later positions against token-level decoding. The switching
machinery is exercised by a scripted chooser (token steps and rounds of several gammas in turn, rows
at different positions when the kind changes), the real chooser end to end on the same tests.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import proxyalign
from proxyalign.engine.auto import AutoLane, Choice, CostPolicy
from proxyalign.engine.core import Channel
from proxyalign.engine.costs import ForwardCosts, row_buckets
from proxyalign.engine.gamma import AUTO_GAMMAS
from proxyalign.engine.lanes import LaneRow
from proxyalign.engine.request import roles_for
from proxyalign.roles import ALIGNED
from proxyalign.testing import tiny_model, tiny_tokenizer
from proxyalign.testing.lanes import manual_engine
from tests.stats import ALPHA, two_sample_pvalue
from tests.test_continuous_batching import LONG, run
from tests.test_speculative import (
    CRITERIA,
    EOS,
    OTHER_PROMPT,
    PROMPT,
    V,
    assert_exact,
    canonical_cells,
    exact_sequences,
    perturbed,
)

N = 4000


@pytest.fixture(scope="module")
def pa():
    base = tiny_model(0, layers=2)
    return proxyalign.ProxyAligner(base, perturbed(base, 1), tiny_tokenizer(), small_base=perturbed(base, 2))


class Scripted:
    """Chooses the given gammas in turn (0: a token step); learns nothing."""

    def __init__(self, gammas):
        self.gammas, self.calls = list(gammas), 0

    def choose(self, lane):
        gamma = self.gammas[self.calls % len(self.gammas)]
        self.calls += 1
        return Choice(gamma, f"scripted step {self.calls}")

    def observe(self, lane, choice, steps, seconds):
        pass


def use_policy(engine, criterion, policy):
    """Make ``engine``'s auto lane for ``criterion`` choose with ``policy`` (None: the measured one)."""
    key = ("auto", roles_for(criterion))
    engine.policies.pop(key, None)
    if policy is not None:
        engine.policies[key] = policy


# -- exactness whatever is chosen ----------------------------------------------------------------------
SCRIPTS = {"token then rounds": [0, 1, 3], "a round then token steps": [2, 0, 0]}


@pytest.mark.parametrize(
    ("name", "params", "script"),
    [
        (*CRITERIA[0], "token then rounds"),
        (*CRITERIA[1], "a round then token steps"),
        (*CRITERIA[2], "token then rounds"),
        (*CRITERIA[2], "a round then token steps"),
    ],
)
def test_first_three_tokens_are_exact_across_switches(pa, name, params, script):
    criterion = proxyalign.get_criterion(name, **params)
    use_policy(pa.engine, criterion, Scripted(SCRIPTS[script]))
    gens = pa.generate([PROMPT] * N, max_new_tokens=3, seed=60, criterion=criterion, mode="auto")
    assert {label for g in gens for label in g.stats.choices} == {
        "token" if gamma == 0 else f"gamma {gamma}" for gamma in SCRIPTS[script]
    }, "every scripted kind of step should have run"
    assert_exact(gens, exact_sequences(pa, PROMPT, criterion, 3), 3, f"{name}, {script}")


@pytest.mark.parametrize(("name", "params"), [CRITERIA[0], CRITERIA[2]])
def test_the_measured_chooser_is_exact_end_to_end(pa, name, params):
    criterion = proxyalign.get_criterion(name, **params)
    use_policy(pa.engine, criterion, None)
    gens = pa.generate(
        [PROMPT, OTHER_PROMPT] * (N // 2), max_new_tokens=3, seed=61, criterion=criterion, mode="auto"
    )
    for g in gens:
        assert sum(g.stats.choices.values()) >= 1 and g.stats.choice_reason
    for offset, prompt in enumerate((PROMPT, OTHER_PROMPT)):
        exact = exact_sequences(pa, prompt, criterion, 3)
        assert_exact(gens[offset::2], exact, 3, f"{name}, measured chooser, {prompt!r}")


def test_later_positions_after_many_switches_match_token_level(pa):
    """Tokens 6-7, after token steps and rounds of three gammas in turn, against token-level decoding."""
    criterion = proxyalign.get_criterion("dual_kad", threshold=0.2)
    use_policy(pa.engine, criterion, Scripted([0, 2, 0, 1, 3]))
    auto = pa.generate([PROMPT] * N, max_new_tokens=7, seed=62, criterion=criterion, mode="auto")
    token = pa.generate([PROMPT] * N, max_new_tokens=7, seed=63, criterion=criterion)

    def histogram(gens):
        cells = canonical_cells(torch.tensor([(g.token_ids + [EOS] * 7)[5:7] for g in gens]))
        return torch.bincount(cells, minlength=V * V).double().numpy()

    assert two_sample_pvalue(histogram(auto), histogram(token)) > ALPHA


@pytest.mark.slow
@pytest.mark.parametrize(("name", "params"), [CRITERIA[0]])
def test_newcomers_joining_a_running_auto_batch_are_exact(pa, name, params):
    """Rows already decoding in the auto lane (longer prompts, several steps in, switching kinds) do not
    change what newcomers sample."""
    criterion = proxyalign.get_criterion(name, **params)
    engine = manual_engine(pa, max_rows=N + 64, max_prefill_tokens=1 << 20)
    use_policy(engine, criterion, Scripted([1, 0, 2, 0, 0, 3]))
    running = pa.requests([LONG, "w7 w8"] * 6, max_new_tokens=60, seed=3, criterion=criterion, mode="auto")
    engine.submit(running, Channel())
    for _ in range(4):
        engine.step()
    newcomers = pa.requests([PROMPT] * N, max_new_tokens=3, seed=64, criterion=criterion, mode="auto")
    channel, done = Channel(), {}
    run(engine, channel, engine.submit(newcomers, channel), done)
    assert engine.status()["running"] > 0, "the earlier rows should still be decoding"
    assert_exact([done[i] for i in range(N)], exact_sequences(pa, PROMPT, criterion, 3), 3, f"{name} joining")


# -- what it reports -----------------------------------------------------------------------------------
def test_stats_and_status_show_the_choices_and_why(pa):
    engine = manual_engine(pa)
    criterion = proxyalign.get_criterion("confidence_bet")
    use_policy(engine, criterion, Scripted([0, 2]))
    channel, done = Channel(), {}
    tickets = engine.submit(pa.requests([PROMPT] * 3, max_new_tokens=12, seed=1, mode="auto"), channel)
    engine.step()
    engine.step()
    status = engine.status()["auto"]
    assert list(status) == ["auto:base+aligned"]
    assert status["auto:base+aligned"]["choice"] in ("token", "gamma 2")
    assert status["auto:base+aligned"]["reason"].startswith("scripted step")
    run(engine, channel, tickets, done)
    for generation in done.values():
        stats = generation.stats
        assert set(stats.choices) == {"token", "gamma 2"}
        assert stats.choices["token"] - stats.choices["gamma 2"] in (0, 1)  # alternating
        assert stats.as_dict()["choices"] == stats.choices


def test_auto_reserves_cache_for_its_largest_round(pa):
    from proxyalign.engine.scheduler import reserved_tokens

    (request,) = pa.requests([PROMPT], max_new_tokens=10, mode="auto")
    assert reserved_tokens(request) == request.longest_prompt + 10 + max(AUTO_GAMMAS) + 1


def test_an_unknown_mode_lists_auto(pa):
    with pytest.raises(proxyalign.InvalidParameterError, match="auto"):
        pa.generate(PROMPT, mode="fastest")


# -- how it chooses: the policy on costs of known shape -------------------------------------------------
class HostCosts:
    """Seconds per forward for a made-up host: p costs ``p1`` per step plus ``per_row`` for every row x
    position beyond the first; q* costs ``q1``."""

    def __init__(self, p1=0.10, per_row=0.002, q1=0.03):
        self.p1, self.per_row, self.q1 = p1, per_row, q1
        self.asked: list[tuple[str, int, int]] = []

    def seconds(self, role, rows, positions=1):
        self.asked.append((role, rows, positions))
        if role == "base":
            return self.p1 + self.per_row * (rows * positions - 1)
        return self.q1 + 0.0005 * (rows - 1)


def fake_lane(rows=1, acceptance=None, criterion="confidence_bet", left=100):
    """What CostPolicy reads of a lane: rows (with their progress), roles, criteria kinds, window.
    ``acceptance``: every row's draft acceptance so far (the policy's prior in :func:`choose`)."""
    crit = proxyalign.get_criterion(criterion)
    lane_rows = []
    for _ in range(rows):
        request = SimpleNamespace(max_new_tokens=left, criterion=crit)
        lane_rows.append(LaneRow(request, None, torch.Generator(), 5))
    return SimpleNamespace(
        rows=lane_rows,
        roles=roles_for(crit),
        lazy_only=crit.kind.name == "LAZY",
        window_room=lambda: math.inf,
        q_star_ran=False,
        acceptance=acceptance,
    )


def choose(costs, lane, **policy_options):
    if lane.acceptance is not None:
        policy_options.setdefault("prior", lane.acceptance)
    policy = CostPolicy(costs, **policy_options)
    return policy, policy.choose(lane)


def test_verification_nearly_free_and_drafts_passing_means_a_long_round():
    _, choice = choose(HostCosts(per_row=0.002), fake_lane(acceptance=0.9))
    assert choice.gamma >= 4, choice.reason
    assert choice.reason.startswith(f"gamma {choice.gamma}:") and "token level" in choice.reason
    assert choice.rates[choice.label] > choice.rates["token"]


def test_drafts_mostly_rejected_means_token_level():
    """With a lazy criterion (q* runs only after a rejection) a token step is cheaper than a round.
    (With an eager one a 1-draft round costs what a token step does when verification is free.)"""
    _, choice = choose(HostCosts(per_row=0.002), fake_lane(acceptance=0.1, criterion="dual_kad"))
    assert choice.gamma == 0 and choice.reason.startswith("token level"), choice.reason


def test_verification_costing_a_step_per_position_means_token_level_and_little_measured():
    """An AVX2-only host with bf16 emulated: every position verified costs about a p step. (With an
    eager criterion a token step runs q* too, so short rounds can still pay there: see the benchmark.)"""
    costs = HostCosts(per_row=0.1)
    _, choice = choose(costs, fake_lane(acceptance=1.0, criterion="dual_kad"))
    assert choice.gamma == 0
    assert max(positions for role, _, positions in costs.asked if role == "base") == 2, (
        "gammas past the first that cannot win even with every draft passing are not measured"
    )


def test_a_large_batch_makes_verification_dear_and_shortens_or_stops_rounds():
    """Verification is free while the host is memory-bound and dear once it is compute-bound."""
    costs = HostCosts(per_row=0.004)
    _, alone = choose(costs, fake_lane(rows=1, acceptance=0.85))
    _, crowd = choose(costs, fake_lane(rows=16, acceptance=0.85))
    assert alone.gamma > crowd.gamma, (alone.reason, crowd.reason)


def test_speculation_must_beat_token_level_by_the_margin():
    lane = fake_lane(acceptance=0.6)
    _, free = choose(HostCosts(per_row=0.0, q1=0.03), lane, margin=0.0)
    rates = free.rates
    best = max(v for k, v in rates.items() if k != "token")
    needed = best / rates["token"] - 1
    assert needed > 0
    _, strict = choose(HostCosts(per_row=0.0, q1=0.03), lane, margin=needed + 0.01)
    assert strict.gamma == 0 and free.gamma > 0


def test_rows_near_their_end_gain_nothing_from_drafts():
    _, choice = choose(HostCosts(), fake_lane(rows=4, acceptance=0.95, left=1))
    assert choice.gamma == 0


def test_rejections_lower_a_rows_estimate_and_token_steps_drift_it_back():
    policy = CostPolicy(HostCosts(), prior=0.8, prior_weight=2, drift=0.1)
    lane = fake_lane(rows=1)
    (row,) = lane.rows
    assert policy.acceptance(row) == pytest.approx(0.8)
    rejected = SimpleNamespace(drafted=1, rejected=1)
    policy.observe(lane, Choice(4), [rejected], 0.5)
    assert policy.acceptance(row) == pytest.approx(1.6 / 3)
    for _ in range(10):
        policy.observe(lane, Choice(0), [SimpleNamespace(drafted=0, rejected=0)], 0.1)
    assert 0.6 < policy.acceptance(row) < 0.8
    assert set(policy.correction) == {"token", "speculative"}


def test_acceptance_counts_drafts_not_rounds():
    """A failed 1-draft round is one draft of evidence against the prior's four, many drafts outweigh
    the prior, and old drafts fade."""
    policy = CostPolicy(HostCosts(), prior=0.8, prior_weight=4, memory=0.97)
    lane = fake_lane(rows=2)
    short, long = lane.rows
    policy.acceptance(long)  # both rows start from the prior
    policy.record(short, passed=0, checked=1)
    assert policy.acceptance(short) == pytest.approx(3.2 / 5)
    for _ in range(20):
        policy.record(long, passed=5, checked=6)
    assert abs(policy.acceptance(long) - 5 / 6) < 0.01
    for _ in range(20):
        policy.record(long, passed=6, checked=6)
    assert policy.acceptance(long) > 0.95, "the last 120 drafts all passed: the early ones have faded"


def test_a_row_joining_later_starts_from_what_earlier_rows_drafts_showed():
    """The prior of a new row is the pair's record so far, not the fixed guess: with drafts passing
    19 times in 20, a request arriving next does not begin with short rounds."""
    policy = CostPolicy(HostCosts(), prior=0.8, prior_weight=4)
    first, second = fake_lane(rows=2).rows
    assert policy.acceptance(first) == pytest.approx(0.8)
    for _ in range(50):
        policy.record(first, passed=19, checked=20)
    assert policy.acceptance(second) > 0.93
    later, bad = fake_lane(rows=2).rows
    policy.acceptance(later)
    for _ in range(100):
        policy.record(bad, passed=0, checked=2)
    assert policy.acceptance(later) > 0.93, "a row's prior is fixed when it joins"
    assert policy.acceptance(fake_lane().rows[0]) < 0.5, "the pool follows what rows show lately"


def test_runs_of_passes_are_averaged_over_what_the_acceptance_may_be():
    """E[a^i] under the row's Beta posterior, checked against draws from torch's own Beta: above
    mean^i while evidence is thin (so long rounds are not undervalued), close to it once it is not."""
    policy = CostPolicy(HostCosts(), prior=0.8, prior_weight=4, memory=1.0)
    thin, thick = fake_lane(rows=2).rows
    policy.record(thin, passed=0, checked=1)
    for _ in range(100):
        policy.record(thick, passed=9, checked=10)
    generator = torch.Generator().manual_seed(0)
    for row, passed, failed in ((thin, 3.2, 1.8), (thick, 3.2 + 900, 0.8 + 100)):
        runs = policy.passing_runs(row, 6)
        beta = torch.distributions.Beta(*(torch.tensor(x, dtype=torch.float64) for x in (passed, failed)))
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(1000, (1,), generator=generator)))
            a = beta.sample((400_000,))
        expected = [float((a**i).mean()) for i in range(7)]
        assert runs == pytest.approx(expected, abs=3e-3), (runs, expected)
        assert runs[1] == pytest.approx(policy.acceptance(row))
    mean = policy.acceptance(thin)
    assert policy.passing_runs(thin, 6)[6] > 2 * mean**6, "thin evidence: long runs likelier than mean^6"
    mean = policy.acceptance(thick)
    assert policy.passing_runs(thick, 6)[6] == pytest.approx(mean**6, rel=0.01)


def test_measured_step_times_correct_the_forward_costs():
    """Steps taking twice what the forwards predict make every prediction of that kind twice as long."""
    costs = HostCosts()
    policy = CostPolicy(costs)
    lane = fake_lane(rows=1)
    predicted = policy._token_seconds(lane, 1)
    policy.observe(lane, Choice(0), [SimpleNamespace(drafted=0, rejected=0)], 2 * predicted)
    assert policy._token_seconds(lane, 1) == pytest.approx(2 * predicted)
    assert policy._correction("speculative") == pytest.approx(2.0), "an unrun kind borrows the other's"


# -- the measurements --------------------------------------------------------------------------------
def test_row_buckets_are_the_powers_of_two_around():
    assert [row_buckets(n) for n in (1, 2, 3, 8, 9)] == [(1, 1), (2, 2), (2, 4), (8, 8), (8, 16)]
    with pytest.raises(ValueError):
        row_buckets(0)


def test_forward_costs_are_measured_once_at_powers_of_two_and_interpolated(pa):
    costs = ForwardCosts(pa.models, reps=1)
    three = costs.seconds("base", 3, 2)
    assert set(costs.known()) == {("base", 2, 2), ("base", 4, 2)}
    known = costs.known()
    assert min(known.values()) <= three <= max(known.values())
    spent = costs.measuring_s
    assert costs.seconds("base", 3, 2) == three and costs.measuring_s == spent, "kept, not re-measured"


def test_calibrating_measures_every_size_a_growing_batch_meets_once(pa):
    costs = ForwardCosts(pa.models, reps=1)
    spent = costs.calibrate(max_rows=3, max_positions=3)
    assert spent > 0 and spent == pytest.approx(costs.measuring_s)
    expected = {(ALIGNED, rows, 1) for rows in (1, 2, 4)}
    verifiers = [role for role in pa.models if role != ALIGNED]
    expected |= {(role, rows, k) for role in verifiers for rows in (1, 2, 4) for k in (1, 2, 3)}
    assert set(costs.known()) == expected
    costs.seconds("base", 3, 3)
    assert costs.calibrate(max_rows=4, max_positions=2) == 0.0, "nothing measured twice"
    with pytest.raises(ValueError, match="max_rows"):
        costs.calibrate(max_rows=0, max_positions=2)


@pytest.mark.parametrize("max_rows", [0, -1, 2.5, True, "8"])
def test_calibrate_auto_refuses_a_bad_row_count_before_measuring(pa, max_rows):
    known = pa.engine.costs.known()
    with pytest.raises(proxyalign.InvalidParameterError, match="max_rows must be an integer >= 1"):
        pa.calibrate_auto(max_rows)
    assert pa.engine.costs.known() == known


def test_an_auto_lane_is_made_for_auto_requests(pa):
    engine = manual_engine(pa)
    tickets = engine.submit(pa.requests([PROMPT], max_new_tokens=4, mode="auto"), Channel())
    engine.step()
    assert isinstance(tickets[0].lane, AutoLane)
    engine.close()


# -- real weights ----------------------------------------------------------------------------------------
@pytest.mark.real_weights
def test_auto_on_the_real_pair_measures_chooses_and_says_why():
    from proxyalign.testing import real_pair_dirs

    dirs = real_pair_dirs("bfloat16")
    if dirs is None:
        pytest.skip("real pair not cached: run `proxyalign models fetch qwen2.5-coder-pair`")
    pair = proxyalign.ProxyAligner.from_pretrained(
        str(dirs[0]), str(dirs[1]), dtype="bfloat16", device="cpu", criterion="confidence_bet"
    )
    try:
        prompt = "def square(x):\n"
        (generation,) = pair.generate([prompt], max_new_tokens=12, seed=0, mode="auto", temperature=0.7)
        stats = generation.stats
        assert stats.new_tokens == len(generation.token_ids) > 0
        assert sum(stats.choices.values()) >= 1 and stats.choice_reason
        measured = pair.engine.costs.known()
        assert ("base", 1, 1) in measured and ("aligned", 1, 1) in measured
        assert all(0 < seconds < 60 for seconds in measured.values())
    finally:
        pair.close()
