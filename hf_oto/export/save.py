"""save_pruned: write a pruned model as a standard Hugging Face repo, atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from hf_oto.errors import ExportError
from hf_oto.export.card import render_card
from hf_oto.export.formats import REMOTE_MODULE, ExportFormat, remote_code_text, resolve_format, rewrite_config
from hf_oto.export.plot import plot_kept
from hf_oto.io import JSONObject, check_no_pickles, check_target, discard, publish, staging_dir, write_text_atomic
from hf_oto.manifest import MANIFEST_FILE as MANIFEST
from hf_oto.manifest import Manifest
from hf_oto.subnet import Subnet


def save_pruned(
    subnet: Subnet,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    source: str | None = None,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
    extra_manifest: dict[str, Any] | None = None,
    license: str | None = None,
    export_format: ExportFormat = "auto",
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save what :func:`hf_oto.construct_subnet` returned as a loadable Hugging Face repo.

    Writes config.json (every dimension explicit), safetensors weights, tokenizer files, the
    generation config, ``pruning_manifest.json``, a README model card and ``pruning_plot.png``
    (kept structures per layer). ``license`` defaults to the one in a local source folder's card.
    ``extra_manifest`` adds :class:`~hf_oto.manifest.Manifest` fields (``hesso``: the settings that
    ran, ``eval``: metric -> value, ...). Layers of different sizes
    get self-contained remote code (load with ``trust_remote_code=True``); ``export_format`` picks how
    such a config is written (see :mod:`hf_oto.export.formats`): ``"auto"`` writes Llama models whose
    layers differ only in FFN width and kv heads as DeciLM (vLLM and llama.cpp run it) and the rest
    as ``"remote_code"``; a form the model cannot take is refused before anything is written. The folder is written
    next to ``out_dir`` and renamed into place, so a failure leaves no half-written export.
    ``overwrite=True`` replaces an earlier hf-oto export at ``out_dir``, never another non-empty folder.
    ``extra_files`` maps file names (no folders) to text written into the repo (the job's recipe).
    The card's ``base_model`` is ``source`` when that is a Hub id, or the ``base_model`` of a local
    source folder's own card; a local path never goes into it (the Hub refuses those).
    """
    if not isinstance(subnet, Subnet):
        raise ExportError("save_pruned takes what construct_subnet returns (a Subnet: the model and its manifest), "
                          f"not a {type(subnet).__name__}")
    out = Path(out_dir)
    model = subnet.model
    source = source or getattr(model.config, "_name_or_path", None) or None
    form = resolve_format(model.config, export_format)
    for name in extra_files or {}:
        if Path(name).name != name or name in ("config.json", MANIFEST, "README.md"):
            raise ExportError(f"extra file name {name!r}: a plain file name that is not one the export writes")
    check_target(out, overwrite=overwrite, marker=MANIFEST)
    tmp = staging_dir(out)
    try:
        license = license or source_license(source)
        _write(model, tmp, tokenizer, subnet.manifest.with_(export_format=form), source, max_shard_size,
               extra_manifest or {}, license)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        return publish(tmp, out)
    finally:
        discard(tmp)


def _local_card(source: str | None) -> JSONObject:
    """The metadata of a local source folder's model card (no network); empty when there is none."""
    if not source or not (Path(source) / "README.md").is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(Path(source) / "README.md").data.to_dict()
    except Exception:  # a card without valid metadata carries nothing
        return {}


def source_license(source: str | None, *, allow_network: bool = False) -> str | None:
    """The license on the source model's card: a local folder's README, or (only with ``allow_network``,
    when the model itself came from the Hub) the Hub card of a Hub id."""
    if is_hub_id(source) and allow_network:
        try:
            from huggingface_hub import ModelCard

            return ModelCard.load(source).data.to_dict().get("license")
        except Exception:  # noqa: BLE001 - no card, no network: the export simply names no license
            return None
    return _local_card(source).get("license")


def is_hub_id(name: Any) -> bool:
    """Whether ``name`` is a valid Hub repo id and not a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or not name or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_base_model(source: str | None) -> str | None:
    """The Hub id to name as ``base_model``: the source itself, or the base_model of a local source's card."""
    if is_hub_id(source):
        return source
    base = _local_card(source).get("base_model")
    base = base[0] if isinstance(base, list) and len(base) == 1 else base
    return base if is_hub_id(base) else None


def _write(model: nn.Module, tmp: Path, tokenizer, manifest: Manifest, source, max_shard_size, extra: dict[str, Any],
           license) -> None:
    config = model.config
    form = manifest.export_format
    per_layer = manifest.per_layer
    auto_class = _auto_class(model)
    config.hf_oto = {"source": source, "layout": manifest.layout}
    try:
        # Remote code gets no checkpoint-key conversions when loaded, so per-layer exports keep the
        # model's own parameter names; stock exports keep transformers' original key format.
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size,
                              save_original_format=not per_layer)
    finally:  # the caller's model object keeps its config as it was
        del config.hf_oto
    if per_layer:  # the saved config.json becomes the format's own (auto_map included), not the model's
        rewrite_config(tmp, config, form, auto_class)
        base_name = config.hf_oto_layers["base_class"]
        (tmp / f"{REMOTE_MODULE}.py").write_text(remote_code_text(base_name, form, auto_class))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    add_compat_fields(tmp)
    full = manifest.with_(source=source, base_model=hub_base_model(source), license=license, auto_class=auto_class,
                          **extra)
    full.write(tmp)
    (tmp / "README.md").write_text(render_card(full))
    plot_kept(full, tmp / "pruning_plot.png")
    check_no_pickles(tmp)


def record_lm_eval(folder: str | Path, scores: dict[str, dict[str, float]], limit: float | None) -> None:
    """Add lm-eval scores (``{task: {metric: value}}``) to an export's manifest and card (model-index)."""
    manifest = Manifest.read(folder).with_(lm_eval={"tasks": scores, "limit": limit})
    card = render_card(manifest)
    manifest.write(folder)
    write_text_atomic(Path(folder) / "README.md", card)


def add_compat_fields(folder: Path) -> None:
    """Fields that older readers need, written beside transformers 5's own (which ignores them).

    transformers 4.x (which optimum-onnx pins) and converters read a top-level ``rope_theta`` and
    ``rope_scaling``, not ``rope_parameters``; without them they silently fall back to theta 10000.
    They also know ``PreTrainedTokenizerFast`` but not transformers 5's ``TokenizersBackend``.
    """
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and config.get("rope_scaling") is None:
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok_path = folder / "tokenizer_config.json"
    if tok_path.is_file() and (folder / "tokenizer.json").is_file():
        tok = json.loads(tok_path.read_text())
        if tok.get("tokenizer_class") == "TokenizersBackend":
            tok["tokenizer_class"] = "PreTrainedTokenizerFast"
            tok_path.write_text(json.dumps(tok, indent=2) + "\n")


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


