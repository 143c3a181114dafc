"""Speculative modes on tiny models: exact distributions of short sequences, rollback, stats, SSS.

The reference distribution of the first few tokens is enumerated exactly from each model's own logits
(64-token vocabulary: every 2- or 3-token continuation is one batched forward pass), independent of
the engine. A sampler passes when the total variation of its histogram to that distribution is within
the noise floor (simulated from the exact distribution itself) *and* a chi-square test does not reject.
Seeds are fixed, so passes are reproducible.
"""

from __future__ import annotations

import copy
import functools
import itertools
import re

import numpy as np
import pytest
import torch

import proxyalign
from proxyalign import mixture
from proxyalign.criteria.base import Criterion
from proxyalign.engine.gamma import GammaSchedule, expected_tokens
from proxyalign.engine.results import Source
from proxyalign.engine.runner import ModelRunner, left_pad
from proxyalign.engine.sampling import SamplingConfig, logits_to_probs
from proxyalign.errors import CriterionError, InvalidParameterError
from proxyalign.testing import tiny_model, tiny_tokenizer
from proxyalign.testing.lanes import prefilled_lane
from tests.stats import ALPHA, assert_matches, chi_square_pvalue

V = 64
EOS = 1
PROMPT = "w9"
OTHER_PROMPT = "w7 w8 w9 w10"
N = 4000


# -- models: q* and q are "fine-tuned" copies of p, so drafts are often (not always) accepted
def perturbed(model, seed: int, eps: float = 0.1):
    """A copy of ``model`` with every weight matrix nudged by ``eps`` of its own spread."""
    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in out.parameters():
            if weight.dim() > 1:
                weight.add_(torch.randn(weight.shape, generator=generator) * eps * weight.std())
    return out


@pytest.fixture(scope="module")
def trio():
    base = tiny_model(0, layers=2)
    return base, perturbed(base, 1), perturbed(base, 2)


@pytest.fixture(scope="module")
def pa(trio):
    base, aligned, small_base = trio
    return proxyalign.ProxyAligner(base, aligned, tiny_tokenizer(), small_base=small_base)


# -- the exact distribution of the first n tokens
def _role_logits(model, prompt_ids: list[int], n: int) -> torch.Tensor:
    """Logits at the n positions after the prompt for every (n-1)-token tail: ``[V**(n-1), n, V]``."""
    tails = torch.tensor(list(itertools.product(range(V), repeat=n - 1)), dtype=torch.long).view(-1, n - 1)
    ids = torch.cat([torch.tensor(prompt_ids).expand(tails.shape[0], -1), tails], dim=1)
    with torch.no_grad():
        logits = model(ids).logits.float()
    return logits[:, len(prompt_ids) - 1 :]


def exact_sequences(pa, prompt: str, criterion: Criterion, n: int, **sampling) -> torch.Tensor:
    """P(first n tokens) as a dense ``[V**n]`` table over canonical cells (zeros after an EOS)."""
    return _exact_sequences(pa, prompt, criterion, n, tuple(sorted(sampling.items())))


@functools.cache
def _exact_sequences(pa, prompt: str, criterion: Criterion, n: int, sampling: tuple) -> torch.Tensor:
    cfg = SamplingConfig(**dict(sampling))
    roles = ["base", "aligned"] + (["small_base"] if criterion.needs_small_base else [])
    prompt_ids = pa._tokenize([prompt], roles, 1)
    dists, views = {}, {}
    for role in roles:
        logits = _role_logits(pa.models[role], prompt_ids[role][0], n)
        proposer = role != "small_base"
        top_k, top_p = (cfg.top_k, cfg.top_p) if proposer else (None, None)
        dists[role] = logits_to_probs(logits, V, cfg.temperature, top_k, top_p)
        views[role] = dists[role] if cfg.criterion_on == "scaled" else logits_to_probs(logits, V)
    if criterion.defines_target:
        pi = criterion.target(dists["base"], dists["aligned"], dists.get("small_base"))
    else:
        mu = criterion.rejection(views["base"], views["aligned"], views.get("small_base"))
        pi = mixture.pgm_target(dists["base"], dists["aligned"], mu)
    joint = torch.ones(())
    for j in range(n):  # pi at position j depends only on the first j tokens of the continuation
        pi_j = pi[:, j].reshape([V] * (n - 1) + [V])[(slice(None),) * j + (0,) * (n - 1 - j)]
        joint = joint.unsqueeze(-1) * pi_j
    cells = torch.tensor(list(itertools.product(range(V), repeat=n)), dtype=torch.long)
    exact = torch.zeros(V**n, dtype=torch.float64)
    return exact.index_add_(0, canonical_cells(cells), joint.flatten().double())


def canonical_cells(sequences: torch.Tensor) -> torch.Tensor:
    """Cell index of each row of ``[S, n]`` tokens, with every token after the first EOS set to 0."""
    after_eos = (sequences == EOS).long().cumsum(dim=1) - (sequences == EOS).long() > 0
    tokens = sequences.masked_fill(after_eos, 0)
    weights = V ** torch.arange(sequences.shape[1] - 1, -1, -1)
    return (tokens * weights).sum(dim=1)


def sampled_cells(generations, n: int) -> torch.Tensor:
    rows = [(g.token_ids[:n] + [0] * n)[:n] for g in generations]
    return canonical_cells(torch.tensor(rows, dtype=torch.long))


def noise_floor(exact: torch.Tensor, draws: int, seed: int = 0, reps: int = 100) -> float:
    """Total variation a correct sampler reaches with ``draws`` samples: mean + 5 sd over simulations."""
    generator = torch.Generator().manual_seed(seed)
    cdf = exact.cumsum(0)
    tvs = []
    for _ in range(reps):
        u = torch.rand(draws, generator=generator, dtype=torch.float64) * cdf[-1]
        cells = torch.searchsorted(cdf, u, right=True).clamp(max=exact.numel() - 1)
        freq = torch.bincount(cells, minlength=exact.numel()).double() / draws
        tvs.append(0.5 * (freq - exact).abs().sum().item())
    return float(np.mean(tvs) + 5 * np.std(tvs))


def assert_exact(generations, exact: torch.Tensor, n: int, what: str) -> None:
    cells = sampled_cells(generations, n)
    counts = torch.bincount(cells, minlength=exact.numel()).double()
    tv = 0.5 * (counts / counts.sum() - exact).abs().sum().item()
    floor = noise_floor(exact, len(cells))
    pvalue = chi_square_pvalue(counts.numpy(), exact.numpy())
    assert tv <= floor and pvalue > ALPHA, (
        f"{what}: TV {tv:.4f} (noise floor {floor:.4f}), chi-square p={pvalue:.2e}"
    )


# -- sequence-level exactness
CRITERIA = [
    ("confidence_bet", {"margin": 0.1}),
    ("dual_kad", {"threshold": 0.2}),
    ("implicit_reward", {}),
]


def test_reference_enumeration_matches_token_level(pa):
    """The exact table is right: token-level sampling (tested against first tokens elsewhere) agrees."""
    criterion = proxyalign.get_criterion("confidence_bet", margin=0.1)
    gens = pa.generate([PROMPT] * N, max_new_tokens=3, seed=10, criterion=criterion)
    assert_exact(gens, exact_sequences(pa, PROMPT, criterion, 3), 3, "token level")


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize(("name", "params"), CRITERIA)
def test_first_three_tokens_match_exact_distribution(pa, name, params, gamma):
    criterion = proxyalign.get_criterion(name, **params)
    gens = pa.generate(
        [PROMPT] * N,
        max_new_tokens=max(3, gamma + 1),  # the first round drafts the full gamma
        seed=gamma,
        criterion=criterion,
        mode="speculative",
        gamma=gamma,
    )
    accepted = {sum(s is Source.ALIGNED for s in g.sources[:gamma]) for g in gens}
    assert len(accepted) >= min(gamma + 1, 3), "rows should accept different numbers of drafts"
    assert_exact(gens, exact_sequences(pa, PROMPT, criterion, 3), 3, f"{name}, gamma={gamma}")


def test_mixed_prompt_lengths_in_one_batch(pa):
    """Left padding, holes from rollback and per-row acceptance do not leak between rows."""
    criterion = proxyalign.get_criterion("confidence_bet", margin=0.1)
    gens = pa.generate(
        [PROMPT, OTHER_PROMPT] * (N // 2),
        max_new_tokens=6,
        seed=20,
        criterion=criterion,
        mode="speculative",
        gamma=2,
    )
    for offset, prompt in enumerate((PROMPT, OTHER_PROMPT)):
        exact = exact_sequences(pa, prompt, criterion, 3)
        assert_exact(gens[offset::2], exact, 3, f"prompt {prompt!r}")


def test_later_positions_match_token_level(pa):
    """Tokens 6-7, reached after several rounds of rollback, against token-level decoding."""
    from tests.stats import two_sample_pvalue

    criterion = proxyalign.get_criterion("dual_kad", threshold=0.2)
    options = dict(max_new_tokens=7, criterion=criterion)
    spec = pa.generate([PROMPT] * N, seed=30, mode="speculative", gamma=2, **options)
    token = pa.generate([PROMPT] * N, seed=31, **options)

    def histogram(gens):
        cells = canonical_cells(torch.tensor([(g.token_ids + [EOS] * 7)[5:7] for g in gens]))
        return torch.bincount(cells, minlength=V * V).double().numpy()

    assert two_sample_pvalue(histogram(spec), histogram(token)) > ALPHA


@pytest.mark.parametrize(
    ("name", "sampling"),
    [
        ("confidence_bet", {"temperature": 0.7, "top_k": 12}),
        ("implicit_reward", {"temperature": 1.3, "top_p": 0.9}),
        ("dual_kad", {"temperature": 0.7, "top_p": 0.95, "criterion_on": "raw"}),
    ],
)
def test_temperature_and_filters_as_at_token_level(pa, name, sampling):
    criterion = proxyalign.get_criterion(name)
    gens = pa.generate(
        [PROMPT] * N, max_new_tokens=4, seed=40, criterion=criterion, mode="speculative", gamma=3, **sampling
    )
    assert_exact(gens, exact_sequences(pa, PROMPT, criterion, 2, **sampling), 2, f"{name} {sampling}")


def test_sss_is_speculative_sampling_of_the_implicit_reward_target(pa):
    """mode="sss" is the exact sampler above (tested against the enumeration) with the SSS target."""
    options = dict(max_new_tokens=12, seed=50, criterion="implicit_reward", gamma=3)
    sss = pa.generate([PROMPT, OTHER_PROMPT] * 32, mode="sss", **options)
    spec = pa.generate([PROMPT, OTHER_PROMPT] * 32, mode="speculative", **options)
    assert [g.token_ids for g in sss] == [g.token_ids for g in spec]
    assert [g.sources for g in sss] == [g.sources for g in spec]


def test_sss_literal_runs_and_is_a_different_rule(pa):
    """The paper's literal rule is approximate (documented); it runs and reports its sources."""
    gens = pa.generate(
        [PROMPT] * 64, max_new_tokens=6, seed=51, criterion="implicit_reward", mode="sss_literal", gamma=3
    )
    assert all(set(g.sources) <= {Source.ALIGNED, Source.RESIDUAL, Source.BONUS} for g in gens)
    assert all(max(g.token_ids) < V for g in gens)


def test_literal_rule_first_token_distribution_is_off_but_exact_rule_is_not():
    """One position, analytically: exact speculation returns pi; the literal SSS rule does not."""
    generator = torch.Generator().manual_seed(0)
    p, q_star, q = (torch.softmax(3 * torch.randn(200, V, generator=generator), -1) for _ in range(3))
    pi = proxyalign.get_criterion("implicit_reward").target(p, q_star, q)

    def emitted(accept, residual):
        kept = q_star * accept
        return kept + (1 - kept.sum(-1, keepdim=True)) * residual

    exact = emitted(mixture.acceptance_probability(pi, q_star), mixture.speculative_residual(pi, q_star))
    literal = emitted(mixture.sss_literal_acceptance(p, q), mixture.sss_literal_residual(p, q_star, q, pi))
    assert torch.allclose(exact, pi, atol=1e-5)
    assert 0.5 * (literal - pi).abs().sum(-1).mean() > 0.01


# -- acceptance statistics
@pytest.mark.parametrize(("name", "params"), CRITERIA[:2])
def test_acceptance_rate_is_at_least_the_rejection_rate_bound(pa, name, params):
    """Each checked draft is accepted with probability >= S at its position (a martingale bound)."""
    criterion = proxyalign.get_criterion(name, **params)
    gens = pa.generate(
        [PROMPT] * 500, max_new_tokens=8, seed=60, criterion=criterion, mode="speculative", gamma=3
    )
    prefixes, outcomes = [], []
    for g in gens:
        for j, source in enumerate(g.sources):
            if source in (Source.ALIGNED, Source.RESIDUAL):  # a draft was checked here
                prefixes.append(g.token_ids[:j])
                outcomes.append(source is Source.ALIGNED)
    bound = rejection_rates(pa, criterion, PROMPT, prefixes)
    accepted, s_sum = sum(outcomes), bound.sum().item()
    assert accepted >= s_sum - 4 * np.sqrt(len(outcomes) / 4), f"{accepted} accepted, sum of S {s_sum:.1f}"


def rejection_rates(pa, criterion, prompt: str, prefixes: list[list[int]]) -> torch.Tensor:
    """S = sum_w p_w mu_w after ``prompt + prefix``, for each prefix (one padded batch per model)."""
    encoded = pa._tokenize([prompt], ["base", "aligned"], 1)
    probs = {}
    for role in ("base", "aligned"):
        ids, mask = left_pad([encoded[role][0] + prefix for prefix in prefixes], 2, torch.device("cpu"))
        runner = ModelRunner(pa.models[role], ids, mask)
        probs[role] = logits_to_probs(runner.next_logits(), V)
    mu = criterion.rejection(probs["base"], probs["aligned"])
    return mixture.rejection_rate(probs["base"], mu)


def test_stats_report_rounds_acceptance_and_tokens_per_forward(pa):
    gens = pa.generate([PROMPT, OTHER_PROMPT], max_new_tokens=30, seed=70, mode="speculative", gamma=4)
    for g in gens:
        s = g.stats
        assert s.base_forwards >= 1 and s.aligned_forwards >= s.base_forwards
        assert s.tokens_per_base_forward == s.new_tokens / s.base_forwards
        assert s.acceptance_rate == pytest.approx((s.drafts - s.rejected_drafts) / s.drafts)
        assert s.tokens_from_aligned + s.tokens_from_target == s.new_tokens
        # every round is a run of accepted drafts closed by one residual or bonus token
        codes = "".join(
            "a" if x is Source.ALIGNED else "r" if x is Source.RESIDUAL else "b" for x in g.sources
        )
        assert re.fullmatch(r"(a{0,4}[rb])*a{0,4}", codes), codes
        assert s.as_dict()["acceptance_rate"] == s.acceptance_rate


def test_adaptive_gamma_grows_on_full_acceptance_and_shrinks_on_early_rejection():
    schedule = GammaSchedule.parse("adaptive")
    start = schedule.value
    for _ in range(3):
        schedule.update([schedule.value] * 2, schedule.value)
    assert schedule.value > start
    for _ in range(30):
        schedule.update([schedule.value] * 4, schedule.value)
    assert schedule.value >= start + 5
    for _ in range(30):
        schedule.update([0, 1], schedule.value)
    assert schedule.value == schedule.low


def test_adaptive_gamma_weighs_q_star_cost():
    cheap, dear = GammaSchedule(adaptive=True, cost_ratio=0.05), GammaSchedule(adaptive=True, cost_ratio=1.0)
    assert cheap.best(0.9) > dear.best(0.9)
    assert expected_tokens(1.0, 4) == 5 and expected_tokens(0.0, 4) == 1


def test_adaptive_gamma_end_to_end_is_exact(pa):
    criterion = proxyalign.get_criterion("dual_kad", threshold=0.2)
    gens = pa.generate(
        [PROMPT] * N, max_new_tokens=8, seed=80, criterion=criterion, mode="speculative", gamma="adaptive"
    )
    assert_exact(gens, exact_sequences(pa, PROMPT, criterion, 3), 3, "adaptive")


@pytest.mark.parametrize("gamma", [0, -1, 65, 2.5, True, "fast"])
def test_invalid_gamma_is_rejected(pa, gamma):
    with pytest.raises(InvalidParameterError, match="gamma"):
        pa.generate(PROMPT, max_new_tokens=2, mode="speculative", gamma=gamma)


# -- cache rollback
def build_lane(pa, prompts, criterion, gamma, seed=0):
    requests = pa.requests(
        prompts, criterion=criterion, mode="speculative", gamma=gamma, seed=seed, max_new_tokens=64
    )
    encoded = {role: [list(r.prompt_ids[role]) for r in requests] for role in requests[0].roles}
    lane = prefilled_lane(pa, requests)
    return encoded, lane.runners, lane


@pytest.mark.parametrize("name", ["confidence_bet", "implicit_reward"])
def test_rolled_back_caches_equal_a_fresh_forward(pa, name):
    criterion = proxyalign.get_criterion(name)
    prompts = [PROMPT, OTHER_PROMPT, "w20 w21", "w33 w34 w35"] * 2
    encoded, runners, lane = build_lane(pa, prompts, criterion, gamma=4)
    generated = [[] for _ in prompts]
    for _ in range(15):
        for row, step in zip(generated, lane.step(), strict=True):
            row.extend(step.tokens)
    lengths = {len(row) for row in generated}
    assert len(lengths) > 1, "rows should have advanced by different amounts"
    mask = runners["base"].attention_mask
    first_real = mask.argmax(dim=1)
    holes = [(mask[b, first_real[b] :] == 0).sum().item() for b in range(len(prompts))]
    assert max(holes) > 0, "some row should carry holes from rejected drafts"
    for role, runner in runners.items():
        rolled = runner.next_logits()
        for b, row in enumerate(generated):
            with torch.no_grad():
                fresh = pa.models[role](torch.tensor([encoded[role][b] + row])).logits[0, -1]
            assert torch.allclose(rolled[b], fresh, atol=1e-4, rtol=1e-4), (role, b)


def test_retained_rows_keep_their_caches_and_progress(pa):
    """Rows that leave mid-generation take their caches with them; the others go on as if alone."""
    criterion = proxyalign.get_criterion("confidence_bet")
    prompts = [PROMPT, OTHER_PROMPT, "w20 w21", "w33 w34 w35"] * 2
    encoded, runners, lane = build_lane(pa, prompts, criterion, gamma=3, seed=5)
    generated = [[] for _ in prompts]
    keep = [6, 0, 3]  # the longest prompts leave: leading cache columns are dropped too
    for round_ in range(10):
        if round_ == 4:
            produced = [lane.rows[row].produced for row in keep]
            lane.retain(keep)
            generated = [generated[row] for row in keep]
            encoded = {role: [rows[row] for row in keep] for role, rows in encoded.items()}
            assert [row.produced for row in lane.rows] == produced and len(lane) == len(keep)
        steps = lane.step()
        assert len(steps) == len(generated)
        for row, step in zip(generated, steps, strict=True):
            row.extend(step.tokens)
    for role, runner in runners.items():
        rolled = runner.next_logits()
        assert rolled.shape[0] == len(keep)
        for b, row in enumerate(generated):
            with torch.no_grad():
                fresh = pa.models[role](torch.tensor([encoded[role][b] + row])).logits[0, -1]
            assert torch.allclose(rolled[b], fresh, atol=1e-4, rtol=1e-4), (role, b)


def test_rewind_with_nothing_rejected_keeps_the_whole_cache(pa):
    """The reference-code bug: ``crop(-0)`` must not empty the cache when every draft is accepted."""
    ids, mask = left_pad([[5, 6, 7]], 2, torch.device("cpu"))
    runner = ModelRunner(pa.models["base"], ids, mask)
    runner.push_block(torch.tensor([[8, 9]]))
    runner.last_logits(3)
    before = runner.cache.get_seq_length()
    runner.rewind(torch.tensor([2]), fed=2, kept_max=2)
    assert runner.cache.get_seq_length() == before == 5
    assert runner.attention_mask.tolist() == [[1, 1, 1, 1, 1]]
    runner.rewind(torch.tensor([0]), fed=2, kept_max=0)
    assert runner.cache.get_seq_length() == 3


# -- shared loop behaviour: greedy, EOS, stop strings, streaming, fallbacks
@pytest.mark.parametrize("name", ["confidence_bet", "dual_kad", "implicit_reward"])
def test_greedy_speculation_reproduces_token_level_greedy(pa, name):
    prompts = [PROMPT, OTHER_PROMPT, "w20 w21", "w40"]
    token = pa.generate(prompts, max_new_tokens=20, temperature=0, criterion=name)
    spec = pa.generate(prompts, max_new_tokens=20, temperature=0, criterion=name, mode="speculative", gamma=3)
    for t, s in zip(token, spec, strict=True):
        assert s.token_ids == t.token_ids and s.sources == t.sources and s.text == t.text


def test_eos_max_new_tokens_and_stop_strings_end_rows(pa):
    gens = pa.generate([PROMPT] * 200, max_new_tokens=9, seed=90, mode="speculative", gamma=5)
    for g in gens:
        assert len(g.token_ids) <= 9
        if g.finish_reason == "eos":
            assert g.token_ids[-1] == EOS and EOS not in g.token_ids[:-1]
        else:
            assert g.finish_reason == "length" and len(g.token_ids) == 9 and EOS not in g.token_ids
    assert {g.finish_reason for g in gens} == {"eos", "length"}
    word = next(w for g in gens for w in g.text.split()[1:3] if w.startswith("w"))
    stopped = pa.generate([PROMPT] * 200, max_new_tokens=9, seed=90, mode="speculative", gamma=5, stop=[word])
    hit = [g for g in stopped if g.finish_reason == "stop"]
    assert hit and all(word not in g.text and g.stop_sequence == word for g in hit)


def test_streaming_concatenates_to_the_generated_text(pa):
    options = dict(max_new_tokens=25, seed=91, mode="speculative", gamma=4, criterion="dual_kad")
    chunks = list(pa.stream(OTHER_PROMPT, **options))
    whole = pa.generate(OTHER_PROMPT, **options)[0]
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert chunks[-1].generation.sources == whole.sources
    assert any(len(c.token_ids) > 1 for c in chunks), "a speculative step streams several tokens"


def test_always_rejecting_criterion_falls_back_to_token_level(pa):
    token = pa.generate([PROMPT] * 3, max_new_tokens=6, seed=92, criterion="aligned")
    spec = pa.generate([PROMPT] * 3, max_new_tokens=6, seed=92, criterion="aligned", mode="speculative")
    assert [g.token_ids for g in spec] == [g.token_ids for g in token]


def test_sss_modes_default_to_the_implicit_reward_criterion(pa):
    """A call in an SSS mode that names no criterion samples SSS's target, whatever the default."""
    assert pa.criterion.name != "implicit_reward"
    for mode in ("sss", "sss_literal"):
        options = {"max_new_tokens": 5, "seed": 4, "mode": mode}
        implicit = pa.generate([PROMPT, OTHER_PROMPT], criterion="implicit_reward", **options)
        assert [g.token_ids for g in pa.generate([PROMPT, OTHER_PROMPT], **options)] == [
            g.token_ids for g in implicit
        ], mode


def test_sss_modes_need_the_implicit_reward_criterion(pa):
    with pytest.raises(InvalidParameterError, match="implicit_reward"):
        pa.generate(PROMPT, max_new_tokens=2, mode="sss", criterion="dual_kad")
    no_q = proxyalign.ProxyAligner(tiny_model(0), tiny_model(1, layers=1), tiny_tokenizer())
    with pytest.raises(InvalidParameterError, match="small base"):
        no_q.generate(PROMPT, max_new_tokens=2, mode="sss", criterion="implicit_reward")


class _Broken(Criterion):
    name = "broken_spec_test"
    reads = frozenset({"p"})

    def rejection(self, p, q_star=None, q=None):
        return torch.full_like(p, float("nan"))


class _WrongShape(_Broken):
    name = "wrong_shape_spec_test"

    def rejection(self, p, q_star=None, q=None):
        return p[:, :3]


@pytest.mark.parametrize(("criterion", "match"), [(_Broken(), "invalid mu.*NaN"), (_WrongShape(), "shape")])
def test_invalid_criterion_output_raises_criterion_error(pa, criterion, match):
    with pytest.raises(CriterionError, match=f"{criterion.name}.*package tests.*{match}"):
        pa.generate(PROMPT, max_new_tokens=4, mode="speculative", criterion=criterion)


# -- degenerate residuals
class _AlwaysResample(Criterion):
    """mu = 1 but not flagged ``always_rejects``: pi = q* S with S = 1 up to rounding, so pi == q*."""

    name = "always_resample_spec_test"
    reads = frozenset({"p"})

    def rejection(self, p, q_star=None, q=None):
        return torch.ones_like(p)


def test_residual_of_equal_distributions_falls_back_to_the_target():
    generator = torch.Generator().manual_seed(1)
    q_star = torch.softmax(torch.randn(5, V, generator=generator), -1)
    for pi in (q_star.clone(), q_star * (1 + 1e-7), q_star * (1 - 1e-7)):
        residual = mixture.speculative_residual(pi, q_star)
        assert torch.isfinite(residual).all()
        assert torch.allclose(residual, pi)
    far = torch.softmax(torch.randn(5, V, generator=generator), -1)
    residual = mixture.speculative_residual(far, q_star)
    assert torch.allclose(residual.sum(-1), torch.ones(5)) and (residual[far <= q_star] == 0).all()


def test_target_equal_to_the_drafter_accepts_everything_and_samples_q_star(pa):
    criterion = _AlwaysResample()
    gens = pa.generate(
        [PROMPT] * N, max_new_tokens=4, seed=93, criterion=criterion, mode="speculative", gamma=3
    )
    assert np.mean([g.stats.acceptance_rate for g in gens]) > 0.999
    assert_exact(gens, exact_sequences(pa, PROMPT, criterion, 2), 2, "pi == q*")


def test_inverse_cdf_sampler_draws_the_given_distribution():
    generator = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(V, generator=generator) * 2, -1)
    probs[[0, 1, 7, V - 1]] = 0  # zero-probability tokens at both ends and inside: never drawn
    draws = mixture.sample_inverse_cdf(3 * probs.expand(20000, V), generator)  # rows need no normalising
    assert_matches(draws, probs / probs.sum(), "inverse cdf")


def test_padded_vocabulary_rows_get_no_mass():
    base = tiny_model(0, vocab_size=80)
    pa = proxyalign.ProxyAligner(base, perturbed(base, 3), tiny_tokenizer(), criterion="confidence_bet")
    gens = pa.generate([PROMPT] * 500, max_new_tokens=6, seed=94, mode="speculative", gamma=3)
    assert max(t for g in gens for t in g.token_ids) < V
