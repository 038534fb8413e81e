"""``torch.compile`` options shared by the LightningModules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune")


def check_compile_mode(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {list(COMPILE_MODES)}, got {mode!r}")


def compiled_or_none(fn: Callable, enabled: bool, mode: str = "default") -> Callable | None:
    """``torch.compile(fn)`` in ``mode`` when ``enabled`` (``default`` passes no mode, so the
    backend keeps its own default), else None."""
    if not enabled:
        return None
    return torch.compile(fn, **({} if mode == "default" else {"mode": mode}))
