"""How a per-layer export describes its layers, so that tools that never saw hf_oto read it right.

Three forms, chosen by :func:`resolve_format`:

- ``stock``: every layer has the same size; config.json is the architecture's own config.
- ``decilm``: Llama models whose layers differ only in FFN width and kv-head count (query heads the
  same everywhere) are written as DeciLM/Nemotron-NAS (``block_configs``), which vLLM's
  ``DeciLMForCausalLM`` and llama.cpp's ``deci`` architecture run; transformers loads it through
  the shipped remote code.
- ``remote_code``: anything else with per-layer sizes. The config names no stock architecture
  (``architectures`` is ``HFOTOPruned<Class>``), its top-level widths are the largest layer's, and
  the layers are listed in ``hf_oto_layers`` (what the shipped code builds from) and, where this
  transformers' config class accepts it, in transformers' own ``per_layer_config``, so stock classes
  can take over as they learn it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from hf_oto.errors import ExportError
from hf_oto.io import JSONObject
from hf_oto.subnet import remote_code

ExportFormat = Literal["auto", "remote_code", "decilm"]
EXPORT_FORMATS: tuple[str, ...] = ("auto", "remote_code", "decilm")
Resolved = Literal["stock", "remote_code", "decilm"]
REMOTE_MODULE = "modeling_hfoto"

# What each form loads in, as measured by scripts/check_serving.py (see its results table).
LOADS_IN: dict[str, str] = {
    "stock": "transformers, vLLM, llama.cpp (GGUF) and ONNX Runtime, with no custom code",
    "decilm": "vLLM (its DeciLMForCausalLM), llama.cpp (`hf-oto export-gguf`) and transformers "
              "(trust_remote_code); not ONNX Runtime (optimum has no DeciLM export)",
    "remote_code": "transformers (trust_remote_code) and, for Llama models, llama.cpp (`hf-oto export-gguf`); "
                   "not vLLM or ONNX Runtime, which size attention and caches from one head count",
}


def per_layer(config) -> bool:
    return bool(getattr(config, remote_code.LAYERS_KEY, None))


def full_layers(config) -> list[JSONObject]:
    """Every layer's value of every per-layer field (a layer without overrides has the top-level value)."""
    layers = remote_code.layer_overrides(config)
    keys = sorted({k for o in layers for k in o})
    return [{k: o.get(k, getattr(config, k, None)) for k in keys} for o in layers]


def decilm_setup_problem(model_type: str, layout: str) -> str | None:
    """Why pruning a ``model_type`` model with ``layout`` cannot end in a DeciLM export (None when it
    can), as a predicate of "DeciLM" (or of "export_format 'decilm'")."""
    if model_type != "llama":
        return f"is a Llama layout and this model is {model_type!r}"
    if layout != "per_layer_ffn":
        return (f"needs pruning_layout: per_layer_ffn (got {layout!r}): 'uniform' exports a stock config and "
                "'global' may give layers different query heads")
    return None


def decilm_problem(config) -> str | None:
    """Why this per-layer config cannot be written as DeciLM (None when it can)."""
    problem = decilm_setup_problem(getattr(config, "model_type", "?"), "per_layer_ffn")
    if problem:
        return f"DeciLM {problem}"
    layers = full_layers(config)
    extra = sorted({k for o in layers for k in o} - {"num_attention_heads", "num_key_value_heads",
                                                        "intermediate_size", "head_dim", remote_code.NO_OP_KEY})
    if extra:
        return f"DeciLM cannot express per-layer {', '.join(extra)}"
    deci = {name: spec for name, spec in remote_code.DECI_NO_OP.values()}
    for i, o in enumerate(layers):
        for name, spec in (o.get(remote_code.NO_OP_KEY) or {}).items():
            if deci.get(name) != {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items()}:
                return f"layer {i} removes {name} in a way DeciLM's no_op blocks do not describe"
    layers = _with_attention(layers)
    if not layers:
        return "no layer keeps its attention"
    heads = {o.get("num_attention_heads", config.num_attention_heads) for o in layers}
    if len(heads) > 1:
        return (f"query heads differ across layers ({', '.join(map(str, sorted(heads)))}) and DeciLM shares one "
                "count; prune with pruning_layout: per_layer_ffn (or uniform) for a DeciLM export")
    if len({o.get("head_dim", config.head_dim) for o in layers}) > 1:
        return "head_dim differs across layers"
    q = heads.pop()
    bad = [i for i, o in enumerate(layers) if q % o.get("num_key_value_heads", config.num_key_value_heads)]
    if bad:
        return f"layer {bad[0]}'s kv heads do not divide the {q} query heads"
    return None


def resolve_format(config, requested: str = "auto") -> Resolved:
    """The form this model is written in; a ``requested`` form it cannot take is refused in one line."""
    if requested not in EXPORT_FORMATS:
        raise ExportError(f"export_format must be one of {EXPORT_FORMATS}, got {requested!r}")
    if not per_layer(config):
        if requested == "decilm":
            raise ExportError("export_format 'decilm' is for per-layer exports; this model has the same "
                              "sizes in every layer and exports as its stock config, which loads everywhere")
        return "stock"
    if requested == "remote_code":
        return "remote_code"
    problem = decilm_problem(config)
    if requested == "decilm" and problem:
        raise ExportError(f"export_format 'decilm' cannot express this model: {problem}")
    return "remote_code" if problem else "decilm"


def remote_code_text(base_class: str, form: Resolved, auto_class: str) -> str:
    """The modeling file shipped with a per-layer export: one class per ``auto_map`` entry."""
    code = Path(remote_code.__file__).read_text() + "\n\n"
    extra = ", config_class=DeciLMConfig" if form == "decilm" else ""
    for name, cls in _classes(base_class, auto_class).values():
        code += f'{name} = pruned_class("{cls}"{extra})\n'
    return code


def _classes(base_class: str, auto_class: str) -> dict[str, tuple[str, str]]:
    """Auto class -> (name in the shipped module, transformers class it extends). A head model also
    gets its bare model under ``AutoModel``, which vLLM's Transformers backend asks for."""
    out = {auto_class: ("HFOTOPrunedModel", base_class)}
    bare = _base_model_class(base_class)
    if bare and auto_class != "AutoModel":
        out["AutoModel"] = ("HFOTOPrunedBaseModel", bare)
    return out


def rewrite_config(folder: Path, config, form: Resolved, auto_class: str) -> None:
    """Turn the saved config.json of a per-layer export into its honest ``form``."""
    if form == "stock":
        return
    path = folder / "config.json"
    data = json.loads(path.read_text())
    layers = full_layers(config)
    canon = {k: getattr(config, "attribute_map", {}).get(k, k) for o in layers for k in o if k != remote_code.NO_OP_KEY}
    base_class = data[remote_code.LAYERS_KEY]["base_class"]
    auto_map = {auto: f"{REMOTE_MODULE}.{name}" for auto, (name, _) in _classes(base_class, auto_class).items()}
    for key in set(canon.values()):  # the top level is the largest layer, never the pre-pruning size
        values = [v for o in layers for k, v in o.items() if canon.get(k) == key]
        if None not in values:  # (a layer that reads its width from the top level keeps it)
            data[key] = max(values)
    if form == "decilm":
        # one query-head count for every layer that keeps its attention (decilm_problem checked it)
        heads = _with_attention(layers)[0].get("num_attention_heads", config.num_attention_heads)
        data["num_attention_heads"] = heads
        data.pop(remote_code.LAYERS_KEY)
        data.update(
            model_type=remote_code.DeciLMConfig.model_type,
            architectures=["DeciLMForCausalLM"],
            auto_map={"AutoConfig": f"{REMOTE_MODULE}.DeciLMConfig", **auto_map},
            block_configs=[_deci_block(o, heads, data) for o in layers],
        )
    else:
        data[remote_code.LAYERS_KEY]["layers"] = layers
        data.update(architectures=[f"HFOTOPruned{base_class}"], auto_map=auto_map)
        described = {str(i): {canon[k]: v for k, v in o.items() if v is not None and k in canon}
                     for i, o in enumerate(layers)}
        removes = any(o.get(remote_code.NO_OP_KEY) for o in layers)  # a stock class would build the block
        if not removes and _parses(type(config), dict(data, per_layer_config=described)):
            data["per_layer_config"] = described
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _with_attention(layers: list[JSONObject]) -> list[JSONObject]:
    """The layers whose attention block a DeciLM export keeps."""
    name = remote_code.DECI_NO_OP["attention"][0]
    return [o for o in layers if name not in (o.get(remote_code.NO_OP_KEY) or {})]


def _deci_block(o: JSONObject, heads: int, data: JSONObject) -> JSONObject:
    """One layer's ``block_configs`` entry; a field no layer overrides (attention kept whole, say) is the
    top-level value. A removed block is ``no_op`` (vLLM's DeciLM and llama.cpp's ``deci`` skip it)."""
    gone = o.get(remote_code.NO_OP_KEY) or {}
    attn_gone = remote_code.DECI_NO_OP["attention"][0] in gone
    ffn_gone = remote_code.DECI_NO_OP["ffn"][0] in gone
    return {
        "attention": {"n_heads_in_group": None if attn_gone else
                      heads // o.get("num_key_value_heads", data["num_key_value_heads"]),
                      "no_op": attn_gone, "replace_with_linear": False},
        "ffn": {"intermediate_size": None if ffn_gone else o.get("intermediate_size", data["intermediate_size"]),
                "no_op": ffn_gone, "replace_with_linear": False},
    }


def _parses(config_class, data: dict) -> bool:
    """Whether this transformers' own config class loads ``per_layer_config`` as written. Some refuse
    it (Llama's config checks its head count against the width before it knows the count is per layer);
    then the export leaves it out rather than ship a config.json that does not load."""
    try:
        config = config_class.from_dict(data)
    except Exception:  # noqa: BLE001 - any refusal means: do not write it
        return False
    return bool(getattr(config, "is_heterogeneous", False))


def _base_model_class(cls_name: str) -> str | None:
    """The bare model class (e.g. LlamaModel for LlamaForCausalLM), from transformers' own mappings."""
    from transformers.models.auto import modeling_auto as ma

    model_type = next((t for t, n in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if n == cls_name), None)
    name = ma.MODEL_MAPPING_NAMES.get(model_type) if model_type else None
    return name if isinstance(name, str) else None
