"""Shared helpers for the benchmark scripts: device and threads, timing, peak memory, Markdown output.

Small on purpose; every benchmark (optimizer cost, scaling, the task scripts) measures the same way:

* :func:`pick_device` / :func:`set_threads` — ``"auto"`` means CUDA when present; the CPU thread count is
  fixed once per process (children get the same value) and printed in every header.
* :func:`time_ms` — warm-up calls excluded, one sample per call, ``before()`` runs outside the timed region;
  on CUDA the time comes from ``torch.cuda.Event`` pairs with a synchronize, on CPU from ``perf_counter``.
  Report :func:`median` of the samples.
* :func:`reset_peak` / :func:`peak_bytes` — CUDA ``max_memory_allocated``; on CPU the process's peak RSS
  (``VmHWM``, else ``ru_maxrss``), which is monotone, hence :func:`run_child`: one fresh process per memory
  measurement.
* :func:`header`, :func:`markdown_table`, :func:`save` — results as Markdown with the command, machine,
  torch version and date, written to ``benchmarks/results/<name>_<device>.md``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
_RESULT_TAG = "BENCH_RESULT "


# ----------------------------------------------------------------------------- device and threads
def pick_device(name: str = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` when available, else ``cpu``; ``"cuda"`` without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return torch.device(name)


def set_threads(n: int | None) -> int:
    """Fix torch's intra-op CPU threads (default: all cores, ``os.cpu_count()``) and return the number."""
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(device: torch.device) -> str:
    """One line: CPU model and cores, and the GPU name when the device is CUDA."""
    text = f"{cpu_model()}, {os.cpu_count()} cores"
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text


def header(title: str, device: torch.device, threads: int, notes: Sequence[str] = ()) -> str:
    """Markdown header: the exact command, machine, torch version, threads and date."""
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    lines = [
        f"## {title}",
        "",
        f"- command: `{cmd}`",
        f"- machine: {machine(device)}; device `{device}`; torch {torch.__version__}; "
        f"torch.get_num_threads() = {threads}",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        *[f"- {n}" for n in notes],
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- timing
def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    repeats: int,
    warmup: int = 1,
    before: Callable[[], object] | None = None,
) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls.

    ``before`` (e.g. re-arming a refresh) runs before every call, untimed. The device is synchronized before
    each timed call; CUDA uses events, CPU ``time.perf_counter``.
    """
    samples = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            samples.append(ms)
    return samples


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def amortized(normal_ms: float, refresh_ms: float, gap: int) -> float:
    """Mean step time when one step in ``gap`` is a refresh: ``(normal·(gap−1) + refresh) / gap``."""
    return (normal_ms * (gap - 1) + refresh_ms) / gap


# ----------------------------------------------------------------------------- memory
def reset_peak(device: torch.device) -> None:
    """Start a peak-memory window (CUDA only: on CPU peak RSS cannot be reset, use a fresh process)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    """CUDA ``max_memory_allocated`` since :func:`reset_peak`; on CPU the process's peak RSS since it began."""
    if device.type == "cuda":
        sync(device)
        return int(torch.cuda.max_memory_allocated(device))
    # VmHWM belongs to this address space; ru_maxrss is NOT reset by execve on Linux, so a child started by a
    # big parent would report the parent's RSS at fork time.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def current_bytes(device: torch.device) -> int:
    """Currently allocated CUDA bytes, or current RSS on CPU (Linux ``/proc``)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def emit_result(payload: dict) -> None:
    """Child side of :func:`run_child`: print one tagged JSON line."""
    print(_RESULT_TAG + json.dumps(payload), flush=True)


def run_child(argv: Sequence[str], timeout: float = 1800) -> dict:
    """Run ``python *argv`` in a fresh process and return the dict it passed to :func:`emit_result`."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG) :])
    raise RuntimeError(
        f"child {' '.join(argv)} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )


# ----------------------------------------------------------------------------- output
def mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.1f}"


def ms(x: float | None) -> str:
    if x is None or x != x:
        return "—"
    return f"{x:,.2f}" if x < 100 else f"{x:,.0f}"


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as ``0.42×`` (below 1: ``a`` is smaller/faster)."""
    if a is None or b is None or b == 0 or a != a or b != b:
        return "—"
    return f"{a / b:.2f}×"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def save(name: str, device: torch.device, text: str, out_dir: Path | None = None) -> Path:
    """Write ``text`` to ``<out_dir or benchmarks/results>/<name>_<device type>.md`` and return the path."""
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{device.type}.md"
    path.write_text(text)
    return path
