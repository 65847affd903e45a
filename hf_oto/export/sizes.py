"""Elastic runs on disk, and the sizes cut out of them (``hf-oto export-size``).

An elastic run folder holds the full trained model (safetensors, loadable as it is), its tokenizer and
``elastic_run.json``: every trained size's removed groups by their stable names, the pruning-space
settings that name them, and the settings that ran. :func:`export_size` reloads the model, zeroes one
size's groups (exactly its masked view, by zero-invariance), slices them out and writes a normal hf-oto
export: config, weights, manifest with an ``elastic`` record, card and plot.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hf_oto.errors import ConfigError, ExportError
from hf_oto.io import JSONObject, check_no_pickles, check_target, discard, publish, staging_dir, write_text_atomic
from hf_oto.manifest import MANIFEST_FILE, ElasticRecord

if TYPE_CHECKING:
    from hf_oto.groups.space import PruningSpace
    from hf_oto.optim.elastic import Elastic
    from hf_oto.trainer.args import HFOTOTrainingArguments

RUN_FILE = "elastic_run.json"
RUN_VERSION = 1


def sizes_record(space: PruningSpace, elastic: Elastic, *, steps: int, args: HFOTOTrainingArguments,
                 extra: dict[str, Any] | None = None, evals: dict[float, dict[str, float]] | None = None) -> JSONObject:
    """What an elastic run records (``elastic_run.json``, or the ``elastic`` entry of a QFA run): each size's
    removed groups by name, the pruning-space settings that name them, the settings that ran, the manifest
    fields of every size's export (``extra``) and each size's metrics (``evals``)."""
    from hf_oto.optim.budget import Plan

    sizes = {}
    for size, row in zip(elastic.elastic.sizes, elastic.removed_flags, strict=True):
        plan = Plan.from_mask(space, row)
        sizes[f"{size:g}"] = {"removed": [space[i].name for i in torch.nonzero(row).flatten().tolist()],
                              "pruned_params": plan.pruned_params(),
                              "eval": dict((evals or {}).get(size, {}))}
    record = elastic.record()
    e = elastic.elastic
    return {
        "version": RUN_VERSION,
        "sizes": sizes,
        "space": {"granularity": args.pruning_granularity, "exclude": args.pruning_exclude,
                  "layout": record["layout"], "groups": len(space)},
        "record": ElasticRecord(size=1.0, sizes=e.sizes, criterion=record["criterion"], selection=record["selection"],
                                layout=record["layout"], ffn_multiple=record["ffn_multiple"], start=e.start,
                                freeze=e.last_ranking, refresh_every=e.refresh_every, samples=e.samples, steps=steps,
                                granularity=args.pruning_granularity).to_dict(),
        "export_format": args.export_format,
        "manifest": {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in (extra or {}).items()},
    }


def save_elastic_run(model: nn.Module, space: PruningSpace, elastic: Elastic, out_dir: str | os.PathLike, *,
                     tokenizer: Any = None, overwrite: bool = False, steps: int,
                     args: HFOTOTrainingArguments, extra: dict[str, Any] | None = None,
                     evals: dict[float, dict[str, float]] | None = None) -> Path:
    """Write the full model, the tokenizer and ``elastic_run.json`` to ``out_dir`` (atomically; it replaces
    only an earlier elastic run). ``space`` must be ``model``'s, in the order the run planned on. ``extra``:
    manifest fields for every size's export (``source`` and ``license`` included); ``evals``: per size, the
    metrics its export's manifest records."""
    out = Path(out_dir)
    check_target(out, overwrite=overwrite, marker=RUN_FILE)
    data = sizes_record(space, elastic, steps=steps, args=args, extra=extra, evals=evals)
    tmp = staging_dir(out)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_text_atomic(tmp / RUN_FILE, json.dumps(data, indent=1))
        check_no_pickles(tmp)
        return publish(tmp, out)
    finally:
        discard(tmp)


def read_run(run_dir: str | os.PathLike) -> JSONObject:
    """``elastic_run.json`` of a run folder (one clear error when it is not one)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not an elastic run (no {RUN_FILE}); train with elastic_sizes and save it "
                          "with save_elastic_run (hf-oto prune does)")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path} is corrupt: {exc}") from None
    if int(data.get("version", 0)) > RUN_VERSION:
        raise ConfigError(f"{path} was written by a newer hf-oto (version {data['version']}); upgrade hf-oto")
    return data


def check_size(data: JSONObject, size: float, run_dir: str | os.PathLike) -> str:
    """The key of ``size`` in the run (refused, with the sizes it has, when it was not trained)."""
    key = f"{float(size):g}"
    if key not in data["sizes"]:
        raise ConfigError(f"size {size} was not trained in {run_dir}; its sizes are "
                          f"{', '.join(sorted(data['sizes'], key=float))}")
    return key


def size_space(model: nn.Module, data: JSONObject) -> PruningSpace:
    """The run's pruning space, rebuilt on ``model`` from the settings the run recorded."""
    from hf_oto.groups import discover_groups
    from hf_oto.groups.depth import with_granularity
    from hf_oto.groups.exclude import exclude_groups

    s = data["space"]
    space = with_granularity(model, discover_groups(model), s["granularity"], s["layout"])
    space = exclude_groups(space, s["exclude"], s["layout"])
    if len(space) != s["groups"]:
        raise ExportError(f"the run's model gives {len(space)} groups, the run planned on {s['groups']}")
    return space


def load_run_model(run_dir: str | os.PathLike) -> nn.Module:
    """The run's full model, as trained (float32 or the dtype it was saved in)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir, dtype="auto")


def removed_flags(space: PruningSpace, data: JSONObject, key: str) -> torch.Tensor:
    """The removed-group flags of size ``key`` in ``space``."""
    flags = torch.zeros(len(space), dtype=torch.bool)
    for name in data["sizes"][key]["removed"]:
        flags[space.index_of(name)] = True
    return flags


def export_size(run_dir: str | os.PathLike, size: float, out_dir: str | os.PathLike, *, overwrite: bool = False,
                model: nn.Module | None = None) -> Path:
    """Cut the sub-network of ``size`` out of an elastic run and write it as a standard hf-oto export.

    ``model``: the run's model already loaded (it is not modified; a copy is zeroed and sliced).
    """
    import copy

    from hf_oto.export.save import save_pruned
    from hf_oto.groups.space import zero_groups
    from hf_oto.subnet import construct_subnet

    data = read_run(run_dir)
    key = check_size(data, size, run_dir)
    check_target(Path(out_dir), overwrite=overwrite, marker=MANIFEST_FILE)
    model = copy.deepcopy(model) if model is not None else load_run_model(run_dir)
    space = size_space(model, data)
    zero_groups(model, space, data["sizes"][key]["removed"])
    subnet = construct_subnet(model, space, layout=data["space"]["layout"])
    record = ElasticRecord.from_dict(dict(data["record"], size=float(key)))
    tokenizer = _tokenizer(run_dir)
    manifest = dict(data.get("manifest") or {})
    source, license = manifest.pop("source", None), manifest.pop("license", None)
    manifest.update(elastic=record, eval=data["sizes"][key].get("eval") or {})
    return save_pruned(subnet, out_dir, tokenizer, source=source, overwrite=overwrite, license=license,
                       extra_manifest=manifest, export_format=data.get("export_format", "auto"))


def _tokenizer(run_dir: str | os.PathLike) -> Any:
    if not any((Path(run_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run_dir)


def export_sizes(run_dir: str | os.PathLike, sizes: list[float], out_dir: str | os.PathLike, *,
                 overwrite: bool = False) -> list[Path]:
    """Several sizes at once, each into ``out_dir/size-<size>`` (the model is loaded once)."""
    data = read_run(run_dir)
    for s in sizes:
        check_size(data, s, run_dir)
    model = load_run_model(run_dir)
    return [export_size(run_dir, s, Path(out_dir) / f"size-{s:g}", overwrite=overwrite, model=model) for s in sizes]
