"""HFOTOTrainer: a transformers.Trainer that prunes with HESSO/CRIC while it fine-tunes."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from hf_oto.errors import ConfigError
from hf_oto.export import save_pruned
from hf_oto.export.adapter import save_base_and_adapter
from hf_oto.groups import unwrap_peft
from hf_oto.manifest import HESSORecord
from hf_oto.optim import HESSO
from hf_oto.optim.elastic import Elastic
from hf_oto.optim.saliency import lora_factors
from hf_oto.subnet import construct_subnet
from hf_oto.trainer.args import HFOTOTrainingArguments
from hf_oto.trainer.distill import DistillMixin
from hf_oto.trainer.elastic import ElasticMixin, wrapped_optimizer
from hf_oto.trainer.qfa import QFAMixin
from hf_oto.trainer.resume import RecordPruningSettings, adopt_added_settings, reload_converted
from hf_oto.trainer.setup import check_launch, check_setup, pruning_space


class HFOTOTrainer(ElasticMixin, QFAMixin, DistillMixin, Trainer):
    """Drop-in ``Trainer``: the optimizer it would build is wrapped by HESSO over the model's groups.

    Use :class:`HFOTOTrainingArguments` for the pruning settings; call :meth:`save_pruned_model`
    after ``train()`` to write the smaller model as a standard Hugging Face repo. With ``qfa=True``
    the targeted linears of the model are replaced (in place, as peft does) by quantized layers with
    one adapter per bit-width, and :meth:`save_qfa_run` saves the run for ``hf-oto qfa-search``. With
    ``elastic_sizes`` the run trains nested sub-networks of those sizes instead of removing anything, and
    :meth:`save_elastic_run` saves it for ``hf-oto export-size``.
    """

    args: HFOTOTrainingArguments

    def __init__(self, model=None, args=None, *rest, **kwargs):
        # Trainer turns the KV cache off for training; exports get the model's own setting back.
        config = getattr(model, "config", None)
        self._source_use_cache = getattr(config, "use_cache", None)
        gen = getattr(model, "generation_config", None)
        self._source_gen_use_cache = getattr(gen, "use_cache", None)
        if kwargs.get("data_collator") is None and not rest and _cannot_pad(kwargs.get("processing_class")):
            kwargs["data_collator"] = _stack_equal_length  # Trainer's padding collator would fail on the first batch
        super().__init__(model, args, *rest, **kwargs)
        if not isinstance(self.args, HFOTOTrainingArguments):
            raise TypeError("HFOTOTrainer needs HFOTOTrainingArguments (TrainingArguments plus pruning settings)")
        check_launch(fsdp=getattr(self, "is_fsdp_enabled", False), processes=self.args.world_size)
        self._total_steps: int | None = None
        self._step_batches: list[dict[str, Any]] = []  # this optimizer step's micro-batches (measured pricing)
        self._step_batches_at = -1  # the global step they belong to
        # hesso_space is what HESSO prunes: with QFA, the QFA layers' gates and adapters
        self.pruning_space, self.hesso_space = check_setup(self.model, self.args)
        self.add_callback(RecordPruningSettings())
        _tensorboard_under_output_dir(self)
        self.setup_distillation(self.args.distill_config(), self.model)
        self.setup_qfa(self.hesso_space)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``Trainer.train``; a checkpoint saved before a setting existed resumes as it was trained."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        if isinstance(checkpoint, (str, os.PathLike)):
            adopt_added_settings(checkpoint, self.args)
            self._check_qfa_resume(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        reload_converted(self.model if model is None else model, resume_from_checkpoint)  # MoE checkpoints

    # Optimizer ---------------------------------------------------------------------------------
    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        self._total_steps = values[-1]  # optimizer steps, from max_steps or from epochs x batches
        return values

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        self._total_steps = num_training_steps
        super().create_optimizer_and_scheduler(num_training_steps)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if isinstance(self.optimizer, HESSO | Elastic):
            return self.optimizer
        total = self._total_steps or self.args.max_steps
        if total is None or total <= 0:
            raise ConfigError("HFOTOTrainer needs the number of training steps (set max_steps, or num_train_epochs "
                              "with a training set that has a length)")
        self._qfa_start(total)
        if self.hesso_space is None:  # a quantize-only QFA run
            return super().create_optimizer(model)
        config = self.args.hesso_config(total, lora=bool(lora_factors(self.model)))
        if self.args.elastic:  # nested sizes trained as masked views; nothing is removed
            elastic = self.args.elastic_config(total)
            elastic.check_steps(total)
            if self.args.pruning_pricing == "auto":  # measured on the toy reference: scripts/benchmark_results/elastic
                config = dataclasses.replace(config, pricing="saliency")
            probe = self._probe_loss if config.pricing == "measured" else None
            self.optimizer = Elastic(self.model, self.hesso_space, super().create_optimizer(model), config, elastic,
                                     probe=probe, view_space=self.pruning_space)
            return self.optimizer
        cric = self.args.cric_config()
        config.validate(self.hesso_space, total_steps=total, cric=cric)  # before the base optimizer is built
        base = super().create_optimizer(model)
        probe = self._probe_loss if config.pricing == "measured" else None
        self.optimizer = HESSO(self.model, self.hesso_space, base, config, cric=cric, probe=probe)
        return self.optimizer

    @torch.no_grad()
    def _probe_loss(self) -> float:
        """The language-model loss of the model as it is on this step's batch, the mean over its
        micro-batches under gradient accumulation (measured pricing's probe): no distillation term, no
        dropout, no gradients."""
        was_training = self.model.training
        self.model.eval()
        try:
            total = 0.0
            for batch in self._step_batches:
                with self.compute_loss_context_manager():
                    total += float(Trainer.compute_loss(self, self.model, self._prepare_inputs(batch)).detach())
        finally:
            self.model.train(was_training)
        return total / len(self._step_batches)

    @property
    def hesso(self) -> HESSO | None:
        """The HESSO optimizer under any accelerate wrapper, once training has created it."""
        return wrapped_optimizer(self.optimizer, HESSO)

    # Training hooks ----------------------------------------------------------------------------
    def training_step(self, model, inputs, *args, **kwargs):
        self._qfa_sample()  # the step's per-layer widths (the same for every micro-batch of the step)
        if self._step_batches_at != self.state.global_step:  # the first micro-batch of a new optimizer step
            self._step_batches, self._step_batches_at = [], self.state.global_step
        self._step_batches.append(inputs)  # measured pricing tries removals on the step's whole batch
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.hesso is not None:
            self.hesso.observe_loss(loss)
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.hesso is not None and "loss" in logs:
            logs.update({f"pruning/{k}": v for k, v in self.hesso.metrics().items()})
        if "loss" in logs:
            logs.update(self._qfa_logs())
        super().log(logs, *args, **kwargs)

    # Export ----------------------------------------------------------------------------------
    def _manifest_extra(self, eval_results: dict[str, Any] | None) -> dict[str, Any]:
        return {"hesso": self.pruning_record(), "eval": eval_results or {}}

    def pruning_record(self) -> HESSORecord | None:
        """The HESSO settings that ran, with what was prunable (None when nothing is pruned)."""
        if self.hesso is None:
            return None
        return dataclasses.replace(self.hesso.record(), granularity=self.args.pruning_granularity,
                                   experts=self.args.prune_experts)

    def save_pruned_model(self, out_dir: str | None = None, *, overwrite: bool | None = None,
                          eval_results: dict[str, Any] | None = None, merge_adapters: bool = True,
                          adapter_dir: str | None = None, license: str | None = None,
                          extra_manifest: dict[str, Any] | None = None,
                          extra_files: dict[str, str] | None = None) -> Path:
        """Build the sub-network of the trained (zeroed) model and save it as a standard HF repo.

        With a peft model, ``merge_adapters=True`` merges a copy of the adapters and writes one
        merged model. ``merge_adapters=False`` writes the pruned *base* to ``out_dir`` and the
        pruned adapter (its rows/columns sliced to match) to ``adapter_dir`` (default
        ``<out_dir>-adapter``), which loads with ``PeftModel.from_pretrained(base, adapter_dir)``.
        ``out_dir`` defaults to ``args.pruned_dir()`` and ``overwrite`` to ``args.overwrite_pruned_output_dir``;
        it replaces only an earlier hf-oto export. The export gets the model's own ``use_cache`` back
        (Trainer turns it off for training). The trained model object is left as it is. ``extra_manifest``
        adds entries to the manifest (e.g. ``gguf``: the GGUF file the model came from, which the card names);
        ``extra_files`` adds text files to the export (``hf-oto prune`` writes its recipe). Returns ``out_dir``.
        """
        if self.args.elastic:
            raise ConfigError("an elastic run is exported per size: save_elastic_run(), then hf-oto export-size "
                              "RUN_DIR --size S --out DIR (or hf_oto.export.sizes.export_size)")
        if self.qfa_config is not None:
            raise ConfigError("a QFA run is exported per bit configuration: save_qfa_run(), then hf-oto qfa-search "
                              "RUN_DIR --budget BITS --out DIR (or hf_oto.export.quantized.save_quantized)")
        target = out_dir or self.args.pruned_dir()
        if overwrite is None:
            overwrite = self.args.overwrite_pruned_output_dir
        layout = self.args.pruning_layout
        extra = dict(extra_manifest or {}, **self._manifest_extra(eval_results))
        is_peft = unwrap_peft(self.model) is not self.model
        if is_peft and not merge_adapters:
            if self.is_world_process_zero():
                save_base_and_adapter(self.model, target, adapter_dir or f"{target}-adapter", layout=layout,
                                      tokenizer=self.processing_class, overwrite=overwrite, extra=extra,
                                      license=license, prepare=self._restore_use_cache,
                                      export_format=self.args.export_format, extra_files=extra_files,
                                      space_of=lambda base: pruning_space(base, self.args))
            return Path(target)
        model = copy.deepcopy(self.model).merge_and_unload() if is_peft else self.model
        space = pruning_space(model, self.args) if is_peft else self.pruning_space
        subnet = construct_subnet(model, space, layout=layout)
        self._restore_use_cache(subnet.model)
        if self.is_world_process_zero():
            return save_pruned(subnet, target, tokenizer=self.processing_class, overwrite=overwrite,
                               extra_manifest=extra, license=license, export_format=self.args.export_format,
                               extra_files=extra_files)
        return Path(target)

    def _restore_use_cache(self, model: torch.nn.Module) -> None:
        if self._source_use_cache is not None:
            model.config.use_cache = self._source_use_cache
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.use_cache = True if self._source_gen_use_cache is None else self._source_gen_use_cache


def _cannot_pad(tokenizer) -> bool:
    """A tokenizer without a pad token (Llama, Mistral): Trainer's default padding collator refuses it."""
    from transformers import PreTrainedTokenizerBase

    return isinstance(tokenizer, PreTrainedTokenizerBase) and tokenizer.pad_token is None


def _stack_equal_length(features: list[dict[str, Any]]) -> dict[str, Any]:
    from transformers import default_data_collator

    lengths = {len(f["input_ids"]) for f in features if "input_ids" in f}
    if len(lengths) > 1:
        raise ConfigError("training examples have different lengths and the tokenizer has no pad token: set "
                          "tokenizer.pad_token (e.g. to the eos token), pass a data_collator, or pack the text "
                          "into equal blocks")
    return default_data_collator(features)


def _tensorboard_under_output_dir(trainer) -> None:
    """TensorBoard logs in ``output_dir/runs/...`` also when something is logged before ``train()``.

    transformers' TensorBoardCallback picks its folder in ``on_train_begin``; a log before that (an
    evaluation first, as ``hf-oto prune`` does) opens a writer on torch's default, ``./runs`` in the
    working directory, and the training curves follow it there. Setting the folder up front keeps
    every curve in one run under ``output_dir``, where TensorBoard users look.
    """
    try:
        from transformers.integrations import TensorBoardCallback
        from transformers.integrations.integration_utils import default_logdir
    except ImportError:  # an integration layout without them: nothing to adjust
        return
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = os.path.join(trainer.args.output_dir, default_logdir())
