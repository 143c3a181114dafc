"""proxyalign: a large base model borrows a small aligned model's alignment at decoding time.

>>> import proxyalign
>>> [c.name for c in proxyalign.list_criteria()][:2]
['aligned', 'base']
"""

from proxyalign.aligner import GenerationConfig, ProxyAligner
from proxyalign.criteria.base import Criterion, CriterionKind, Param, TargetCriterion
from proxyalign.engine.results import FinishReason, Generation, GenerationChunk, GenerationStats, Source
from proxyalign.engine.scheduler import SchedulerConfig
from proxyalign.errors import (
    ConstraintError,
    CriterionError,
    EngineClosedError,
    InvalidParameterError,
    InvalidPromptError,
    ModelLoadError,
    ProxyAlignError,
    TokenizerMismatchError,
    ToolCallError,
    UnknownCriterionError,
)
from proxyalign.hookspecs import hookimpl
from proxyalign.plugins import get_criterion, list_criteria, reload_registry

__all__ = [
    "ConstraintError",
    "Criterion",
    "CriterionError",
    "CriterionKind",
    "EngineClosedError",
    "FinishReason",
    "Generation",
    "GenerationChunk",
    "GenerationConfig",
    "GenerationStats",
    "InvalidParameterError",
    "InvalidPromptError",
    "ModelLoadError",
    "Param",
    "ProxyAlignError",
    "ProxyAligner",
    "SchedulerConfig",
    "Source",
    "TargetCriterion",
    "TokenizerMismatchError",
    "ToolCallError",
    "UnknownCriterionError",
    "get_criterion",
    "hookimpl",
    "list_criteria",
    "reload_registry",
]
