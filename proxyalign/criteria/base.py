"""What a rejection criterion is: a small pure function of next-token distributions.

A criterion subclasses :class:`Criterion` and implements :meth:`Criterion.rejection` (the vector mu of
the rejection PGM), or subclasses :class:`TargetCriterion` and implements :meth:`TargetCriterion.target`
when it is defined by the distribution it aims at rather than by a rejection rule. Parameters are
declared with :class:`Param` so that every front end (Python, CLI, adapters) validates them alike.
"""

from __future__ import annotations

import math
from abc import ABC
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

import torch

from proxyalign import mixture
from proxyalign.errors import InvalidParameterError

__all__ = ["Criterion", "CriterionKind", "Param", "TargetCriterion"]


class CriterionKind(StrEnum):
    """How the engine runs a criterion: which models, in which order."""

    ALIGNED_ONLY = "aligned_only"  #: mu = 1 everywhere: q* alone, p need not run
    LAZY = "lazy"  #: mu reads p alone: draft from p first, run q* only after a rejection
    EAGER = "eager"  #: mu reads q* (or q): every model runs every step
    TARGET = "target"  #: defined by its target distribution, sampled exactly


def _log(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else torch.log(t)


def _implements(cls: type) -> bool:
    """Whether a concrete criterion class defines its rule in one of the two spaces."""
    if issubclass(cls, TargetCriterion):
        return cls.target is not TargetCriterion.target or cls.log_target is not TargetCriterion.log_target
    return cls.rejection is not Criterion.rejection or cls.log_rejection is not Criterion.log_rejection


#: Distribution names a criterion may read: large base, small aligned, small base.
DISTRIBUTIONS = frozenset({"p", "q_star", "q"})


@dataclass(frozen=True)
class Param:
    """A numeric criterion parameter with its default and accepted closed range."""

    name: str
    default: float
    description: str
    low: float = 0.0
    high: float = 1.0
    integer: bool = False

    def validate(self, criterion: str, value: Any) -> float | int:
        """Coerce ``value`` (numbers or numeric strings from a CLI) and check its range."""
        kind = "an integer" if self.integer else "a number"
        accepted = f"{kind} in [{self.low:g}, {self.high:g}]"
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InvalidParameterError(
                f"criterion {criterion!r}: parameter {self.name!r} must be {accepted}, got {value!r}"
            ) from None
        if isinstance(value, bool) or not math.isfinite(number) or not self.low <= number <= self.high:
            raise InvalidParameterError(
                f"criterion {criterion!r}: parameter {self.name!r} must be {accepted}, got {value!r}"
            )
        if self.integer:
            if number != int(number):
                raise InvalidParameterError(
                    f"criterion {criterion!r}: parameter {self.name!r} must be {accepted}, got {value!r}"
                )
            return int(number)
        return number


class Criterion(ABC):
    """A rejection criterion: maps next-token distributions to mu in [0, 1]^V per row.

    Class attributes describe the criterion to the registry and the engine:

    - ``name``, ``description``, ``reference``: shown by ``proxyalign criteria``.
    - ``params``: the accepted parameters; instances expose validated values as ``self.params``.
    - ``reads``: which distributions mu depends on. A criterion that reads only ``"p"`` lets the
      engine draft from p first and run q* only when a draft is rejected (lazy q*).
    - ``always_rejects``: mu is 1 everywhere, so p's draft is never kept and p need not run.
    - ``never_rejects``: mu is 0 everywhere, so the output is p's (tools that compare methods, like the
      evaluation harness, then know that only p's prompt steers it).

    All tensors are float32 probabilities of shape ``[B, V]`` on one device.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    reads: ClassVar[frozenset[str]] = frozenset({"p"})
    always_rejects: ClassVar[bool] = False
    never_rejects: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        declared = {param.name: param for param in type(self).params}
        unknown = sorted(set(params) - set(declared))
        if unknown:
            accepted = ", ".join(declared) or "none"
            raise InvalidParameterError(
                f"criterion {self.name!r} has no parameter {unknown[0]!r}; accepted parameters: {accepted}"
            )
        self.params: dict[str, float | int] = {
            name: param.validate(self.name, params.get(name, param.default))
            for name, param in declared.items()
        }

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = cls.reads - DISTRIBUTIONS
        if unknown:
            raise TypeError(f"{cls.__name__}.reads names unknown distributions {sorted(unknown)}")
        if "name" in cls.__dict__ and not _implements(cls):
            raise TypeError(
                f"criterion class {cls.__name__} must implement rejection() or log_rejection()"
                " (a TargetCriterion: target() or log_target())"
            )

    @property
    def kind(self) -> CriterionKind:
        """How the engine runs this criterion (derived from ``always_rejects``, ``reads`` and the class)."""
        if self.always_rejects:
            return CriterionKind.ALIGNED_ONLY
        return CriterionKind.LAZY if self.reads <= {"p"} else CriterionKind.EAGER

    @property
    def needs_small_base(self) -> bool:
        """Whether the small base model q must be loaded for this criterion."""
        return "q" in self.reads

    @property
    def lazy_aligned(self) -> bool:
        """Whether q* is needed only after a rejected draft (``kind`` is LAZY)."""
        return self.kind is CriterionKind.LAZY

    @property
    def defines_target(self) -> bool:
        """Whether the criterion is defined by its target rather than by a rejection vector."""
        return self.kind is CriterionKind.TARGET

    @property
    def reads_logprobs(self) -> bool:
        """Whether the engine hands this criterion log-probabilities: true when the class implements
        :meth:`log_rejection` (a :class:`TargetCriterion`: ``log_target``) rather than the plain method."""
        return type(self).log_rejection is not Criterion.log_rejection

    @property
    def label(self) -> str:
        """The name and the package that provides it, for error messages (set by the registry)."""
        package = getattr(self, "package", None) or type(self).__module__.split(".")[0]
        return f"{self.name!r} (package {package})"

    def rejection(
        self, p: torch.Tensor, q_star: torch.Tensor | None = None, q: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The rejection probabilities mu (``[B, V]``, in [0, 1]) of p's draft.

        Implement this or :meth:`log_rejection`; the default calls the latter with ``log`` of its inputs.
        """
        if not self.reads_logprobs:
            raise NotImplementedError(
                f"{type(self).__name__} implements neither rejection() nor log_rejection()"
            )
        return self.log_rejection(*(_log(t) for t in (p, q_star, q)))  # type: ignore[arg-type]

    def log_rejection(
        self, log_p: torch.Tensor, log_q_star: torch.Tensor | None = None, log_q: torch.Tensor | None = None
    ) -> torch.Tensor:
        """mu from log-probabilities (``-inf`` where a token has no mass); optional, see :meth:`rejection`.

        The engine passes exact ``log_softmax`` values, so ratios of probabilities that underflow in
        float32 stay finite and right.
        """
        raise NotImplementedError

    def target(self, p: torch.Tensor, q_star: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        """The closed-form next-token distribution pi (``[B, V]``) this criterion samples from."""
        return mixture.pgm_target(p, q_star, self.rejection(p, q_star, q))

    def describe_params(self) -> str:
        """``name=value`` pairs, for logs, cache keys and ``repr``."""
        return ", ".join(f"{k}={v:g}" for k, v in self.params.items())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe_params()})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.params == other.params  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.params.items()))))

    @classmethod
    def defaults(cls) -> Mapping[str, float]:
        return {param.name: param.default for param in cls.params}


class TargetCriterion(Criterion):
    """A criterion defined by its target distribution (e.g. proxy tuning's ``p * q*/q``).

    The engine samples the target exactly. Where the target is also a rejection PGM (see
    :func:`proxyalign.mixture.pgm_decomposition`) it samples in two stages so provenance is known, and it
    reports how often that held.
    """

    @property
    def kind(self) -> CriterionKind:
        return CriterionKind.TARGET

    @property
    def reads_logprobs(self) -> bool:
        return type(self).log_target is not TargetCriterion.log_target

    def target(self, p: torch.Tensor, q_star: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        """pi (``[B, V]``). Implement this or :meth:`log_target`; the default normalises the latter
        applied to ``log`` of the inputs."""
        if not self.reads_logprobs:
            raise NotImplementedError(f"{type(self).__name__} implements neither target() nor log_target()")
        scores = self.log_target(_log(p), _log(q_star), _log(q))  # type: ignore[arg-type]
        return torch.softmax(scores, dim=-1)

    def log_target(
        self, log_p: torch.Tensor, log_q_star: torch.Tensor, log_q: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Unnormalised log-scores of pi from log-probabilities (the engine normalises them with a
        softmax in float32); optional, see :meth:`target`."""
        raise NotImplementedError

    def rejection(
        self, p: torch.Tensor, q_star: torch.Tensor | None = None, q: torch.Tensor | None = None
    ) -> torch.Tensor:
        """mu of the PGM decomposition of the target; rows where none exists get NaN."""
        if q_star is None:
            raise ValueError(f"criterion {self.name!r} needs q_star")
        decomposition = mixture.pgm_decomposition(p, q_star, self.target(p, q_star, q))
        return torch.where(decomposition.holds.unsqueeze(-1), decomposition.mu, torch.nan)
