"""Conformance kit for rejection criteria: one call or one base test class checks any criterion.

In the spirit of LangChain's standard tests, a plugin author gets the same checks the built-ins pass::

    # tests/test_my_criterion.py
    from proxyalign.testing.conformance import CriterionConformanceTests

    class TestMyRule(CriterionConformanceTests):
        criterion_name = "my_rule"              # looked up in the registry, like a user would
        criterion_params = {"margin": 0.3}      # optional

or, without pytest classes, ``check_criterion("my_rule")`` (raises :class:`ConformanceError` listing
every failed check, returns a :class:`ConformanceReport` otherwise).

What is checked, and why it matters to the engine:

- declaration: a usable ``name`` (no ``:``, which selects a package), a description, sane ``Param``s;
- parameters: values at the declared bounds work, values outside them are refused;
- shape, range, dtype, device: mu is ``[B, V]`` in [0, 1] (target: non-negative, rows sum to one),
  in the caller's dtype and on the caller's device, for float32 and float64, on CPU and any GPU;
- ``reads``: a criterion that does not declare ``q_star`` works without it and ignores it (the engine
  then keeps q* lazily behind), and likewise for ``q`` and ``p``;
- rows independent: permuting, splitting or duplicating the batch gives the same rows;
- deterministic, and the inputs are not modified in place;
- edge distributions: one-hot, uniform, tiny (1e-30) and subnormal probabilities, padded vocabulary
  (trailing exact zeros), two-point, disjoint supports: no NaN, valid output;
- consistency: ``target == pgm_target(p, q*, mu)`` for PGM criteria; for target-defined criteria the
  PGM decomposition (where it exists) reproduces the target;
- sampling: the engine's own sampler (:func:`proxyalign.engine.hybrid.sample_hybrid`; for target
  criteria :func:`~proxyalign.engine.hybrid.sample_target`) matches ``target`` — chi-square
  goodness of fit and total variation against a distribution-free noise bound, for the emitted token,
  for the tokens p kept, for the tokens q* supplied, and for the rejection rate S.

The statistical checks use fixed seeds, so a run is reproducible; each test has significance
:data:`SIGNIFICANCE`, so a correct criterion fails one by chance about once in a million tries.
Do not loosen them to make a criterion pass: a failure means the criterion (or the sampler) is wrong.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, ParamSpec, TypeVar

import torch

from proxyalign import mixture
from proxyalign.criteria.base import DISTRIBUTIONS, Criterion, CriterionKind
from proxyalign.engine import hybrid
from proxyalign.engine.sampling import Dists
from proxyalign.errors import InvalidParameterError
from proxyalign.plugins import get_criterion, get_registry

__all__ = [
    "DEFAULT_DRAWS",
    "DEFAULT_VOCAB",
    "SIGNIFICANCE",
    "Batch",
    "ConformanceError",
    "ConformanceReport",
    "CriterionConformanceTests",
    "GoodnessOfFit",
    "accelerator_devices",
    "check_criterion",
    "check_declaration",
    "check_deterministic",
    "check_dtypes_and_devices",
    "check_edge_distributions",
    "check_engine",
    "check_params",
    "check_reads",
    "check_rows_independent",
    "check_sampler",
    "check_shape_and_range",
    "check_target_consistency",
    "edge_batch",
    "goodness_of_fit",
    "random_batch",
]

DEFAULT_VOCAB = 16
#: Draws per distribution in the sampling checks: detects a total-variation error of about 0.02.
DEFAULT_DRAWS = 40_000
#: Significance level of each statistical test.
SIGNIFICANCE = 1e-6
#: Rows of a target must sum to one within this (float32 sums of V terms).
SUM_ATOL = 1e-5
#: Tolerance for "the same numbers" across batch layouts and for PGM identities.
ATOL = 1e-6
#: Tolerance between float32 and float64 / CPU and GPU results of the same inputs.
CROSS_ATOL = 1e-4
_P = ParamSpec("_P")
_R = TypeVar("_R")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_TINY = 1e-30
_SUBNORMAL = 1e-40


class ConformanceError(AssertionError):
    """One or more conformance checks failed; the message lists each with the inputs that broke it."""


CriterionLike = Criterion | type[Criterion] | str


# -- inputs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """Rows of (p, q*, q) with a name per row, so that a failure says which inputs broke it."""

    names: tuple[str, ...]
    p: torch.Tensor
    q_star: torch.Tensor
    q: torch.Tensor

    def __len__(self) -> int:
        return len(self.names)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Batch:
        return Batch(self.names, *(t.to(device=device, dtype=dtype) for t in (self.p, self.q_star, self.q)))

    def select(self, index: Sequence[int] | torch.Tensor) -> Batch:
        idx = torch.as_tensor(index, dtype=torch.long)
        return Batch(
            tuple(self.names[i] for i in idx.tolist()),
            self.p[idx.to(self.p.device)],
            self.q_star[idx.to(self.p.device)],
            self.q[idx.to(self.p.device)],
        )

    def cat(self, other: Batch) -> Batch:
        return Batch(
            self.names + other.names,
            torch.cat([self.p, other.p]),
            torch.cat([self.q_star, other.q_star]),
            torch.cat([self.q, other.q]),
        )


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(dim=-1, keepdim=True)


def edge_distributions(vocab: int = DEFAULT_VOCAB, seed: int = 0) -> dict[str, torch.Tensor]:
    """Named hard cases for a criterion, each a float64 distribution of shape ``[vocab]``."""
    if vocab < 8:
        raise ValueError("edge distributions need a vocabulary of at least 8 tokens")
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    one_hot = torch.zeros(vocab, dtype=torch.float64)
    one_hot[3] = 1.0
    out["one_hot"] = one_hot
    other_hot = torch.zeros(vocab, dtype=torch.float64)
    other_hot[vocab - 5] = 1.0
    out["one_hot_other"] = other_hot
    out["uniform"] = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    for label, small in (("tiny", _TINY), ("subnormal", _SUBNORMAL)):
        row = torch.full((vocab,), small, dtype=torch.float64)
        row[1], row[2] = 0.6, 0.4 - (vocab - 2) * small
        out[label] = row
    padded = torch.zeros(vocab, dtype=torch.float64)
    padded[: vocab - 4] = torch.softmax(torch.randn(vocab - 4, generator=g, dtype=torch.float64) * 2, -1)
    out["padded"] = padded  # the last 4 ids are padding: exact zeros
    two = torch.zeros(vocab, dtype=torch.float64)
    two[0], two[5] = 0.5, 0.5
    out["two_point"] = two
    skewed = torch.zeros(vocab, dtype=torch.float64)
    skewed[2], skewed[7] = 0.9, 0.1
    out["two_point_skewed"] = skewed
    tie = torch.zeros(vocab, dtype=torch.float64)
    tie[1], tie[4], tie[6] = 0.4, 0.4, 0.2
    out["tied_top"] = tie
    out["peaked"] = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 6, -1)
    out["flat"] = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 0.3, -1)
    return out


def edge_batch(vocab: int = DEFAULT_VOCAB, seed: int = 0, dtype: torch.dtype = torch.float32) -> Batch:
    """Every ordered pair (p, q*) of :func:`edge_distributions`, with q cycling through them too.

    A padded-vocabulary row where all three models share the trailing zeros is included.
    """
    dists = edge_distributions(vocab, seed)
    names = list(dists)
    rows: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for i, p_name in enumerate(names):
        for j, q_star_name in enumerate(names):
            q_name = names[(i + 2 * j + 1) % len(names)]
            rows.append(
                (
                    f"p={p_name}, q*={q_star_name}, q={q_name}",
                    dists[p_name],
                    dists[q_star_name],
                    dists[q_name],
                )
            )
    g = torch.Generator().manual_seed(seed + 1)
    shared = []
    for _ in range(3):
        row = torch.zeros(vocab, dtype=torch.float64)
        row[: vocab - 4] = torch.softmax(torch.randn(vocab - 4, generator=g, dtype=torch.float64) * 2, -1)
        shared.append(row)
    rows.append(("all padded alike (last 4 ids zero in p, q*, q)", *shared))
    return Batch(
        tuple(r[0] for r in rows),
        torch.stack([r[1] for r in rows]).to(dtype),
        torch.stack([r[2] for r in rows]).to(dtype),
        torch.stack([r[3] for r in rows]).to(dtype),
    )


def random_batch(
    rows: int = 12, vocab: int = DEFAULT_VOCAB, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Batch:
    """Random softmax rows of varied sharpness, so thresholds at any default fall inside the range."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.3, 6.0, rows, dtype=torch.float64).unsqueeze(-1)

    def draw() -> torch.Tensor:
        logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64)
        perm = torch.randperm(rows, generator=g)
        return torch.softmax(logits * scales[perm], dim=-1)

    p, q_star, q = draw(), draw(), draw()
    # Some rows where q* is a nudge of p and q a nudge of q*, as with related checkpoints.
    near = torch.arange(rows) % 3 == 0
    q_star[near] = _normalise(
        p[near] * torch.exp(0.5 * torch.randn(int(near.sum()), vocab, generator=g, dtype=torch.float64))
    )
    q[near] = _normalise(
        q_star[near] * torch.exp(0.5 * torch.randn(int(near.sum()), vocab, generator=g, dtype=torch.float64))
    )
    names = tuple(f"random row {i} (seed {seed})" for i in range(rows))
    return Batch(names, p.to(dtype), q_star.to(dtype), q.to(dtype))


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run on one CPU thread: the kit's tensors are tiny, and threads fighting over a busy CPU
    make them many times slower (the setting is restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _single_threaded(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with _one_thread():
            return fn(*args, **kwargs)

    return wrapper


# -- calling a criterion the way the engine does -----------------------------------------------------
def _as_criterion(criterion: CriterionLike, params: Mapping[str, Any] | None = None) -> Criterion:
    if isinstance(criterion, Criterion):
        if params:
            raise InvalidParameterError("params cannot be combined with a criterion instance")
        return criterion
    if isinstance(criterion, type) and issubclass(criterion, Criterion):
        return criterion(**dict(params or {}))
    return get_criterion(criterion, **dict(params or {}))


def _label(criterion: Criterion) -> str:
    return criterion.label


def _dists(batch: Batch, criterion: Criterion) -> tuple[Dists, Dists, Dists | None]:
    """The batch's distributions as the engine hands them over (q only to criteria that read it)."""
    q = Dists.from_probs(batch.q) if "q" in criterion.reads else None
    return Dists.from_probs(batch.p), Dists.from_probs(batch.q_star), q


def _mu(criterion: Criterion, batch: Batch) -> torch.Tensor:
    """mu as the engine asks for it (:func:`proxyalign.engine.hybrid.call_rejection`)."""
    return hybrid.call_rejection(criterion, *_dists(batch, criterion))


def _target(criterion: Criterion, batch: Batch) -> torch.Tensor:
    """pi as the engine asks for it (:func:`proxyalign.engine.hybrid.call_target`); for a PGM criterion
    its ``target()``, which the consistency check compares with ``pgm_target(p, q*, mu)``."""
    if criterion.kind is not CriterionKind.TARGET:
        return _call_plain(criterion, batch)
    return hybrid.call_target(criterion, *_dists(batch, criterion))


def _call_plain(criterion: Criterion, batch: Batch) -> torch.Tensor:
    q = batch.q if "q" in criterion.reads else None
    return criterion.target(batch.p, batch.q_star, q)


def _value(criterion: Criterion, batch: Batch) -> torch.Tensor:
    """What defines the criterion: its target if target-defined, else its mu."""
    return _target(criterion, batch) if criterion.kind is CriterionKind.TARGET else _mu(criterion, batch)


def _same(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    return a.shape == b.shape and torch.allclose(
        a.double().cpu(), b.double().cpu(), rtol=0, atol=atol, equal_nan=True
    )


def _bad_rows(mask: torch.Tensor, batch: Batch, limit: int = 4) -> str:
    rows = mask.nonzero().flatten().tolist()
    shown = "; ".join(batch.names[i] for i in rows[:limit])
    more = f" (+{len(rows) - limit} more)" if len(rows) > limit else ""
    return f"{len(rows)} row(s): {shown}{more}"


def _fail(criterion: Criterion, message: str) -> ConformanceError:
    return ConformanceError(f"criterion {_label(criterion)}: {message}")


def _check_tensor(criterion: Criterion, what: str, tensor: Any, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise _fail(criterion, f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.shape != like.shape:
        raise _fail(
            criterion, f"{what} has shape {tuple(tensor.shape)}, expected {tuple(like.shape)} ([B, V])"
        )
    if tensor.dtype != like.dtype:
        raise _fail(criterion, f"{what} has dtype {tensor.dtype}, expected the input's {like.dtype}")
    if tensor.device != like.device:
        raise _fail(criterion, f"{what} is on {tensor.device}, expected the input's device {like.device}")
    return tensor


def _check_outputs(criterion: Criterion, batch: Batch, context: str = "") -> None:
    """mu and target of every row of ``batch`` are well-formed (shape, dtype, device, range, sums)."""
    where = f" ({context})" if context else ""
    mu = _check_tensor(criterion, f"mu{where}", _mu(criterion, batch), batch.p)
    if criterion.kind is CriterionKind.TARGET:
        # rejection() of a target criterion is NaN on rows that are not a PGM, and valid elsewhere.
        nan_rows = torch.isnan(mu).any(dim=-1)
        partial = nan_rows & ~torch.isnan(mu).all(dim=-1)
        if partial.any():
            raise _fail(criterion, f"mu{where} is NaN on part of a row, in {_bad_rows(partial, batch)}")
        checked = ~nan_rows
    else:
        checked = torch.ones(len(batch), dtype=torch.bool, device=mu.device)
        nan = torch.isnan(mu).any(dim=-1)
        if nan.any():
            raise _fail(criterion, f"mu{where} has NaN in {_bad_rows(nan, batch)}")
    out = ((mu < 0) | (mu > 1)).any(dim=-1) & checked
    if out.any():
        finite = mu[torch.isfinite(mu)]
        raise _fail(
            criterion,
            f"mu{where} outside [0, 1] (range [{float(finite.min()):.4g}, {float(finite.max()):.4g}]) "
            f"in {_bad_rows(out, batch)}",
        )
    if criterion.kind is CriterionKind.ALIGNED_ONLY and not bool((mu == 1).all()):
        raise _fail(criterion, f"always_rejects is set but mu{where} is not 1 everywhere")
    if criterion.never_rejects and not bool((mu == 0).all()):
        raise _fail(criterion, f"never_rejects is set but mu{where} is not 0 everywhere")
    target = _check_tensor(criterion, f"target{where}", _target(criterion, batch), batch.p)
    bad = ~torch.isfinite(target).all(dim=-1)
    if bad.any():
        raise _fail(criterion, f"target{where} has NaN/inf in {_bad_rows(bad, batch)}")
    negative = (target < 0).any(dim=-1)
    if negative.any():
        raise _fail(criterion, f"target{where} has negative entries in {_bad_rows(negative, batch)}")
    sums = target.double().sum(dim=-1)
    off = (sums - 1).abs() > SUM_ATOL
    if off.any():
        worst = float((sums - 1).abs().max())
        raise _fail(
            criterion,
            f"target{where} rows do not sum to 1 (off by up to {worst:.3g}) in {_bad_rows(off, batch)}",
        )


# -- the checks --------------------------------------------------------------------------------------
def check_declaration(criterion: CriterionLike) -> None:
    """The class attributes the registry, the CLI and the engine rely on."""
    crit = _as_criterion(criterion)
    cls = type(crit)
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise _fail(
            crit,
            f"name {name!r} must be a non-empty identifier-like string without ':' or spaces "
            "(':' selects a package, as in 'package:name')",
        )
    if not isinstance(cls.description, str) or not cls.description.strip():
        raise _fail(crit, "has no description (shown by `proxyalign criteria`)")
    if not isinstance(cls.reads, frozenset) or not cls.reads <= DISTRIBUTIONS:
        raise _fail(crit, f"reads must be a frozenset of {sorted(DISTRIBUTIONS)}, got {cls.reads!r}")
    names = [param.name for param in cls.params]
    if len(set(names)) != len(names):
        raise _fail(crit, f"declares a parameter twice: {names}")
    for param in cls.params:
        if not param.name.isidentifier():
            raise _fail(crit, f"parameter name {param.name!r} is not an identifier")
        if not (math.isfinite(param.low) and math.isfinite(param.high) and param.low <= param.high):
            raise _fail(crit, f"parameter {param.name!r} has bounds [{param.low}, {param.high}]")
        if not param.low <= param.default <= param.high:
            raise _fail(
                crit,
                f"parameter {param.name!r} default {param.default} is outside [{param.low}, {param.high}]",
            )
        if param.integer and param.default != int(param.default):
            raise _fail(crit, f"integer parameter {param.name!r} has default {param.default}")
        if not param.description.strip():
            raise _fail(crit, f"parameter {param.name!r} has no description")
    if set(crit.params) != set(names):
        raise _fail(crit, f"instance params {sorted(crit.params)} differ from the declared {sorted(names)}")


def check_params(criterion: CriterionLike, vocab: int = DEFAULT_VOCAB, seed: int = 0) -> None:
    """Every declared bound is accepted and valid output results; values outside are refused."""
    crit = _as_criterion(criterion)
    cls = type(crit)
    edges = edge_batch(vocab, seed)
    for param in cls.params:
        for value in {param.low, param.high, param.default}:
            try:
                instance = cls(**{**crit.params, param.name: value})
            except Exception as exc:
                raise _fail(
                    crit, f"refuses {param.name}={value:g}, inside its declared range: {exc}"
                ) from exc
            _check_outputs(instance, edges, f"{param.name}={value:g}")
        span = max(param.high - param.low, 1.0)
        for value in (param.low - span, param.high + span, "not-a-number", float("nan")):
            try:
                cls(**{**crit.params, param.name: value})
            except InvalidParameterError:
                continue
            except Exception as exc:
                raise _fail(
                    crit,
                    f"{param.name}={value!r} raised {type(exc).__name__} instead of InvalidParameterError",
                ) from exc
            raise _fail(crit, f"accepts {param.name}={value!r}, outside [{param.low:g}, {param.high:g}]")
    try:
        cls(**crit.params, not_a_parameter=1)
    except InvalidParameterError:
        pass
    else:
        raise _fail(crit, "accepts an unknown parameter 'not_a_parameter'")


def check_shape_and_range(criterion: CriterionLike, batch: Batch | None = None) -> None:
    """mu in [0, 1]^[B, V]; target non-negative, rows summing to one; both in the input dtype/device."""
    crit = _as_criterion(criterion)
    _check_outputs(crit, batch if batch is not None else random_batch())


def check_reads(criterion: CriterionLike, batch: Batch | None = None) -> None:
    """``reads`` tells the truth: undeclared distributions may be absent and never change the result.

    A criterion that reads only p is called as ``rejection(p)`` by the engine's lazy path, so it must
    not need q*. (Declaring more than it uses cannot be detected here; it only wastes model calls.)
    """
    crit = _as_criterion(criterion)
    batch = batch if batch is not None else random_batch()
    other = random_batch(len(batch), batch.p.shape[-1], seed=12345, dtype=batch.p.dtype).to(batch.p.device)
    reference = _value(crit, batch)
    if crit.kind is CriterionKind.LAZY:
        try:
            with_q_star = crit.rejection(batch.p, batch.q_star, batch.q)
        except Exception as exc:
            raise _fail(crit, f"reads only p, but rejection(p, q_star, q) failed: {exc!r}") from exc
        if not _same(with_q_star, reference):
            raise _fail(crit, "reads only p, but its mu changes when q_star/q are passed")
    for dist in ("q_star", "q", "p"):
        if dist in crit.reads or (dist == "q_star" and crit.kind is CriterionKind.TARGET):
            continue  # q* enters every target; its use is not optional there
        swapped = Batch(
            batch.names, *(getattr(other if d == dist else batch, d) for d in ("p", "q_star", "q"))
        )
        if not _same(_value(crit, swapped), reference):
            raise _fail(
                crit,
                f"depends on {dist} but does not declare it in reads={sorted(crit.reads)}; "
                "the engine may not supply it",
            )
    if "q" not in crit.reads:
        try:
            if crit.kind is CriterionKind.TARGET:
                crit.target(batch.p, batch.q_star, None)
            else:
                crit.rejection(batch.p, batch.q_star, None)
        except Exception as exc:
            raise _fail(crit, f"does not declare q but fails when q is None: {exc!r}") from exc


def check_rows_independent(criterion: CriterionLike, batch: Batch | None = None, seed: int = 0) -> None:
    """Each row depends on its own inputs only: permuting, splitting or duplicating rows changes nothing."""
    crit = _as_criterion(criterion)
    batch = batch if batch is not None else random_batch()
    whole = _value(crit, batch)
    perm = torch.randperm(len(batch), generator=torch.Generator().manual_seed(seed))
    if not _same(_value(crit, batch.select(perm)), whole[perm.to(whole.device)]):
        raise _fail(crit, "permuting the rows of a batch changed the rows' results")
    for i in range(len(batch)):
        if not _same(_value(crit, batch.select([i])), whole[i : i + 1]):
            raise _fail(crit, f"row {batch.names[i]!r} alone differs from the same row inside a batch")
    doubled = _value(crit, batch.cat(batch))
    if not _same(doubled[: len(batch)], whole) or not _same(doubled[len(batch) :], whole):
        raise _fail(crit, "duplicating the batch changed the rows' results")


def check_deterministic(criterion: CriterionLike, batch: Batch | None = None) -> None:
    """Same inputs, same outputs; and the caller's tensors are left untouched (they are reused)."""
    crit = _as_criterion(criterion)
    batch = batch if batch is not None else random_batch()
    before = [t.clone() for t in (batch.p, batch.q_star, batch.q)]
    first_mu, first_target = _mu(crit, batch), _target(crit, batch)
    second_mu, second_target = _mu(crit, batch), _target(crit, batch)
    if not (_same(first_mu, second_mu, 0.0) and _same(first_target, second_target, 0.0)):
        raise _fail(crit, "two calls with the same inputs gave different results")
    for name, old, new in zip(("p", "q_star", "q"), before, (batch.p, batch.q_star, batch.q), strict=True):
        if not torch.equal(old, new):
            raise _fail(crit, f"modified its input {name} in place")


def accelerator_devices() -> list[torch.device]:
    """GPUs (and Apple's MPS) this process can use; the dtype/device check runs on each."""
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append(torch.device("mps"))
    return devices


def check_dtypes_and_devices(
    criterion: CriterionLike,
    batch: Batch | None = None,
    devices: Sequence[torch.device | str] | None = None,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
) -> None:
    """Output dtype and device follow the input; results agree across dtypes and devices.

    The engine hands criteria float32 tensors on the models' device; float64 (and a GPU, when one is
    present) catch hard-coded dtypes and ``.cpu()``/``torch.tensor(...)`` calls that land elsewhere.
    """
    crit = _as_criterion(criterion)
    batch = batch if batch is not None else random_batch()
    devices = [torch.device("cpu"), *accelerator_devices()] if devices is None else list(devices)
    reference = _target(crit, batch.to("cpu", torch.float32)).double()
    for device in devices:
        for dtype in dtypes:
            if torch.device(device).type == "mps" and dtype == torch.float64:
                continue  # MPS has no float64
            moved = batch.to(device, dtype)
            _check_outputs(crit, moved, f"{dtype} on {device}")
            if not _same(_target(crit, moved), reference, CROSS_ATOL):
                raise _fail(
                    crit,
                    f"target in {dtype} on {device} differs from float32 on cpu by more than {CROSS_ATOL}",
                )


def check_edge_distributions(criterion: CriterionLike, vocab: int = DEFAULT_VOCAB, seed: int = 0) -> None:
    """One-hot, uniform, 1e-30 and subnormal entries, padded vocabularies, two-point, tied tops."""
    crit = _as_criterion(criterion)
    for dtype in (torch.float32, torch.float64):
        _check_outputs(crit, edge_batch(vocab, seed, dtype), f"edge distributions, {dtype}")


def check_target_consistency(criterion: CriterionLike, batch: Batch | None = None) -> None:
    """``target`` is the rejection PGM of ``mu`` (PGM criteria) or its decomposition reproduces it."""
    crit = _as_criterion(criterion)
    batches = [batch] if batch is not None else [random_batch(), edge_batch()]
    for b in batches:
        target = _target(crit, b)
        if crit.kind is not CriterionKind.TARGET:
            expected = mixture.pgm_target(b.p, b.q_star, _mu(crit, b))
            off = ((target - expected).abs() > ATOL).any(dim=-1)
            if off.any():
                raise _fail(
                    crit,
                    f"target != pgm_target(p, q*, mu) in {_bad_rows(off, b)}; a PGM criterion "
                    "must not override target(), or must keep it equal",
                )
            continue
        decomposition = mixture.pgm_decomposition(b.p, b.q_star, target)
        rebuilt = mixture.pgm_target(b.p, b.q_star, decomposition.mu)
        off = ((rebuilt - target).abs() > 10 * ATOL).any(dim=-1) & decomposition.holds
        if off.any():
            raise _fail(
                crit,
                f"pgm_decomposition says the target is a PGM but its mu does not reproduce it "
                f"in {_bad_rows(off, b)}",
            )
        mu = _mu(crit, b)
        nan_rows = torch.isnan(mu).all(dim=-1)
        if not torch.equal(nan_rows, ~decomposition.holds):
            raise _fail(crit, "rejection() is NaN on rows other than those without a PGM decomposition")


@dataclass(frozen=True)
class GoodnessOfFit:
    """Observed draws against expected probabilities.

    ``pvalue``: chi-square test (bins with expected count < 5 pooled); ``rare_pvalue``: Poisson tail of
    the pooled rare bins (catches draws of tokens that should (almost) never appear); ``tv`` against
    ``tv_bound``, the Bretagnolle–Huber–Carol bound that a correct sampler exceeds with probability
    at most :data:`SIGNIFICANCE` whatever the distribution.
    """

    draws: int
    pvalue: float
    rare_pvalue: float
    tv: float
    tv_bound: float
    impossible: int

    @property
    def ok(self) -> bool:
        return (
            self.impossible == 0
            and self.pvalue >= SIGNIFICANCE
            and self.rare_pvalue >= SIGNIFICANCE
            and self.tv <= self.tv_bound
        )

    def __str__(self) -> str:
        return (
            f"{self.draws} draws: chi-square p={self.pvalue:.3g}, rare-token p={self.rare_pvalue:.3g}, "
            f"TV={self.tv:.4f} (noise bound {self.tv_bound:.4f}), impossible draws={self.impossible}"
        )


def goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor) -> GoodnessOfFit:
    """Compare integer ``counts`` per category with probabilities ``probs`` (normalised here)."""
    counts = counts.double().cpu()
    probs = probs.double().cpu().clamp_min(0)
    probs = probs / probs.sum()
    n = float(counts.sum())
    impossible = int(counts[probs == 0].sum())
    support = probs > 0
    obs, exp = counts[support], probs[support] * n
    tv = 0.5 * float((counts / n - probs).abs().sum())
    k = max(int(support.sum()), 2)
    tv_bound = math.sqrt((k * math.log(2) + math.log(1 / SIGNIFICANCE)) / (2 * n))
    order = torch.argsort(exp)
    exp, obs = exp[order], obs[order]
    small = torch.cumsum(exp, 0) < 5  # a prefix, since exp is sorted ascending
    cut = int(small.sum())
    if cut and cut < len(exp):
        cut += 1  # fold the pooled rare bins into the next bin so the pool reaches 5 expected draws
    rare_pvalue = 1.0
    rare_obs, rare_exp = float(obs[small].sum()), float(exp[small].sum())
    if rare_obs > rare_exp:  # P(Poisson(rare_exp) >= rare_obs) is the regularised lower gamma P(k, λ)
        rare_pvalue = float(
            torch.special.gammainc(
                torch.tensor(rare_obs, dtype=torch.float64), torch.tensor(rare_exp, dtype=torch.float64)
            )
        )
    if cut:
        obs = torch.cat([obs[:cut].sum().view(1), obs[cut:]])
        exp = torch.cat([exp[:cut].sum().view(1), exp[cut:]])
    dof = len(exp) - 1
    if dof <= 0:
        pvalue = 1.0
    else:
        stat = float(((obs - exp) ** 2 / exp).sum())
        pvalue = float(
            torch.special.gammaincc(
                torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)
            )
        )
    return GoodnessOfFit(int(n), pvalue, rare_pvalue, tv, tv_bound, impossible)


def _sampler_batch(vocab: int, seed: int) -> Batch:
    """Random rows plus the edge pairs most likely to expose a sampling error."""
    edges = edge_batch(vocab, seed)
    wanted = (
        "p=one_hot, q*=uniform",
        "p=uniform, q*=one_hot",
        "p=one_hot, q*=one_hot_other",
        "p=tiny, q*=peaked",
        "p=two_point, q*=two_point_skewed",
        "p=flat, q*=padded",
        "p=subnormal, q*=flat",
        "p=tied_top, q*=flat",
        "all padded alike",
    )
    picked = [i for i, name in enumerate(edges.names) if any(name.startswith(w) for w in wanted)]
    return random_batch(8, vocab, seed).cat(edges.select(picked))


@_single_threaded
def check_sampler(
    criterion: CriterionLike,
    batch: Batch | None = None,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[GoodnessOfFit]:
    """The engine's sampler draws from ``target``: checked per row with ``draws`` fixed-seed draws.

    PGM criteria: :func:`proxyalign.engine.hybrid.sample_hybrid` — the emitted tokens follow ``target``,
    the share rejected follows ``S = sum p mu``, kept tokens follow ``p (1 - mu) / (1 - S)`` and
    replacements follow q*. Target criteria: :func:`~proxyalign.engine.hybrid.sample_target` (two stages
    where the target is a PGM, a direct draw elsewhere). Returns the fit of every emitted-token test.
    """
    crit = _as_criterion(criterion)
    batch = (batch if batch is not None else _sampler_batch(DEFAULT_VOCAB, seed)).to(device)
    generator = torch.Generator().manual_seed(seed)
    fits: list[GoodnessOfFit] = []
    for i, name in enumerate(batch.names):
        row = batch.select([i])
        target = _target(crit, row)[0]
        vocab = target.shape[-1]
        p, q_star = (t.expand(draws, vocab).contiguous() for t in (row.p, row.q_star))
        u = torch.rand((draws, 3), generator=generator, dtype=torch.float64).to(device)
        if crit.kind is CriterionKind.TARGET:
            draw = hybrid.sample_target(p, q_star, target.expand(draws, vocab).contiguous(), u)
            tokens, from_aligned = draw.tokens, draw.rejected
            holds = bool(draw.drafted.all())
            mu = mixture.pgm_decomposition(row.p, row.q_star, target.unsqueeze(0)).mu
        else:
            holds, mu = True, _mu(crit, row)
            tokens, from_aligned = hybrid.sample_hybrid(p, q_star, mu.expand(draws, vocab).contiguous(), u)
        fit = goodness_of_fit(torch.bincount(tokens, minlength=vocab), target)
        fits.append(fit)
        if not fit.ok:
            raise _fail(crit, f"sampled tokens do not follow target for {name!r}: {fit}")
        if not holds:
            continue
        rate = float(mixture.rejection_rate(row.p, mu)[0])
        rejected = int(from_aligned.sum())
        split = goodness_of_fit(torch.tensor([draws - rejected, rejected]), torch.tensor([1 - rate, rate]))
        if not split.ok:
            raise _fail(
                crit,
                f"share of rejected drafts for {name!r} does not match S={rate:.4g}: "
                f"{rejected}/{draws} rejected; {split}",
            )
        kept_probs = (row.p * (1 - mu))[0]
        for label, chosen, probs in (
            ("kept drafts of p", tokens[~from_aligned], kept_probs),
            ("replacements from q*", tokens[from_aligned], row.q_star[0]),
        ):
            if chosen.numel() == 0 or float(probs.sum()) <= 0:
                continue
            part = goodness_of_fit(torch.bincount(chosen, minlength=vocab), probs)
            if not part.ok:
                raise _fail(crit, f"{label} do not follow their distribution for {name!r}: {part}")
    return fits


@lru_cache(maxsize=1)
def _tiny_aligner() -> Any:
    from proxyalign.testing.tiny import tiny_aligner

    return tiny_aligner("base", small_base=True)


#: The decoding modes that sample the criterion's own hybrid (token level, exact speculative).
ENGINE_MODES = ("token", "speculative")


@_single_threaded
def check_engine(criterion: CriterionLike, max_new_tokens: int = 6, seed: int = 0) -> None:
    """Decode a small batch with tiny random models in every mode: the criterion works in the real engine.

    Token level (sampled and greedy) and, where the engine has it, exact speculative decoding, which
    evaluates the criterion on many positions at once as rows of one batch. Needs transformers (as
    proxyalign does); about a second the first time in a process.
    """
    crit = _as_criterion(criterion)
    aligner = _tiny_aligner()
    prompts = ["w5 w6 w7", "w9"]
    runs = [(mode, 1.0) for mode in ENGINE_MODES] + [("token", 0.0)]
    for mode, temperature in runs:
        options: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "criterion": crit,
            "temperature": temperature,
        }
        if mode != "token":
            options["mode"] = mode
        where = f"mode={mode}, temperature={temperature:g}"
        generations = aligner.generate(prompts, **options)
        again = aligner.generate(prompts, **options)
        if len(generations) != len(prompts):
            raise _fail(
                crit,
                f"the engine returned {len(generations)} generations for {len(prompts)} prompts ({where})",
            )
        for g, h in zip(generations, again, strict=True):
            if g.token_ids != h.token_ids:
                raise _fail(crit, f"the engine gave different tokens for the same seed ({where})")
            if not 1 <= len(g.token_ids) <= max_new_tokens or len(g.sources) != len(g.token_ids):
                raise _fail(
                    crit,
                    f"the engine produced {len(g.token_ids)} tokens and {len(g.sources)} sources ({where})",
                )
            if crit.kind is CriterionKind.ALIGNED_ONLY and any(str(s) != "aligned" for s in g.sources):
                raise _fail(crit, f"always_rejects is set but some tokens did not come from q* ({where})")
            if mode == "token" and crit.never_rejects and any(str(s) != "base" for s in g.sources):
                raise _fail(crit, f"never_rejects is set but some tokens did not come from p ({where})")
            if (
                mode == "token"
                and crit.kind is not CriterionKind.TARGET
                and g.stats.rejected_drafts != g.stats.tokens_from_aligned
            ):
                raise _fail(crit, f"rejected drafts and tokens from q* disagree ({where})")


# -- one call ----------------------------------------------------------------------------------------
@dataclass
class ConformanceReport:
    """What :func:`check_criterion` ran; ``fits`` are the emitted-token goodness-of-fit results."""

    criterion: str
    passed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    fits: list[GoodnessOfFit] = field(default_factory=list)

    def __str__(self) -> str:
        worst = min((f.pvalue for f in self.fits), default=float("nan"))
        return (
            f"{self.criterion}: {len(self.passed)} checks passed ({', '.join(self.passed)}); "
            f"smallest sampling p-value {worst:.3g}"
        )


CHECKS: dict[str, Callable[[Criterion], Any]] = {
    "declaration": check_declaration,
    "params": check_params,
    "shape_and_range": check_shape_and_range,
    "reads": check_reads,
    "rows_independent": check_rows_independent,
    "deterministic": check_deterministic,
    "dtypes_and_devices": check_dtypes_and_devices,
    "edge_distributions": check_edge_distributions,
    "target_consistency": check_target_consistency,
    "sampler": check_sampler,
    "engine": check_engine,
}


def check_criterion(
    criterion: CriterionLike,
    params: Mapping[str, Any] | None = None,
    *,
    skip: Sequence[str] = (),
) -> ConformanceReport:
    """Run every check on ``criterion`` (an instance, a class, or a registered name).

    Raises :class:`ConformanceError` listing every failed check; ``skip`` names checks to leave out
    (e.g. ``("engine",)`` where transformers is unavailable).
    """
    crit = _as_criterion(criterion, params)
    unknown = set(skip) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; known: {', '.join(CHECKS)}")
    report = ConformanceReport(_label(crit))
    failures: list[str] = []
    for name, check in CHECKS.items():
        if name in skip:
            report.skipped.append(name)
            continue
        try:
            result = check(crit)
        except Exception as exc:
            failures.append(
                f"[{name}] {exc}"
                if isinstance(exc, AssertionError)
                else f"[{name}] raised {type(exc).__name__}: {exc}"
            )
            continue
        report.passed.append(name)
        if name == "sampler":
            report.fits = result
    if failures:
        raise ConformanceError(
            f"criterion {_label(crit)} failed {len(failures)} conformance check(s):\n" + "\n".join(failures)
        )
    return report


# -- the base test class -----------------------------------------------------------------------------
class CriterionConformanceTests:
    """Subclass in a pytest module to run the kit on a criterion (one test per check).

    Set ``criterion_name`` (a registered name or ``package:name``: this also proves the entry point
    works) and optionally ``criterion_params``; or override :meth:`make_criterion` to build it yourself.
    The class name of the subclass must start with ``Test`` for pytest to collect it.
    """

    criterion_name: ClassVar[str | None] = None
    criterion_params: ClassVar[Mapping[str, Any]] = {}
    #: Set False where the tiny-model engine check is too slow or transformers is absent.
    run_engine_check: ClassVar[bool] = True

    def make_criterion(self) -> Criterion:
        if self.criterion_name is None:
            raise TypeError(f"{type(self).__name__}: set criterion_name or override make_criterion()")
        return get_criterion(self.criterion_name, **dict(self.criterion_params))

    def test_registered(self) -> None:
        """The criterion is found by name and listed with its package and version."""
        if self.criterion_name is None:
            import pytest

            pytest.skip("built by make_criterion(), not looked up by name")
        info = get_registry().lookup(self.criterion_name)
        assert info.cls is type(self.make_criterion())
        assert info.version and info.version != "unknown", f"{info.qualified_name} has no version"
        assert info in get_registry().criteria()

    def test_declaration(self) -> None:
        check_declaration(self.make_criterion())

    def test_params_validated(self) -> None:
        check_params(self.make_criterion())

    def test_shape_and_range(self) -> None:
        check_shape_and_range(self.make_criterion())

    def test_reads_declared(self) -> None:
        check_reads(self.make_criterion())

    def test_rows_independent(self) -> None:
        check_rows_independent(self.make_criterion())

    def test_deterministic(self) -> None:
        check_deterministic(self.make_criterion())

    def test_dtypes_and_devices(self) -> None:
        check_dtypes_and_devices(self.make_criterion())

    def test_edge_distributions(self) -> None:
        check_edge_distributions(self.make_criterion())

    def test_target_consistency(self) -> None:
        check_target_consistency(self.make_criterion())

    def test_sampler_matches_target(self) -> None:
        check_sampler(self.make_criterion())

    def test_engine(self) -> None:
        if not self.run_engine_check:
            import pytest

            pytest.skip("run_engine_check = False")
        check_engine(self.make_criterion())
