"""Write one bit configuration of a QFA model as a compressed-tensors "pack-quantized" repo.

The adapters and gates are folded into integer codes and scales (exactly: see
:mod:`hf_oto.quant.layer`), pruned groups are removed physically (through
:func:`hf_oto.subnet.construct_subnet`, which also writes the config), and every quantized linear
is stored as ``weight_packed`` (int32), ``weight_scale`` and ``weight_shape``, with one
``config_groups`` entry per bit-width. ``AutoModelForCausalLM.from_pretrained`` loads it where
compressed-tensors is installed (validated: :data:`COMPRESSED_TENSORS_VERSION`), and vLLM reads it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from hf_oto.errors import ExportError
from hf_oto.export.save import add_compat_fields
from hf_oto.groups.space import PruningSpace
from hf_oto.io import JSONObject, check_no_pickles, check_target, discard, publish, staging_dir, unique_state
from hf_oto.quant.prepare import per_layer_bits, qfa_layers
from hf_oto.quant.quantize import QuantizedWeight, whole_groups

COMPRESSED_TENSORS_VERSION = "0.20.0"  # the version the 3-bit (dense cross-word) packing is validated with
QFA_MANIFEST = "qfa_manifest.json"


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-wide codes (rows x cols, int8) densely into int32 words along each row.

    Each code is offset by ``2^(bits-1)`` to be unsigned; code ``i`` of a row occupies bits
    ``[i*bits, (i+1)*bits)`` of the row's little-endian bit stream, so a code may straddle two words.
    This is compressed-tensors' pack-quantized layout since 0.18.
    """
    rows, cols = codes.shape
    stream_bits = cols * bits
    words = math.ceil(stream_bits / 32)
    device = codes.device
    vals = (codes.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    out = torch.zeros(rows, words + 1, dtype=torch.int64, device=device)
    start = torch.arange(cols, dtype=torch.int64) * bits  # the layout depends on cols and bits only: CPU
    word, offset = start // 32, start % 32
    out.scatter_add_(1, word.to(device).expand(rows, -1), (vals << offset.to(device)) & 0xFFFFFFFF)
    spill = torch.nonzero(offset + bits > 32).flatten()
    if len(spill):
        out.scatter_add_(1, (word[spill] + 1).to(device).expand(rows, -1),
                         vals.index_select(1, spill.to(device)) >> (32 - offset[spill]).to(device))
    out = out[:, :words]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def average_bits(model: nn.Module, bits: Sequence[int]) -> float:
    """Mean bit-width of the quantized weights (weighted by their sizes) under per-layer ``bits``."""
    total = weighted = 0
    for _, i, m in qfa_layers(model):
        n = m.out_features * m.in_features
        total, weighted = total + n, weighted + n * bits[i]
    return weighted / total


def _dense_copy(model: nn.Module, bits: Sequence[int], *,
                weights: bool) -> tuple[nn.Module, dict[str, QuantizedWeight]]:
    """A plain copy of ``model`` whose QFA layers are ``nn.Linear`` holding the folded weights.

    Nothing large is copied: deepcopy's memo maps each QFA layer to its new linear (its codes of
    every width are not copied) and every other parameter and buffer to itself (shared, read only:
    the export reads them, :func:`construct_subnet` builds new tensors). With ``weights=False`` the
    new linears' weights stay on the meta device (the export writes the folded codes, not them).
    """
    folded = {name: m.folded(bits[i]) for name, i, m in qfa_layers(model)}
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for name, _, m in qfa_layers(model):
        q = folded[name]
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(q.dequantize() if weights else lin.weight, requires_grad=False)
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        memo[id(m)] = lin
    return copy.deepcopy(model, memo), folded


def _slice(q: QuantizedWeight, kept: dict[int, torch.Tensor], name: str) -> QuantizedWeight:
    """The codes and scales of the kept rows (dim 0) and input columns (dim 1, whole groups only)."""
    if 1 in kept and not whole_groups(kept[1][None], q.group_size):
        raise ExportError(f"{name}: the {kept[1].numel()} kept input columns are not whole quantization groups of "
                          f"{q.group_size}")
    codes, scales = q.codes, q.scales
    kept = {dim: idx.to(codes.device) for dim, idx in kept.items()}
    if 0 in kept:
        codes, scales = codes.index_select(0, kept[0]), scales.index_select(0, kept[0])
    if 1 in kept:
        cols = kept[1]
        codes, scales = codes.index_select(1, cols), scales.index_select(1, cols[::q.group_size] // q.group_size)
    return QuantizedWeight(codes.contiguous(), scales.contiguous(), q.bits, q.group_size)


def _quantization_config(names_by_bits: dict[int, list[str]], group_size: int, ignore: list[str]) -> JSONObject:
    groups = {}
    for k, (b, names) in enumerate(sorted(names_by_bits.items())):
        groups[f"group_{k}"] = {
            "targets": ["re:^(" + "|".join(re.escape(n) for n in names) + ")$"],
            "weights": {"num_bits": b, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": group_size, "dynamic": False},
            "input_activations": None, "output_activations": None, "format": "pack-quantized",
        }
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None,
            "version": COMPRESSED_TENSORS_VERSION}


def check_bits(model: nn.Module, bits: Sequence[int]) -> list[int]:
    """The per-layer widths, checked against the model before anything is written (the model is not changed)."""
    bits = per_layer_bits(model, bits)  # refuses a wrong length or a width the layers were not quantized at
    bad = [b for b in bits if not 1 <= b <= 8]
    if bad:
        raise ExportError(f"compressed-tensors pack-quantized stores 1 to 8 bits, not {bad[0]}")
    return bits


def save_quantized(model: nn.Module, bits: Sequence[int], out_dir: str | os.PathLike, *,
                   space: PruningSpace | None = None, tokenizer: Any = None, overwrite: bool = False,
                   extra_manifest: dict[str, Any] | None = None) -> Path:
    """Export ``model`` (prepared by :func:`hf_oto.quant.prepare_qfa`) at per-layer widths ``bits``.

    With ``space`` (the pruning space discovered before QFA), groups whose gates HESSO zeroed are
    removed and the config shrinks with them (uniform layout: the stock architecture config). The
    repo holds config.json with a compressed-tensors ``quantization_config``, model.safetensors,
    the tokenizer, ``qfa_manifest.json`` and a model card with the bits per layer. Written beside
    ``out_dir`` and renamed into place; ``overwrite`` replaces only an earlier hf-oto export.
    The model is left as it was.
    """
    from hf_oto.subnet.construct import construct_subnet, kept_indices

    bits = check_bits(model, bits)
    out = Path(out_dir)
    check_target(out, overwrite=overwrite, marker=QFA_MANIFEST)
    dense, folded = _dense_copy(model, bits, weights=space is not None)  # pruning slices the dense weights
    if space is not None:
        subnet = construct_subnet(dense, space, layout="uniform")
        small, kept = subnet.model, kept_indices(space, subnet.manifest)
        if small.config.to_dict().get("hf_oto_layers"):
            raise ExportError("a quantized export needs equal layers (pruning_layout: uniform)")
    else:
        kept, small = {}, dense
    quantized = {name: _slice(q, kept.get(f"{name}.weight", {}), name) for name, q in folded.items()}
    params = dict(small.named_parameters())
    for name, q in quantized.items():
        w = params[f"{name}.weight"]
        same = w.is_meta or torch.equal(q.dequantize().to(w.dtype), w.detach())  # meta: the codes are the weight
        if w.shape != q.codes.shape or not same:
            raise ExportError(f"{name}: the folded codes do not reproduce the sub-network's weight (internal error)")
    layer_of = {name: i for name, i, _ in qfa_layers(model)}
    tmp = staging_dir(out)
    try:
        _write(small, quantized, bits, layer_of, tmp, tokenizer, extra_manifest or {})
        return publish(tmp, out)
    finally:
        discard(tmp)


def _write(small: nn.Module, quantized: dict[str, QuantizedWeight], bits: list[int], layer_of: dict[str, int],
           tmp: Path, tokenizer: Any, extra: dict[str, Any]) -> None:
    state = unique_state(small, skip={f"{name}.weight" for name in quantized})  # the codes replace them
    dtype = next(iter(state.values())).dtype
    by_bits: dict[int, list[str]] = {}
    for name, q in quantized.items():
        state[f"{name}.weight_packed"] = pack_int32(q.codes.cpu(), q.bits)
        state[f"{name}.weight_scale"] = q.scales.to("cpu", dtype)
        state[f"{name}.weight_shape"] = torch.tensor(list(q.codes.shape), dtype=torch.int64)
        by_bits.setdefault(q.bits, []).append(name)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    gs = next(iter(quantized.values())).group_size
    ignore = [n for n, m in small.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    config = small.config
    config.quantization_config = _quantization_config(by_bits, gs, ignore)
    try:
        config.save_pretrained(tmp)
    finally:
        del config.quantization_config
    gen = getattr(small, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    add_compat_fields(tmp)
    sizes = {b: sum(quantized[n].codes.numel() for n in names) for b, names in by_bits.items()}
    total_q = sum(sizes.values())
    manifest = dict(
        extra, model_type=small.config.model_type, bits_per_layer=bits, group_size=gs, symmetric=True,
        format="compressed-tensors pack-quantized",
        compressed_tensors_version=COMPRESSED_TENSORS_VERSION,
        average_bits=sum(b * n for b, n in sizes.items()) / total_q,
        file_bytes=(tmp / "model.safetensors").stat().st_size,
        quantized_modules={n: quantized[n].bits for n in sorted(quantized, key=lambda n: layer_of[n])},
    )
    (tmp / QFA_MANIFEST).write_text(json.dumps(manifest, indent=1))
    (tmp / "README.md").write_text(_card(manifest))
    _plot_bits(bits, tmp / "bits_per_layer.png")
    check_no_pickles(tmp)


def _card(m: JSONObject) -> str:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from hf_oto.export.card import hub_metadata, replay_sentence

    rows = "\n".join(f"| {i} | {b} |" for i, b in enumerate(m["bits_per_layer"]))
    pruned = m.get("pruning")
    replay = replay_sentence(m.get("replay_fraction"), "the run's training draws")
    name = f"{m.get('model_type', 'model')}-hf-oto-qfa-{m['average_bits']:.2f}bit"
    search = m.get("search") or {}
    results = None
    if isinstance(search.get("eval_loss"), (int, float)):  # the searched configuration on the run's held-out blocks
        results = [EvalResult(task_type="text-generation", dataset_type="held-out-split-of-the-training-text",
                              dataset_name="held-out split of the training text", metric_type="perplexity",
                              metric_name="perplexity", metric_value=float(math.exp(search["eval_loss"])))]
    data = ModelCardData(base_model=m.get("base_model"), license=m.get("license"), library_name="transformers",
                         tags=["hf-oto", "llm-qfa", "compressed-tensors", "quantized"] + (["pruned"] if pruned else []),
                         model_name=name, eval_results=results,
                         **hub_metadata(m.get("datasets"), m.get("base_model"), "quantized"))
    body = f"""
# Mixed-precision export from one QFA run (hf-oto)

This checkpoint was cut from a quantization-aware once-for-all (LLM-QFA) run: one training run
whose adapters serve every per-layer bit-width configuration. This configuration averages
**{m['average_bits']:.2f} bits** per quantized weight (symmetric, group size {m['group_size']}).
The weights take **{m['file_bytes'] / 2**20:.2f} MiB** on disk.{' ' + pruned if pruned else ''}{replay}

Load it with stock transformers (compressed-tensors {m['compressed_tensors_version']} installed):

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
```

On CPU, transformers decompresses the weights on the first forward pass; vLLM runs the packed format.

| decoder layer | bits |
|---|---|
{rows}

![bits per layer](bits_per_layer.png)
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _plot_bits(bits: list[int], path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: the user's backend and open figures are left alone

    fig = Figure(figsize=(max(4, len(bits) * 0.35), 2.6))
    ax = fig.subplots()
    ax.bar(range(len(bits)), bits, color="#4a7bb7")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("bits")
    ax.set_yticks(sorted(set(bits)))
    ax.set_title("bits per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
