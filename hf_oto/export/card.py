"""The export's model card: ``huggingface_hub.ModelCard`` from a Jinja template the package owns.

Metadata (license, base_model, tags, evaluation results as ``EvalResult`` so the Hub shows them)
goes through ``ModelCardData``; the body is ``templates/pruned_model.md``. Values are inserted by
Jinja, so braces or other template syntax in a value are printed as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

from hf_oto.io import JSONObject
from hf_oto.manifest import Manifest

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


CRITERION_TEXT = {
    "hesso": "HESSO's weighted saliency (magnitude, cosine and first-order terms of one step's update)",
    "taylor": "accumulated first-order Taylor importance (sum of |w * g| over the training steps, relative within "
              "each kind)",
    "fisher": "the accumulated empirical Fisher estimate of each group's removal cost (sum of (w . g)^2 over the "
              "training steps)",
    "wanda_sp": "the activation-weighted magnitude of each group's input columns in the layer that consumes it "
                "(Wanda-sp, with the activations of the training passes; relative within each kind)",
}
SELECTION_TEXT = {"saliency": "lowest score first", "per_param": "lowest score per parameter freed first"}
GRANULARITY_TEXT = {"depth": " Only whole decoder layers (and, in a per-layer layout, whole attention or MLP "
                             "blocks) could go (pruning_granularity `depth`).",
                    "both": " Whole decoder layers (and, in a per-layer layout, whole attention or MLP blocks) "
                            "competed with heads and channels in the same budget (pruning_granularity `both`)."}
EXPERTS_TEXT = (" Whole routed experts competed in the same budget (prune_experts): a removed expert's router row "
                "went with it, and the export has fewer experts in every MoE layer.")
PRICING_TEXT = {"saliency": "kinds compared in the criterion's own units",
                "measured": "each kind priced by the loss its removal measured on a batch at every period start"}


def method_text(manifest: Manifest) -> str:
    """One paragraph on how the model was pruned, from the settings that ran (the manifest's records),
    and on the share of its data the source model sampled itself, if any."""
    return _pruning_text(manifest) + _replay_text(manifest)


def replay_sentence(fraction: float | None, draws: str, consequence: str = "") -> str:
    """The card's sentence for self-generated replay ("" without it): ``fraction`` of ``draws`` (for example
    "the training draws") were text the source model sampled itself; ``consequence`` ends the sentence."""
    if not fraction:
        return ""
    return (f" {100 * fraction:g}% of {draws} were text the source model sampled itself (self-generated replay, "
            f"`replay_fraction`){consequence}.")


def _replay_text(manifest: Manifest) -> str:
    if manifest.oneshot is not None and manifest.hesso is None:
        return replay_sentence(manifest.replay_fraction, "the calibration blocks")
    return replay_sentence(manifest.replay_fraction, "the training draws", ": the model was ranked and trained on "
                           "its own general text as well as on the fine-tuning data")


def _pruning_text(manifest: Manifest) -> str:
    h, o, e = manifest.hesso, manifest.oneshot, manifest.elastic
    if e is not None:
        others = ", ".join(f"{100 * s:g}%" for s in e.sizes if s != e.size) or "none"
        refresh = (f"re-ranked every {e.refresh_every} steps until step {e.freeze}" if e.refresh_every
                   else f"ranked once at step {e.start}")
        return (f"Cut from one elastic (once-for-all) fine-tuning run of {e.steps} steps that trained nested "
                f"sub-networks keeping {100 * e.size:g}% of the prunable parameters (this model) and {others}, "
                f"together with the full model. Groups ranked by {CRITERION_TEXT.get(e.criterion, e.criterion)}, "
                f"removals taken {SELECTION_TEXT.get(e.selection, e.selection)}, layout `{e.layout}`, FFN widths on "
                f"multiples of {e.ffn_multiple}; the keep-sets were {refresh}. From step {e.start} on, each step "
                f"trained the smallest size and {e.samples} other drawn size(s) as masked views of the full model's "
                f"weights, distilled in place from its logits.{GRANULARITY_TEXT.get(e.granularity, '')}")
    if o and not h:
        data = (f"on {o.calibration_batches} calibration batches of {o.batch_size} x {o.block_size} tokens"
                if o.calibration_batches else "from the weights alone")
        priced = f", {PRICING_TEXT[o.pricing]}" if o.pricing in PRICING_TEXT else ""
        return (f"One-shot `{o.criterion}` pruning {data}, without training: the lowest-scoring groups were "
                f"removed until {100 * o.pruned_fraction:.1f}% of the prunable parameters were gone (target "
                f"{100 * o.target_sparsity:.0f}%){priced}, layout `{o.layout}`, FFN widths on multiples of "
                f"{o.ffn_multiple}.{GRANULARITY_TEXT.get(o.granularity, '')}"
                f"{EXPERTS_TEXT if o.experts else ''} Fine-tuning it (or pruning "
                "while training with HESSO) recovers quality.")
    if not h:
        return "Groups that were exactly zero were removed (no HESSO settings recorded)."
    cric = "with CRIC corrective cycles" if h.cric else "without CRIC"
    ranking = CRITERION_TEXT.get(h.criterion, f"`{h.criterion}`")
    if h.criterion == "hesso":
        ranking += f", smoothed by an EMA of {h.saliency_ema}" if h.saliency_ema is not None \
            else ", measured at each period start"
    selection = SELECTION_TEXT.get(h.selection, h.selection)
    pricing = PRICING_TEXT.get(h.pricing, h.pricing)
    return (
        f"HESSO {cric}, while fine-tuning: {h.target_params:,} prunable parameters targeted, "
        f"layout `{h.layout}`, pruning from step {h.start_pruning_step} over {h.pruning_steps} steps in "
        f"{h.pruning_periods} periods, FFN widths on multiples of {h.ffn_multiple}. Groups ranked by "
        f"{ranking}; removals taken {selection}, {pricing}.{GRANULARITY_TEXT.get(h.granularity, '')}"
        f"{EXPERTS_TEXT if h.experts else ''}"
    )


def _eval_results(manifest: Manifest) -> list:
    from huggingface_hub import EvalResult

    dataset = manifest.eval_dataset or EVAL_DATASET
    out = []
    for name, value in manifest.eval.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metric = name.removeprefix("eval_")
            out.append(EvalResult(task_type="text-generation", dataset_type=dataset.replace(" ", "-"),
                                  dataset_name=dataset, metric_type=metric, metric_name=metric,
                                  metric_value=float(value)))
    for task, metrics in (manifest.lm_eval.tasks if manifest.lm_eval else {}).items():
        for metric, value in metrics.items():
            out.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                  metric_type=metric, metric_name=metric, metric_value=float(value)))
    return out


def render_card(manifest: Manifest) -> str:
    """The README.md of an export: metadata header plus the filled-in template."""
    from huggingface_hub import ModelCard, ModelCardData

    before, after = manifest.params_before, manifest.params_after
    data = ModelCardData(
        base_model=manifest.base_model, license=manifest.license, library_name="transformers",
        tags=["hf-oto", "pruned", "structured-pruning"], model_name=f"{manifest.model_type}-hf-oto-pruned",
        eval_results=_eval_results(manifest) or None,
        **hub_metadata(manifest.datasets, manifest.base_model, "finetune"),
    )
    evaluation = [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in manifest.eval.items()]
    lm_eval = manifest.lm_eval
    limit = f" ({lm_eval.limit} examples per task)" if lm_eval and lm_eval.limit else ""
    evaluation += [(f"lm-eval {task} {metric}{limit}", f"{value:.4g}")
                   for task, metrics in (lm_eval.tasks if lm_eval else {}).items() for metric, value in metrics.items()]
    template = resources.files("hf_oto.export").joinpath("templates", TEMPLATE).read_text(encoding="utf-8")
    card = ModelCard.from_template(
        data, template_str=template,
        source=_source_text(manifest),
        model_type=manifest.model_type,
        params_before=f"{before:,}", params_after=f"{after:,}",
        flops_before=format_flops(manifest.flops_per_token_before),
        flops_after=format_flops(manifest.flops_per_token_after),
        kept_pct=f"{100.0 * after / max(before, 1):.1f}", layout=manifest.layout,
        method=method_text(manifest), evaluation=evaluation, auto_class=manifest.auto_class,
        load_kwargs=", trust_remote_code=True" if manifest.per_layer else "",
        remote_note=_format_note(manifest.export_format or "stock"),
        layers_note=_layers_text(manifest),
        sets=[s.to_dict() for s in manifest.sets],
    )
    return str(card)


def _layers_text(manifest: Manifest) -> str:
    """Which decoder layers and blocks left whole ("" when none did); the table below keeps the source's
    numbering."""
    gone, blocks = manifest.removed_layers(), manifest.removed_blocks()
    out = []
    if gone:
        total = len({s.layer for s in manifest.sets if s.kind == "layer"})
        out.append(f"Decoder layers removed whole: {len(gone)} of {total} ({', '.join(map(str, gone))}, numbered as "
                   "in the source model; the layers that stay are renumbered from 0 in this model).")
    names = {"attention": "Attention blocks removed (the layer keeps its MLP)",
             "mlp": "MLP blocks removed (the layer keeps its attention)"}
    out += [f"{names[b]}: source layers {', '.join(map(str, layers))}." for b, layers in blocks.items()]
    return " ".join(out)


def hub_metadata(datasets: Sequence[str] | None, base_model: str | None, relation: str) -> JSONObject:
    """The Hub's ``pipeline_tag``, ``datasets`` (Hub ids the run trained on) and ``base_model_relation``.

    The Hub knows four relations (adapter, merge, quantized, finetune). A pruned model was trained on
    the way, so it is a ``finetune`` of its base (the ``pruned`` tag says how); a QFA export is ``quantized``.
    """
    out: JSONObject = {"pipeline_tag": "text-generation"}
    if datasets:
        out["datasets"] = list(datasets)
    if base_model:
        out["base_model_relation"] = relation
    return out


def _source_text(manifest: Manifest) -> str:
    """How the card names what was pruned: the GGUF file (and what its header says it is), or the source."""
    gguf = manifest.gguf
    if gguf:
        who = " ".join(v for v in (gguf.organization, gguf.name) if v)
        return f"the GGUF file **{gguf.file}**" + (f" ({who})" if who else "") + ", dequantized to full precision"
    if manifest.source:
        return f"**{manifest.source}**"
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
