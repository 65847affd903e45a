"""The export's model card: ``huggingface_hub.ModelCard`` from a Jinja template the package owns.

Metadata (license, base_model, tags, evaluation results as ``EvalResult`` so the Hub shows them)
goes through ``ModelCardData``; the body is ``templates/pruned_model.md``. Values are inserted by
Jinja, so braces or other template syntax in a value are printed as they are.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

TEMPLATE = "pruned_model.md"
EVAL_DATASET = "held-out split of the training text"


def format_flops(v: float | None) -> str:
    """FLOPs with a unit that keeps 3 significant digits (M, G or T)."""
    if v is None:
        return "n/a"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if v >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.3g}"


def method_text(manifest: dict[str, Any]) -> str:
    """One paragraph on how the model was pruned, from the recorded HESSO settings."""
    h = manifest.get("hesso")
    o = manifest.get("oneshot")
    if o and not h:
        data = (f"on {o['calibration_batches']} calibration batches of {o['batch_size']} x {o['block_size']} tokens"
                if o["calibration_batches"] else "from the weights alone")
        return (f"One-shot `{o['criterion']}` pruning {data}, without training: the lowest-scoring groups were "
                f"removed until {100 * o['pruned_fraction']:.1f}% of the prunable parameters were gone (target "
                f"{100 * o['target_sparsity']:.0f}%), layout `{o['layout']}`, FFN widths on multiples of "
                f"{o['ffn_multiple']}. Fine-tuning it (or pruning while training with HESSO) recovers quality.")
    if not h:
        return "Groups that were exactly zero were removed (no HESSO settings recorded)."
    cric = "with CRIC corrective cycles" if h.get("cric") else "without CRIC"
    return (
        f"HESSO {cric}, while fine-tuning: {h['target_params']:,} prunable parameters targeted, "
        f"layout `{h['layout']}`, pruning from step {h['start_pruning_step']} over {h['pruning_steps']} steps in "
        f"{h['pruning_periods']} periods, FFN widths on multiples of {h['ffn_multiple']}, "
        + (f"saliency EMA {h['saliency_ema']}." if h.get("saliency_ema") is not None else "one-batch saliency.")
    )


def _eval_results(manifest: dict[str, Any], model_name: str) -> list:
    from huggingface_hub import EvalResult

    dataset = manifest.get("eval_dataset") or EVAL_DATASET
    out = []
    for name, value in (manifest.get("eval") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metric = name.removeprefix("eval_")
            out.append(EvalResult(task_type="text-generation", dataset_type=dataset.replace(" ", "-"),
                                  dataset_name=dataset, metric_type=metric, metric_name=metric,
                                  metric_value=float(value)))
    for task, metrics in ((manifest.get("lm_eval") or {}).get("tasks") or {}).items():
        for metric, value in metrics.items():
            out.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                  metric_type=metric, metric_name=metric, metric_value=float(value)))
    return out


def render_card(manifest: dict[str, Any], *, trust_remote_code: bool, repo_class: str) -> str:
    """The README.md of an export: metadata header plus the filled-in template."""
    from huggingface_hub import ModelCard, ModelCardData

    before, after = manifest["params_before"], manifest["params_after"]
    model_name = f"{manifest['model_type']}-hf-oto-pruned"
    data = ModelCardData(
        base_model=manifest.get("base_model"), license=manifest.get("license"), library_name="transformers",
        tags=["hf-oto", "pruned", "structured-pruning"], model_name=model_name,
        eval_results=_eval_results(manifest, model_name) or None, **hub_metadata(manifest, "finetune"),
    )
    evaluation = [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in (manifest.get("eval") or {}).items()]
    lm_eval = manifest.get("lm_eval") or {}
    limit = f" ({lm_eval['limit']} examples per task)" if lm_eval.get("limit") else ""
    evaluation += [(f"lm-eval {task} {metric}{limit}", f"{value:.4g}")
                   for task, metrics in (lm_eval.get("tasks") or {}).items() for metric, value in metrics.items()]
    template = resources.files("hf_oto.export").joinpath("templates", TEMPLATE).read_text(encoding="utf-8")
    card = ModelCard.from_template(
        data, template_str=template,
        source=_source_text(manifest),
        model_type=manifest["model_type"],
        params_before=f"{before:,}", params_after=f"{after:,}",
        flops_before=format_flops(manifest.get("flops_per_token_before")),
        flops_after=format_flops(manifest.get("flops_per_token_after")),
        kept_pct=f"{100.0 * after / max(before, 1):.1f}", layout=manifest["layout"],
        method=method_text(manifest), evaluation=evaluation, auto_class=repo_class,
        load_kwargs=", trust_remote_code=True" if trust_remote_code else "",
        remote_note=_format_note(manifest.get("export_format", "remote_code" if trust_remote_code else "stock")),
        sets=manifest["sets"],
    )
    return str(card)


def hub_metadata(manifest: dict[str, Any], relation: str) -> dict[str, Any]:
    """The Hub's ``pipeline_tag``, ``datasets`` (Hub ids the run trained on) and ``base_model_relation``.

    The Hub knows four relations (adapter, merge, quantized, finetune). A pruned model was trained on
    the way, so it is a ``finetune`` of its base (the ``pruned`` tag says how); a QFA export is ``quantized``.
    """
    out: dict[str, Any] = {"pipeline_tag": "text-generation"}
    if manifest.get("datasets"):
        out["datasets"] = list(manifest["datasets"])
    if manifest.get("base_model"):
        out["base_model_relation"] = relation
    return out


def _source_text(manifest: dict[str, Any]) -> str:
    """How the card names what was pruned: the GGUF file (and what its header says it is), or the source."""
    gguf = manifest.get("gguf")
    if gguf:
        who = " ".join(str(gguf[k]) for k in ("organization", "name") if gguf.get(k))
        return f"the GGUF file **{gguf['file']}**" + (f" ({who})" if who else "") + ", dequantized to full precision"
    if manifest.get("source"):
        return f"**{manifest['source']}**"
    return "a model built from a config (no base checkpoint)"


def _format_note(form: str) -> str:
    from hf_oto.export.formats import LOADS_IN

    if form == "stock":
        return ("Every layer keeps the same counts, so `config.json` is the stock architecture config. "
                f"It runs in {LOADS_IN['stock']}.")
    if form == "decilm":
        return ("Its layers differ in FFN width, so `config.json` is a DeciLM/Nemotron-NAS config "
                "(`block_configs`) and the repo ships `modeling_hfoto.py` (it only imports transformers) for "
                f"transformers; load it with `trust_remote_code=True`. It runs in {LOADS_IN['decilm']}.")
    return ("Its layers differ in size, so the repo ships `modeling_hfoto.py` (it only imports "
            "transformers); load it with `trust_remote_code=True`. `config.json` lists each layer in "
            f"`hf_oto_layers`. It runs in {LOADS_IN['remote_code']}.")
