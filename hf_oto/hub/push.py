"""push_pruned: create a Hub repo and upload an hf-oto export (weights, config, card, manifest)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hf_oto.errors import ExportError, first_line
from hf_oto.export.verify import check_weights
from hf_oto.io import PICKLE_SUFFIXES
from hf_oto.manifest import MANIFEST_FILE as MANIFEST
from hf_oto.manifest import Manifest


def check_export(folder: str | Path) -> Manifest:
    """The export's manifest, after checking that ``folder`` is a complete, loadable hf-oto export.

    Checks, without any network: the required files; every safetensors file parses and is whole
    (and the shard index names only present files); ``config.json`` loads with ``AutoConfig``; the
    manifest is valid JSON with the fields a push reports; no pickle files.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ExportError(f"{folder} is not a folder")
    for required in ("config.json", MANIFEST, "README.md"):
        if not (path / required).is_file():
            raise ExportError(f"{folder} is not an hf-oto export: {required} is missing")
    pickles = [p.name for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ExportError(f"refusing to upload pickle files: {pickles}")
    if not check_weights(path):
        raise ExportError(f"{folder} has no safetensors weights")
    manifest = Manifest.read(path)  # one line on a corrupt or foreign manifest
    try:
        from transformers import AutoConfig

        auto_map = json.loads((path / "config.json").read_text()).get("auto_map") or {}
        if "AutoConfig" in auto_map:  # the export's own config class: check it is there, never run it here
            module = auto_map["AutoConfig"].split(".")[0] + ".py"
            if not (path / module).is_file():
                raise ExportError(f"{module} (named by auto_map) is missing")
        else:
            AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any reason the config does not load stops the push
        raise ExportError(f"{path / 'config.json'} does not load with AutoConfig: {first_line(exc)}") from None
    return manifest


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
    before, after = manifest.params_before, manifest.params_after
    message = commit_message or (
        f"hf-oto pruned {manifest.model_type}: {after:,} of {before:,} parameters "
        f"({100 * after / max(before, 1):.1f}%)"
    )
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=message, ignore_patterns=[".*"])
    return str(getattr(info, "commit_url", info))
