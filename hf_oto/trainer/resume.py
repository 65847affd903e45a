"""Resume: the pruning settings a checkpoint was trained with, and the weights transformers' Trainer
does not load back by itself.

Every checkpoint gets ``hf_oto_pruning.json`` (:class:`RecordPruningSettings`); a resume with other
settings is refused up front (:func:`changed_pruning_settings`, read by the main job's pre-flight), and a
setting the checkpoint predates resumes as it was trained (:data:`ADDED_SETTINGS`).

transformers 5 writes MoE checkpoints in the Hub's per-expert layout (``save_pretrained`` converts the
fused expert weights back), while ``Trainer`` resumes with a plain ``load_state_dict`` that cannot read
that layout: the expert weights and routers silently keep the values of the freshly built model
(transformers issue 48805, seen in 5.25). :func:`reload_converted` notices the mismatch and loads the
checkpoint through ``from_pretrained``, which converts, so a resumed MoE run continues bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import TrainerCallback

from hf_oto.errors import ResumeError
from hf_oto.groups import unwrap_peft
from hf_oto.io import JSONObject, write_text_atomic
from hf_oto.trainer.args import HFOTOTrainingArguments

CHECKPOINT_SETTINGS = "hf_oto_pruning.json"  # the pruning settings a checkpoint was trained with
# Settings added after hf-oto 0.1.0, with the value that reproduces a checkpoint saved before them:
# such a checkpoint resumes with that value where the setting is left at "auto" (or None).
ADDED_SETTINGS: JSONObject = {"pruning_pricing": "saliency", "pruning_granularity": "width",
                                  "prune_experts": False, "distill_teacher_dtype": "same", "qfa_shared_rank": 0}
_UNSET = ("auto", None)  # the values that mean "left to hf-oto", which a checkpoint's own value replaces
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def checkpoint_keys(checkpoint: str | os.PathLike) -> set[str] | None:
    """Tensor names of a checkpoint folder's safetensors weights (None when it has none)."""
    folder = Path(checkpoint)
    if (folder / INDEX).is_file():
        return set(json.loads((folder / INDEX).read_text())["weight_map"])
    if (folder / WEIGHTS).is_file():
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            return set(f.keys())
    return None


@torch.no_grad()
def reload_converted(model: nn.Module, checkpoint: str | os.PathLike) -> bool:
    """Load ``checkpoint`` into ``model`` through ``from_pretrained`` when its tensor names are not the
    model's own (a converted MoE layout); returns whether it did. Plain and peft models are left alone."""
    if unwrap_peft(model) is not model or not hasattr(model, "from_pretrained"):
        return False
    names = checkpoint_keys(checkpoint)
    own = set(model.state_dict())
    if names is None or names <= own:
        return False
    try:
        loaded = type(model).from_pretrained(str(checkpoint), dtype=next(model.parameters()).dtype)
    except Exception as e:  # noqa: BLE001 - say which checkpoint could not be read, and why
        raise ResumeError(f"{checkpoint}: its weights are stored in a converted layout that from_pretrained could "
                          f"not read back ({type(e).__name__}: {e})") from e
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if k in names]:
        raise ResumeError(f"{checkpoint}: its converted weights do not match the model (missing "
                          f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    return True


class RecordPruningSettings(TrainerCallback):
    """Writes the pruning settings into every checkpoint, so a resume with other settings is refused up front."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and isinstance(args, HFOTOTrainingArguments):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_text_atomic(folder / CHECKPOINT_SETTINGS, json.dumps(args.pruning_settings(), indent=1,
                                                                           sort_keys=True))
        return control


def saved_settings(checkpoint: str | os.PathLike) -> JSONObject | None:
    """The pruning settings ``checkpoint`` was trained with (None for a checkpoint without them)."""
    path = Path(checkpoint) / CHECKPOINT_SETTINGS
    return json.loads(path.read_text()) if path.is_file() else None


def adopt_added_settings(checkpoint: str | os.PathLike, args: HFOTOTrainingArguments) -> None:
    """Settings left at "auto" that ``checkpoint`` predates take the value it was trained with."""
    saved = saved_settings(checkpoint)
    for name, old in ADDED_SETTINGS.items():
        if saved is not None and name not in saved and getattr(args, name) in _UNSET:
            setattr(args, name, old)
    if saved is not None:
        args.auto_rule = saved.get("auto_rule", 1)  # "auto" decides as it did when the checkpoint was trained


def changed_pruning_settings(checkpoint: str | os.PathLike, args: HFOTOTrainingArguments) -> dict[str, tuple]:
    """Pruning settings that differ from those ``checkpoint`` was saved with: name -> (saved, now).

    A setting the checkpoint predates counts as its :data:`ADDED_SETTINGS` value, which "auto" adopts."""
    saved = saved_settings(checkpoint)
    if saved is None:
        return {}
    now = json.loads(json.dumps(args.pruning_settings()))
    for name, old in ADDED_SETTINGS.items():
        if name not in saved:
            saved[name] = old
            if now.get(name) in _UNSET:
                now[name] = old
    now["auto_rule"] = saved["auto_rule"] = saved.get("auto_rule", 1)  # resumed under the checkpoint's rule
    return {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
