"""Export a pruned LoRA model as a pruned base repo plus a pruned adapter folder (peft format)."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from hf_oto.errors import ExportError
from hf_oto.export.save import MANIFEST, save_pruned
from hf_oto.groups import PruningSpace, discover_groups
from hf_oto.io import check_target, discard, publish, staging_dir
from hf_oto.subnet import construct_subnet
from hf_oto.subnet.construct import kept_indices

ADAPTER_MARKER = "hf_oto_adapter.json"


def save_base_and_adapter(peft_model: nn.Module, out_dir: str | os.PathLike, adapter_dir: str | os.PathLike, *,
                          layout: str = "uniform", tokenizer: Any = None, overwrite: bool = False,
                          extra: dict[str, Any] | None = None, license: str | None = None,
                          extra_files: dict[str, str] | None = None,
                          prepare: Callable[[nn.Module], None] | None = None,
                          export_format: str = "auto",
                          space_of: Callable[[nn.Module], PruningSpace] = discover_groups) -> tuple[Path, Path]:
    """Write the pruned base model (``save_pruned``) and the matching pruned adapter.

    Each LoRA ``B`` keeps the rows of its module's kept output features, each ``A`` the columns of
    its kept input features (DoRA magnitudes follow the rows), so base + adapter computes what the
    trained, zeroed peft model computed. ``prepare(small)`` may adjust the pruned base before it is
    saved (the trainer restores ``use_cache``). ``space_of(base)`` gives the pruning space of the unloaded
    base (discovery by default; the trainer adds what its settings added, whole experts say).
    ``peft_model`` is not modified.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapter_out = Path(adapter_dir)
    check_target(adapter_out, overwrite=overwrite, marker=ADAPTER_MARKER)
    check_target(Path(out_dir), overwrite=overwrite, marker=MANIFEST)
    name = peft_model.active_adapter
    config = copy.deepcopy(peft_model.peft_config[name])
    state = get_peft_model_state_dict(peft_model, adapter_name=name)
    base = copy.deepcopy(peft_model).unload()
    space = space_of(base)
    subnet = construct_subnet(base, space, layout=layout)
    small = subnet.model
    if prepare is not None:
        prepare(small)
    kept = kept_indices(space, subnet.manifest)
    small_shapes = {n: p.shape for n, p in small.named_parameters()}
    out_dim = 1 if getattr(config, "fan_in_fan_out", False) else 0

    sliced = {}
    prefix = "base_model.model."
    for key, value in state.items():
        module, _, leaf = key.removeprefix(prefix).rpartition(".lora_")
        weight = f"{module}.weight"
        if weight not in small_shapes:
            raise ExportError(f"cannot map adapter tensor {key} to a base weight; use merge_adapters=True")
        if leaf.startswith("A."):  # (r, in): keep the kept input columns
            idx = kept.get(weight, {}).get(1 - out_dim)
            value = value if idx is None else value.index_select(1, idx.to(value.device))
        elif leaf.startswith("B.") or leaf.startswith("magnitude_vector"):  # rows follow kept outputs
            idx = kept.get(weight, {}).get(out_dim)
            value = value if idx is None else value.index_select(0, idx.to(value.device))
        elif leaf.startswith("embedding") or "lora_embedding" in key:
            raise ExportError("LoRA on embeddings is not sliced by hf-oto; use merge_adapters=True")
        sliced[key] = value.contiguous()

    base_path = save_pruned(subnet, out_dir, tokenizer=tokenizer, overwrite=overwrite,
                            extra_manifest=dict(extra or {}, adapter=str(adapter_out)), license=license,
                            export_format=export_format, extra_files=extra_files)
    adapted = get_peft_model(small, config, adapter_name=name)
    adapted.peft_config[name].base_model_name_or_path = str(base_path)
    result = set_peft_model_state_dict(adapted, sliced, adapter_name=name)
    bad = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    if bad:
        raise ExportError(f"the sliced adapter did not load into the pruned base: {bad[:3]}")
    tmp = staging_dir(adapter_out)
    try:
        adapted.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True)
        if name != "default" and (tmp / name).is_dir():  # peft writes named adapters into a sub-folder
            for f in (tmp / name).iterdir():
                os.replace(f, tmp / f.name)
            (tmp / name).rmdir()
        (tmp / ADAPTER_MARKER).write_text(json.dumps({"base_model": str(base_path), "adapter_name": name}, indent=1))
        publish(tmp, adapter_out)
    finally:
        discard(tmp)
    return base_path, adapter_out
