"""Resume: weights that transformers' Trainer does not load back by itself.

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

from hf_oto.errors import ResumeError
from hf_oto.groups import unwrap_peft

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
