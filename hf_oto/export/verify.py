"""Checks of saved repos: safetensors files that parse and are whole, and a reload without hf_oto."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from hf_oto.errors import ExportError

# Suffixes of pickle-based weight files: exports never write them and push refuses them.

NO_HF_OTO_PRELUDE = """
import importlib.abc, os, sys, threading, time
class _BlockHFOTO(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_oto" or name.startswith("hf_oto."):
            raise ImportError("hf_oto must not be needed to load an export")
sys.meta_path.insert(0, _BlockHFOTO())
def _exit_with_parent(parent=int(os.environ.get("HF_OTO_PARENT_PID") or os.getppid())):
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(3)
threading.Thread(target=_exit_with_parent, daemon=True).start()
"""
"""Code for a fresh Python process that must not import hf_oto. It also ends when its parent dies: the
parent passes its pid in ``HF_OTO_PARENT_PID`` (see :func:`child_env`), so a parent killed before the
child even started is noticed too."""


def child_env() -> dict[str, str]:
    """The environment for a process that runs :data:`NO_HF_OTO_PRELUDE`."""
    return dict(os.environ, HF_OTO_PARENT_PID=str(os.getpid()))


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (header unreadable, or data cut short), else None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return "shorter than a safetensors header"
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                return "truncated (its header runs past the end of the file)"
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"unreadable header ({exc})"
    if not isinstance(header, dict):
        return "unreadable header (not a JSON object)"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            return f"tensor {name} has no data offsets"
        end = max(end, int(offsets[1]))
    if 8 + n + end != size:
        return f"truncated or padded: the header describes {8 + n + end:,} bytes, the file has {size:,}"
    return None


def check_weights(folder: Path) -> list[Path]:
    """The folder's safetensors files after checking each one and the shard index; raises ExportError."""
    files = sorted(folder.glob("*.safetensors"))
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ExportError(f"{index_path} is corrupt ({exc})") from None
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise ExportError(f"{folder}: the shard index names missing files: {', '.join(missing[:3])}")
    for f in files:
        problem = safetensors_problem(f)
        if problem:
            raise ExportError(f"{f} is not a whole safetensors file: {problem}")
    return files


VERIFY = NO_HF_OTO_PRELUDE + textwrap.dedent(
    """
    import math, torch
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[3] == "1").eval()
    blocks = load_file(sys.argv[2])["blocks"]
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(blocks), 8):
            b = blocks[i:i + 8]
            total += float(model(input_ids=b, labels=b).loss) * len(b)
    print(math.exp(total / len(blocks)), sum(p.numel() for p in model.parameters()))
    """
)


def verify_export(out: Path, blocks: torch.Tensor) -> tuple[float, int]:
    """Perplexity and size of the export, loaded by a Python process that cannot import hf_oto.

    The evaluation blocks travel through a temporary file outside the user's folders, and the
    child process ends by itself if this one is killed.
    """
    from safetensors.torch import save_file

    out = Path(out).resolve()
    remote = "auto_map" in json.loads((out / "config.json").read_text())
    with tempfile.TemporaryDirectory(prefix="hf-oto-verify-") as tmp:
        probe = Path(tmp) / "eval.safetensors"
        save_file({"blocks": blocks.contiguous()}, probe)
        res = subprocess.run([sys.executable, "-c", VERIFY, str(out), str(probe), "1" if remote else "0"],
                             capture_output=True, text=True, cwd=tmp, env=child_env())
    if res.returncode != 0:
        raise RuntimeError(f"the export at {out} did not reload without hf_oto:\n{res.stderr[-3000:]}")
    ppl, n = res.stdout.strip().splitlines()[-1].split()
    return float(ppl), int(n)
