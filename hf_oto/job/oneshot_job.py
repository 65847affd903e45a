"""``hf-oto oneshot``: prune a model in one shot (magnitude, Taylor or Wanda-sp on calibration text), no training.

The quick path users try first and the baseline they hold HESSO against. It takes the same settings,
checks, export, card and recipe as ``hf-oto prune``: the model (a folder, Hub id or GGUF file), the
calibration text (a file, a Hub dataset or ``python-stdlib``), ``target_sparsity``, the layout and
FFN multiple; it scores every group on ``calibration_batches`` batches, zeroes the lowest until the
target is met, exports the smaller model and checks the export reloads without hf_oto.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hf_oto.errors import ConfigError
from hf_oto.manifest import Manifest, OneShotRecord
from hf_oto.optim.oneshot import ONESHOT_CRITERIA

if TYPE_CHECKING:
    from hf_oto.job.summary import OneShotSummary

ONESHOT_KEYS = ("criterion", "calibration_batches")  # settings of this job beyond prune's
PRICING_BATCHES = 2  # calibration batches measured pricing tries each kind's removal on


def oneshot_settings(model: str | None, criterion: str, target_sparsity: float | None, calibration: str | None,
                     out: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The job's settings mapping from the command line (``prune``'s keys plus :data:`ONESHOT_KEYS`)."""
    settings: dict[str, Any] = {"criterion": criterion, "calibration_batches": 8, "per_device_train_batch_size": 4,
                                "block_size": 256, "report_to": []}
    if model:
        settings["gguf_file" if model.endswith(".gguf") else "model_name_or_path"] = model
    if target_sparsity is not None:
        settings["target_sparsity"] = target_sparsity
    if calibration:
        if calibration == "python-stdlib":
            settings["text_source"] = calibration
        elif Path(calibration).exists():
            settings["train_files"] = [calibration]
        else:
            settings["dataset_name"] = calibration
    if out:
        settings["pruned_output_dir"] = out
    settings.update(overrides)
    return settings


def run_oneshot(settings: dict[str, Any], where: str = "the command line") -> OneShotSummary:
    """Check, load, score on calibration batches, prune, export with card and recipe, verify; the summary."""
    from hf_oto import construct_subnet
    from hf_oto.data import calibration_batches, load_documents, load_eval_documents, train_eval_blocks
    from hf_oto.export.save import save_pruned
    from hf_oto.export.verify import check_weights, verify_export
    from hf_oto.job.args import build_arguments
    from hf_oto.job.build import load_model, load_tokenizer, provenance, with_replay
    from hf_oto.job.log import job_logger
    from hf_oto.job.preflight import preflight
    from hf_oto.job.recipe import RECIPE_FILE, recipe_text
    from hf_oto.job.summary import OneShotSummary, print_table
    from hf_oto.metrics import perplexity
    from hf_oto.optim.budget import BudgetRules
    from hf_oto.optim.oneshot import batch_loss, oneshot_prune, oneshot_scores
    from hf_oto.trainer.setup import pruning_space

    settings = dict(settings)
    job = {k: settings.pop(k) for k in ONESHOT_KEYS if k in settings}
    criterion, batches = job.get("criterion", "wanda_sp"), int(job.get("calibration_batches", 8))
    if criterion not in ONESHOT_CRITERIA:
        raise ConfigError(f"criterion must be one of {', '.join(ONESHOT_CRITERIA)}, got {criterion!r}")
    if batches < 1:
        raise ConfigError(f"calibration_batches must be at least 1, got {batches}")
    if not settings.get("pruned_output_dir"):
        raise ConfigError("give --out DIR: the folder the pruned model is written to")
    with tempfile.TemporaryDirectory(prefix="hf-oto-oneshot-") as work:
        margs, dargs, targs = build_arguments(dict(settings, output_dir=settings.get("output_dir", work)), where)
        if criterion == "block_influence" and targs.pruning_granularity == "width":
            raise ConfigError("criterion block_influence ranks whole layers: add --pruning_granularity depth (or both)")
        if criterion == "routing" and not targs.prune_experts:
            raise ConfigError("criterion routing ranks whole experts: add --prune_experts")
        needs_data = criterion != "magnitude"  # magnitude reads the weights only
        checked = preflight(margs, dargs, targs)  # model, data, export folder, reachable target: before any work
        logger = job_logger(targs)
        torch.manual_seed(targs.seed)
        tokenizer = load_tokenizer(margs)
        train_blocks, eval_blocks = train_eval_blocks(load_documents(dargs), tokenizer, dargs, targs.seed,
                                                      load_eval_documents(dargs), dargs.preprocessing_num_workers)
        model = load_model(margs, tokenizer).eval()
        size = targs.per_device_train_batch_size
        if dargs.replay_fraction and needs_data:  # calibration draws the model's own samples at that share
            train_blocks = with_replay(train_blocks, model, tokenizer, dargs, targs.seed, batches * size,
                                       progress=not targs.disable_tqdm)
        calib = calibration_batches(train_blocks, batches, size, targs.seed)
        space = pruning_space(model, targs)
        before = perplexity(model, eval_blocks)
        scores = oneshot_scores(model, space, criterion, calib if needs_data else None)
        pricing, prices = targs.resolved_pricing(), []
        probe = batch_loss(model, calib[:PRICING_BATCHES]) if pricing == "measured" else None
        rules = BudgetRules(layout=targs.pruning_layout, ffn_multiple=targs.ffn_multiple, min_keep=targs.min_keep)
        plan = oneshot_prune(model, space, scores, target_sparsity=targs.target_sparsity, rules=rules, probe=probe,
                             prices=prices)
        subnet = construct_subnet(model, space, layout=targs.pruning_layout)
        after = perplexity(subnet.model, eval_blocks)
        origin = provenance(margs, dargs)
        record = OneShotRecord(criterion=criterion, calibration_batches=len(calib) if needs_data else 0,
                               batch_size=size, block_size=dargs.block_size, target_sparsity=targs.target_sparsity,
                               layout=targs.pruning_layout, ffn_multiple=targs.ffn_multiple, pricing=pricing,
                               granularity=targs.pruning_granularity, experts=targs.prune_experts,
                               prices=tuple(p.to_dict() for p in prices),
                               pruned_fraction=plan.pruned_params() / space.prunable_params)
        out = save_pruned(subnet, checked.pruned, tokenizer, source=origin.source,
                          overwrite=targs.overwrite_pruned_output_dir, license=origin.license,
                          export_format=targs.export_format,
                          extra_manifest={"oneshot": record, "eval": {"eval_perplexity": after},
                                          **origin.manifest_fields()},
                          extra_files={RECIPE_FILE: recipe_text(dict(settings, **job), {"oneshot": record.to_dict()},
                                                                job="oneshot")})
        if targs.verify_export:
            reloaded, params_after = verify_export(out, eval_blocks)
        else:
            check_weights(out)
            reloaded, params_after = float("nan"), Manifest.read(out).params_after
    summary = OneShotSummary(output=str(out), params_before=space.total_params, params_after=params_after,
                             prunable_removed=record.pruned_fraction, ppl_before=before, ppl_after=after,
                             ppl_export_reloaded=reloaded)
    print_table([("criterion", f"{criterion} ({record.calibration_batches} calibration batches)"),
                 ("parameters before", f"{space.total_params:,}"),
                 ("parameters after (export)", f"{params_after:,} ({100 * params_after / space.total_params:.1f}%)"),
                 ("prunable parameters removed", f"{100 * record.pruned_fraction:.1f}%"),
                 *([("decoder layers", f"{space.num_layers} -> {subnet.model.config.num_hidden_layers}")]
                   if space.layer_sets() else []),
                 ("eval perplexity, before", f"{before:.2f}"), ("eval perplexity, pruned", f"{after:.2f}"),
                 ("eval perplexity, export reloaded without hf_oto",
                  f"{reloaded:.2f}" if targs.verify_export else "not run (verify_export: false)"),
                 ("pruned model", str(out))])
    logger.info("fine-tune it to recover: hf-oto prune with model_name_or_path set to the export, or HESSO from the "
                "dense model (hf-oto prune), which prunes while it trains")
    return summary
