"""Exceptions users can catch by type; every message names the offending parameter or component."""

from __future__ import annotations

__all__ = [
    "ConstraintError",
    "CriterionError",
    "EngineClosedError",
    "InvalidParameterError",
    "InvalidPromptError",
    "ModelLoadError",
    "ProxyAlignError",
    "TokenizerMismatchError",
    "ToolCallError",
    "UnknownCriterionError",
]


class ProxyAlignError(Exception):
    """Base class of every error raised on purpose by proxyalign."""


class InvalidParameterError(ProxyAlignError, ValueError):
    """A parameter (of a criterion, of generation, of loading) is missing, unknown or out of range."""


class InvalidPromptError(InvalidParameterError):
    """A prompt is not valid text or chat messages (empty, bytes, invalid Unicode, unknown role ...)."""


class UnknownCriterionError(ProxyAlignError, KeyError):
    """No registered criterion has this name; the message lists those that do exist."""

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return str(self.args[0]) if self.args else ""


class CriterionError(ProxyAlignError, RuntimeError):
    """A criterion produced invalid output (NaN, wrong shape, mu outside [0, 1]) during decoding."""


class TokenizerMismatchError(ProxyAlignError, ValueError):
    """The models of a hybrid do not share one vocabulary."""


class ModelLoadError(ProxyAlignError, OSError):
    """A model could not be found or loaded; the message says what was tried."""


class EngineClosedError(ProxyAlignError, RuntimeError):
    """The engine was closed (``ProxyAligner.close()``); no request is accepted any more."""


class ConstraintError(ProxyAlignError, RuntimeError):
    """A constrained row reached a state its grammar allows no token from (fails that row only)."""


class ToolCallError(ProxyAlignError, ValueError):
    """A model's output holds a malformed tool call (raised only when parsing with ``strict=True``)."""
