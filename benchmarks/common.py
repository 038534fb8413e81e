"""Timing and memory helpers shared by the benchmark scripts (no project imports).

Timings synchronise CUDA before reading the clock. On a shared CPU, use the minimum or the
median of several repetitions; ``Stopwatch`` records wall and process CPU time together.
Peak memory: CUDA ``max_memory_allocated`` on a GPU; on the CPU the peak resident set size
(RSS) sampled every 2 ms in a background thread while the measured block runs.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall (perf_counter) and process CPU time (process_time) of a block, CUDA-synchronised."""

    def __init__(self, device: torch.device):
        self.device = device
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Stopwatch:
        sync(self.device)
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryMeter:
    """Peak memory of a block: ``peak_mb`` (absolute) and ``delta_mb`` (over the start)."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device = device
        self.interval = interval
        self.peak_mb = self.delta_mb = 0.0

    def __enter__(self) -> MemoryMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._peak = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        self.peak_mb = peak / 2**20
        self.delta_mb = (peak - self._start) / 2**20


def time_methods(obj: object, names: list[str], device: torch.device,
                 when: dict[str, Callable[[], bool]] | None = None) -> dict[str, list[float]]:
    """Wrap ``obj``'s methods to record their EXCLUSIVE wall time in ms (nested calls of other
    wrapped methods are subtracted), CUDA-synchronised before and after each call. A call is
    recorded only if ``when[name]()`` (checked before the call) is true."""
    records: dict[str, list[float]] = {n: [] for n in names}
    stack: list[float] = []
    when = when or {}

    def wrap(name: str, original: Callable) -> Callable:
        def timed(*args, **kwargs):
            if not when.get(name, lambda: True)():
                return original(*args, **kwargs)
            sync(device)
            start = time.perf_counter()
            stack.append(0.0)
            try:
                return original(*args, **kwargs)
            finally:
                sync(device)
                elapsed = time.perf_counter() - start
                inner = stack.pop()
                records[name].append((elapsed - inner) * 1e3)
                if stack:
                    stack[-1] += elapsed

        return timed

    for name in names:
        setattr(obj, name, wrap(name, getattr(obj, name)))
    return records


def summary(values: list[float]) -> dict[str, float]:
    """min / median / mean of a list (nan when empty)."""
    if not values:
        return {"min": math.nan, "median": math.nan, "mean": math.nan, "n": 0}
    return {"min": min(values), "median": statistics.median(values),
            "mean": statistics.fmean(values), "n": len(values)}


PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@contextmanager
def autocast(device: torch.device, precision: str):
    """Autocast like Lightning's for ``bf16-mixed`` / ``16-mixed``, nothing for ``32-true``."""
    if precision in _AUTOCAST_DTYPES:
        with torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision]):
            yield
    elif precision in ("32-true", "32"):
        yield
    else:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def as_run(device: torch.device, precision: str) -> str:
    """The precision Lightning actually runs: ``16-mixed`` becomes ``bf16-mixed`` on a CPU. A
    baseline uses it too, so both sides of a comparison compute in the same dtype."""
    return "bf16-mixed" if device.type == "cpu" and precision == "16-mixed" else precision


def release_memory(device: torch.device) -> None:
    """Free what earlier measurements left (reference cycles, the CUDA cache) so the next
    block's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """The loss scaler ``16-mixed`` needs (fp16 gradients underflow without it), as Lightning
    sets up for that precision; a disabled one (a no-op) for the other precisions."""
    return torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")


def profiler_activities(device: torch.device) -> list:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def profile_tables(prof, device: torch.device, host_rows: int = 30, device_rows: int = 15) -> str:
    """A finished torch.profiler's ops by host time, then (on a GPU) by device time."""
    averages = prof.key_averages()
    text = averages.table(sort_by="self_cpu_time_total", row_limit=host_rows)
    if device.type == "cuda":
        text += "\n" + averages.table(sort_by="self_cuda_time_total", row_limit=device_rows)
    return text
