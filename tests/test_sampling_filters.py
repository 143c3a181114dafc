"""Temperature, top-k, top-p and ``criterion_on`` through the public API, against an independent reference.

Expected distributions come from each model's own logits with :mod:`tests.reference` (float64 numpy:
its own temperature, top-k and top-p, documented there), never from the engine's sampling code. Two
tiny model pairs: the peaky default pair of ``tiny_aligner`` and a flat one (output scale 0.5) whose
filtered supports hold many tokens of similar probability, so that a filter keeping one token too many
or too few shows at once.

- *Lazy token-level path with ``criterion_on="raw"``*: a criterion reading only p computes mu on the
  untempered, unfiltered p while sampling from the tempered, filtered p and q*:
  ``pi = p_s (1 - mu(p_raw)) + q*_s * sum(p_s mu(p_raw))``; checked on the first two tokens.
- *Top-k / top-p*: first-token histograms for several (k, p, T) with ``base``, ``aligned`` and a
  hybrid criterion, and direct checks that the tokens drawn are exactly the reference support.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import proxyalign
from proxyalign.testing import tiny_model, tiny_tokenizer
from tests.reference import (
    CUT_MARGIN,
    assert_checks,
    check,
    criterion_mu,
    filter_margins,
    hybrid_pi,
    reference_probs,
    top_k_keep,
    top_p_keep,
)

V = 64
EOS = 1
ENDED = V  #: the second-token cell of a row whose first token was EOS
PROMPT = "w5 w6 w7"
N = 4000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is several times faster than two on a shared two-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def flat():
    """A p/q* pair with flat next-token distributions (many tokens of similar probability)."""
    return proxyalign.ProxyAligner(
        tiny_model(0, layers=2, scale=0.5), tiny_model(1, layers=1, scale=0.5), tiny_tokenizer()
    )


@pytest.fixture(scope="module")
def pairs(aligner, flat):
    return {"peaky": aligner, "flat": flat}


# -- each model's own logits -----------------------------------------------------------------------
@functools.cache
def two_token_logits(pa, prompt: str = PROMPT) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per role: logits of the first token ``[V]`` and of the second after each first token ``[V, V]``."""
    prompt_ids = torch.tensor(tiny_tokenizer()(prompt)["input_ids"])
    ids = torch.cat([prompt_ids.expand(V, -1), torch.arange(V).unsqueeze(1)], dim=1)
    out = {}
    for role, model in pa.models.items():
        with torch.no_grad():
            logits = model(ids).logits[:, -2:, :V].double().numpy()
        out[role] = (logits[0, 0], logits[:, 1])
    return out


def first_logits(pa) -> dict[str, np.ndarray]:
    return {role: first for role, (first, _) in two_token_logits(pa).items()}


def exact_two_tokens(pa, criterion, **sampling) -> np.ndarray:
    """Exact P(first two tokens) as ``[V, V + 1]`` (an EOS first token is followed by ENDED)."""
    logits = two_token_logits(pa)
    pi0 = hybrid_pi(criterion, {role: first for role, (first, _) in logits.items()}, **sampling)
    pi1 = hybrid_pi(criterion, {role: second for role, (_, second) in logits.items()}, **sampling)
    joint = np.zeros((V, V + 1))
    joint[:, :V] = pi0[:, None] * pi1
    joint[EOS] = 0
    joint[EOS, ENDED] = pi0[EOS]
    return joint


def two_token_cells(generations) -> np.ndarray:
    """``[rows, 2]``: the first two tokens of each row, ENDED after an EOS."""
    rows = []
    for g in generations:
        first = g.token_ids[0]
        if first == EOS:
            rows.append((first, ENDED))
        else:
            assert len(g.token_ids) >= 2, "a row ended after one token without an EOS"
            rows.append((first, g.token_ids[1]))
    return np.array(rows, dtype=np.int64)


def two_token_checks(generations, joint: np.ndarray) -> list:
    cells = two_token_cells(generations)
    return [
        check(cells[:, 0], joint.sum(axis=1), "token 0"),
        check(cells[:, 1], joint.sum(axis=0), "token 1"),
        check(cells[:, 0] * (V + 1) + cells[:, 1], joint.reshape(-1), "tokens 0,1"),
    ]


def assert_well_conditioned(
    logits: dict[str, np.ndarray],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> None:
    """No filter cut within CUT_MARGIN of its threshold (float32 vs float64 could disagree there)."""
    for role, x in logits.items():
        if role == "small_base":
            continue
        margin = filter_margins(np.atleast_2d(x), temperature, top_k, top_p)
        assert margin > CUT_MARGIN, f"{role}: a filter cut lies {margin:.1e} from its threshold"


# -- the reference itself --------------------------------------------------------------------------
def test_reference_filters_follow_the_documented_conventions():
    # top-k keeps every logit >= the k-th largest: ties at the k-th value are all kept
    assert top_k_keep(np.array([3.0, 2.0, 2.0, 1.0]), 2).tolist() == [True, True, True, False]
    assert top_k_keep(np.array([3.0, 2.0, 1.0]), 5).tolist() == [True, True, True]
    # top-p keeps the smallest most-likely set whose mass reaches p, and always the top token
    # (p = 0.5 or 0.8 exactly would be ties with float rounding: the tests stay away from cuts)
    scores = np.log(np.array([0.2, 0.5, 0.3]))
    assert top_p_keep(scores, 0.1).tolist() == [False, True, False]
    assert top_p_keep(scores, 0.49).tolist() == [False, True, False]
    assert top_p_keep(scores, 0.51).tolist() == [False, True, True]
    assert top_p_keep(scores, 0.79).tolist() == [False, True, True]
    assert top_p_keep(scores, 0.81).tolist() == [True, True, True]
    assert top_p_keep(scores, 1.0).tolist() == [True, True, True]
    # top-p is computed after top-k (on the renormalised survivors) and after temperature
    scores = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    assert (reference_probs(scores, top_p=0.5) > 0).tolist() == [True, True, False, False]
    assert (reference_probs(scores, top_k=2, top_p=0.5) > 0).tolist() == [True, False, False, False]
    assert (reference_probs(scores, top_p=0.6) > 0).sum() == 2
    assert (reference_probs(scores, temperature=5.0, top_p=0.6) > 0).sum() == 3  # flatter: more kept
    np.testing.assert_allclose(reference_probs(scores, top_k=2), [4 / 7, 3 / 7, 0, 0])
    np.testing.assert_allclose(reference_probs(scores, temperature=0.5), np.array([16, 9, 4, 1]) / 30)


# -- lazy path x criterion_on="raw" -----------------------------------------------------------------
RAW_CASES = [
    ("dual_kad", {"threshold": 0.1}, {"temperature": 0.7, "top_p": 0.95}),
    ("dual_kad", {"threshold": 0.1}, {"temperature": 0.7, "top_k": 5}),
    ("nudging", {"threshold": 0.5}, {"temperature": 0.7, "top_p": 0.95}),
    ("nudging", {"threshold": 0.7}, {"temperature": 0.7, "top_k": 5}),
    ("primal_kad", {"alpha": 0.3}, {"temperature": 0.7, "top_k": 8, "top_p": 0.95}),
    # an eager criterion (reads q*) for completeness
    ("confidence_bet", {"margin": 0.2}, {"temperature": 0.7, "top_p": 0.95}),
]


@pytest.mark.parametrize(
    ("name", "params", "sampling"),
    RAW_CASES,
    ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in s.items())}" for n, _, s in RAW_CASES],
)
def test_criterion_on_raw_reads_untempered_unfiltered_p(aligner, name, params, sampling):
    """mu from softmax(raw logits); sampling from the tempered, filtered p and q* (two tokens)."""
    criterion = proxyalign.get_criterion(name, **params)
    for first, second in two_token_logits(aligner).values():
        assert_well_conditioned({"first": first, "second": second}, **sampling)
    exact = exact_two_tokens(aligner, criterion, criterion_on="raw", **sampling)
    scaled = exact_two_tokens(aligner, criterion, criterion_on="scaled", **sampling)
    assert 0.5 * np.abs(exact - scaled).sum() > 0.05, "this case cannot tell raw from scaled"
    gens = aligner.generate(
        [PROMPT] * N, max_new_tokens=2, seed=11, criterion=criterion, criterion_on="raw", **sampling
    )
    assert_checks(two_token_checks(gens, exact))


def test_raw_view_is_the_softmax_of_the_raw_logits():
    """The reference's raw view: temperature 1, no filter (mu compared with the model's own p)."""
    logits = np.log(np.array([0.6, 0.25, 0.1, 0.05]))
    criterion = proxyalign.get_criterion("dual_kad", threshold=0.1)
    raw = hybrid_pi(criterion, {"base": logits, "aligned": logits[::-1].copy()}, 0.7, None, 0.9, "raw")
    p_s = reference_probs(logits, 0.7, None, 0.9)
    q_s = reference_probs(logits[::-1].copy(), 0.7, None, 0.9)
    mu = criterion_mu(criterion, reference_probs(logits))
    assert mu.tolist() == [0.0, 0.0, 0.0, 1.0]  # p_raw = 0.05 < 0.1 only for the last token
    np.testing.assert_allclose(raw, p_s * (1 - mu) + q_s * (p_s * mu).sum())


# -- top-k / top-p -----------------------------------------------------------------------------------
FILTER_CASES = [  # (pair, top_k, top_p, temperature, hybrid criterion that mixes both models here)
    ("flat", 3, None, 1.0, ("confidence_bet", {"margin": 0.05})),
    ("flat", None, 0.3, 1.0, ("dual_kad", {"threshold": 0.1})),
    ("flat", 10, 0.9, 0.7, ("confidence_bet", {"margin": 0.05})),
    ("flat", 20, 0.5, 2.0, ("primal_kad", {"alpha": 0.3})),
    ("peaky", 5, 0.8, 1.5, ("dual_kad", {"threshold": 0.3})),
    ("peaky", None, 0.9, 1.3, ("confidence_bet", {"margin": 0.1})),
]
FILTER_PARAMS = [
    pytest.param(pair, k, p, t, criterion, id=f"{pair}-k{k}-p{p}-T{t}-{criterion[0]}")
    for pair, k, p, t, hybrid in FILTER_CASES
    for criterion in (("base", {}), ("aligned", {}), hybrid)
]


@pytest.mark.parametrize(("pair", "top_k", "top_p", "temperature", "criterion"), FILTER_PARAMS)
def test_filtered_first_token_matches_reference(pairs, pair, top_k, top_p, temperature, criterion):
    pa = pairs[pair]
    name, params = criterion
    criterion = proxyalign.get_criterion(name, **params)
    logits = first_logits(pa)
    assert_well_conditioned(logits, temperature, top_k, top_p)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    pi = hybrid_pi(criterion, logits, **sampling)
    if name not in ("base", "aligned"):
        p_s = reference_probs(logits["base"], **sampling)
        q_s = reference_probs(logits["aligned"], **sampling)
        rate = float((p_s * criterion_mu(criterion, p_s, q_s)).sum())
        assert 0.1 < rate < 0.9, f"rejection rate {rate:.2f}: the hybrid should mix both models"
    gens = pa.generate([PROMPT] * N, max_new_tokens=1, seed=21, criterion=criterion, **sampling)
    tokens = np.array([g.token_ids[0] for g in gens])
    assert_checks([check(tokens, pi, f"{name} first token, top_k={top_k} top_p={top_p} T={temperature}")])


SUPPORT_DRAWS = 3000
SUPPORT_CASES = [  # (criterion, top_k, top_p, temperature) on the flat pair
    ("base", 1, None, 1.0),
    ("base", 5, None, 1.0),
    ("aligned", 9, None, 1.5),
    ("base", None, 0.3, 1.0),
    ("aligned", None, 0.5, 1.0),
    ("base", 12, 0.7, 1.0),
    ("dual_kad", 5, 0.9, 1.0),
]


@pytest.mark.parametrize(
    ("name", "top_k", "top_p", "temperature"),
    SUPPORT_CASES,
    ids=[f"{c[0]}-k{c[1]}-p{c[2]}" for c in SUPPORT_CASES],
)
def test_drawn_tokens_are_exactly_the_reference_support(flat, name, top_k, top_p, temperature):
    """With many draws from flat distributions every kept token shows up and no other one does;
    with top_k=k a single model never yields more than k distinct tokens."""
    criterion = proxyalign.get_criterion(name, **({"threshold": 0.2} if name == "dual_kad" else {}))
    logits = first_logits(flat)
    assert_well_conditioned(logits, temperature, top_k, top_p)
    pi = hybrid_pi(criterion, logits, temperature, top_k, top_p)
    support = set(np.flatnonzero(pi > 0).tolist())
    assert SUPPORT_DRAWS * pi[pi > 0].min() >= 20, "a kept token could be missed by chance"
    if name == "dual_kad":  # both models contribute: the support lies in the union of their filtered sets
        kept = {
            role: set(np.flatnonzero(reference_probs(logits[role], temperature, top_k, top_p)).tolist())
            for role in ("base", "aligned")
        }
        assert support <= kept["base"] | kept["aligned"]
        assert support & kept["base"] and support & kept["aligned"], "the hybrid should mix both models"
    gens = flat.generate(
        [PROMPT] * SUPPORT_DRAWS,
        max_new_tokens=1,
        seed=31,
        criterion=criterion,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    drawn = {g.token_ids[0] for g in gens}
    if top_k is not None and name in ("base", "aligned"):
        assert len(drawn) <= top_k, f"top_k={top_k} but {len(drawn)} distinct tokens were drawn"
    assert drawn == support, (
        f"drawn but not kept: {sorted(drawn - support)}; kept, never drawn: {sorted(support - drawn)}"
    )
