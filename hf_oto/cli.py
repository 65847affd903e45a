"""Command line: ``hf-oto inspect``, ``prune``, ``oneshot``, ``eval``, ``push``, ``export-gguf``, ``export-size``,
``qfa-search`` and ``env``.

User errors print one line and exit with code 2; ``--debug`` (or ``HF_OTO_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hf_oto.errors import ConfigError, HFOTOError, first_line, only_a_path


def _load_meta_model(target: str):
    """Build the model described by a local repo folder or config.json on the meta device."""
    path = Path(target)  # a mistyped path is refused before torch and transformers load (seconds)
    if not path.exists():
        raise ConfigError(f"{target} does not exist (give a local model folder or a config.json)")
    if path.is_file() and path.name != "config.json":
        raise ConfigError(f"{target} is not a model folder or a config.json")
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from hf_oto.job.preflight import check_model_folder

    folder = path if path.is_dir() else path.parent
    check_model_folder(folder, weights=False)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"could not read the config in {folder}: {first_line(exc)}") from None
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            return AutoModel.from_config(config)


def demo_config_dir(out: Path) -> Path:
    """Write a small Llama (GQA) config to ``out`` so inspect can run on a fresh machine."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64,
    ).save_pretrained(out)
    return out


def _version() -> str:
    from hf_oto.env import installed_version

    return installed_version("hf-oto") or "unknown"


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.demo:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="hf-oto-demo-") as tmp:  # the config is read, then removed
            model = _load_meta_model(str(demo_config_dir(Path(tmp))))
    elif args.model:
        model = _load_meta_model(args.model)
    else:
        raise HFOTOError("give MODEL_DIR_OR_CONFIG, or --demo for a small built-in Llama config")
    from hf_oto.groups import discover_groups

    space = discover_groups(model)
    if args.pruning_granularity != "width":
        from hf_oto.groups.depth import with_granularity

        space = with_granularity(model, space, args.pruning_granularity, args.pruning_layout)
    if args.prune_experts:
        from hf_oto.groups.experts import with_experts

        space = with_experts(model, space)
    if args.json:
        print(space.to_json())
        return 0
    print(f"{space.model_type}: {space.num_layers} layers, {space.total_params:,} parameters, "
          f"{space.prunable_params:,} in prunable groups, {len(space):,} groups")
    print(f"{'layer':>5}  {'module':<40} {'kind':<15} {'groups':>7} {'params/group':>13}  prunable")
    for row in _collapse_experts(space.summary()):
        ok = "yes" if row["prunable"] else f"no: {row['reason']}"
        print(f"{row['layer']:>5}  {row['module']:<40} {row['kind']:<15} {row['groups']:>7} "
              f"{row['params_per_group']:>13,}  {ok}")
    return 0


def _collapse_experts(rows: list[dict]) -> list[dict]:
    """One row for a layer's experts that agree on everything but their index ("experts.* (256 experts)"),
    so a 256-expert model's table has a few rows per layer; ``--json`` keeps every set."""
    out: list[dict] = []
    count: list[int] = []
    for row in rows:
        base, _, index = row["module"].rpartition(".")
        same = (row["kind"] == "expert_channel" and index.isdigit() and out and out[-1]["kind"] == "expert_channel"
                and out[-1]["module"].startswith(base + ".") and out[-1]["layer"] == row["layer"]
                and all(out[-1][k] == row[k] for k in ("groups", "params_per_group", "prunable")))
        if same:
            count[-1] += 1
            out[-1] = dict(out[-1], module=f"{base}.* ({count[-1]} experts)")
        else:
            out.append(row)
            count.append(1)
    return out


def cmd_prune(args: argparse.Namespace) -> int:
    if "--recipe" in args.overrides:  # hf-oto prune --recipe EXPORT/hf_oto_recipe.yaml [--key value ...]
        at = args.overrides.index("--recipe")
        value = args.overrides[at + 1] if at + 1 < len(args.overrides) else None
        if value is not None and not value.startswith("--"):  # --recipe FILE after other settings
            if args.config is not None:
                raise ConfigError("--recipe takes the place of the YAML config: give one of them")
            args.config, args.overrides = value, args.overrides[:at] + args.overrides[at + 2:]
        elif args.config is not None:  # argparse took FILE as the config position already
            args.overrides = args.overrides[:at] + args.overrides[at + 1:]
        else:
            raise ConfigError("--recipe needs a file: hf-oto prune --recipe EXPORT/hf_oto_recipe.yaml")
    if args.config is None and not args.overrides:
        raise ConfigError("give a YAML config: hf-oto prune CONFIG.yaml [--key value ...] (--help lists the keys)")
    if args.config in (None, "-h", "--help") or any(o in ("-h", "--help") for o in args.overrides):
        from hf_oto.job.args import help_text

        print(PRUNE_USAGE + help_text())
        return 0
    from hf_oto.job.prune_job import run

    run(args.config, args.overrides)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hf_oto.job.evaluate_job import run_eval

    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    run_eval(args.model, tasks=tasks, perplexity=args.perplexity, stride=args.stride, max_length=args.max_length,
             limit=args.limit, batch_size=args.batch_size, num_fewshot=args.num_fewshot,
             include_path=args.include_path, out=args.out, trust_remote_code=args.trust_remote_code)
    return 0


def cmd_oneshot(args: argparse.Namespace) -> int:
    from hf_oto.job.args import apply_overrides, field_types, read_yaml
    from hf_oto.job.oneshot_job import ONESHOT_KEYS, oneshot_settings, run_oneshot
    from hf_oto.job.recipe import recipe_settings
    from hf_oto.optim.oneshot import ONESHOT_CRITERIA

    types_ = {k: tp for k, (_, tp) in field_types().items()}
    types_.update(criterion=str, calibration_batches=int)
    overrides = apply_overrides({}, list(args.overrides or []), types_)
    if args.recipe:
        settings = recipe_settings(read_yaml(args.recipe), args.recipe, job="oneshot")
        if args.out:
            settings["pruned_output_dir"] = args.out
        settings.update(overrides)
    else:
        if not args.model or args.target_sparsity is None:
            raise ConfigError("give a model and a target: hf-oto oneshot MODEL --target_sparsity 0.3 --out DIR "
                              f"[--criterion {'|'.join(ONESHOT_CRITERIA)}] [--calibration FILE|DATASET|python-stdlib]")
        settings = oneshot_settings(args.model, args.criterion, args.target_sparsity,
                                    args.calibration or "python-stdlib", args.out, overrides)
    if args.overwrite:
        settings["overwrite_pruned_output_dir"] = True
    unknown = [k for k in settings if k not in types_ and k not in ONESHOT_KEYS]
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}; hf-oto prune --help lists them")
    run_oneshot(settings, args.recipe or "the command line")
    return 0


PRUNE_USAGE = """usage: hf-oto prune CONFIG.yaml [--key value ...]
       hf-oto prune --recipe EXPORT/hf_oto_recipe.yaml [--key value ...]   (rerun an export's recipe)

Fine-tune and prune from a YAML file of settings; any setting can also be given (or overridden) as
--key value or --key=value, where the value is read as YAML (numbers, true/false, [lists], null);
a boolean also as --flag (true) or --no_flag (false), a list also as --key v1 v2 ... The settings:
"""


def cmd_push(args: argparse.Namespace) -> int:
    from hf_oto.hub import push_pruned

    url = push_pruned(args.folder, args.repo_id, private=args.private)
    print(f"uploaded {args.folder} to {args.repo_id}: {url}")
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from hf_oto.export.gguf import export_gguf

    out = export_gguf(args.folder, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); run it with llama.cpp, e.g. llama-cli -m {out}")
    return 0


def cmd_export_size(args: argparse.Namespace) -> int:
    from hf_oto.export.sizes import check_size, export_size, export_sizes, read_run
    from hf_oto.io import check_target
    from hf_oto.manifest import MANIFEST_FILE

    if (args.size is None) == (args.sizes is None):
        raise ConfigError("give --size S (one size into --out) or --sizes S1,S2,... (each into --out/size-S)")
    sizes = [args.size] if args.size is not None else _sizes_arg(args.sizes)
    data = read_run(args.run_dir)  # bad input is refused before the model loads
    for s in sizes:
        check_size(data, s, args.run_dir)
    out = Path(args.out)
    targets = [out] if args.size is not None else [out / f"size-{s:g}" for s in sizes]
    for t in targets:
        check_target(t, overwrite=args.overwrite, marker=MANIFEST_FILE, hint="pass --overwrite",
                     error=ConfigError)
    written = [export_size(args.run_dir, args.size, out, overwrite=args.overwrite)] if args.size is not None \
        else export_sizes(args.run_dir, sizes, out, overwrite=args.overwrite)
    for s, folder in zip(sizes, written, strict=True):
        print(f"size {s:g}: wrote {folder}")
    return 0


# what a QFA run passes on to its exports
PROVENANCE = ("source", "base_model", "license", "datasets", "gguf", "replay_fraction")


def cmd_qfa_search(args: argparse.Namespace) -> int:
    from hf_oto.quant.search import check_holdout, parse_budget

    average_bits, max_bytes = parse_budget(args.budget)  # a bad budget or holdout is refused before anything loads
    check_holdout(args.holdout, "--holdout")
    sizes = _sizes_arg(args.sizes)
    if args.out:
        from hf_oto.export.quantized import QFA_MANIFEST
        from hf_oto.io import check_target

        check_target(Path(args.out), overwrite=args.overwrite, marker=QFA_MANIFEST)
    from hf_oto.quant.run import RUN_FILE, load_qfa_run

    info_path = Path(args.run_dir) / RUN_FILE
    if info_path.is_file() and sizes:  # sizes are checked before the model loads
        import json

        from hf_oto.quant.joint import check_size

        info = json.loads(info_path.read_text())
        if not info.get("elastic"):
            raise ConfigError(f"--sizes needs an elastic QFA run (qfa with elastic_sizes); {args.run_dir} has none")
        sizes = [check_size(info, s) for s in sizes]
    run = load_qfa_run(args.run_dir)
    if run.eval_blocks is None:
        raise ConfigError(f"{args.run_dir} holds no evaluation blocks (eval_blocks.safetensors) to search on")
    if run.info.get("elastic"):
        return _joint_search(run, args, average_bits, max_bytes, sizes)
    from hf_oto.export.quantized import save_quantized
    from hf_oto.quant.search import qfa_search

    model, info = run.model, run.info
    space = None
    if info.get("pruned"):
        from hf_oto.groups import discover_groups
        from hf_oto.quant.run import base_model_for_space

        space = discover_groups(base_model_for_space(info))
    result = qfa_search(model, run.eval_blocks, average_bits=average_bits, max_bytes=max_bytes, samples=args.samples,
                        refine=args.refine, seed=args.seed, min_gain_se=args.min_gain_se, holdout=args.holdout)
    print(result.table())
    print(f"chosen bits per layer: {list(result.best.bits)} ({result.evaluated} configurations evaluated)")
    if args.out:
        out = save_quantized(model, result.best.bits, args.out, space=space, tokenizer=run.tokenizer,
                             overwrite=args.overwrite,
                             extra_manifest={"search": {"budget": args.budget, "eval_loss": result.best.loss,
                                                        "evaluated": result.evaluated},
                                             **{k: info[k] for k in PROVENANCE if info.get(k)}})
        print(f"wrote {out}: load it with AutoModelForCausalLM.from_pretrained (compressed-tensors installed)")
    return 0


def _sizes_arg(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--sizes takes comma-separated numbers, got {text!r}") from None


def _joint_search(run, args: argparse.Namespace, average_bits: float | None, max_bytes: int | None,
                  sizes: list[float] | None) -> int:
    """qfa-search on an elastic QFA run: sizes and per-layer bits together; the winner is exported."""
    from hf_oto.export.quantized import save_quantized
    from hf_oto.quant.joint import joint_search, run_spaces, zero_size

    result = joint_search(run, run.eval_blocks, average_bits=average_bits, max_bytes=max_bytes, sizes=sizes,
                          samples=args.samples, refine=args.refine, seed=args.seed, min_gain_se=args.min_gain_se,
                          holdout=args.holdout)
    print(result.table())
    print(f"chosen: size {result.size:g}, bits per layer {list(result.best.bits)} "
          f"({result.evaluated} configurations evaluated)")
    if args.out:
        space, gates = run_spaces(run)
        zero_size(run.model, run.info, gates, result.size)
        record = dict(run.info["elastic"]["record"], size=result.size)
        sentence = (f"It is the size-{result.size:g} sub-network of an elastic run ({100 * result.size:g}% of the "
                    "prunable parameters kept), chosen together with its bit-widths; its removed heads and FFN "
                    "channels are sliced out.") if result.size < 1.0 else None
        extra = {"search": {"budget": args.budget, "eval_loss": result.best.loss, "evaluated": result.evaluated,
                            "size": result.size},
                 "elastic": record, **({"pruning": sentence} if sentence else {}),
                 **{k: run.info[k] for k in PROVENANCE if run.info.get(k)}}
        out = save_quantized(run.model, result.best.bits, args.out, space=space, tokenizer=run.tokenizer,
                             overwrite=args.overwrite, extra_manifest=extra)
        print(f"wrote {out}: load it with AutoModelForCausalLM.from_pretrained (compressed-tensors installed)")
    return 0


# the commands' arguments that name a local file or folder: (argument, what it is, whether it may also be a Hub
# id or PACKAGE/FILE.gguf, as oneshot's MODEL may: then only a name that can only be a path is checked early)
LOCAL_PATHS = {"eval": (("model", "model folder", False),), "export-gguf": (("folder", "export folder", False),),
               "export-size": (("run_dir", "elastic run folder", False),),
               "qfa-search": (("run_dir", "QFA run folder", False),), "prune": (("config", "config file", False),),
               "oneshot": (("recipe", "recipe file", False), ("model", "model folder", True))}


def _check_local_paths(args: argparse.Namespace) -> None:
    """A mistyped path is refused at once, before a command imports torch and transformers (8-18 s)."""
    for attr, what, may_be_hub in LOCAL_PATHS.get(args.command, ()):
        value = getattr(args, attr, None)
        if not value or value.startswith("-") or (may_be_hub and not only_a_path(value)):
            continue
        if not Path(value).expanduser().exists():
            raise ConfigError(f"{what} {value} not found")


def cmd_env(args: argparse.Namespace) -> int:
    from hf_oto.env import report

    print(report())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-oto", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors (or HF_OTO_DEBUG=1)")
    parser.add_argument("--version", action="version", version=f"hf-oto {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print the prunable groups of a model (no weights are loaded)")
    p.add_argument("model", nargs="?", help="local model folder or config.json")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--demo", action="store_true", help="inspect a small built-in Llama config")
    p.add_argument("--prune_experts", action="store_true",
                   help="MoE models: add whole routed experts (what prune_experts makes prunable)")
    p.add_argument("--pruning_granularity", choices=("width", "depth", "both"), default="width",
                   help="depth/both: add whole layers (and, with a per-layer --pruning_layout, whole attention and "
                        "MLP blocks); shapes only: the probes that need weights run when a model is pruned")
    p.add_argument("--pruning_layout", choices=("uniform", "per_layer_ffn", "global"), default="uniform")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("prune", help="fine-tune and prune from a YAML config, export, verify the export",
                       add_help=False, usage="hf-oto prune CONFIG.yaml [--key value ...] (--help lists the keys)")
    p.add_argument("config", nargs="?", help="YAML file (see configs/quickstart.yaml)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs that override the YAML")
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("oneshot", help="prune in one shot on calibration text (magnitude, taylor, wanda_sp), "
                                       "no training; export, card, recipe and check as prune")
    p.add_argument("model", nargs="?", help="model folder, Hub id or .gguf file (or PACKAGE/FILE.gguf)")
    p.add_argument("--criterion", default="wanda_sp", help="magnitude, taylor or wanda_sp (default)")
    p.add_argument("--target_sparsity", type=float, help="share of the prunable parameters to remove")
    p.add_argument("--calibration", help="text file, Hub dataset id or python-stdlib (default: python-stdlib)")
    p.add_argument("--out", help="folder for the pruned model")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier hf-oto export at --out")
    p.add_argument("--recipe", help="rerun an export's hf_oto_recipe.yaml (written by hf-oto oneshot)")
    # any other setting of hf-oto prune as --key value (block_size, pruning_layout, ffn_multiple,
    # calibration_batches, per_device_train_batch_size, seed, ...): parse_known_args passes them on
    p.set_defaults(func=cmd_oneshot, overrides=[])
    p = sub.add_parser("eval", help="lm-evaluation-harness tasks and strided perplexity of a model folder")
    p.add_argument("model", help="model folder (an hf-oto export or any causal LM folder)")
    p.add_argument("--tasks", help="lm-eval tasks, comma-separated (e.g. arc_easy,hellaswag,piqa,winogrande,boolq)")
    p.add_argument("--perplexity", help="text file, python-stdlib, or Hub dataset NAME:CONFIG:SPLIT "
                                        "(e.g. wikitext:wikitext-2-raw-v1:test)")
    p.add_argument("--stride", type=int, help="perplexity window stride (default: 512 or the window if smaller)")
    p.add_argument("--max_length", type=int, help="perplexity window (default: the model's max positions)")
    p.add_argument("--limit", type=float, help="lm-eval: examples per task (or a fraction)")
    p.add_argument("--batch_size", type=int, default=1, help="lm-eval batch size")
    p.add_argument("--num_fewshot", type=int, help="lm-eval few-shot examples (default: each task's)")
    p.add_argument("--include_path", help="folder of local lm-eval task YAML files")
    p.add_argument("--trust_remote_code", action="store_true", help="run model code shipped in a non-hf-oto folder")
    p.add_argument("--out", help="write the results as JSON here")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("push", help="upload an exported folder to the Hugging Face Hub")
    p.add_argument("folder", help="folder written by save_pruned / hf-oto prune")
    p.add_argument("repo_id", help="namespace/name on the Hub")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.set_defaults(func=cmd_push)
    p = sub.add_parser("export-gguf", help="write an export of a Llama-family model as a GGUF file for llama.cpp")
    p.add_argument("folder", help="folder written by save_pruned / hf-oto prune")
    p.add_argument("--out", help="the .gguf file to write (default: <folder>-<dtype>.gguf beside the folder)")
    p.add_argument("--dtype", choices=("f32", "f16", "bf16", "q8_0"), default="f32",
                   help="matrix precision (norms stay f32; bf16 and q8_0 through the gguf package's quantizers)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_export_gguf)
    p = sub.add_parser("export-size", help="cut trained sizes out of an elastic run (elastic_sizes) as hf-oto exports")
    p.add_argument("run_dir", help="folder saved by an elastic run (hf-oto prune with elastic_sizes)")
    p.add_argument("--size", type=float, help="one trained size (kept fraction of the prunable parameters)")
    p.add_argument("--sizes", help="several trained sizes, comma-separated: each goes to --out/size-S")
    p.add_argument("--out", required=True, help="folder for the export (with --sizes: the parent folder)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier hf-oto exports at the targets")
    p.set_defaults(func=cmd_export_size)
    p = sub.add_parser("qfa-search", help="pick per-layer bit-widths of a QFA run for a budget, and export them")
    p.add_argument("run_dir", help="folder saved by a QFA run (<output_dir>/qfa_run)")
    p.add_argument("--budget", required=True, help="average bits (e.g. 2.5) or a size of the weights (e.g. 300MB); "
                                                   "on an elastic run, bits mean the full model's bytes at that width")
    p.add_argument("--out", help="export the chosen configuration to this folder (compressed-tensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier hf-oto quantized export at --out")
    p.add_argument("--samples", type=int, default=8,
                   help="random allocations of the budget's memory, measured beside the guided candidates")
    p.add_argument("--refine", type=int, default=16, help="steps of the measured local search")
    p.add_argument("--seed", type=int, default=0, help="seed of the search's draws")
    p.add_argument("--min_gain_se", type=float, default=2.0,
                   help="a mix replaces the best uniform configuration within the budget only when it beats it by "
                        "more than this many paired standard errors on the run's evaluation blocks (0: any gain)")
    p.add_argument("--holdout", type=float, default=None,
                   help="share of the evaluation blocks kept out of the search, on which --min_gain_se is then "
                        "tested (default: 0.5 on runs with 64 or more blocks, as QFA runs save, else 0; 0: the test "
                        "runs on the blocks the mix was chosen on, which favours the mix)")
    p.add_argument("--sizes", help="elastic QFA runs: only these trained sizes, comma-separated (default: every "
                                   "size and the full model, searched together with the bits)")
    p.set_defaults(func=cmd_qfa_search)
    p = sub.add_parser("env", help="print the versions that matter (for bug reports) and how they meet the lock")
    p.set_defaults(func=cmd_env)
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command in ("prune", "oneshot"):  # e.g. `hf-oto prune --help`: the job's own settings
        args.overrides = unknown + list(args.overrides or [])
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    debug = args.debug or os.environ.get("HF_OTO_DEBUG", "") not in ("", "0")
    try:
        _check_local_paths(args)
        return args.func(args)
    except HFOTOError as exc:
        if debug:
            raise
        print(f"hf-oto: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-oto: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
