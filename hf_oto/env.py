"""The versions that change hf-oto's behaviour, against the tested lock (``hf-oto env``, bug reports)."""

from __future__ import annotations

import functools
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

LOCK_FILE = Path(__file__).with_name("constraints.txt")
# "auto" precision on a CPU: bf16 only where its matrix product takes under this share of the fp32 time (the
# locked torch build: 0.4-0.6x on AMD EPYC machines with AVX512-BF16, 7-50x on Intel Xeon ones)
AUTO_BF16_BELOW = 0.75

# What a bug report needs, in this order; everything else in the lock is listed only when it differs.
KEY_PACKAGES = ("hf-oto", "torch", "transformers", "peft", "accelerate", "datasets", "evaluate", "safetensors",
                "huggingface_hub", "tokenizers", "compressed-tensors", "gguf", "numpy")


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def locked_versions(path: Path = LOCK_FILE) -> dict[str, str]:
    """``{package: version}`` of the lock file (``name==version`` lines)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[_norm(name)] = version.strip()
    return out


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _public(version: str | None) -> str | None:
    """The version without its local label (``2.13.0+cpu`` -> ``2.13.0``), as ``==`` compares them."""
    return None if version is None else version.split("+", 1)[0]


def lock_differences(lock: dict[str, str] | None = None) -> dict[str, tuple[str, str | None]]:
    """``{package: (locked, installed)}`` for every locked package whose installed version differs."""
    lock = locked_versions() if lock is None else lock
    out = {}
    for name, want in lock.items():
        have = installed_version(name)
        if _public(have) != want:
            out[name] = (want, have)
    return out


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the OS has one; else all of them)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def accelerator() -> str:
    """The device torch sees: CUDA device names, or 'cpu' (with bf16 support where the CPU has it)."""
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"cuda {torch.version.cuda}: {', '.join(names)}"
    return "cpu (no CUDA device)"


@functools.cache
def cpu_bf16_slowdown(size: int = 256, repeats: int = 3) -> float:
    """How many times longer a bf16 matrix product takes than an fp32 one on this CPU (best of ``repeats``).

    Measured once per process (per arguments), so every "auto" in a run (``bf16``, the distillation
    teacher's dtype) and the pre-flight warning decide on the same figure.

    Above 1, bf16 autocast slows CPU training down: some torch builds have no fast bf16 GEMM for the CPU
    they run on and fall back to a reference loop (measured 10-50x slower than fp32 on SmolLM2's shapes).
    """
    import time

    import torch

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        a @ b.t()  # first call: allocation and dispatch
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b.t()
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)


def fast_bf16(device) -> bool:
    """Whether bf16 pays on ``device``: a CUDA device that supports it, or a CPU whose bf16 matrix product
    takes under :data:`AUTO_BF16_BELOW` of the fp32 time (:func:`cpu_bf16_slowdown`). What ``auto`` picks
    for ``bf16`` (autocast) and ``distill_teacher_dtype``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_slowdown() < AUTO_BF16_BELOW
    return False


def report() -> str:
    """A plain-text report: Python, platform, accelerator, the key packages and how they meet the lock."""
    lock = locked_versions() if LOCK_FILE.exists() else {}
    lines = [f"- python: {sys.version.split()[0]}", f"- platform: {platform.platform()}",
             f"- accelerator: {accelerator()}",
             f"- cpu bf16 matrix product: {cpu_bf16_slowdown():.1f}x the fp32 time (above 1: bf16 autocast slows "
             "CPU training)"]
    for name in KEY_PACKAGES:
        have = installed_version(name)
        want = lock.get(_norm(name))
        mark = "" if want is None or _public(have) == want else f"  (locked: {want})"
        lines.append(f"- {name}: {have or 'not installed'}{mark}")
    if not lock:
        lines.append("- lock: no lock file found")
        return "\n".join(lines)
    diffs = lock_differences(lock)
    if not diffs:
        lines.append(f"- lock: every installed version is the locked one ({len(lock)} packages, {LOCK_FILE})")
    else:
        lines.append(f"- lock: {len(diffs)} of {len(lock)} packages differ from {LOCK_FILE}")
        key = {_norm(k) for k in KEY_PACKAGES}  # those are listed above
        lines += [f"  - {n}: {have or 'not installed'} (locked: {want})"
                  for n, (want, have) in sorted(diffs.items()) if n not in key]
    return "\n".join(lines)
