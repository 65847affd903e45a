"""Writing files safely, shared by every step that writes (exports, QFA runs, reports).

Atomic folder writes that never touch a user's folder by surprise, the pickle check, and the state
dict with tied tensors once.

A repo is written into a hidden staging folder beside its target and renamed into place. Staging
folders carry a marker with the writer's host and process id, so a later write can remove the
ones a killed process left behind, and nothing else. ``overwrite`` replaces only a folder that an
earlier hf-oto export wrote (it holds ``marker``), never some other folder of the user's.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn

from hf_oto.errors import ExportError

# What JSON (and YAML settings) files hold: the type of every boundary where a record becomes text.
JSON = None | bool | int | float | str | list["JSON"] | dict[str, "JSON"]
JSONObject = dict[str, JSON]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
STAGING_TAG = ".hf-oto-staging-"
STAGING_MARKER = ".hf-oto-staging.json"


def check_target(out: Path, *, overwrite: bool, marker: str, label: str | None = None,
                 hint: str = "pass overwrite=True", error: type[Exception] = ExportError) -> None:
    """Refuse a target that is a file, or a non-empty folder that ``overwrite`` may not replace (one that
    holds no ``marker``, i.e. no earlier hf-oto export of this kind). ``label``, ``hint`` and ``error`` let
    the job's pre-flight say the same in its own terms (the setting's name, a ConfigError)."""
    label = label or str(out)
    if out.exists() and not out.is_dir():
        raise error(f"{label} is a file, not a directory; give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise error(f"{label} is not empty; choose a new folder, or {hint} to replace an earlier hf-oto export there")
    if not (out / marker).is_file():
        raise error(f"{label} is not empty and holds no earlier hf-oto export (no {marker}); hf-oto replaces only "
                    "its own exports: choose another folder or empty this one")


def staging_dir(out: Path) -> Path:
    """A new, marked staging folder beside ``out`` (created with the user's umask)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    tmp = out.parent / f".{out.name}{STAGING_TAG}{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    (tmp / STAGING_MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    return tmp


def publish(tmp: Path, out: Path) -> Path:
    """Move the finished staging folder ``tmp`` to ``out``; an earlier folder there is replaced."""
    if out.exists():
        old = staging_dir(out)
        os.replace(out, old / "replaced")
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    (out / STAGING_MARKER).unlink()
    return out


def discard(tmp: Path) -> None:
    """Remove a staging folder after a failure."""
    if tmp.exists():
        shutil.rmtree(tmp)


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove staging folders of ``out`` left by hf-oto processes on this host that no longer run."""
    removed = []
    if not out.parent.is_dir():
        return removed
    host = socket.gethostname()
    for cand in out.parent.glob(f".{out.name}{STAGING_TAG}*"):
        try:
            info = json.loads((cand / STAGING_MARKER).read_text())
            pid, owner = int(info["pid"]), info["host"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours, or being written right now: leave it
        if owner == host and not _alive(pid):
            shutil.rmtree(cand, ignore_errors=True)
            removed.append(cand)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def unique_state(model: nn.Module, skip: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor once, under the name ``named_parameters`` reports (on the
    CPU), without the names in ``skip``."""
    keep = ({n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}) - set(skip)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in keep}


def check_no_pickles(folder: Path) -> None:
    """Refuse a folder about to be published that holds a pickle-format file."""
    for f in folder.rglob("*"):
        if f.suffix in PICKLE_SUFFIXES:
            raise ExportError(f"refusing to export a pickle: {f.name}")
