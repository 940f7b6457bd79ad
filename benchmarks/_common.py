"""Helpers shared by the benchmark scripts: side-by-side timing, peak memory, atomic outputs.

Benchmarks run on noisy shared machines, so conditions are always measured in one process,
interleaved round by round (A B C, C B A, A B C, ...), and reported as medians and ratios. Add
new helpers at the end; do not change the behaviour of existing ones (other scripts rely on it).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Benchmarks share a 2-core machine with other jobs: busy-waiting OpenMP threads then slow a
# step down 50-100x (measured: 2.1 s instead of 0.025 s). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lightning_anatomy import files  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_RLHF = SHARED_DATA / "hh-rlhf-harmless-test-a.jsonl"


# ------------------------------------------------------------------------------- environment
def log(message: str) -> None:
    """Progress goes to stderr, so stdout carries only the result tables."""
    print(message, file=sys.stderr, flush=True)


def setup_offline(threads: int | None = None) -> None:
    """Offline hubs/W&B and a fixed thread count, before any model is built."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("WANDB_MODE", "offline"),
                       ("WANDB_SILENT", "true"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    torch.set_num_threads(threads or min(2, os.cpu_count() or 1))


def release_free_memory() -> bool:
    """Hand freed heap memory back to the OS, so RSS shows live memory (`lightning_anatomy.heap`):
    without it, one condition's garbage would sit in the next condition's starting RSS."""
    from lightning_anatomy.heap import release_free_memory as release

    return release()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on (goes into every result file)."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    info: dict[str, Any] = {
        "device": device, "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gb": mem_gb, "python": platform.python_version(), "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


# ------------------------------------------------------------------------------- timing
def sync(device: str | torch.device = "cpu") -> None:
    """Wait for queued GPU work so a wall-clock reading covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: str | torch.device = "cpu") -> float:
    """Seconds one call of `fn` takes (GPU work included)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(
    conditions: Mapping[str, Callable[[], float | Sequence[float]]],
    *,
    repeats: int,
    warmup: int = 1,
    log: Callable[[str], None] | None = log,
) -> dict[str, list[float]]:
    """Run every condition once per round, alternating the order (ABC, CBA, ABC, ...).

    Each callable returns one sample (seconds) or several; warm-up rounds are discarded. The
    alternation puts each condition early and late equally often, so slow drifts of a shared
    machine (another job starting, thermal throttling) cancel out of the ratios.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(conditions)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            value = conditions[name]()
            values = [float(value)] if isinstance(value, int | float) else [float(v) for v in value]
            if round_ >= warmup:
                samples[name].extend(values)
        if log is not None:
            done = "warm-up" if round_ < warmup else f"{round_ - warmup + 1}/{repeats}"
            log(f"  round {done}: " + ", ".join(
                f"{n}={statistics.median(samples[n]):.4g}" for n in names if samples[n]))
    return samples


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min and count of a list of samples."""
    if not values:
        raise ValueError("summarize needs at least one sample")
    xs = sorted(float(v) for v in values)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": xs[0], "n": len(xs)}


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, refusing a zero or non-finite denominator (never silently inf/NaN)."""
    if not (math.isfinite(denominator) and denominator != 0 and math.isfinite(numerator)):
        raise ValueError(f"cannot form the ratio {numerator!r} / {denominator!r}")
    return numerator / denominator


# ------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line (not Linux?)")


def current_rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak RSS since the process started or since the last `reset_peak_rss()`."""
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ≥ 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory inside a `with` block: process RSS (host) and, on CUDA, allocated bytes.

    `rss_peak` is the process-wide peak; `rss_increase` the peak above the RSS at entry (what the
    block itself needed on top of what was already resident). Entry collects garbage and returns
    freed heap memory to the OS first, so the entry RSS is live memory only.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.rss_start = self.rss_peak = self.rss_increase = 0
        self.cuda_peak: int | None = None
        self.reset_ok = False

    def __enter__(self) -> PeakMemory:
        import gc

        gc.collect()
        release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.reset_ok = reset_peak_rss()
        self.rss_start = current_rss_bytes()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.rss_peak = peak_rss_bytes()
        self.rss_increase = max(self.rss_peak - self.rss_start, 0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peak = int(torch.cuda.max_memory_allocated(self.device))


# ------------------------------------------------------------------------------- outputs
def _check_finite(obj: Any, where: str = "result") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where} is {obj}; a benchmark result must be finite (or null when not measured)")
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_finite(v, f"{where}[{i}]")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temp file beside `path`, then rename: readers never see a partial file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_bytes(target, data)
    return target


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """JSON (sorted keys, 2-space indent) written atomically; NaN/inf anywhere raises, naming the key."""
    _check_finite(obj)
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def atomic_save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (format from the suffix of `path`)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    return atomic_write_bytes(path, buf.getvalue())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats shown with 4 significant digits."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@contextmanager
def matplotlib_agg():
    """matplotlib with the non-interactive Agg backend (no display on benchmark machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        yield plt
    finally:
        plt.close("all")


def quiet_libraries() -> None:
    """Silence Lightning's per-fit banners and transformers' info logs (benchmarks run many fits)."""
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "transformers", "datasets", "trl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def time_call_cpu(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call of `fn`.

    On a shared CPU machine the process CPU time barely moves when other jobs compete for the
    cores, while wall time can double: ratios of CPU times are the steadier measure there.
    """
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu



def select_settings(settings: tuple, names: list[str] | None) -> tuple:
    """The settings named by a script's `--models` (all when None); unknown names exit with the choices."""
    if not names:
        return settings
    unknown = sorted(set(names) - {s.name for s in settings})
    if unknown:
        raise SystemExit(f"--models: unknown setting(s) {unknown}; choose from {[s.name for s in settings]}")
    return tuple(s for s in settings if s.name in names)


# ------------------------------------------------------------------------- statistics, controls
def bootstrap_mean(values: Sequence[float], n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Mean and percentile-bootstrap 95% CI over seeds."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 1:
        return {"mean": float(x[0]), "ci": [float(x[0]), float(x[0])], "n": 1}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(x.mean()), "ci": [float(lo), float(hi)], "n": int(len(x))}


def bootstrap_ratio(num: Sequence[float], den: Sequence[float], n_boot: int, seed: int = 0, *,
                    any_change: bool = False) -> dict[str, Any]:
    """mean(num)/mean(den) with a paired bootstrap CI over seeds.

    null where unbounded: a resample (or the point estimate) whose condition rise is ≤ 0 counts
    as an infinite cut; the ratio itself is null when vanilla's rise is ≤ 0 (nothing to cut).
    With `any_change=True` the ratio is |mean(num)| / |mean(den)|: a condition that overshoots
    below the base changed the property too, and only no change at all is an infinite cut.
    """
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if a.mean() <= 0:
        return {"mean": None, "ci": [None, None], "note": "vanilla did not raise the spurious rate"}
    size = np.abs if any_change else (lambda v: v)
    point = float(abs(a.mean()) / size(b.mean())) if size(b.mean()) > 0 else None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    na, nb = size(a[idx].mean(1)), size(b[idx].mean(1))
    ratios = np.where(nb > 0, na / np.where(nb > 0, nb, 1.0), np.inf)
    ratios.sort()
    lo, hi = ratios[int(0.025 * (n_boot - 1))], ratios[int(math.ceil(0.975 * (n_boot - 1)))]
    fin = lambda v: float(v) if math.isfinite(v) else None  # noqa: E731
    out = {"mean": point, "ci": [fin(lo), fin(hi)]}
    if point is None:
        out["note"] = ("condition's mean change is 0: the change was eliminated" if any_change
                       else "condition's mean rise <= 0: the rise was eliminated")
    return out


def random_set(like: Any, hook: str, seed: int) -> Any:
    """Random directions of the same rank as `like` (seeded), the control for any projection."""
    from lightning_anatomy.concepts import ConceptSet

    k = like.basis(hook).shape[1]
    d = like[0].dim
    vectors = torch.randn(k, d, generator=torch.Generator().manual_seed(10_000 + seed))
    return ConceptSet.from_vectors(vectors, hook, names=[f"random{i}" for i in range(k)])


def publish(results: dict[str, Any], out: Path, name: str, tables: Callable[[dict[str, Any]], str],
            plot: Callable[[dict[str, Any], Path], None] | None = None) -> None:
    """A script's last step: `<out>/<name>.json` (+ `.png`) written atomically, its tables printed."""
    atomic_write_json(out / f"{name}.json", results)
    if plot is not None:
        plot(results, out / f"{name}.png")
    print(tables(results))
    log(f"wrote {out / (name + '.json')}{f' and {name}.png' if plot else ''} in {results['wall_s']:.0f} s")
