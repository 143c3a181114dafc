"""Speculative mode is exact at every position of a round, the bonus position included.

With ``gamma = g`` the first round emits tokens 0..g-1 from q*'s drafts (or a residual at the first
rejection) and, when every draft passed, a *bonus* token at index ``g``; index ``g + 1`` is the first
token of the second round. The first few tokens alone (tests/test_speculative.py) never reach the bonus
for g >= 3, so here every position up to ``g + 1`` is checked.

A 6-token vocabulary keeps the exact distribution of the first ``g + 2`` tokens enumerable for g up to
5: every prefix is fed to each model (one forward per prefix length), and the exact joint probability of
every sequence is built from each model's own logits with this file's own softmax and target
(:mod:`tests.reference`), independently of the engine. EOS is an absorbing state: the tokens after an
EOS are a separate "ended" cell. Histograms of the sampled sequences are then compared, position by
position, with the exact marginals (each token with the one before it, the tokens up to the bonus
position, and the bonus tokens given their own prefixes).
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

import proxyalign
from proxyalign.testing import tiny_model
from tests.reference import Check, assert_checks, check, criterion_mu, implicit_reward_pi, pgm_pi, softmax

V = 6
EOS = 1
ENDED = V  #: the cell of a position after the row's EOS
PROMPT = "w4 w5 w4"
N = 4000
#: q* and q are perturbed copies of p: drafts are usually accepted, so the bonus position is often reached
EPS = 0.05
#: A bias on p's (and so every copy's) EOS logit keeps EOS possible but rare: most rows reach index
#: gamma + 1, and the few EOS inside a round still exercise the ended rows.
EOS_BIAS = -3.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is several times faster than two on a shared two-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_tokenizer():
    """A word-level tokenizer of ``V`` ids, ``<unk> </s> <pad> <s> w4 w5`` (EOS = 1 as in ``tiny_model``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "</s>", "<pad>", "<s>"])}
    vocab.update({f"w{i}": i for i in range(4, V)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="<pad>", bos_token="<s>"
    )


def perturbed(model, seed: int, eps: float = EPS):
    """A copy of ``model`` with every weight matrix nudged by ``eps`` of its own spread."""
    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in out.parameters():
            if weight.dim() > 1:
                weight.add_(torch.randn(weight.shape, generator=generator) * eps * weight.std())
    return out


def with_eos_bias(model, bias: float = EOS_BIAS):
    """``model`` with an output layer that adds ``bias`` to the EOS logit (all other biases zero)."""
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[EOS] = bias
    model.set_output_embeddings(biased)
    return model


@pytest.fixture(scope="module")
def pa():
    base = with_eos_bias(tiny_model(0, layers=2, vocab_size=V, scale=2.0))
    tokenizer = small_tokenizer()
    aligner = proxyalign.ProxyAligner(
        base, perturbed(base, 1), tokenizer, small_base=perturbed(base, 2), criterion="dual_kad"
    )
    assert aligner.vocab_size == V
    return aligner


# -- the exact distribution, from the models' own logits ------------------------------------------------
class Tree:
    """Every non-ended prefix of the first ``depth`` tokens, level by level, with each model's logits.

    ``prefixes[j]``: ``[n_j, j]`` token ids of the prefixes of length j that contain no EOS;
    ``logits[j][role]``: ``[n_j, V]`` float64 logits of the next token after ``prompt + prefix``.
    """

    def __init__(self, pa, prompt: str, depth: int) -> None:
        prompt_ids = torch.tensor(pa.tokenizer(prompt)["input_ids"])
        self.depth = depth
        self.prefixes: list[torch.Tensor] = []
        self.logits: list[dict[str, np.ndarray]] = []
        prefixes = torch.empty((1, 0), dtype=torch.long)
        live = torch.tensor([t for t in range(V) if t != EOS])
        for j in range(depth):
            ids = torch.cat([prompt_ids.expand(prefixes.shape[0], -1), prefixes], dim=1)
            level = {}
            for role, model in pa.models.items():
                with torch.no_grad():
                    level[role] = model(ids).logits[:, -1, :V].double().numpy()
            self.prefixes.append(prefixes)
            self.logits.append(level)
            if j + 1 == depth:
                break
            n = prefixes.shape[0]
            prefixes = torch.cat(
                [prefixes.repeat_interleave(len(live), dim=0), live.repeat(n).unsqueeze(1)], dim=1
            )

    def pi(self, criterion) -> list[np.ndarray]:
        """pi at every node (temperature 1, no filters), level by level: ``[n_j, V]``."""
        out = []
        for level in self.logits:
            probs = {role: softmax(x) for role, x in level.items()}
            if criterion.name == "implicit_reward":
                out.append(implicit_reward_pi(probs["base"], probs["aligned"], probs["small_base"]))
            else:
                mu = criterion_mu(criterion, probs["base"], probs["aligned"], probs.get("small_base"))
                out.append(pgm_pi(probs["base"], probs["aligned"], mu))
        return out

    def joint(self, pis: list[np.ndarray]) -> np.ndarray:
        """Exact probability of every canonical sequence of ``depth`` cells: ``[V + 1] * depth``."""
        weights = (V + 1) ** np.arange(self.depth - 1, -1, -1)
        table = np.zeros((V + 1) ** self.depth)
        mass = np.ones(1)  # probability of each node of the current level
        for j, pi in enumerate(pis):
            prefix_code = self.prefixes[j].numpy() @ weights[:j] if j else np.zeros(1, dtype=np.int64)
            children = mass[:, None] * pi  # [n_j, V]
            # an EOS at position j: the remaining positions are ENDED
            ended_tail = sum(ENDED * weights[i] for i in range(j + 1, self.depth))
            np.add.at(table, prefix_code + EOS * weights[j] + ended_tail, children[:, EOS])
            keep = [t for t in range(V) if t != EOS]
            if j == self.depth - 1:
                for t in keep:
                    np.add.at(table, prefix_code + t * weights[j], children[:, t])
            else:
                mass = children[:, keep].reshape(-1)  # same order as the next level's prefixes
        assert abs(table.sum() - 1) < 1e-9
        return table.reshape([V + 1] * self.depth)


GAMMAS = [1, 2, 3, 5]
DEPTH = max(GAMMAS) + 2  #: tokens 0..gamma+1 for the largest gamma


@functools.cache
def tree(pa) -> Tree:
    return Tree(pa, PROMPT, DEPTH)


@functools.cache
def exact(pa, criterion) -> tuple[list[np.ndarray], np.ndarray]:
    """pi at every prefix, level by level, and the exact joint of the first DEPTH cells."""
    pis = tree(pa).pi(criterion)
    return pis, tree(pa).joint(pis)


def node_index(prefix: list[int]) -> int:
    """Row of a non-ended prefix within its level of :class:`Tree` (base V-1 over the live tokens)."""
    index = 0
    for t in prefix:
        index = index * (V - 1) + (t if t < EOS else t - 1)
    return index


def canonical(generations, depth: int) -> np.ndarray:
    """``[rows, depth]`` cells of the sampled sequences: tokens, ENDED after an EOS."""
    rows = []
    for g in generations:
        tokens = list(g.token_ids[:depth])
        if EOS in tokens:
            tokens = tokens[: tokens.index(EOS) + 1]
        assert len(tokens) == depth or tokens[-1] == EOS, "a row stopped early without an EOS"
        rows.append(tokens + [ENDED] * (depth - len(tokens)))
    return np.array(rows, dtype=np.int64)


def marginal_check(cells: np.ndarray, joint: np.ndarray, positions: tuple[int, ...], what: str) -> Check:
    """Histogram of the cells at ``positions`` (jointly) against the exact marginal."""
    others = tuple(i for i in range(joint.ndim) if i not in positions)
    exact = joint.sum(axis=others).reshape(-1)
    weights = (V + 1) ** np.arange(len(positions) - 1, -1, -1)
    return check(cells[:, list(positions)] @ weights, exact, what)


# -- the tests ---------------------------------------------------------------------------------------
CRITERIA = [
    ("confidence_bet", {"margin": 0.1}),
    ("dual_kad", {"threshold": 0.2}),
    ("implicit_reward", {}),
]


@functools.cache
def speculative(pa, criterion, gamma: int, seed: int):
    """N rows of the first ``gamma + 2`` tokens: the first round (its bonus at index gamma) and one more.

    Cached: both tests of a (criterion, gamma) read the same draws.
    """
    return pa.generate(
        [PROMPT] * N,
        max_new_tokens=gamma + 2,
        seed=seed,
        criterion=criterion,
        mode="speculative",
        gamma=gamma,
        temperature=1.0,
    )


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize(("name", "params"), CRITERIA)
def test_every_position_of_a_round_is_exact(pa, name, params, gamma):
    """Each position 0..gamma+1 with the one before it, and the four tokens up to the bonus jointly.

    Index gamma is the bonus of rows that accepted every draft, gamma + 1 the first token of round two.
    """
    criterion = proxyalign.get_criterion(name, **params)
    depth = gamma + 2
    joint = exact(pa, criterion)[1]
    gens = speculative(pa, criterion, gamma, seed=100 + gamma)
    bonus = sum(len(g.sources) > gamma and g.sources[gamma] == proxyalign.Source.BONUS for g in gens)
    assert bonus >= N // 10, f"only {bonus} rows reached the bonus position: the test would be weak"
    cells = canonical(gens, depth)
    checks = [marginal_check(cells, joint, (0,), "token 0")]
    checks += [marginal_check(cells, joint, (k - 1, k), f"tokens {k - 1},{k}") for k in range(1, depth)]
    head = tuple(range(max(0, gamma - 3), gamma + 1))  # up to four tokens ending at the bonus, jointly
    if len(head) > 2:  # (for gamma <= 3: the whole first round)
        checks.append(marginal_check(cells, joint, head, f"tokens {head[0]}..{gamma}"))
    assert_checks(checks)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize(("name", "params"), CRITERIA)
def test_bonus_tokens_follow_pi_given_their_prefix(pa, name, params, gamma):
    """Rows that accepted every draft of the first round: the bonus at index gamma ~ pi(. | prefix).

    Given its prefix, a bonus token is one draw from pi at that prefix, so the bonus histogram must
    match the sum of those rows' exact pi (a chi-square against expected counts that are sums of
    per-row probabilities is conservative).
    """
    criterion = proxyalign.get_criterion(name, **params)
    pis = exact(pa, criterion)[0][gamma]
    gens = speculative(pa, criterion, gamma, seed=100 + gamma)
    bonus = [g for g in gens if len(g.sources) > gamma and g.sources[gamma] == proxyalign.Source.BONUS]
    assert len(bonus) >= N // 10, f"only {len(bonus)} rows reached the bonus position"
    expected = np.zeros(V)
    for g in bonus:
        assert EOS not in g.token_ids[:gamma]
        expected += pis[node_index(g.token_ids[:gamma])]
    cells = canonical(bonus, gamma + 1)[:, gamma]
    assert_checks([check(cells, expected / len(bonus), f"bonus token (index {gamma})")])
