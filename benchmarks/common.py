"""Helpers shared by the benchmark scripts: timing, peak memory, machine description."""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class PeakMemory:
    """Peak GPU memory allocated (CUDA) or peak process RSS above the start (CPU), in MiB."""

    def __init__(self):
        self.peak = 0.0

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        proc = psutil.Process()
        self._base = proc.memory_info().rss
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, (proc.memory_info().rss - self._base) / 2**20)
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()


# The embedded default before it learned skin, chest X-ray, fetal ultrasound and clicks (main fbd9375): the
# base of the corrections benchmark for those never-seen domains (docs/corrections.md). Taken from git history,
# not copied into the package.
TWO_MODALITY_DEFAULT = "git:fbd9375"
DEFAULT_ASSET = "napari_vlsm/assets/default_film_unet"


def model_from_git(spec: str, cache_root="runs/git_models") -> str:
    """A model spec as it is, or for ``git:REV[:PATH]`` the model folder PATH (the embedded default's by
    default) as it was at commit REV, extracted once with ``git archive`` into ``cache_root/REV``."""
    import subprocess
    import tarfile
    from io import BytesIO
    from pathlib import Path

    if not spec.startswith("git:"):
        return spec
    rev, _, path = spec[4:].partition(":")
    path = path or DEFAULT_ASSET
    root = Path(__file__).resolve().parents[1]
    out = root / cache_root / rev.replace("/", "_")
    folder = out / path
    if not (folder / "config.json").exists():
        data = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", rev, path], check=True,
                              capture_output=True).stdout
        tmp = out.with_name(out.name + ".tmp")
        with tarfile.open(fileobj=BytesIO(data)) as tar:
            tar.extractall(tmp, filter="data")
        tmp.rename(out) if not out.exists() else None
    return str(folder)
