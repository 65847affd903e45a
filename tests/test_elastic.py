"""Elastic (once-for-all) sizes: masked views equal zeroed groups, nested keep-sets, exports equal to the
trained sub-networks (reloaded without hf_oto), exact resume, and bad settings refused up front."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from jobs import QUICKSTART, SMALL, refused
from test_trainer import Tokens, _args
from tiny import ARCHS, ENCODERS, logits, reload_logits, tiny_model

from hf_oto import discover_groups
from hf_oto.errors import ConfigError
from hf_oto.groups.depth import with_granularity
from hf_oto.groups.mask import MaskedView
from hf_oto.groups.space import zero_groups
from hf_oto.optim import HESSOConfig
from hf_oto.optim.budget import Plan
from hf_oto.optim.elastic import ElasticConfig, nested_removals, size_targets
from hf_oto.trainer import HFOTOTrainer

IDS = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def _half_of_each_set(space) -> torch.Tensor:
    """Flags removing about half the groups of every prunable set (at least one kept), by a fixed draw."""
    gen = torch.Generator().manual_seed(3)
    flags = torch.zeros(len(space), dtype=torch.bool)
    for k, gs in enumerate(space.sets):
        if gs.prunable and gs.count > 1:
            gone = torch.randperm(gs.count, generator=gen)[: gs.count // 2]
            flags[space.set_offset(k) + gone] = True
    return flags


def _zeroed(model, space, flags):
    twin = copy.deepcopy(model)
    zero_groups(twin, space, [space[i].name for i in torch.nonzero(flags).flatten().tolist()])
    return twin


MASKABLE = [a for a in ARCHS if a not in ENCODERS]


@pytest.mark.parametrize("arch", MASKABLE)
def test_masked_view_computes_what_the_zeroed_model_computes(arch):
    model = tiny_model(arch)
    space = discover_groups(model)
    if any(gs.prunable and gs.kind in ("expert", "expert_channel") for gs in space.sets):
        with pytest.raises(ConfigError, match="elastic sizes mask"):
            MaskedView(model, space)
        return
    flags = _half_of_each_set(space)
    assert flags.any()
    view = MaskedView(model, space)
    with view.removed(flags):
        masked = logits(model, IDS)
    assert (masked - logits(_zeroed(model, space, flags), IDS)).abs().max() <= 1e-5
    assert not torch.equal(masked, logits(model, IDS))  # the masks were in effect, and are gone after the block


def test_masked_view_of_removed_layers_and_lora_adapters():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama", num_hidden_layers=4)
    space = with_granularity(model, discover_groups(model), "both")
    flags = _half_of_each_set(space)
    flags[space.set_offset(space.layer_sets()[2])] = True  # layer 2 removed whole
    with MaskedView(model, space).removed(flags):
        masked = logits(model, IDS)
    assert (masked - logits(_zeroed(model, space, flags), IDS)).abs().max() <= 1e-5

    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["o_proj", "down_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # adapters that change the output
    space = discover_groups(lora)
    flags = _half_of_each_set(space)
    with MaskedView(lora, space).removed(flags):
        masked = logits(lora, IDS)
    assert (masked - logits(_zeroed(lora, space, flags), IDS)).abs().max() <= 1e-5


def test_sizes_are_nested_and_meet_their_targets():
    model = tiny_model("llama", intermediate_size=256, num_hidden_layers=3)
    space = discover_groups(model)
    config = HESSOConfig(layout="global", criterion="fisher", selection="per_param", pricing="saliency")
    sizes = (0.8, 0.6, 0.4)
    targets = size_targets(space, sizes, config)
    score = torch.rand(len(space), generator=torch.Generator().manual_seed(0))
    rows = nested_removals(space, score, targets, config)
    for i, target in enumerate(targets):
        pruned = Plan.from_mask(space, rows[i]).pruned_params()
        assert abs(pruned - target) <= 0.05 * target
        if i:
            assert bool((rows[i - 1] <= rows[i]).all())  # each smaller size removes what the larger one does
    with pytest.raises(ConfigError, match="elastic size 0.001"):
        size_targets(space, (0.5, 0.001), config)


@pytest.mark.parametrize("sizes, match", [([0.5, 1.5], r"\(0, 1\]"), ([0.0], r"\(0, 1\]"), ([1.0], "below 1")])
def test_bad_sizes_are_refused(sizes, match):
    with pytest.raises(ConfigError, match=match):
        ElasticConfig(sizes=tuple(sizes))


def test_measured_pricing_tries_removals_on_masked_views(tmp_path):
    model = tiny_model("llama", intermediate_size=64)
    trainer = HFOTOTrainer(model=model, args=_elastic_args(tmp_path, pruning_pricing="measured"),
                           train_dataset=Tokens())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    e = trainer.elastic
    assert [p["step"] for p in e.prices] == [3, 5]
    kinds = {t["kind"]: t for t in e.prices[0]["kinds"]}
    assert "ffn_channel" in kinds and all(t["measured"] != 0 for t in kinds.values())  # the masks changed the loss
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained, unmasked


def _elastic_args(tmp_path, **kw):
    return _args(tmp_path, **dict(dict(elastic_sizes=[0.4, 0.7], elastic_start=0.25, elastic_refresh=2,
                                       elastic_freeze=0.5), **kw))


def test_elastic_run_exports_every_size_equal_to_its_trained_sub_network(tmp_path):
    from hf_oto.export.sizes import export_size
    from hf_oto.manifest import Manifest

    model = tiny_model("llama", intermediate_size=64)
    trainer = HFOTOTrainer(model=model, args=_elastic_args(tmp_path), train_dataset=Tokens())
    trainer.train()
    e = trainer.elastic
    assert e.rankings == 2  # at step 3 and, re-ranked, at step 5; frozen from step 6 (elastic_freeze 0.5)
    assert e.config.pricing == "saliency" and not e.prices  # "auto" for elastic sizes
    logged = [h for h in trainer.state.log_history if "elastic/kl_size_0.4" in h]
    assert logged and logged[-1]["elastic/size_0.4_pruned_fraction"] > logged[-1]["elastic/size_0.7_pruned_fraction"]
    run = trainer.save_elastic_run(str(tmp_path / "elastic"))
    model.eval()
    dirs, masked = {}, {}
    for size in (0.4, 0.7):
        out = export_size(run, size, tmp_path / f"size-{size}")
        dirs[str(size)] = {"dir": str(out)}
        with e.subnetwork(size):
            masked[str(size)] = logits(model, IDS)
        m = Manifest.read(out)
        assert m.elastic.size == size and m.elastic.sizes == (0.7, 0.4) and m.params_after < m.params_before
    reloaded = reload_logits(dirs, IDS, tmp_path)  # a fresh interpreter without hf_oto
    for key, value in masked.items():
        assert (reloaded[key] - value).abs().max() <= 1e-5, key
    assert not torch.equal(masked["0.4"], masked["0.7"])
    with pytest.raises(ConfigError, match="export-size"):
        trainer.save_pruned_model(str(tmp_path / "pruned"))


def test_elastic_resume_is_bit_exact(tmp_path):
    full = tiny_model("llama")
    whole = HFOTOTrainer(model=full, args=_elastic_args(tmp_path / "a"), train_dataset=Tokens())
    whole.train()
    first = tiny_model("llama")
    HFOTOTrainer(model=first, args=_elastic_args(tmp_path / "b", save_strategy="steps", save_steps=4),
                 train_dataset=Tokens()).train()
    resumed = tiny_model("llama")
    again = HFOTOTrainer(model=resumed, args=_elastic_args(tmp_path / "c"), train_dataset=Tokens())
    again.train(resume_from_checkpoint=str(tmp_path / "b" / "run" / "checkpoint-4"))
    assert torch.equal(whole.elastic.removed_flags, again.elastic.removed_flags)
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    changed = HFOTOTrainer(model=tiny_model("llama"), args=_elastic_args(tmp_path / "d", elastic_sizes=[0.5]),
                           train_dataset=Tokens())
    with pytest.raises(ValueError, match="changed elastic settings"):
        changed.train(resume_from_checkpoint=str(tmp_path / "b" / "run" / "checkpoint-4"))


@pytest.mark.parametrize("target", ["full", "teacher"])
def test_sub_networks_distil_from_the_full_model_or_the_teacher_and_mix_in_the_labels(tmp_path, monkeypatch, target):
    import hf_oto.trainer.distill as distill
    import hf_oto.trainer.elastic as elastic

    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    lm_calls: list[torch.Tensor] = []

    def record(where, fn):
        def wrapped(student, teacher, *a):
            calls.append((where, student, teacher))
            return fn(student, teacher, *a)
        return wrapped

    monkeypatch.setattr(distill, "kl_sum", record("distill", distill.kl_sum))
    monkeypatch.setattr(elastic, "kl_sum", record("size", elastic.kl_sum))
    monkeypatch.setattr(elastic, "lm_sum", lambda logits, *a: lm_calls.append(logits) or distill.lm_sum(logits, *a))
    args = _elastic_args(tmp_path, max_steps=4, elastic_start=0.5, elastic_refresh=0, elastic_freeze=None,
                         distill=True, elastic_target=target, elastic_label_weight=0.25)
    HFOTOTrainer(model=tiny_model("llama"), args=args, train_dataset=Tokens()).train()
    sized = [i for i, c in enumerate(calls) if c[0] == "size"]
    assert sized and len(lm_calls) == len(sized)  # each sub-network: distillation and the labels
    for i in sized:
        first = max(j for j in range(i) if calls[j][0] == "distill")  # the full model's step
        _, student, teacher = calls[first]
        if target == "teacher":
            assert calls[i][2] is teacher
        else:
            assert torch.equal(calls[i][2], student.detach()) and not torch.equal(calls[i][2], teacher)


def test_lm_sum_is_the_models_own_loss_summed_over_tokens():
    from hf_oto.trainer.distill import lm_sum, token_mask

    model = tiny_model("llama")
    ids = IDS.clone()
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(input_ids=ids, labels=labels)
    mask = token_mask({"input_ids": ids}, labels)
    assert torch.allclose(lm_sum(out.logits, labels, mask) / mask.sum(), out.loss, atol=1e-6)


@pytest.mark.parametrize("kw, match", [
    (dict(elastic_sizes=[0.5, 2.0]), r"\(0, 1\]"),
    (dict(elastic_target="teacher"), "distill: true"),
    (dict(elastic_target="dense"), "elastic_target must be one of"),
    (dict(elastic_label_weight=1.5), r"elastic_label_weight must be in \[0, 1\]"),
    (dict(elastic_sizes=[0.001]), "elastic size 0.001"),
    (dict(use_cric=True), "use_cric"),
    (dict(pruning_criterion="wanda_sp"), "masked sub-networks' activations"),
    (dict(elastic_start=12, elastic_freeze=None), "never train"),
])
def test_bad_elastic_settings_stop_when_the_trainer_is_built(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        HFOTOTrainer(model=tiny_model("llama"), args=_elastic_args(tmp_path, **kw), train_dataset=Tokens())


@pytest.mark.parametrize("args, words", [
    (["--elastic_sizes", "0.5", "1.5"], ["(0, 1]"]),
    (["--elastic_sizes", "0.01"], ["elastic size 0.01", "cannot be reached"]),
    (["--elastic_sizes", "0.5", "--use_cric", "true"], ["use_cric"]),
])
def test_bad_elastic_settings_are_one_line_before_any_work(capsys, tmp_path, args, words):
    line = refused(capsys, "prune", QUICKSTART, *SMALL, *args, "--output_dir", str(tmp_path / "run"))
    assert all(w in line for w in words), line
    assert not (tmp_path / "run").exists()


def test_elastic_job_saves_the_run_and_export_size_cuts_it(tmp_path, capsys):
    from hf_oto.cli import main
    from hf_oto.job.prune_job import run

    out = tmp_path / "elastic"
    summary = run(QUICKSTART, SMALL + ["--elastic_sizes", "0.5", "0.75", "--output_dir", str(tmp_path / "run"),
                                       "--pruned_output_dir", str(out)])
    assert set(summary.ppl) == {1.0, 0.75, 0.5} and summary.removed[0.5] > summary.removed[0.75] > 0
    data = json.loads((out / "elastic_run.json").read_text())
    assert set(data["sizes"]) == {"0.5", "0.75"}
    assert main(["export-size", str(out), "--sizes", "0.5,0.75", "--out", str(tmp_path / "sizes")]) == 0
    from hf_oto.manifest import Manifest

    m = Manifest.read(tmp_path / "sizes" / "size-0.5")
    assert m.eval["eval_perplexity"] == pytest.approx(summary.ppl[0.5]) and m.elastic.steps == 8
    assert "elastic (once-for-all)" in (tmp_path / "sizes" / "size-0.5" / "README.md").read_text()
    capsys.readouterr()
    line = refused(capsys, "export-size", str(out), "--size", "0.3", "--out", str(tmp_path / "x"))
    assert "size 0.3 was not trained" in line and "0.5, 0.75" in line
    assert not (tmp_path / "x").exists()


def test_accelerate_two_processes_plan_sizes_of_the_shape_one_process_plans(tmp_path):
    """The trainer under ``accelerate launch`` (2 CPU processes): rank 0 saves and reports once, and each size
    removes what a one-process run on the same global batches removes, kind by kind. The exact groups can
    differ on this 8-step random model, where float rounding of the all-reduce flips near ties (HESSO's own
    DDP run differs the same way)."""
    import subprocess
    import sys

    from jobs import ROOT

    from hf_oto.job.prune_job import run

    elastic = ["--elastic_sizes", "0.5", "0.75", "--elastic_start", "4"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(QUICKSTART, SMALL + elastic + ["--output_dir", str(tmp_path / "r1"), "--pruned_output_dir", str(one),
                                       "--per_device_train_batch_size", "8"])  # the two processes' global batch
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu_2proc.yaml",
           "--main_process_port", "0", "scripts/prune_finetune.py", QUICKSTART, *SMALL, *elastic,
           "--output_dir", str(tmp_path / "r2"), "--pruned_output_dir", str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("elastic run (for export-size)") == 1  # rank 0 reports once

    def shape(folder):
        sizes = json.loads((folder / "elastic_run.json").read_text())["sizes"]
        return {k: (v["pruned_params"], sorted({n.rsplit(".", 1)[0] for n in v["removed"]}),
                    len(v["removed"])) for k, v in sizes.items()}

    assert shape(one) == shape(two)


def test_elastic_run_with_lora_adapters_saves_the_merged_model_and_its_sizes(tmp_path):
    from peft import LoraConfig, get_peft_model

    from hf_oto.export.sizes import export_size

    model = get_peft_model(tiny_model("llama", intermediate_size=64),
                           LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                                           "gate_proj", "down_proj"]))
    trainer = HFOTOTrainer(model=model, args=_elastic_args(tmp_path, learning_rate=1e-2), train_dataset=Tokens())
    trainer.train()
    assert trainer.elastic.config.criterion == "hesso"  # "auto" under LoRA: frozen base weights have no gradient
    run = trainer.save_elastic_run(str(tmp_path / "elastic"))
    model.eval()
    with trainer.elastic.subnetwork(0.4):
        masked = logits(model, IDS)
    out = export_size(run, 0.4, tmp_path / "size")
    reloaded = reload_logits({"s": {"dir": str(out)}}, IDS, tmp_path)["s"]
    assert (reloaded - masked).abs().max() <= 1e-5
    from safetensors import safe_open

    with safe_open(run / "model.safetensors", "pt") as f:  # the run holds the merged model: no adapter weights
        assert f.keys() and not any("lora" in k for k in f.keys())
