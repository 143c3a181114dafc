"""The three models of a hybrid, by role: one spelling for every module."""

from __future__ import annotations

__all__ = ["ALIGNED", "BASE", "ROLES", "SMALL_BASE"]

BASE = "base"  #: the large base model p
ALIGNED = "aligned"  #: the small aligned model q*
SMALL_BASE = "small_base"  #: the small base model q that q* was aligned from (some criteria read it)
ROLES: tuple[str, ...] = (BASE, ALIGNED, SMALL_BASE)
