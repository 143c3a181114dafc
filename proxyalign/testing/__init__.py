"""Test helpers for proxyalign, its integrations and third-party criterion plugins."""

from proxyalign.testing.conformance import CriterionConformanceTests, check_criterion
from proxyalign.testing.tiny import (
    REAL_PAIR,
    real_pair_dirs,
    real_tokenizer,
    save_tiny_pair,
    tiny_aligner,
    tiny_byte_aligner,
    tiny_byte_tokenizer,
    tiny_chat_aligner,
    tiny_chat_model,
    tiny_model,
    tiny_tokenizer,
)

__all__ = [
    "REAL_PAIR",
    "CriterionConformanceTests",
    "check_criterion",
    "real_pair_dirs",
    "real_tokenizer",
    "save_tiny_pair",
    "tiny_aligner",
    "tiny_byte_aligner",
    "tiny_byte_tokenizer",
    "tiny_chat_aligner",
    "tiny_chat_model",
    "tiny_model",
    "tiny_tokenizer",
]
