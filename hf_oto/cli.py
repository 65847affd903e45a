"""Command line: ``hf-oto inspect``, ``hf-oto prune`` and ``hf-oto push``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hf_oto.errors import HFOTOError


def _load_meta_model(target: str):
    """Build the model described by a local repo folder or config.json on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path = Path(target)
    if not path.exists():
        raise HFOTOError(f"{target} does not exist (give a local model folder or a config.json)")
    config = AutoConfig.from_pretrained(path if path.is_dir() else path.parent if path.name == "config.json"
                                        else path)
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


def cmd_inspect(args: argparse.Namespace) -> int:
    from hf_oto.groups import discover_groups

    if args.demo:
        import tempfile

        target = str(demo_config_dir(Path(tempfile.mkdtemp(prefix="hf-oto-demo-"))))
    elif args.model:
        target = args.model
    else:
        raise HFOTOError("give MODEL_DIR_OR_CONFIG, or --demo for a small built-in Llama config")
    model = _load_meta_model(target)
    space = discover_groups(model)
    if args.json:
        print(space.to_json())
        return 0
    print(f"{space.model_type}: {space.num_layers} layers, {space.total_params:,} parameters, "
          f"{space.prunable_params:,} in prunable groups, {len(space):,} groups")
    print(f"{'layer':>5}  {'module':<40} {'kind':<15} {'groups':>7} {'params/group':>13}  prunable")
    for row in space.summary():
        ok = "yes" if row["prunable"] else f"no: {row['reason']}"
        print(f"{row['layer']:>5}  {row['module']:<40} {row['kind']:<15} {row['groups']:>7} "
              f"{row['params_per_group']:>13,}  {ok}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from hf_oto.main_job import run

    run(args.config, args.overrides)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from hf_oto.hub import push_pruned

    url = push_pruned(args.folder, args.repo_id, private=args.private)
    print(f"uploaded {args.folder} to {args.repo_id}: {url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-oto", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print the prunable groups of a model (no weights are loaded)")
    p.add_argument("model", nargs="?", help="local model folder or config.json")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--demo", action="store_true", help="inspect a small built-in Llama config")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("prune", help="fine-tune and prune from a YAML config, export, verify the export")
    p.add_argument("config", help="YAML file (see configs/quickstart.yaml)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs that override the YAML")
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("push", help="upload an exported folder to the Hugging Face Hub")
    p.add_argument("folder", help="folder written by save_pruned / hf-oto prune")
    p.add_argument("repo_id", help="namespace/name on the Hub")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.set_defaults(func=cmd_push)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HFOTOError as exc:
        print(f"hf-oto: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
