"""push_pruned: create a Hub repo and upload an hf-oto export (weights, config, card, manifest)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hf_oto.errors import ExportError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def check_export(folder: str | Path) -> dict[str, Any]:
    """The export's manifest, after checking that ``folder`` is a complete hf-oto export."""
    path = Path(folder)
    if not path.is_dir():
        raise ExportError(f"{folder} is not a folder")
    for required in ("config.json", "pruning_manifest.json", "README.md"):
        if not (path / required).is_file():
            raise ExportError(f"{folder} is not an hf-oto export: {required} is missing")
    if not list(path.glob("*.safetensors")):
        raise ExportError(f"{folder} has no safetensors weights")
    pickles = [p.name for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ExportError(f"refusing to upload pickle files: {pickles}")
    return json.loads((path / "pruning_manifest.json").read_text())


def push_pruned(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str | None = None, api: Any = None) -> str:
    """Create ``repo_id`` (if needed) and upload the export; returns the commit URL.

    ``api`` defaults to ``huggingface_hub.HfApi(token=token)``; pass another object with the same
    ``create_repo`` / ``upload_folder`` methods to test or to redirect the upload.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ExportError(f"invalid repo id {repo_id!r}: {exc}") from exc
    manifest = check_export(folder)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    before, after = manifest["params_before"], manifest["params_after"]
    message = commit_message or (
        f"hf-oto pruned {manifest['model_type']}: {after:,} of {before:,} parameters "
        f"({100 * after / max(before, 1):.1f}%)"
    )
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=message, ignore_patterns=[".*"])
    return str(getattr(info, "commit_url", info))
