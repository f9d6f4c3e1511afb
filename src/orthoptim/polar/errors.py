"""Errors raised by the polar engine (re-exported as ``orthoptim.NonFiniteError``)."""

from __future__ import annotations


class NonFiniteError(ValueError):
    """An input or result held NaN or ±Inf where the caller's non-finite policy is ``"raise"``."""
