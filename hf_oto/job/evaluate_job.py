"""``hf-oto eval``: the numbers pruning papers report, for any model folder (an hf-oto export or not).

- ``--tasks``: zero/few-shot accuracy through lm-evaluation-harness (``lm_eval.simple_evaluate`` with
  its ``HFLM`` wrapped around the already loaded model), installed by the ``eval`` extra; local task
  YAML files come in with ``--include_path``.
- ``--perplexity``: strided perplexity over a whole text, the method of the transformers perplexity
  guide: windows of ``max_length`` tokens moved by ``stride``, each scoring only the tokens the
  previous window did not, so every token is predicted once with up to ``max_length`` of context.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_oto.errors import ConfigError, first_line
from hf_oto.io import JSONObject


def load_for_eval(folder: str, trust_remote_code: bool = False):
    """(model, tokenizer) of a local folder; an hf-oto export's own remote code is trusted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{folder} is not a model folder (no config.json)")
    config = json.loads((path / "config.json").read_text())
    ours = (path / "pruning_manifest.json").is_file()  # hf-oto wrote the remote code it ships
    if "auto_map" in config and not (ours or trust_remote_code):
        raise ConfigError(f"{folder} ships its own model code; pass --trust_remote_code to run it")
    remote = "auto_map" in config
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote).eval()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"could not load {folder}: {first_line(exc)}") from None
    return model, tokenizer


def perplexity_text(spec: str) -> tuple[str, str]:
    """(text, description) of ``--perplexity``: a text file, ``python-stdlib`` (first 1 MB), or a Hub dataset
    ``name:config:split`` (its ``text`` column joined with blank lines, as the perplexity guide does)."""
    if Path(spec).is_file():
        return Path(spec).read_text(encoding="utf-8"), spec
    if spec == "python-stdlib":
        from hf_oto.data import stdlib_text

        return "\n\n".join(stdlib_text(1.0)), "python-stdlib (1 MB)"
    parts = spec.split(":")
    if len(parts) != 3 or not all(parts):
        raise ConfigError(f"--perplexity {spec!r}: give a text file, python-stdlib, or a Hub dataset as "
                          "NAME:CONFIG:SPLIT (e.g. wikitext:wikitext-2-raw-v1:test)")
    from datasets import load_dataset

    try:
        ds = load_dataset(parts[0], parts[1], split=parts[2])
    except Exception as exc:  # noqa: BLE001 - offline, unknown name: one line
        raise ConfigError(f"--perplexity {spec}: {first_line(exc)}") from None
    return "\n\n".join(ds["text"]), spec


@torch.no_grad()
def strided_perplexity(model, tokenizer, text: str, *, max_length: int | None = None,
                       stride: int | None = None) -> dict:
    """Perplexity of ``text`` with sliding windows (see the module docstring); ``stride`` defaults to
    512 or the window, whichever is smaller."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    max_length = max_length or getattr(model.config, "max_position_embeddings", 1024)
    stride = min(512, max_length) if stride is None else stride
    if stride < 1 or stride > max_length:
        raise ConfigError(f"--stride must be in 1..{max_length} (the window), got {stride}")
    device = next(model.parameters()).device
    total_nll, counted, prev_end = 0.0, 0, 0
    starts = range(0, ids.size(1), stride)
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=len(starts) < 8):
        end = min(begin + max_length, ids.size(1))
        new = end - prev_end  # tokens this window scores for the first time
        window = ids[:, begin:end].to(device)
        labels = window.clone()
        labels[:, :-new] = -100
        scored = int((labels[:, 1:] != -100).sum())  # the first token of a window has nothing to predict it
        if scored:
            loss = model(input_ids=window, labels=labels).loss
            total_nll += float(loss) * scored
            counted += scored
        prev_end = end
        if end == ids.size(1):
            break
    return {"perplexity": math.exp(total_nll / max(counted, 1)), "tokens": counted, "max_length": max_length,
            "stride": stride}


def task_manager(tasks: list[str], include_path: str | None, names: tuple[str, str] = ("--tasks", "--include_path")):
    """lm-eval's TaskManager, after checking every task name (before any model loads); ``names`` are the
    settings' names as the user typed them, for the messages. Where every task is a plain task of
    ``include_path``, the manager indexes that folder only."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(f"{names[0]} needs lm-evaluation-harness: pip install 'hf-oto[eval]'") from None
    if include_path and not Path(include_path).is_dir():
        raise ConfigError(f"{names[1]} {include_path} is not a folder")
    if include_path:  # local tasks alone need no index of lm-eval's 14,000 built-in ones (16 s on 2 cores)
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_subtasks for t in tasks):  # groups and tags may name built-in tasks
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task {unknown[0]!r} (lm-eval --tasks list shows them; local YAML tasks "
                          f"need {names[1]})")
    return manager


def run_lm_eval(model, tokenizer, tasks: list[str], manager, *, limit: float | None, batch_size: int,
                num_fewshot: int | None) -> JSONObject:
    """lm-evaluation-harness on the loaded model; returns its results dictionary."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    limit = int(limit) if limit is not None and limit >= 1 else limit  # a count, or a fraction of each task
    return simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                           random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def _metrics(metrics: JSONObject) -> Iterator[tuple[str, str, float]]:
    """(metric, filter, value) of one task's lm-eval results: its keys are "metric,filter"; alias, sample_len
    and the stderr entries are not metrics."""
    for key, value in metrics.items():
        metric, _, filt = key.partition(",")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if filt and numeric and not metric.endswith("_stderr"):
            yield metric, filt, float(value)


def task_scores(results: JSONObject) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results (filters dropped from the names, no stderr)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        for metric, _, value in _metrics(metrics):
            out.setdefault(task, {})[metric] = value
    return out


def task_table(results: JSONObject) -> str:
    """The task results as a Markdown table (task, n-shot, metric, value, stderr). Printed by hf-oto itself:
    lm-eval's own table needs pytablewriter >= 1, which resolvers pair badly with python-dateutil 4."""
    rows = ["| task | n-shot | metric | value | stderr |", "|---|--:|---|--:|--:|"]
    for task, metrics in results["results"].items():
        shots = (results.get("n-shot") or {}).get(task, "")
        for metric, filt, value in _metrics(metrics):
            err = metrics.get(f"{metric}_stderr,{filt}")
            err_text = f"{err:.4f}" if isinstance(err, (int, float)) else "-"
            name = metric if filt == "none" else f"{metric} ({filt})"
            rows.append(f"| {task} | {shots} | {name} | {value:.4f} | {err_text} |")
    return "\n".join(rows)


def run_eval(folder: str, *, tasks: list[str], perplexity: str | None, stride: int | None, max_length: int | None,
             limit: float | None, batch_size: int, num_fewshot: int | None, include_path: str | None,
             out: str | None, trust_remote_code: bool = False) -> JSONObject:
    """``hf-oto eval``: every check first, then perplexity and tasks; prints tables, writes JSON to ``out``."""
    if not tasks and not perplexity:
        raise ConfigError("give --tasks T1,T2 (lm-eval) and/or --perplexity TEXT")
    if out and Path(out).is_dir():
        raise ConfigError(f"--out {out} is a folder; give a .json file name")
    text = perplexity_text(perplexity) if perplexity else None
    manager = task_manager(tasks, include_path) if tasks else None
    if stride is not None and stride < 1:
        raise ConfigError(f"--stride must be in 1..the window, got {stride}")
    model, tokenizer = load_for_eval(folder, trust_remote_code)
    report: JSONObject = {"model": str(folder)}
    if text is not None:
        report["perplexity"] = dict(strided_perplexity(model, tokenizer, text[0], max_length=max_length,
                                                       stride=stride), text=text[1])
        p = report["perplexity"]
        print(f"perplexity on {p['text']}: {p['perplexity']:.3f} ({p['tokens']:,} tokens, window {p['max_length']}, "
              f"stride {p['stride']})")
    if tasks:
        results = run_lm_eval(model, tokenizer, tasks, manager, limit=limit, batch_size=batch_size,
                              num_fewshot=num_fewshot)
        print(task_table(results))
        report["lm_eval"] = {"results": results["results"], "versions": results.get("versions"),
                             "n-shot": results.get("n-shot"), "limit": limit}
    if out:
        from hf_oto.io import write_text_atomic

        write_text_atomic(Path(out), json.dumps(report, indent=1, default=str))
        print(f"wrote {out}")
    return report
