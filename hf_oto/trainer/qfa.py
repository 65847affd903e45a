"""QFA in the Trainer: quantize before training, sample a per-layer width each step, save the run."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from hf_oto.errors import ConfigError
from hf_oto.groups import unwrap_peft
from hf_oto.groups.space import PruningSpace
from hf_oto.quant.config import QFAConfig
from hf_oto.quant.health import WidthCheck, batch_loss
from hf_oto.quant.prepare import QFAMemory, check_targets, decoder_layers, prepare_qfa, set_bits
from hf_oto.quant.pruning import enable_gates, qfa_space, zero_removed_columns
from hf_oto.quant.run import save_qfa_run
from hf_oto.quant.sampler import BitSampler

EVAL_BLOCKS_SAVED = 64  # held-out blocks stored with the run for qfa-search


def check_qfa_setup(model: torch.nn.Module, args, space: PruningSpace | None) -> PruningSpace | None:
    """Check the QFA settings against the model before any quantization; returns HESSO's space.

    Refuses peft models (QFA brings its own adapters), layouts other than uniform when pruning,
    a group size that does not divide a target's input width, targets that match nothing, and
    groups whose input columns cannot be whole quantization groups.
    """
    config = args.qfa_config()
    if unwrap_peft(model) is not model:
        raise ConfigError("qfa trains its own adapters (one per bit-width); start from the plain model, without "
                          "LoRA (lora_r: 0)")
    targets = check_targets(model, config)
    if space is None:
        return None
    what = "qfa with elastic_sizes" if args.elastic else "qfa with pruning"
    if args.pruning_granularity != "width":
        raise ConfigError(f"{what} takes pruning_granularity: width (its quantized export keeps every layer)")
    if args.prune_experts:
        raise ConfigError(f"{what} keeps every expert (prune_experts: false): its quantized layers are fixed before "
                          "training")
    if args.pruning_layout != "uniform":
        raise ConfigError(f"{what} needs pruning_layout: uniform (the quantized export is the stock architecture "
                          "config)")
    return qfa_space(space, {n: tuple(m.weight.shape) for n, _, m in targets}, config, args.ffn_multiple)


class QFAMixin:
    """Trainer methods for QFA; ``setup_qfa`` after ``Trainer.__init__`` turns it on."""

    qfa_config: QFAConfig | None = None
    qfa_memory: QFAMemory | None = None
    qfa_check: WidthCheck | None = None  # the quantized base's loss per width, before training
    _qfa_sampler: BitSampler | None = None
    _qfa_bits: tuple[int, ...] | None = None

    def setup_qfa(self, hesso_space: PruningSpace | None) -> None:
        config = self.args.qfa_config()
        self.qfa_config = config
        if config is None:
            return
        calibration = None
        if config.quantizer == "gptq":
            calibration = list(itertools.islice(self._calibration_batches(), config.calibration_batches))
        probe = calibration[0] if calibration else next(self._calibration_batches(), None) \
            if self.train_dataset is not None else None
        full = batch_loss(self.model, probe) if probe is not None else None
        self.qfa_memory = prepare_qfa(self.model, config, calibration)
        if probe is not None:  # does the model survive every width? (one batch, before any training)
            self.qfa_check = WidthCheck.measure(self.model, probe, full)
        if hesso_space is not None:
            enable_gates(self.model, hesso_space)
        self.add_callback(_QFAStepEnd(self))
        if self.is_world_process_zero():
            print(f"hf-oto: {self.qfa_memory.table()}")
            if self.qfa_check is not None:
                print(f"hf-oto: {self.qfa_check.line()}")
                if self.qfa_check.warning():
                    print(f"hf-oto: {self.qfa_check.warning()}")

    def _check_qfa_resume(self, checkpoint) -> None:
        """Refuse a checkpoint whose QFA adapters are not the ones this trainer built (one line, before
        loading): a run saved before the shared adapter existed needs ``qfa_shared_rank=0`` when the trainer
        is built (the main job adopts it by itself)."""
        if self.qfa_config is None:
            return
        now, saved = self.qfa_config.shared_rank, self.args.qfa_config().shared_rank
        if now != saved:
            raise ConfigError(f"{checkpoint} was trained with qfa_shared_rank {saved}, but this trainer built its "
                              f"QFA adapters with {now}: build HFOTOTrainer with qfa_shared_rank={saved} to resume")

    def _calibration_batches(self):
        if self.train_dataset is None:
            raise ConfigError("qfa with quantizer 'gptq' needs a training set to calibrate on (or qfa_quantizer: rtn)")
        loader = torch.utils.data.DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size,
                                             collate_fn=self.data_collator, shuffle=False)
        device = next(self.model.parameters()).device
        for batch in loader:
            yield {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def _qfa_start(self, total_steps: int) -> None:
        if self.qfa_config is not None:
            layers = len(decoder_layers(self.model)[1])
            self._qfa_sampler = BitSampler(self.qfa_config, layers, self.qfa_config.period or total_steps)

    def _qfa_sample(self) -> None:
        if self._qfa_sampler is not None:
            self._qfa_bits = self._qfa_sampler.sample(self.state.global_step)
            set_bits(self.model, self._qfa_bits)

    def _qfa_logs(self) -> dict[str, float]:
        if self._qfa_bits is None:
            return {}
        return {"qfa/mean_bits": sum(self._qfa_bits) / len(self._qfa_bits)}

    def evaluate(self, *args, **kwargs):
        if self.qfa_config is not None:  # evaluation reports the widest configuration
            set_bits(self.model, self.qfa_config.bits[-1])
        return super().evaluate(*args, **kwargs)

    def save_qfa_run(self, out_dir: str | None = None, *, overwrite: bool = False,
                     extra: dict[str, Any] | None = None,
                     evals: dict[float, dict[str, float]] | None = None) -> Path:
        """Save the trained QFA model for ``hf-oto qfa-search`` (rank 0 writes). Returns the folder.

        With ``elastic_sizes`` the run also records every size's removed groups (and ``evals``, each size's
        metrics), and ``qfa-search`` searches sizes and bit-widths together."""
        if self.qfa_config is None:
            raise ConfigError("save_qfa_run needs a QFA run (qfa: true)")
        target = out_dir or self.args.qfa_dir()
        elastic = getattr(self, "elastic", None)
        if elastic is not None:
            if elastic.removed_flags is None:
                raise ConfigError("save_qfa_run on an elastic run needs training past elastic_start (no sizes yet)")
            from hf_oto.export.sizes import sizes_record

            extra = dict(extra or {}, elastic=sizes_record(self.hesso_space, elastic, steps=int(self.state.global_step),
                                                           args=self.args, evals=evals))
        if self.is_world_process_zero():
            blocks = None
            if self.eval_dataset is not None and len(self.eval_dataset) > 0:
                n = min(len(self.eval_dataset), EVAL_BLOCKS_SAVED)
                rows = [self.eval_dataset[i]["input_ids"] for i in range(n)]
                blocks = torch.stack([torch.as_tensor(r) for r in rows])
            save_qfa_run(self.model, self.qfa_config, target, pruned=self.hesso is not None, eval_blocks=blocks,
                         tokenizer=self.processing_class, overwrite=overwrite, extra=extra)
        return Path(target)


class _QFAStepEnd(TrainerCallback):
    """After each optimizer step: keep removed blocks' adapter columns at zero."""

    def __init__(self, trainer: QFAMixin):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if getattr(self.trainer, "hesso", None) is not None:
            zero_removed_columns(self.trainer.model)
        return control
