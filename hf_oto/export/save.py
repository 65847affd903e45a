"""save_pruned: write a pruned model as a standard Hugging Face repo, atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from hf_oto.errors import ExportError
from hf_oto.subnet import remote_code

REMOTE_MODULE = "modeling_hfoto"


def save_pruned(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    source: str | None = None,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
    extra_manifest: dict[str, Any] | None = None,
) -> Path:
    """Save a model built by :func:`hf_oto.construct_subnet` as a loadable Hugging Face repo.

    Writes config.json (every dimension explicit), safetensors weights, tokenizer files, the
    generation config, ``pruning_manifest.json`` and a README model card. Layers of different sizes
    get self-contained remote code (load with ``trust_remote_code=True``). The folder is written
    next to ``out_dir`` and renamed into place, so a failure leaves no half-written export.
    """
    out = Path(out_dir)
    source = source or getattr(model.config, "_name_or_path", None) or None
    manifest = getattr(model, "hf_oto_manifest", None)
    if manifest is None:
        raise ExportError("save_pruned takes the model returned by construct_subnet (it has no hf_oto_manifest)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write(model, tmp, tokenizer, manifest, source, max_shard_size, extra_manifest or {})
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "dir")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _write(model, tmp: Path, tokenizer, manifest, source, max_shard_size, extra) -> None:
    config = model.config
    per_layer = bool(getattr(config, remote_code.LAYERS_KEY, None))
    base_name = config.hf_oto_layers["base_class"] if per_layer else None
    had_auto_map = "auto_map" in config.__dict__
    saved_auto_map = getattr(config, "auto_map", None)
    config.hf_oto = {"source": source, "layout": manifest["layout"]}
    if per_layer:
        config.auto_map = {_auto_class(model): f"{REMOTE_MODULE}.HFOTOPrunedModel"}
    try:
        # Remote code gets no checkpoint-key conversions when loaded, so per-layer exports keep the
        # model's own parameter names; stock exports keep transformers' original key format.
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size,
                              save_original_format=not per_layer)
    finally:  # the caller's model object keeps its config as it was
        del config.hf_oto
        if had_auto_map:
            config.auto_map = saved_auto_map
        elif "auto_map" in config.__dict__:
            del config.auto_map
    if per_layer:
        code = Path(remote_code.__file__).read_text()
        code += f'\n\nHFOTOPrunedModel = pruned_class("{base_name}")\n'
        (tmp / f"{REMOTE_MODULE}.py").write_text(code)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    full = dict(manifest, source=source, **extra)
    (tmp / "pruning_manifest.json").write_text(json.dumps(full, indent=1))
    (tmp / "README.md").write_text(render_card(full, trust_remote_code=per_layer, repo_class=_auto_class(model)))
    _check_no_pickles(tmp)


def _auto_class(model: nn.Module) -> str:
    """The Auto class that loads this model, read from transformers' own mappings."""
    from transformers.models.auto import modeling_auto as ma

    name = type(model).__name__
    for auto_name, mapping in (
        ("AutoModelForCausalLM", ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
        ("AutoModelForMaskedLM", ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
        ("AutoModelForSequenceClassification", ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
        ("AutoModel", ma.MODEL_MAPPING_NAMES),
    ):
        if name in set(mapping.values()):
            return auto_name
    return "AutoModel"


def _check_no_pickles(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle"):
            raise ExportError(f"refusing to export a pickle: {f.name}")


def render_card(manifest: dict[str, Any], *, trust_remote_code: bool, repo_class: str) -> str:
    """Fill the model card template of ``model_cards/`` with the manifest's facts."""
    template = resources.files("hf_oto.model_cards").joinpath("pruned_model.md").read_text()
    before, after = manifest["params_before"], manifest["params_after"]
    rows = []
    for s in manifest["sets"]:
        rows.append(f"| {s['layer']} | `{s['module']}` | {s['kind']} | {len(s['kept'])} / {s['groups']} |")
    load_kw = ", trust_remote_code=True" if trust_remote_code else ""
    return template.format(
        source=manifest.get("source") or "unknown",
        base_model_line=f"base_model: {manifest['source']}\n" if manifest.get("source") else "",
        model_type=manifest["model_type"],
        params_before=f"{before:,}",
        params_after=f"{after:,}",
        kept_pct=f"{100.0 * after / max(before, 1):.1f}",
        layout=manifest["layout"],
        auto_class=repo_class,
        load_kwargs=load_kw,
        remote_note=(
            "Its layers differ in size, so the repo ships `modeling_hfoto.py` (it only imports "
            "transformers); load it with `trust_remote_code=True`."
            if trust_remote_code
            else "Every layer keeps the same counts, so `config.json` is the stock architecture config: "
            "it loads with plain transformers and no custom code."
        ),
        table="\n".join(rows),
    )
