"""Checks that run before any training (on meta models too): the launch, the pruning and QFA settings,
the schedule, the export format and the trainable dtype. ``HFOTOTrainer`` runs them when it is built and
``hf-oto prune`` in its pre-flight, so both refuse the same settings with the same one-line errors."""

from __future__ import annotations

import os

import torch

from hf_oto.errors import ConfigError
from hf_oto.export.formats import EXPORT_FORMATS, decilm_setup_problem
from hf_oto.groups import discover_groups, unwrap_peft
from hf_oto.groups.depth import with_granularity
from hf_oto.groups.exclude import exclude_groups
from hf_oto.groups.experts import with_experts
from hf_oto.groups.space import PruningSpace
from hf_oto.trainer.args import HFOTOTrainingArguments
from hf_oto.trainer.qfa import check_qfa_setup


def check_format_and_layout(export_format: str, layout: str, model_type: str) -> None:
    """Refuse, before training, an export format the pruned model could not be written in."""
    if export_format not in EXPORT_FORMATS:
        raise ConfigError(f"export_format must be one of {EXPORT_FORMATS}, got {export_format!r}")
    problem = decilm_setup_problem(model_type, layout) if export_format == "decilm" else None
    if problem:
        raise ConfigError(f"export_format 'decilm' {problem}")


def pruning_space(model: torch.nn.Module, args: HFOTOTrainingArguments) -> PruningSpace:
    """The groups the arguments make prunable: discovery, then ``pruning_granularity`` and ``prune_experts``,
    then ``pruning_exclude``."""
    space = with_granularity(model, discover_groups(model), args.pruning_granularity, args.pruning_layout)
    if args.prune_experts:
        if args.pruning_granularity == "depth":
            raise ConfigError("prune_experts adds whole experts to the width groups: use pruning_granularity 'width' "
                              "or 'both'")
        space = with_experts(model, space)
    return exclude_groups(space, args.pruning_exclude, args.pruning_layout)


def check_pruning_setup(model: torch.nn.Module, args: HFOTOTrainingArguments) -> PruningSpace:
    """Discover the groups and check every pruning setting before any training (works on meta models).

    Raises :class:`~hf_oto.errors.ConfigError` (a ``ValueError``) for a model with no prunable
    groups, LoRA adapters that touch no prunable module, a target the constraints cannot reach,
    or a schedule that does not fit in ``max_steps``.
    """
    space = pruning_space(model, args)
    if space.prunable_params == 0:
        raise ConfigError("this model has no prunable groups" + (" left after pruning_exclude" if args.pruning_exclude
                                                                 else " (hf-oto inspect shows why)"))
    check_format_and_layout(args.export_format, args.pruning_layout, space.model_type)
    args.distill_config()  # its settings are checked here, before any training
    if unwrap_peft(model) is not model:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if not any(sl.param in trainable for gs in space.sets if gs.prunable for sl in gs.slices):
            raise ConfigError(
                "the LoRA adapters touch none of the prunable modules (attention q/k/v/o or FFN "
                "projections), so training cannot inform pruning; add them to target_modules"
            )
    if args.elastic:
        check_elastic(args, space)
    else:
        check_schedule(args, space)
    return space


def check_elastic(args: HFOTOTrainingArguments, space: PruningSpace) -> None:
    """Refuse elastic settings that cannot train as asked: sizes outside (0, 1], sizes the constraints cannot
    reach, a schedule that never trains the sub-networks, and combinations an elastic run does not support."""
    from hf_oto.optim.elastic import size_targets

    if args.use_cric:
        raise ConfigError("elastic_sizes does not combine with use_cric: CRIC trials removals on the weights, and an "
                          "elastic run removes nothing (its sizes are masked views)")
    if args.prune_experts:
        raise ConfigError("elastic_sizes masks heads, kv groups, FFN channels, whole layers and blocks; whole experts "
                          "are not supported yet (leave prune_experts off)")
    from hf_oto.optim.elastic import ELASTIC_REFUSAL, ELASTIC_REFUSED

    if args.pruning_criterion == ELASTIC_REFUSED:
        raise ConfigError(ELASTIC_REFUSAL)
    total = args.max_steps if args.max_steps and args.max_steps > 0 else None
    if args.elastic_target == "teacher" and not args.distill:
        raise ConfigError("elastic_target 'teacher' distils the sizes from the dense teacher: set distill: true "
                          "(or elastic_target: full)")
    elastic = args.elastic_config(total or 1000)
    if total is not None:
        elastic.check_steps(total)
    size_targets(space, elastic.sizes, args.hesso_config(total or 1000))


def check_setup(model: torch.nn.Module, args: HFOTOTrainingArguments) -> tuple[PruningSpace | None,
                                                                              PruningSpace | None]:
    """Every pruning and QFA check, before any training or quantization (works on meta models).

    Returns the pruning space (None for a quantize-only QFA run) and the space HESSO works on.
    """
    if not args.qfa:  # QFA trains only its own adapters, which it creates in float32
        check_trainable_dtype(model)
    space = check_pruning_setup(model, args) if args.prunes else None
    if not args.qfa:
        return space, space
    hesso_space = check_qfa_setup(model, args, space)
    if hesso_space is not None:  # the quantized space adds whole-quantization-group alignment to the sizes
        check_elastic(args, hesso_space) if args.elastic else check_schedule(args, hesso_space)
    return space, hesso_space


def check_launch(*, fsdp: bool = False, processes: int | None = None) -> None:
    """Refuse launches that would not train as asked: accelerate's FSDP (not verified with the trainer;
    on a machine without GPUs accelerate cannot run it and silently trains unsharded instead), and
    several launched processes that accelerate runs as independent single processes."""
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp or (asked and torch.cuda.is_available()):
        raise ConfigError("HFOTOTrainer under accelerate's FSDP is not verified yet; use DDP "
                          "(configs/accelerate/ddp_gpu.yaml), or HESSO directly on an FSDP2 model (see README)")
    if asked:
        raise ConfigError("accelerate was launched with an FSDP config, but accelerate runs FSDP only on GPUs and "
                          "similar accelerators: on this machine it would train unsharded (plain data parallel on "
                          "CPU); use configs/accelerate/cpu_2proc.yaml")
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if processes is not None and launched > 1 and processes == 1:
        raise ConfigError(f"{launched} processes were launched, but accelerate runs each one alone (no GPU and "
                          "use_cpu is false), so each would train and export on its own; set use_cpu: true for "
                          "data parallel on CPU (gloo)")


def check_trainable_dtype(model: torch.nn.Module) -> None:
    """Refuse float16 weights that the optimizer would update: float16 cannot hold Adam's epsilon (1e-8)
    or its small second moments, so the first step divides by zero and training turns to NaN (with or
    without pruning). bfloat16 has float32's range and trains; LoRA adapters are float32 under peft."""
    half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if half:
        raise ConfigError(f"{len(half)} trainable parameters are float16 (e.g. {half[0]}), which AdamW turns to NaN "
                          "in one step; load the model in float32 with fp16: true (mixed precision), in bfloat16, "
                          "or train LoRA adapters (lora_r) on the float16 base")


def check_schedule(args: HFOTOTrainingArguments, space: PruningSpace) -> None:
    """Check that the target can be reached in ``space`` and (with max_steps) that the schedule fits."""
    total = args.max_steps if args.max_steps and args.max_steps > 0 else None
    if total is not None:
        args.hesso_config(total).validate(space, total_steps=total, cric=args.cric_config())
    else:  # epochs: the step count is known once the data is, so train() checks the schedule; the target now
        args.hesso_config(max(args.pruning_periods, 1) * 1000).validate(space, cric=args.cric_config())
