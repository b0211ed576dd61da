"""Device and precision choice: CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda", "mps")  # the choices offered; cuda:N names one of several GPUs
DEVICE_HELP = "auto (CUDA, then Apple's MPS, then the CPU), cpu, cuda, cuda:N (e.g. cuda:1, the second GPU) or mps."


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """Return ``device`` if given (other than "auto"), else the best one available."""
    import torch

    if device is not None and str(device) != "auto":
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"Unknown device {device!r}; use {DEVICE_HELP}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Device {device!r} was asked for, but CUDA is not available here (this torch build "
                             f"is {torch.__version__}); use the device auto or cpu.")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"There is no {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
        mps = getattr(torch.backends, "mps", None)
        if dev.type == "mps" and not (mps is not None and mps.is_available()):
            raise ValueError("Device 'mps' was asked for, but Apple's MPS is not available here; use auto or cpu.")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """Inference precision: bf16 (or fp16 where bf16 is unsupported) on GPU, fp32 on CPU."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
        if str(dtype) not in names:
            raise ValueError(f"Unknown precision {dtype!r}; use auto, fp32, bf16 or fp16.")
        return names[str(dtype)]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """Short human label such as 'cuda:0 (NVIDIA H200), bfloat16'."""
    import torch

    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    return f"{name}, {str(dtype).replace('torch.', '')}"


def cpu_threads() -> int:
    """The CPU cores this process may use (its affinity, not the machine's count): the thread
    count for training, set on purpose rather than left to torch's default."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)
