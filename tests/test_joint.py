"""Elastic sizes with QFA in one run, and the joint search over (size, per-layer bits): every pair exports
equal to the masked sub-network that trained (reloaded without hf_oto), the search respects its budget and
picks the lowest loss, resume is bit-exact, and bad settings are one line before any work."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from jobs import QUICKSTART, SMALL, refused
from test_trainer import Tokens, _args
from tiny import logits, reload_logits, tiny_model

from hf_oto.errors import ConfigError
from hf_oto.export.quantized import save_quantized
from hf_oto.quant import qfa_layers, set_bits
from hf_oto.quant.joint import joint_search, run_spaces, zero_size
from hf_oto.quant.run import load_qfa_run
from hf_oto.quant.search import Costs
from hf_oto.trainer import HFOTOTrainer

IDS = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
BLOCKS = torch.randint(3, 64, (6, 16), generator=torch.Generator().manual_seed(0))


def _joint_args(tmp_path, **kw):
    base = dict(qfa=True, qfa_group_size=8, qfa_quantizer="rtn", learning_rate=5e-3, ffn_multiple=8,
                elastic_sizes=[0.5, 0.75], elastic_start=0.25)
    return _args(tmp_path, **dict(base, **kw))


def _train(tmp_path, **kw):
    model = tiny_model("llama", num_hidden_layers=2, intermediate_size=64)
    trainer = HFOTOTrainer(model=model, args=_joint_args(tmp_path, **kw), train_dataset=Tokens(),
                           eval_dataset=[{"input_ids": b} for b in BLOCKS])
    trainer.train()
    return model, trainer


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("joint")
    model, trainer = _train(tmp)
    return model, trainer, trainer.save_qfa_run(str(tmp / "qfa_run"))


def test_sizes_and_widths_train_together_and_the_run_records_the_sizes(joint_run):
    model, trainer, run_dir = joint_run
    e = trainer.elastic
    assert e is not None and e.rankings == 1 and trainer.hesso is None
    logged = [h for h in trainer.state.log_history if "elastic/kl_size_0.5" in h]
    assert logged and "qfa/mean_bits" in logged[-1]  # each step: sampled widths and sampled sizes
    moved = [n for _, _, m in qfa_layers(model) for n, p in m.lora_B.items() if p.abs().sum() > 0]
    assert {"2", "3", "4"} <= set(moved)
    info = json.loads((run_dir / "qfa_run.json").read_text())
    sizes = info["elastic"]["sizes"]
    assert set(sizes) == {"0.5", "0.75"} and set(sizes["0.75"]["removed"]) < set(sizes["0.5"]["removed"])
    assert sizes["0.5"]["pruned_params"] > sizes["0.75"]["pruned_params"] > 0
    assert not info["pruned"]  # nothing was zeroed: the sizes are masked views
    with pytest.raises(ConfigError, match="save_qfa_run"):
        trainer.save_elastic_run(str(run_dir.parent / "elastic"))


def test_every_size_and_bit_mix_exports_equal_to_its_masked_sub_network(joint_run, tmp_path):
    model, trainer, run_dir = joint_run
    run = load_qfa_run(run_dir)
    space, gates = run_spaces(run)
    model.eval()
    pairs = {"s0.5": (0.5, [2, 4]), "s0.75": (0.75, [4, 3]), "full": (1.0, [3, 2])}
    expected, dirs = {}, {}
    for key, (size, bits) in pairs.items():
        set_bits(model, bits)
        if size < 1.0:
            with trainer.elastic.subnetwork(size):
                expected[key] = logits(model, IDS)
        else:
            expected[key] = logits(model, IDS)
        pruned = copy.deepcopy(run.model)
        zero_size(pruned, run.info, gates, size)
        dirs[key] = {"dir": str(save_quantized(pruned, bits, tmp_path / key, space=space))}
    got = reload_logits(dirs, IDS, tmp_path)  # a fresh interpreter without hf_oto
    for key in pairs:
        assert (got[key] - expected[key]).abs().max() <= 1e-5, key
    widths = {k: json.loads((tmp_path / k / "config.json").read_text())["intermediate_size"] for k in pairs}
    assert widths["s0.5"] < widths["s0.75"] < widths["full"] == 64
    assert not torch.equal(expected["s0.5"], expected["s0.75"])


def test_joint_search_picks_the_lowest_loss_pair_within_the_budget(joint_run):
    _, _, run_dir = joint_run
    run = load_qfa_run(run_dir)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    limit = Costs(run.model).bytes([3, 3])  # the full model at 3 bits
    result = joint_search(run, run.eval_blocks, max_bytes=limit, samples=4, refine=2, progress=False)
    assert [r.size for r in result.per_size] == [1.0, 0.75, 0.5]
    for r in result.per_size:
        assert r.search is not None and r.search.best.bytes <= limit
    assert result.best.loss == min(r.search.best.loss for r in result.per_size)
    assert all(torch.equal(v, before[k]) for k, v in run.model.state_dict().items())  # left as loaded
    # bits as a budget: the full model's bytes at that width, so smaller sizes may spend more bits per weight
    by_bits = joint_search(run, run.eval_blocks, average_bits=3.0, samples=4, refine=2, progress=False)
    assert by_bits.limit == limit
    fits4 = {r.size: any(c.bits[0] == 4 and c.bytes <= limit for c in r.search.uniform) for r in by_bits.per_size}
    assert not fits4[1.0] and fits4[0.5]
    with pytest.raises(ConfigError, match="below every size"):
        joint_search(run, run.eval_blocks, max_bytes=1000, progress=False)
    with pytest.raises(ConfigError, match="sizes are 0.5, 0.75, 1"):
        joint_search(run, run.eval_blocks, max_bytes=limit, sizes=[0.3], progress=False)


def test_joint_resume_is_bit_exact(tmp_path):
    full, whole = _train(tmp_path / "a")
    _train(tmp_path / "b", save_strategy="steps", save_steps=4)
    resumed = tiny_model("llama", num_hidden_layers=2, intermediate_size=64)
    again = HFOTOTrainer(model=resumed, args=_joint_args(tmp_path / "c"), train_dataset=Tokens())
    again.train(resume_from_checkpoint=str(tmp_path / "b" / "run" / "checkpoint-4"))
    assert torch.equal(whole.elastic.removed_flags, again.elastic.removed_flags)
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("args, words", [
    (["--pruning_layout", "per_layer_ffn"], ["qfa with elastic_sizes", "uniform"]),
    (["--pruning_granularity", "both"], ["qfa with elastic_sizes", "width"]),
    (["--elastic_sizes", "0.5", "1.5"], ["(0, 1]"]),
])
def test_bad_joint_settings_are_one_line_before_any_work(capsys, tmp_path, args, words):
    job = ["--qfa", "true", "--qfa_quantizer", "rtn", "--elastic_sizes", "0.5", *args]
    line = refused(capsys, "prune", QUICKSTART, *SMALL, *job, "--output_dir", str(tmp_path / "run"))
    assert all(w in line for w in words), line
    assert not (tmp_path / "run").exists()


def test_cli_joint_run_then_search_writes_the_chosen_pair(tmp_path, capsys, monkeypatch):
    from jobs import ROOT, ran, word_corpus

    base = tmp_path / "base"
    tiny_model("llama", num_hidden_layers=2, intermediate_size=64).save_pretrained(base)
    from jobs import no_pad_tokenizer

    no_pad_tokenizer(base)
    corpus = word_corpus(tmp_path / "words.txt", 400)
    job = ["prune", ROOT / "configs" / "qfa_quickstart.yaml", "--model_name_or_path", base, "--text_source", "null",
           "--train_files", corpus, "--block_size", "16", "--max_steps", "8", "--per_device_train_batch_size", "4",
           "--logging_steps", "4", "--qfa_group_size", "8", "--qfa_quantizer", "rtn", "--elastic_sizes", "0.5",
           "--elastic_start", "0.25", "--ffn_multiple", "8", "--output_dir", tmp_path / "run"]
    monkeypatch.chdir(tmp_path)
    printed = ran(capsys, *job)
    assert "size 0.5 (masked)" in printed and "a size and bit-widths" in printed
    run = tmp_path / "run" / "qfa_run"
    line = refused(capsys, "qfa-search", run, "--budget", "3.0", "--sizes", "0.3")
    assert "size 0.3 was not trained" in line and "0.5, 1" in line
    printed = ran(capsys, "qfa-search", run, "--budget", "3.0", "--samples", "4", "--refine", "2", "--sizes", "0.5",
                  "--out", tmp_path / "export")
    assert "chosen: size 0.5" in printed
    manifest = json.loads((tmp_path / "export" / "qfa_manifest.json").read_text())
    assert manifest["search"]["size"] == 0.5 and manifest["elastic"]["size"] == 0.5
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["intermediate_size"] < 64 and "quantization_config" in cfg
    got = reload_logits({"x": {"dir": str(tmp_path / "export")}}, IDS, tmp_path)
    assert torch.isfinite(got["x"]).all()
