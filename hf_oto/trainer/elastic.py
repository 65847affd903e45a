"""Elastic (once-for-all) sizes in the trainer: the sandwich step with in-place distillation, and saving the run.

Each step after ``elastic_start`` computes the usual loss on the full model, then runs the sub-networks
:meth:`~hf_oto.optim.elastic.Elastic.sizes_for_step` names (masked views of the same weights) on the
same batch and adds ``T^2 * KL(full || sub)`` for each, the full model's logits detached as the target
(``elastic_target: teacher``: the dense teacher's; ``elastic_label_weight`` mixes in the language-model loss).
One backward takes the sum, so data-parallel training synchronises once per step as usual.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from hf_oto.errors import ConfigError
from hf_oto.groups import unwrap_peft
from hf_oto.optim.elastic import Elastic
from hf_oto.trainer.distill import kl_sum, lm_sum, token_mask


def wrapped_optimizer(opt, cls: type):
    """The ``cls`` optimizer inside ``opt``'s accelerate wrappers (``opt`` itself if it is one), or None."""
    while opt is not None and not isinstance(opt, cls):
        opt = getattr(opt, "optimizer", None)
    return opt


class ElasticMixin:
    """Adds elastic sizes to ``HFOTOTrainer`` (active when the optimizer is an :class:`Elastic`)."""

    @property
    def elastic(self) -> Elastic | None:
        """The :class:`Elastic` optimizer under any accelerate wrapper, once training has created it."""
        return wrapped_optimizer(getattr(self, "optimizer", None), Elastic)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        e = self.elastic
        sizes = e.sizes_for_step() if e is not None and model.training else ()
        if not sizes:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        config = e.elastic
        self.teacher_logits, self.keep_teacher_logits = None, config.target == "teacher"
        try:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            target = outputs["logits"].detach() if config.target == "full" else self.teacher_logits
        finally:
            self.teacher_logits, self.keep_teacher_logits = None, False
        labels = inputs.get("labels")
        mask = token_mask(inputs, labels)
        norm = self._distill_normaliser(mask, num_items_in_batch)
        temperature, w = config.temperature, config.label_weight
        feed = {k: v for k, v in inputs.items() if k != "labels"}
        stats = self._elastic_stats
        for size in sizes:
            with e.subnetwork(size):
                logits = model(**feed).logits
            kl = kl_sum(logits, target, mask, temperature) * norm
            sub = (1 - w) * temperature ** 2 * kl
            if w > 0:
                sub = sub + w * lm_sum(logits, inputs["input_ids"] if labels is None else labels, mask) * norm
            loss = loss + sub
            stats[size] = stats.get(size, 0.0) + float(kl.detach())
        stats["steps"] = stats.get("steps", 0) + 1
        return (loss, outputs) if return_outputs else loss

    @property
    def _elastic_stats(self) -> dict[Any, float]:
        if not hasattr(self, "_elastic_kl"):
            self._elastic_kl: dict[Any, float] = {}
        return self._elastic_kl

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        e = self.elastic
        if e is not None and "loss" in logs:
            logs.update({f"elastic/{k}": v for k, v in e.metrics().items()})
            stats, self._elastic_kl = self._elastic_stats, {}
            n = stats.pop("steps", 0)
            logs.update({f"elastic/kl_size_{s:g}": v / n for s, v in stats.items() if n})
        super().log(logs, *args, **kwargs)

    def save_elastic_run(self, out_dir: str | None = None, *, overwrite: bool | None = None,
                         extra: dict[str, Any] | None = None,
                         evals: dict[float, dict[str, float]] | None = None) -> Path:
        """Save the trained elastic run for ``hf-oto export-size``: the full model (LoRA adapters merged into a
        copy), the tokenizer and ``elastic_run.json`` (every size's removed groups, the settings that ran).
        ``out_dir`` defaults to ``args.pruned_dir()``; it replaces only an earlier elastic run. ``extra``: manifest
        fields every size's export gets (source, license, datasets); ``evals``: metrics of each size, for its
        export's manifest and card. Rank 0 writes."""
        from hf_oto.export.sizes import save_elastic_run
        from hf_oto.trainer.setup import pruning_space

        e = self.elastic
        if e is None or e.removed_flags is None:
            raise ConfigError("save_elastic_run needs a trained elastic run (elastic_sizes, past elastic_start)")
        if getattr(self, "qfa_config", None) is not None:
            raise ConfigError("an elastic QFA run is saved with save_qfa_run(); hf-oto qfa-search then picks a size "
                              "and per-layer bit-widths for a budget")
        target = Path(out_dir or self.args.pruned_dir())
        if overwrite is None:
            overwrite = self.args.overwrite_pruned_output_dir
        if not self.is_world_process_zero():
            return target
        is_peft = unwrap_peft(self.model) is not self.model
        model = copy.deepcopy(self.model).merge_and_unload() if is_peft else self.model
        space = pruning_space(model, self.args) if is_peft else self.pruning_space
        if len(space) != len(e.space):
            raise RuntimeError("the merged model's pruning space differs from the trained one")
        gen = getattr(model, "generation_config", None)
        before = (model.config.use_cache, getattr(gen, "use_cache", None))
        self._restore_use_cache(model)  # the run's config carries the source's setting, as exports do
        try:
            return save_elastic_run(model, space, e, target, tokenizer=self.processing_class, overwrite=overwrite,
                                    steps=int(self.state.global_step), args=self.args, extra=extra,
                                    evals=evals)
        finally:
            model.config.use_cache = before[0]
            if gen is not None:
                gen.use_cache = before[1]
