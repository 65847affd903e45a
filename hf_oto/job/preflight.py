"""Checks the main job runs before it reads data or loads a model: sources, output folders, resume.

Each failure is one :class:`~hf_oto.errors.HFOTOError` whose message names the problem and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_oto.data import DataArguments, check_data_args
from hf_oto.errors import ConfigError, ExportError, ResumeError, first_line, only_a_path
from hf_oto.export.adapter import ADAPTER_MARKER
from hf_oto.export.save import MANIFEST
from hf_oto.export.sizes import RUN_FILE as ELASTIC_RUN_FILE
from hf_oto.export.verify import check_weights
from hf_oto.io import PICKLE_SUFFIXES, check_target
from hf_oto.job.args import ModelArguments
from hf_oto.job.build import gguf_source, model_config, with_lora
from hf_oto.quant.run import RUN_FILE
from hf_oto.stream import check_streaming
from hf_oto.trainer import HFOTOTrainingArguments
from hf_oto.trainer.resume import adopt_added_settings, changed_pruning_settings


@dataclass(frozen=True)
class Checked:
    """What :func:`preflight` found: the local source folder (None for Hub ids and ``init_config``),
    the export folder, the checkpoint to resume (None: a fresh run), warnings to print and the lm-eval
    TaskManager that checked ``eval_tasks`` (None without them; the job evaluates with it)."""

    source: Path | None
    pruned: Path
    resume: str | None
    warnings: tuple[str, ...] = ()
    tasks: Any = None


def preflight(margs: ModelArguments, dargs: DataArguments, targs: HFOTOTrainingArguments) -> Checked:
    """Every check that needs no data and no weights: sources, outputs, resume, and the pruning settings.

    The model is built on the meta device, so this costs seconds even for large models.
    """
    from transformers import AutoModelForCausalLM

    from hf_oto.trainer.setup import check_launch, check_setup

    check_launch()
    if not (margs.model_name_or_path or margs.init_config or margs.gguf_file):
        raise ConfigError("set model_name_or_path, gguf_file or init_config")
    if margs.init_config and (margs.model_name_or_path or margs.gguf_file):
        raise ConfigError("init_config builds a new model: set it alone, without model_name_or_path or gguf_file")
    if margs.torch_dtype and not isinstance(getattr(torch, margs.torch_dtype, None), torch.dtype):
        raise ConfigError(f"torch_dtype {margs.torch_dtype!r} is not a torch dtype (e.g. bfloat16, float32)")
    if margs.gguf_file:
        source = gguf_source(margs).folder
    else:
        source = local_or_hub(margs.model_name_or_path, "model folder") if margs.model_name_or_path else None
        if source is not None:
            check_model_folder(source)
    if margs.tokenizer_name:
        local_or_hub(margs.tokenizer_name, "tokenizer folder")
    elif not dargs.train_tokenizer_vocab and not (margs.model_name_or_path or margs.gguf_file):
        raise ConfigError("a model built from init_config needs tokenizer_name or train_tokenizer_vocab")
    check_data_args(dargs)
    check_streaming(dargs, targs.max_steps)
    check_trackers(targs)
    tasks = check_eval_tasks(dargs, margs, targs)
    adapter_dir = f"{targs.pruned_dir()}-adapter" if margs.lora_r and not margs.merge_adapters else None
    pruned = check_output_folders(targs, source=source, adapter_dir=adapter_dir)
    resume = resolve_resume(targs)
    config = model_config(margs, vocab=dargs.train_tokenizer_vocab or 64)
    dtype = {"dtype": getattr(torch, margs.torch_dtype)} if margs.torch_dtype else {}
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, **dtype)
        except ValueError as exc:
            raise ConfigError(f"{config.model_type} has no causal-LM head in transformers: "
                              f"{first_line(exc)}") from None
        model = with_lora(model, margs)
    check_setup(model, targs)
    return Checked(source=source, pruned=pruned, resume=resume, warnings=tuple(precision_warnings(targs)),
                   tasks=tasks)


def check_eval_tasks(dargs: DataArguments, margs: ModelArguments, targs: HFOTOTrainingArguments) -> Any:
    """``eval_tasks``: lm-eval installed and every task known, before any training; returns the TaskManager
    that found them (None without ``eval_tasks``)."""
    if not dargs.eval_tasks:
        if dargs.eval_tasks_limit is not None or dargs.eval_tasks_include_path:
            raise ConfigError("eval_tasks_limit and eval_tasks_include_path apply to eval_tasks; set eval_tasks too")
        return None
    from hf_oto.job.evaluate_job import task_manager

    if dargs.eval_tasks_limit is not None and dargs.eval_tasks_limit <= 0:
        raise ConfigError(f"eval_tasks_limit must be positive, got {dargs.eval_tasks_limit}")
    if targs.elastic:
        raise ConfigError("eval_tasks evaluates the pruned export; an elastic run has one per size only after "
                          "hf-oto export-size, so run hf-oto eval on those exports")
    if targs.qfa:
        raise ConfigError("eval_tasks evaluates the pruned export; a QFA run has one only after qfa-search, so run "
                          "hf-oto eval on the qfa-search export")
    if margs.lora_r and not margs.merge_adapters:
        raise ConfigError("eval_tasks evaluates the exported model; with merge_adapters: false the export is a base "
                          "plus an adapter, so run hf-oto eval on a merged copy instead")
    return task_manager(list(dargs.eval_tasks), dargs.eval_tasks_include_path,
                        ("eval_tasks", "eval_tasks_include_path"))


def check_trackers(targs: HFOTOTrainingArguments) -> None:
    """``report_to: tensorboard`` needs the tensorboard package (Trainer would only say so after the data work)."""
    import importlib.util

    wanted = targs.report_to if isinstance(targs.report_to, list) else [targs.report_to]
    if "tensorboard" in wanted and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise ConfigError("report_to: tensorboard needs the tensorboard package: pip install 'hf-oto[tracking]'")


def precision_warnings(targs: HFOTOTrainingArguments) -> list[str]:
    """bf16 autocast, or a bfloat16 teacher, on a CPU whose torch build multiplies bf16 matrices slower than
    fp32 ones."""
    on_cpu = targs.use_cpu or not torch.cuda.is_available()
    teacher_on_cpu = on_cpu or targs.distill_teacher_device == "cpu"
    autocast = targs.bf16 and on_cpu
    teacher = targs.distill and targs.distill_teacher_dtype == "bfloat16" and teacher_on_cpu
    if not (autocast or teacher):
        return []
    from hf_oto.env import cpu_bf16_slowdown

    slowdown = cpu_bf16_slowdown()
    if slowdown <= 1.5:
        return []
    kernel = f"{slowdown:.0f}x slower than fp32 (this torch build has no fast bf16 kernel for it)"
    out = []
    if autocast:
        out.append(f"bf16 on this CPU multiplies matrices {kernel}; training in fp32 (bf16: false) will be faster")
    if teacher:
        out.append(f"distill_teacher_dtype: bfloat16 on this CPU multiplies the teacher's matrices {kernel}; "
                   "'auto' or 'same' will be faster")
    return out


def local_or_hub(name: str, what: str) -> Path | None:
    """``name`` as a local folder (checked to exist), or None when it can only be a Hub id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name).expanduser()
    if path.exists():
        return path
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(f"{what} {name} does not exist (and it is not a Hub id either)") from None
    if only_a_path(name):
        raise ConfigError(f"{what} {name} does not exist")
    return None


def check_model_folder(path: Path, *, weights: bool = True) -> None:
    """A local model folder: a folder with a readable config.json and (optionally) whole weight files."""
    if not path.is_dir():
        raise ConfigError(f"{path} is a file, not a model folder (give the folder that holds config.json)")
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"{path} is not a Hugging Face model folder: it has no config.json")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ConfigError(f"{config} has no model_type, so transformers cannot tell which architecture it is")
    if not weights:
        return
    try:
        files = check_weights(path)
    except ExportError as exc:
        raise ConfigError(str(exc)) from None
    if not files and not any(f.suffix in PICKLE_SUFFIXES for f in path.iterdir()):
        raise ConfigError(f"{path} has no weights (no *.safetensors file)")


def check_output_folders(targs: HFOTOTrainingArguments, *, source: Path | None,
                         adapter_dir: str | None = None) -> Path:
    """Refuse export targets that would destroy something; returns the pruned model's folder.

    A target may not be a file, the source model's folder (or contain it, or lie inside it),
    ``output_dir`` or a folder that contains it, or a checkpoint folder; a non-empty target needs
    ``overwrite_pruned_output_dir`` and must hold an earlier hf-oto export.
    """
    out = Path(targs.output_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {targs.output_dir} is a file")
    if source is not None and out == source.resolve():
        raise ConfigError(f"output_dir {targs.output_dir} is the source model's folder; choose another output_dir")
    pruned = Path(targs.qfa_dir() if targs.qfa else targs.pruned_dir())
    targets = [("qfa_run_dir" if targs.qfa else "pruned_output_dir", pruned)]
    if adapter_dir:
        targets.append(("the adapter folder", Path(adapter_dir)))
    for what, target in targets:
        t = target.resolve()
        if t.exists() and not t.is_dir():
            raise ConfigError(f"{what} {target} is a file; give a folder")
        if source is not None:
            src = source.resolve()
            if t == src or src in t.parents or t in src.parents:
                raise ConfigError(f"{what} {target} would overwrite the source model at {source}; choose another "
                                  "folder")
        if t == out or t in out.parents:
            raise ConfigError(f"{what} {target} would replace output_dir {targs.output_dir} (the run's "
                              "checkpoints); choose a folder outside it, or a new one inside it")
        if out in t.parents and t.relative_to(out).parts[0].startswith("checkpoint-"):
            raise ConfigError(f"{what} {target} lies inside a checkpoint folder, which Trainer may delete; "
                              "choose another folder")
        check_target(t, overwrite=targs.overwrite_pruned_output_dir, label=f"{what} {target}", error=ConfigError,
                     marker={"pruned_output_dir": ELASTIC_RUN_FILE if targs.elastic else MANIFEST,
                             "qfa_run_dir": RUN_FILE}.get(what, ADAPTER_MARKER),
                     hint="set overwrite_pruned_output_dir: true")
    return pruned


def resolve_resume(targs: HFOTOTrainingArguments) -> str | None:
    """The checkpoint to resume from (``true``: the last one in output_dir), checked; None for a fresh run."""
    from transformers.trainer_utils import get_last_checkpoint

    value = targs.resume_from_checkpoint
    out = Path(targs.output_dir)
    if value in (None, False) or str(value).lower() in ("", "false", "no", "none"):
        last = get_last_checkpoint(str(out)) if out.is_dir() else None
        if last is not None and targs.save_strategy != "no":
            raise ConfigError(f"output_dir {out} already holds checkpoints ({Path(last).name}) that this run would "
                              "overwrite; resume with --resume_from_checkpoint true, or choose a new output_dir")
        return None
    if value is True or str(value).lower() in ("true", "yes", "last"):
        last = get_last_checkpoint(str(out)) if out.is_dir() else None
        if last is None:
            raise ResumeError(f"resume_from_checkpoint is true, but output_dir {out} holds no checkpoint-N folder")
        checkpoint = Path(last)
    else:
        checkpoint = Path(str(value))
        if not checkpoint.is_dir():
            raise ResumeError(f"checkpoint {value} does not exist")
    if not (checkpoint / "trainer_state.json").is_file():
        raise ResumeError(f"{checkpoint} is not a Trainer checkpoint (no trainer_state.json)")
    changed = changed_pruning_settings(checkpoint, targs)
    if changed:
        diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise ResumeError(f"{checkpoint} was trained with other pruning settings ({diff}); resume with the same "
                          "settings, or start a new run in a new output_dir")
    adopt_added_settings(checkpoint, targs)  # before the trainer builds what they shape (QFA's adapters)
    return str(checkpoint)
