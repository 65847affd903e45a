"""The main job: fine-tune and prune a causal LM from a YAML config, export it, verify the export.

Used by ``hf-oto prune CONFIG.yaml [--key value ...]`` and ``scripts/prune_finetune.py``. Read top
to bottom: settings, checks that need no data or weights, data, model, training with HESSO,
evaluation, export, a reload of the export without hf_oto, the summary table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from hf_oto.data import Blocks, DataArguments, load_documents, load_eval_documents, train_eval_blocks, train_tokenizer
from hf_oto.errors import ExportError
from hf_oto.export.verify import check_weights, verify_export
from hf_oto.job.args import ModelArguments, build_arguments, parse, read_settings
from hf_oto.job.build import Provenance, load_model, load_tokenizer, provenance, with_lora, with_replay
from hf_oto.job.log import job_logger, log
from hf_oto.job.memory import ENV, keep_freed_memory
from hf_oto.job.preflight import preflight
from hf_oto.job.recipe import RECIPE_FILE, recipe_text
from hf_oto.job.summary import ElasticSummary, PruneSummary, QFASummary, print_summary, print_table
from hf_oto.manifest import Manifest
from hf_oto.metrics import compute_metrics, preprocess_logits_for_metrics
from hf_oto.stream import stream_train_eval
from hf_oto.trainer import HFOTOTrainer

__all__ = ["parse", "preflight", "run"]

def run(config_path: str, overrides: list[str]) -> PruneSummary | QFASummary | ElasticSummary:
    """Parse, check, load data, train and prune, export, verify the export, print a summary."""
    from transformers import default_data_collator

    settings = read_settings(config_path, overrides)
    margs, dargs, targs = build_arguments(settings, config_path)
    checked = preflight(margs, dargs, targs)  # raises before any data is read or weights are loaded
    logger = job_logger(targs)
    for line in checked.warnings:
        logger.warning(f"hf-oto: warning: {line}")
    if settings.get("bf16") == "auto":
        logger.info(f"hf-oto: bf16 auto: {'bf16 autocast' if targs.bf16 else 'fp32 (no fast bf16 here)'} on "
                    f"{targs.device.type}")
    if targs.device.type == "cpu" and keep_freed_memory():
        logger.info(f"hf-oto: training on the CPU: freed memory is kept for reuse, which saves page faults ({ENV}=0 "
                    "turns this off)")
    torch.manual_seed(targs.seed)

    tokenizer = None if dargs.train_tokenizer_vocab else load_tokenizer(margs)
    if dargs.streaming:  # tokenized and packed while training; the stream's first documents evaluate
        train_data, eval_blocks = stream_train_eval(dargs, tokenizer, targs.seed)
    else:
        docs = load_documents(dargs)
        if tokenizer is None:
            tokenizer = train_tokenizer(docs["text"], dargs.train_tokenizer_vocab)
        train_blocks, eval_blocks = train_eval_blocks(docs, tokenizer, dargs, targs.seed, load_eval_documents(dargs),
                                                      dargs.preprocessing_num_workers)
        train_data = Blocks(train_blocks)

    model = load_model(margs, tokenizer)
    if dargs.replay_fraction:
        draws = (targs.max_steps * targs.per_device_train_batch_size * targs.gradient_accumulation_steps
                 * targs.world_size) if targs.max_steps > 0 else None
        train_data = Blocks(with_replay(train_blocks, model, tokenizer, dargs, targs.seed, draws,
                                        progress=targs.local_process_index == 0 and not targs.disable_tqdm,
                                        device=targs.device))
    model = with_lora(model, margs)
    trainer = HFOTOTrainer(
        model=model, args=targs, train_dataset=train_data, eval_dataset=Blocks(eval_blocks),
        processing_class=tokenizer, data_collator=default_data_collator,  # equal-length blocks: no padding
        compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    before = trainer.evaluate(metric_key_prefix="initial")
    trainer.train(resume_from_checkpoint=checked.resume)
    after = trainer.evaluate()
    results = {"eval_perplexity": after["eval_perplexity"], "eval_token_accuracy": after["eval_token_accuracy"]}
    if targs.qfa:
        return _finish_qfa(trainer, checked.pruned, eval_blocks, before, results, provenance(margs, dargs))
    if targs.elastic:
        return _finish_elastic(trainer, checked.pruned, before, results, provenance(margs, dargs))
    out = _save(trainer, checked.pruned, margs, dargs, results, settings)
    if not trainer.is_world_process_zero():  # rank 0 verifies and reports
        return PruneSummary(output=str(out))

    manifest, reload = Manifest.read(out), None
    if not margs.merge_adapters and margs.lora_r:
        log().info(f"pruned base: {out}; pruned adapter: {out}-adapter (load with PeftModel.from_pretrained)")
        reload = "not run (a pruned base and an adapter: the base alone is not the model)"
    elif not targs.verify_export:
        reload = "not run (verify_export: false)"
    if reload is None:
        ppl_export, params_after = verify_export(out, eval_blocks)
    else:
        check_weights(out)
        ppl_export, params_after = float("nan"), manifest.params_after
    summary = PruneSummary(
        output=str(out), params_before=trainer.pruning_space.total_params, params_after=params_after,
        prunable_removed=trainer.hesso.metrics()["pruned_param_fraction"],
        ppl_initial=before["initial_perplexity"], ppl_trained_pruned=results["eval_perplexity"],
        ppl_export_reloaded=ppl_export, reload_note=reload, token_accuracy=results["eval_token_accuracy"],
        kept=manifest.kept_by_kind(),
        train_tokens=int(trainer.state.global_step * targs.per_device_train_batch_size * dargs.block_size
                         * trainer.accelerator.num_processes * targs.gradient_accumulation_steps),
        lm_eval=_lm_eval(out, dargs, targs.per_device_eval_batch_size, checked.tasks) if dargs.eval_tasks else None,
    )
    print_summary(summary)
    return summary


def _lm_eval(out: Path, dargs: DataArguments, batch_size: int, manager) -> dict[str, dict[str, float]]:
    """``eval_tasks`` on the export as users load it (without hf_oto), with the TaskManager that checked the
    tasks before training; the scores go into its card."""
    from hf_oto.export.save import record_lm_eval
    from hf_oto.job.evaluate_job import load_for_eval, run_lm_eval, task_scores

    model, tokenizer = load_for_eval(str(out))
    results = run_lm_eval(model, tokenizer, list(dargs.eval_tasks), manager, limit=dargs.eval_tasks_limit,
                          batch_size=batch_size, num_fewshot=None)
    scores = task_scores(results)
    record_lm_eval(out, scores, dargs.eval_tasks_limit)
    return scores


def _finish_qfa(trainer: HFOTOTrainer, target: Path, eval_blocks: torch.Tensor, before: dict[str, float],
                results: dict[str, float], origin: Provenance) -> QFASummary:
    """Save the QFA run for qfa-search, and report held-out perplexity at every uniform width (of every size,
    in an elastic QFA run)."""
    from hf_oto.export.save import hub_base_model
    from hf_oto.quant.search import eval_loss

    config, e = trainer.qfa_config, trainer.elastic
    blocks = eval_blocks[:64]

    def perplexities() -> dict[int, float]:
        return {b: float(torch.exp(torch.tensor(eval_loss(trainer.model, b, blocks)))) for b in config.bits}

    ppl = perplexities()
    sizes: dict[float, dict[int, float]] = {}
    if e is not None:
        for size in e.elastic.sizes:
            with e.subnetwork(size):
                sizes[size] = perplexities()
    evals = {s: {f"eval_perplexity_{b}bit": v for b, v in by_bits.items()} for s, by_bits in sizes.items()}
    extra = dict(origin.to_dict(), eval=results, base_model=hub_base_model(origin.source))
    out = trainer.save_qfa_run(str(target), overwrite=trainer.args.overwrite_pruned_output_dir, extra=extra,
                               evals=evals or None)
    if not trainer.is_world_process_zero():
        return QFASummary(output=str(out))
    rows = [("QFA base in memory", trainer.qfa_memory.table().removeprefix("QFA base: ")),
            ("eval perplexity, quantized at start (widest)", f"{before['initial_perplexity']:.2f}")]
    rows += [(f"eval perplexity, trained, uniform {b}-bit", f"{v:.2f}") for b, v in ppl.items()]
    for size, by_bits in sizes.items():
        rows.append((f"eval perplexity, size {size:g} (masked), uniform " + "/".join(f"{b}" for b in by_bits) + " bit",
                     " / ".join(f"{v:.2f}" for v in by_bits.values())))
    if trainer.hesso is not None:
        rows.append(("prunable parameters removed", f"{100 * trainer.hesso.metrics()['pruned_param_fraction']:.1f}%"))
    rows.append(("QFA run (for qfa-search)", str(out)))
    print_table(rows)
    what = "a size and bit-widths" if e is not None else "bit-widths"
    log().info(f"next: hf-oto qfa-search {out} --budget {config.bits[0] + 0.5} --out {out}-export (picks {what})")
    return QFASummary(output=str(out), ppl_initial=before["initial_perplexity"], ppl_uniform=ppl, ppl_sizes=sizes)


def _finish_elastic(trainer: HFOTOTrainer, target: Path, before: dict[str, float], results: dict[str, float],
                    origin: Provenance) -> ElasticSummary:
    """Save the elastic run for export-size, and report held-out perplexity of every trained size."""
    extra = origin.to_dict()  # every size's export: the source, its license, the data
    e = trainer.elastic
    ppl = {1.0: results["eval_perplexity"]}
    removed = e.metrics()
    fraction = {1.0: 0.0, **{size: removed[f"size_{size:g}_pruned_fraction"] for size in e.elastic.sizes}}
    for size in e.elastic.sizes:
        with e.subnetwork(size):
            ppl[size] = trainer.evaluate(metric_key_prefix=f"size_{size:g}")[f"size_{size:g}_perplexity"]
    evals = {s: {"eval_perplexity": p} for s, p in ppl.items() if s < 1.0}
    out = trainer.save_elastic_run(str(target), extra=extra, evals=evals)
    if not trainer.is_world_process_zero():
        return ElasticSummary(output=str(out))
    summary = ElasticSummary(output=str(out), ppl_initial=before["initial_perplexity"], ppl=ppl, removed=fraction)
    print_table(summary.rows())
    sizes = ",".join(f"{s:g}" for s in e.elastic.sizes)
    log().info(f"next: hf-oto export-size {out} --sizes {sizes} --out {out}-sizes")
    return summary


def _save(trainer: HFOTOTrainer, target: Path, margs: ModelArguments, dargs: DataArguments,
          eval_results: dict[str, float], settings: dict[str, Any]) -> Path:
    """Export (with its recipe); if the target filled up during training, write beside it rather than lose
    the trained model."""
    origin = provenance(margs, dargs)
    record = trainer.pruning_record()
    resolved = {"hesso": None if record is None else record.to_dict()}
    kw = dict(merge_adapters=margs.merge_adapters, eval_results=eval_results, license=origin.license,
              extra_manifest=origin.manifest_fields(),
              extra_files={RECIPE_FILE: recipe_text(settings, json.loads(json.dumps(resolved, default=str)))})
    try:
        return trainer.save_pruned_model(str(target), **kw)
    except ExportError as exc:
        if not (target.is_dir() and any(target.iterdir())):
            raise
        fallback = target.with_name(f"{target.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        log().warning(f"hf-oto: warning: {exc}; writing the pruned model to {fallback} instead")
        return trainer.save_pruned_model(str(fallback), **kw)
