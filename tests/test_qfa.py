"""LLM-QFA: sampler, adapter isolation, exact folding, export equivalence, QFA+HESSO, resume, bad input."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import Tokens, _args
from tiny import logits, reload_logits, tiny_model

from hf_oto.errors import ConfigError, ExportError
from hf_oto.export.quantized import pack_int32, save_quantized
from hf_oto.groups import group_is_zero
from hf_oto.quant import BitSampler, QFAConfig, prepare_qfa, qfa_layers, qfa_search, set_bits
from hf_oto.quant.quantize import code_range, gptq, rtn
from hf_oto.quant.search import BitSearch, parse_budget
from hf_oto.trainer import HFOTOTrainer

IDS = torch.randint(3, 64, (2, 11), generator=torch.Generator().manual_seed(3))

def _reload_without_hf_oto(dirs: dict[str, str], tmp_path) -> dict[str, torch.Tensor]:
    """Logits of each export from a process that cannot import hf_oto, and its config's FFN width."""
    out = reload_logits({k: {"dir": d} for k, d in dirs.items()}, IDS, tmp_path)
    for key, folder in dirs.items():
        cfg = json.loads((Path(folder) / "config.json").read_text())
        out[key + ".intermediate"] = torch.tensor(cfg["intermediate_size"])
        out[key + ".heads"] = torch.tensor([cfg["num_attention_heads"], cfg["num_key_value_heads"]])
    return out


def _qfa_model(seed=0, **config):
    model = tiny_model("llama", seed=seed, num_hidden_layers=3, intermediate_size=64)
    config.setdefault("quantizer", "rtn")
    config.setdefault("group_size", 16)
    prepare_qfa(model, QFAConfig(**config))
    return model


def _randomise_adapters(model, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, m in qfa_layers(model):
            for p in m.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=g) * std)


# Quantizers ----------------------------------------------------------------------------------------
def test_codes_stay_in_range_and_rtn_error_falls_with_bits():
    w = torch.randn(24, 64)
    errors = []
    for b in (2, 3, 4, 8):
        q = rtn(w, b, 16)
        lo, hi = code_range(b)
        assert q.codes.dtype == torch.int8 and lo <= int(q.codes.min()) and int(q.codes.max()) <= hi
        assert q.scales.shape == (24, 4)
        errors.append(float((q.dequantize() - w).norm() / w.norm()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01


def test_a_negative_scale_mirrors_the_grid_where_the_group_needs_its_long_side_up():
    # 2 bits store codes -2..1: only a mirrored grid (-1..2 steps, a negative scale) holds the first row exactly
    w = torch.tensor([[1.0, 0.5, 0.0, -0.5], [-1.0, -0.5, 0.0, 0.5]])
    for q in (rtn(w, 2, 4), gptq(w, torch.eye(4), 2, 4)):
        assert torch.allclose(q.dequantize(), w, atol=1e-6)
        assert q.scales[0, 0] < 0 < q.scales[1, 0]
    # never worse than the grid without mirroring (signed=False), whose candidates are among the signed ones
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    for b in (2, 3, 4):
        mirrored = ((rtn(x, b, 32).dequantize() - x) ** 2).sum(dim=1)
        plain = ((rtn(x, b, 32, signed=False).dequantize() - x) ** 2).sum(dim=1)
        assert (mirrored <= plain + 1e-6).all() and mirrored.sum() < 0.95 * plain.sum(), b
    h = torch.eye(32) + 0.5  # correlated inputs
    assert (gptq(x, h, 2, 32).scales < 0).any() and (gptq(x, h, 2, 32, signed=False).scales > 0).all()


def test_gptq_beats_round_to_nearest_on_the_layer_output():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g)
    x = torch.randn(512, 64, generator=g) @ mix  # correlated inputs, where GPTQ's error feedback pays
    w = torch.randn(32, 64, generator=g)
    h = x.T @ x / x.shape[0]
    for b in (2, 3, 4):
        err_rtn = (x @ (rtn(w, b, 16).dequantize() - w).T).norm()
        err_gptq = (x @ (gptq(w, h, b, 16).dequantize() - w).T).norm()
        assert err_gptq < 0.9 * err_rtn, b


def test_packing_matches_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for b in (2, 3, 4, 8):
        codes = torch.randint(-(1 << (b - 1)), 1 << (b - 1), (5, 96), dtype=torch.int8)
        assert torch.equal(pack_int32(codes, b), ct.pack_to_int32(codes, b)), b


# Sampler -------------------------------------------------------------------------------------------
def test_uniform_sampler_draws_every_width_equally_and_per_layer():
    s = BitSampler(QFAConfig(bits=(2, 3, 4), seed=1), num_layers=6, period=100)
    draws = [s.sample(t) for t in range(2000)]
    counts = Counter(b for d in draws for b in d)
    for b in (2, 3, 4):
        assert abs(counts[b] / 12000 - 1 / 3) < 0.02
    assert len(set(draws)) > 0.85 * 3**6  # nearly every per-layer mix appears (about 94% expected)
    same = sum(d[0] == d[1] for d in draws) / len(draws)
    assert abs(same - 1 / 3) < 0.03  # layers draw independently
    assert s.sample(17) == BitSampler(QFAConfig(bits=(2, 3, 4), seed=1), 6, 100).sample(17)  # a function of step
    assert s.sample(17) != BitSampler(QFAConfig(bits=(2, 3, 4), seed=2), 6, 100).sample(17)


def test_triangular_sampler_sweeps_the_mean_width_low_high_low():
    s = BitSampler(QFAConfig(bits=(2, 3, 4), schedule="triangular"), num_layers=400, period=40)
    assert set(s.sample(0)) == {2}
    assert set(s.sample(20)) == {4}
    for t in (5, 10, 15, 25, 30, 35):
        target = 2 + s.mean_index(t)
        mean = sum(s.sample(t)) / 400
        assert abs(mean - target) < 0.1, t
    assert s.mean_index(10) == pytest.approx(1.0) and s.mean_index(30) == pytest.approx(1.0)


# Exact folding -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared_rank", [0, 4])
def test_adapters_fold_exactly_into_the_codes(shared_rank):
    model = _qfa_model(bits=(2, 3, 4, 8), shared_rank=shared_rank)
    _randomise_adapters(model)
    shifted = 0
    for _, _, m in qfa_layers(model):
        for b in m.bits:
            folded = m.folded(b)
            assert torch.equal(folded.dequantize(), m.weight_for(b).detach())
            shifted += int((folded.codes != m.codes(b)).sum())
            lo, hi = code_range(b)
            assert lo <= int(folded.codes.min()) and int(folded.codes.max()) <= hi
    assert shifted > 0  # the adapters did move codes, so the equality above is not trivial


def test_the_shared_adapter_moves_every_width_and_reloads_from_a_saved_run(tmp_path):
    from hf_oto.quant.run import load_qfa_run, save_qfa_run

    model = _qfa_model(shared_rank=4)
    m = qfa_layers(model)[0][2]
    assert set(m.lora_A) == {"2", "3", "4", "shared"} and m.lora_A["shared"].shape[0] == 4
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # only the shared adapter is non-zero: it alone shifts the codes
        for _, _, layer in qfa_layers(model):
            layer.lora_B["shared"].copy_(torch.randn(layer.lora_B["shared"].shape, generator=g) * 0.3)
    for b in m.bits:
        assert not torch.equal(m.folded(b).codes, m.codes(b)), b
    set_bits(model, [2, 4, 3])
    expected = logits(model, IDS)
    save_qfa_run(model, QFAConfig(quantizer="rtn", group_size=16, shared_rank=4), tmp_path / "run", pruned=False)
    run = load_qfa_run(tmp_path / "run")
    assert run.config.shared_rank == 4
    set_bits(run.model, [2, 4, 3])
    assert torch.equal(logits(run.model, IDS), expected)
    old = json.loads((tmp_path / "run" / "qfa_run.json").read_text())["qfa"]
    old.pop("shared_rank")  # a run saved before the shared adapter existed
    assert QFAConfig.from_dict(old).shared_rank == 0


def test_adapter_shift_is_a_per_group_zero_point_move():
    model = _qfa_model()
    _randomise_adapters(model)
    m = qfa_layers(model)[0][2]
    delta = m.folded(3).codes.float() - m.codes(3).float()
    lo, hi = code_range(3)
    free = (m.folded(3).codes > lo) & (m.folded(3).codes < hi)  # not clamped
    groups = delta.reshape(delta.shape[0], -1, m.group_size)
    free = free.reshape_as(groups)
    for r in range(groups.shape[0]):
        for g in range(groups.shape[1]):
            vals = groups[r, g][free[r, g]].unique()
            assert vals.numel() <= 1  # one integer shift per (row, group)


# Training ------------------------------------------------------------------------------------------
def _qfa_args(tmp_path, **kw):
    base = dict(qfa=True, qfa_group_size=16, qfa_quantizer="rtn", target_sparsity=0, learning_rate=5e-3)
    base.update(kw)
    return _args(tmp_path, **base)


def test_the_trainer_measures_each_width_of_the_base_before_training(tmp_path, capsys):
    """One training batch's loss in full precision (before quantizing) and at each uniform width of the
    quantized base, printed when the trainer is built."""
    from hf_oto.quant.health import batch_loss

    model = tiny_model("llama", num_hidden_layers=2, intermediate_size=64)
    batch = {"input_ids": Tokens()[0]["input_ids"].unsqueeze(0)}
    original = copy.deepcopy(model)
    trainer = HFOTOTrainer(model=model, args=_qfa_args(tmp_path, max_steps=2, per_device_train_batch_size=1),
                           train_dataset=Tokens())
    check = trainer.qfa_check
    assert check.full == pytest.approx(batch_loss(original, batch), abs=1e-6)
    assert set(check.widths) == {2, 3, 4}
    for b in (2, 3, 4):
        set_bits(model, b)
        assert check.widths[b] == pytest.approx(batch_loss(model, batch), abs=1e-6)
    assert check.line() in capsys.readouterr().out


def test_a_width_the_model_does_not_survive_is_named_with_the_widths_to_keep():
    from hf_oto.quant.health import WidthCheck

    fine = WidthCheck(full=2.7, widths={3: 3.4, 4: 2.9})
    assert fine.collapsed == [] and fine.warning() is None
    broken = WidthCheck(full=2.7, widths={2: 17.3, 3: 3.4, 4: 2.9})
    assert broken.collapsed == [2]
    assert "2-bit" in broken.warning() and "qfa_bits: [3, 4]" in broken.warning()
    assert WidthCheck(full=2.7, widths={2: float("nan")}).collapsed == [2]  # a NaN loss is a collapse too


@pytest.mark.parametrize("shared_rank", [0, 4])
def test_a_two_bit_step_moves_no_other_width(tmp_path, monkeypatch, shared_rank):
    monkeypatch.setattr(BitSampler, "sample", lambda self, step: (2,) * self.num_layers)
    model = tiny_model("llama", num_hidden_layers=2, intermediate_size=64)
    trainer = HFOTOTrainer(model=model, args=_qfa_args(tmp_path, max_steps=3, qfa_shared_rank=shared_rank),
                           train_dataset=Tokens())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trained = (".lora_A.2", ".lora_B.2", ".lora_A.shared", ".lora_B.shared")
    assert moved and all(any(key in n for key in trained) for n in moved)
    assert any(".lora_B.2" in n for n in moved)
    assert any(".lora_B.shared" in n for n in moved) == bool(shared_rank)  # the shared one trains every step
    opt = trainer.optimizer
    params = dict(model.named_parameters())
    for n, p in params.items():
        if ".lora_A.3" in n or ".lora_B.4" in n:
            assert p.grad is None and not opt.state.get(p)  # no gradient, no optimizer state
    assert {h["qfa/mean_bits"] for h in trainer.state.log_history if "qfa/mean_bits" in h} <= {2.0}


def test_sampled_widths_are_logged_and_every_adapter_trains(tmp_path):
    model = tiny_model("llama", num_hidden_layers=2, intermediate_size=64)
    trainer = HFOTOTrainer(model=model, args=_qfa_args(tmp_path, max_steps=12), train_dataset=Tokens())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    logged = [h["qfa/mean_bits"] for h in trainer.state.log_history if "qfa/mean_bits" in h]
    assert logged and all(2 <= v <= 4 for v in logged)
    for b in (2, 3, 4):
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if f".lora_B.{b}" in n)
    frozen = [n for n, p in model.named_parameters() if ".lora_" not in n]
    assert frozen and all(torch.equal(model.get_parameter(n), before[n]) for n in frozen)


def test_resume_is_bit_exact(tmp_path):
    def run(folder, **kw):
        model = tiny_model("llama", num_hidden_layers=2, intermediate_size=64)
        trainer = HFOTOTrainer(model=model, args=_qfa_args(tmp_path / folder, **kw), train_dataset=Tokens())
        return model, trainer

    full, t = run("a")
    t.train()
    _, t = run("b", save_strategy="steps", save_steps=5)
    t.train()
    resumed, t = run("c")
    t.train(resume_from_checkpoint=str(tmp_path / "b" / "run" / "checkpoint-5"))
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_a_checkpoint_from_before_the_shared_adapter_resumes_without_one(tmp_path):
    """Its settings lack qfa_shared_rank: the main job's pre-flight adopts 0 before the trainer builds the
    adapters, and the resumed run is bit for bit the uninterrupted one; a trainer built with the shared
    adapter refuses it in one line before loading anything."""
    from hf_oto.job.preflight import resolve_resume
    from hf_oto.trainer.resume import CHECKPOINT_SETTINGS

    def run(folder, **kw):
        model = tiny_model("llama", num_hidden_layers=2, intermediate_size=64)
        trainer = HFOTOTrainer(model=model, args=_qfa_args(tmp_path / folder, **kw), train_dataset=Tokens())
        return model, trainer

    full, t = run("a", qfa_shared_rank=0)
    t.train()
    _, t = run("b", qfa_shared_rank=0, save_strategy="steps", save_steps=5)
    t.train()
    ckpt = tmp_path / "b" / "run" / "checkpoint-5"
    saved = json.loads((ckpt / CHECKPOINT_SETTINGS).read_text())
    saved.pop("qfa_shared_rank")  # as hf-oto wrote it before the setting existed
    (ckpt / CHECKPOINT_SETTINGS).write_text(json.dumps(saved))
    _, t = run("c")
    assert t.qfa_config.shared_rank == 8  # the default: a shared adapter of qfa_rank
    with pytest.raises(ConfigError, match="trained with qfa_shared_rank 0"):
        t.train(resume_from_checkpoint=str(ckpt))
    args = _qfa_args(tmp_path / "d", resume_from_checkpoint=str(ckpt))
    assert resolve_resume(args) == str(ckpt) and args.qfa_shared_rank == 0
    resumed = tiny_model("llama", num_hidden_layers=2, intermediate_size=64)
    HFOTOTrainer(model=resumed, args=args, train_dataset=Tokens()).train(resume_from_checkpoint=str(ckpt))
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


# Export --------------------------------------------------------------------------------------------
def test_mixed_precision_export_reloads_without_hf_oto_with_identical_logits(tmp_path):
    model = _qfa_model()
    _randomise_adapters(model, std=0.1)
    configs = {"mixed": [2, 4, 3], "uniform3": [3, 3, 3]}
    expected, dirs = {}, {}
    for key, bits in configs.items():
        set_bits(model, bits)
        expected[key] = logits(model, IDS)
        dirs[key] = str(save_quantized(model, bits, tmp_path / key))
    got = _reload_without_hf_oto(dirs, tmp_path)
    for key in configs:
        assert (got[key] - expected[key]).abs().max().item() <= 1e-5, key
    from safetensors.torch import load_file

    scales = [t for n, t in load_file(tmp_path / "mixed" / "model.safetensors").items() if n.endswith("weight_scale")]
    assert any((t < 0).any() for t in scales) and any((t > 0).any() for t in scales)  # mirrored grids reload too
    cfg = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    assert sorted(g["weights"]["num_bits"] for g in cfg["config_groups"].values()) == [2, 3, 4]
    manifest = json.loads((tmp_path / "mixed" / "qfa_manifest.json").read_text())
    assert manifest["bits_per_layer"] == [2, 4, 3] and manifest["average_bits"] == pytest.approx(3.0)
    assert "| 1 | 4 |" in (tmp_path / "mixed" / "README.md").read_text()
    assert "sampled itself" not in (tmp_path / "mixed" / "README.md").read_text()  # no replay, no line
    assert (tmp_path / "mixed" / "bits_per_layer.png").stat().st_size > 0
    set_bits(model, 4)
    extra = {"base_model": "org/original-model", "license": "apache-2.0", "search": {"eval_loss": 2.0},
             "replay_fraction": 0.25}
    save_quantized(model, [2, 2, 2], tmp_path / "other", extra_manifest=extra)
    assert all(m.active_bits == 4 for _, _, m in qfa_layers(model))  # the model is left as it was
    from huggingface_hub import ModelCard

    assert "25% of the run's training draws were text the source model sampled itself" in \
        (tmp_path / "other" / "README.md").read_text()
    card = ModelCard.load(tmp_path / "other" / "README.md").data
    assert card.base_model == "org/original-model" and card.license == "apache-2.0"
    assert card.to_dict()["base_model_relation"] == "quantized" and card.pipeline_tag == "text-generation"
    (result,) = card.eval_results
    assert result.metric_type == "perplexity" and result.metric_value == pytest.approx(math.exp(2.0))


def test_qfa_with_hesso_prunes_quantizes_and_exports_the_smaller_model(tmp_path):
    model = tiny_model("llama", num_hidden_layers=2, intermediate_size=64)
    args = _qfa_args(tmp_path, qfa_group_size=8, target_sparsity=0.4, ffn_multiple=8, qfa_shared_rank=4)
    trainer = HFOTOTrainer(model=model, args=args, train_dataset=Tokens())
    trainer.train()
    zero = group_is_zero(trainer.model, trainer.hesso_space)
    assert zero.any()
    removed_rows = removed_cols = 0
    for _, _, m in qfa_layers(model):
        if m.gate_out is not None:
            dead = m.gate_out == 0
            removed_rows += int(dead.sum())
            assert set(m.lora_B) == {"2", "3", "4", "shared"}
            for b in m.bits:  # dequantized rows and adapter rows of removed groups: exactly zero
                assert (m.weight_for(b)[dead] == 0).all()
            assert all((lora_b[dead] == 0).all() for lora_b in m.lora_B.values())
            dead_in = m.gate_in == 0
            removed_cols += int(dead_in.sum())
            blocks = dead_in.reshape(-1, m.group_size).all(dim=1)
            assert torch.equal(dead_in.reshape(-1, m.group_size).any(dim=1), blocks)  # whole groups only
            for b in m.bits:
                assert (m.weight_for(b)[:, dead_in] == 0).all()
            assert all((lora_a[:, blocks] == 0).all() for lora_a in m.lora_A.values())
    assert removed_rows > 0 and removed_cols > 0
    bits = [2, 4]
    set_bits(model, bits)
    expected = logits(model, IDS)
    out = save_quantized(model, bits, tmp_path / "export", space=trainer.pruning_space)
    got = _reload_without_hf_oto({"pruned": str(out)}, tmp_path)
    assert int(got["pruned.intermediate"]) < 64
    assert (got["pruned"] - expected).abs().max().item() <= 1e-5


def test_search_keeps_the_sensitive_layer_wide(monkeypatch):
    model = _qfa_model(bits=(2, 4))
    # A planted loss: layer 1 at 2 bits costs far more than any other choice (a tiny random model's
    # loss barely depends on its weights, so the evaluation is replaced by a known function).
    penalty = {(0, 2): 0.10, (1, 2): 1.0, (2, 2): 0.05}
    calls = []

    def planted(_model, bits, blocks, batch_size=8):
        calls.append(tuple(bits))
        return torch.full((len(blocks),), 3.0 + sum(penalty.get((i, b), 0.0) for i, b in enumerate(bits)),
                          dtype=torch.float64)

    monkeypatch.setattr("hf_oto.quant.search.block_losses", planted)
    blocks = torch.randint(3, 64, (16, 12))
    result = qfa_search(model, blocks, average_bits=2.7, samples=6, refine=4, progress=False)
    assert len(set(calls)) == len(calls) == result.evaluated  # each configuration is evaluated once
    assert result.best.bits[1] == 4 and result.best.average_bits <= 2.7 + 1e-9
    assert sum(result.best.bits) == 2 * 2 + 4  # the budget allows one 4-bit layer, and it is spent
    worst = min(range(3), key=lambda i: -result.sensitivity[i])
    assert worst == 1
    assert "uniform 2-bit" in result.table()


@pytest.mark.parametrize("consistent", [False, True])
def test_search_keeps_uniform_unless_a_mix_wins_beyond_the_blocks_noise(monkeypatch, consistent):
    model = _qfa_model(bits=(2, 3, 4))
    # Planted per-block losses at a 3.0-bit budget (equal layers: one 4-bit layer pays for one 2-bit layer).
    # The additive model predicts that layer 0 at 4 bits with another layer at 2 gains 0.05; measured, a mix
    # gains 0.005 on average with block-to-block swings of +-0.055 (noise), or 0.055 on every block.
    noisy = torch.tensor([-0.06, 0.05, -0.06, 0.05], dtype=torch.float64)
    steady = torch.tensor([-0.05, -0.06, -0.05, -0.06], dtype=torch.float64)

    def planted(_model, bits, blocks, batch_size=8):
        effect = sum(-0.15 if (i, b) == (0, 4) else {2: 0.1, 3: 0.0, 4: -0.1}[b] for i, b in enumerate(bits))
        mixed = 2 in bits and 4 in bits
        return 3.0 + effect + (0.05 + (steady if consistent else noisy) if mixed
                                else torch.zeros(len(blocks), dtype=torch.float64))

    monkeypatch.setattr("hf_oto.quant.search.block_losses", planted)
    search = BitSearch(model, torch.randint(3, 64, (4, 12)), progress=False)
    found = search.search(average_bits=3.0, samples=2, refine=4)
    assert found.gain_se is not None and found.gain_se > 0
    if consistent:  # 0.055 +- 0.003 per block: about 19 standard errors
        assert found.best.bits[0] == 4 and 2 in found.best.bits and found.mix is None and found.gain_se > 10
        assert "(kept)" in found.table()
    else:  # a 0.005 gain against +-0.055 swings: uniform 3-bit is kept, the mix reported beside it
        assert found.best.bits == (3, 3, 3) and found.mix is not None and found.mix.bits[0] == 4
        assert found.gain_se < 1 and "best mix (not chosen)" in found.table() and "not enough" in found.table()
        raw = search.search(average_bits=3.0, samples=2, refine=4, min_gain_se=0.0)  # any lower mean wins
        assert raw.best.bits == found.mix.bits and raw.mix is None


def test_holdout_tests_the_chosen_mix_on_blocks_the_search_never_saw(monkeypatch):
    model = _qfa_model(bits=(2, 3, 4))
    blocks = torch.randint(3, 64, (8, 12))
    blocks[:, 0] = torch.arange(8)  # each block's id: the first token
    # A mix (layer 0 at 4 bits, another at 2) gains 0.05 +- 0.005 on the first six blocks, as measured, and
    # loses 0.05 on the last two: the luck of the blocks it was chosen on, which held-out blocks do not share.
    luck = torch.tensor([-0.05, -0.055, -0.045, -0.05, -0.055, -0.045, 0.05, 0.05], dtype=torch.float64)

    def planted(_model, bits, chunk, batch_size=8):
        effect = sum(-0.15 if (i, b) == (0, 4) else {2: 0.1, 3: 0.0, 4: -0.1}[b] for i, b in enumerate(bits))
        mixed = 2 in bits and 4 in bits
        return 3.0 + effect + (luck[chunk[:, 0]] if mixed else torch.zeros(len(chunk), dtype=torch.float64))

    monkeypatch.setattr("hf_oto.quant.search.block_losses", planted)
    seen = BitSearch(model, blocks[:6], progress=False).search(average_bits=3.0, samples=2, refine=4)
    assert seen.best.bits[0] == 4 and 2 in seen.best.bits and seen.gain_se > 10 and seen.held_out == 0
    held = BitSearch(model, blocks, holdout=0.25, progress=False).search(average_bits=3.0, samples=2, refine=4)
    assert held.best.bits == (3, 3, 3) and held.mix is not None and held.mix.bits == seen.best.bits
    assert held.gain_se == 0.0 and held.held_out == 2 and "on 2 held-out blocks" in held.table()
    with pytest.raises(ConfigError, match="leaves 1 to test on"):
        BitSearch(model, blocks, holdout=0.1)
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        BitSearch(model, blocks, holdout=1.0)


def test_by_default_half_the_blocks_are_held_out_from_64_blocks_on():
    model = _qfa_model(bits=(2, 3, 4))
    many, few = torch.randint(3, 64, (64, 4)), torch.randint(3, 64, (63, 4))
    assert BitSearch(model, many, progress=False).held.shape[0] == 32  # what a QFA run saves: 64 blocks
    assert BitSearch(model, few, progress=False).held is None
    assert BitSearch(model, many, holdout=0.0, progress=False).held is None  # as asked
    assert BitSearch(model, few, holdout=0.25, progress=False).held.shape[0] == 16


def test_search_spends_the_budget_when_the_narrowest_width_collapses(monkeypatch):
    model = _qfa_model(bits=(2, 3, 4))
    # Not additive: one 2-bit layer costs 0.5, two or more collapse the model (as 2 bits do on SmolLM2);
    # at 3 bits layer 2 loses most. Random configurations are dominated by the collapse, which once made
    # the search keep uniform 3-bit under a 3.5-bit budget.
    def loss(bits):
        narrow = sum(b == 2 for b in bits)
        at3 = {0: 0.02, 1: 0.05, 2: 0.30}
        return 3.0 + (0.5 * narrow if narrow < 2 else 10.0) + sum(at3[i] for i, b in enumerate(bits) if b == 3)

    def planted(_model, bits, blocks, batch_size=8):
        return torch.full((len(blocks),), loss(bits), dtype=torch.float64)

    monkeypatch.setattr("hf_oto.quant.search.block_losses", planted)
    search = BitSearch(model, torch.randint(3, 64, (4, 12)), progress=False)
    layers = search.costs.per_layer
    assert len({search.costs.layer_bytes(i, 4) for i in layers}) == 1  # equal layers: 3.5 bits fit one 4-bit
    at = search.search(average_bits=3.5, samples=0, refine=8)  # the guided search alone
    assert at.best.bits == (3, 3, 4) and at.best.loss == loss((3, 3, 4))
    assert at.best.loss < next(c for c in at.uniform if c.bits == (3, 3, 3)).loss
    drawn = search.search(average_bits=3.5, samples=3, refine=8)
    assert drawn.random and drawn.best.loss <= min(c.loss for c in drawn.random)
    before = len(search._losses)
    search.search(average_bits=3.5, samples=3, refine=8)
    assert len(search._losses) == before  # a second search of the same model measures nothing again


# Bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    (dict(qfa_bits=[2, 5]), "bit-widths must be chosen from"),
    (dict(qfa_group_size=24), "does not divide the input width"),
    (dict(qfa_target_modules=["nonexistent_proj"]), "match no linear"),
    (dict(qfa_symmetric=False), "asymmetric QFA is not offered"),
    (dict(qfa_schedule="cosine"), "schedule must be one of"),
    (dict(qfa_shared_rank=-1), "shared_rank must be 0"),
    (dict(target_sparsity=0.5, pruning_layout="global"), "needs pruning_layout: uniform"),
    (dict(target_sparsity=0.5, qfa_group_size=16), "not whole quantization groups"),
])
def test_bad_qfa_settings_are_refused_before_training(tmp_path, kw, message):
    model = tiny_model("llama", num_hidden_layers=2, intermediate_size=64)
    with pytest.raises(ConfigError, match=message):
        HFOTOTrainer(model=model, args=_qfa_args(tmp_path, **kw), train_dataset=Tokens())
    assert not any(type(m).__name__ == "QFALinear" for m in model.modules())  # nothing was quantized


def test_qfa_refuses_lora_models(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama", num_hidden_layers=2),
                                peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ConfigError, match="own adapters"):
        HFOTOTrainer(model=model, args=_qfa_args(tmp_path), train_dataset=Tokens())


def test_budget_parsing_and_a_budget_below_the_smallest_configuration():
    assert parse_budget("2.5") == (2.5, None)
    assert parse_budget("3MiB") == (None, 3 * 2**20)
    with pytest.raises(ConfigError, match="budget must be"):
        parse_budget("cheap")
    model = _qfa_model()
    blocks = torch.randint(3, 64, (4, 8))
    with pytest.raises(ConfigError, match="below the smallest configuration"):
        qfa_search(model, blocks, average_bits=1.5, progress=False)


def test_export_refuses_a_width_the_model_was_not_quantized_at(tmp_path):
    model = _qfa_model(bits=(2, 4))
    with pytest.raises(ConfigError, match="no 3-bit codes"):
        save_quantized(model, [2, 3, 4], tmp_path / "x")
    with pytest.raises(ConfigError, match="one width per decoder layer"):
        save_quantized(model, [2, 4], tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError):
        (tmp_path / "y").mkdir()
        (tmp_path / "y" / "keep.txt").write_text("user file")
        save_quantized(model, [2, 4, 4], tmp_path / "y", overwrite=True)
    assert (tmp_path / "y" / "keep.txt").read_text() == "user file"


# The user's path: one YAML through `hf-oto prune`, then `hf-oto qfa-search` -------------------------
def test_cli_qfa_with_pruning_then_search_gives_a_repo_stock_transformers_loads(tmp_path, capsys):
    from jobs import ROOT, hfoto, no_pad_tokenizer, refused, word_corpus

    base = tmp_path / "base"
    tiny_model("llama", num_hidden_layers=2, intermediate_size=64).save_pretrained(base)
    no_pad_tokenizer(base)
    (base / "README.md").write_text("---\nlicense: mit\nbase_model: org/original-model\n---\n# base\n")
    corpus = word_corpus(tmp_path / "words.txt", 400)
    job = ["prune", ROOT / "configs" / "qfa_quickstart.yaml", "--model_name_or_path", base, "--text_source", "null",
           "--train_files", corpus, "--block_size", "16", "--max_steps", "8", "--per_device_train_batch_size", "4",
           "--logging_steps", "4", "--qfa_group_size", "8", "--qfa_calibration_batches", "2",
           "--target_sparsity", "0.25", "--pruning_layout", "uniform", "--start_pruning_step", "0.25",
           "--pruning_steps", "0.5", "--pruning_periods", "2", "--ffn_multiple", "8", "--replay_fraction", "0.25",
           "--output_dir", tmp_path / "run"]
    proc = hfoto(*job, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "uniform 2-bit" in proc.stdout and "qfa-search" in proc.stdout
    run = tmp_path / "run" / "qfa_run"
    assert "budget must be" in refused(capsys, "qfa-search", run, "--budget", "lots")
    assert "--holdout is the share" in refused(capsys, "qfa-search", run, "--budget", "3.0", "--holdout", "1.5")
    proc = hfoto("qfa-search", run, "--budget", "3.0", "--samples", "4", "--refine", "2", "--out",
                 tmp_path / "export", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "chosen" in proc.stdout and "uniform 4-bit" in proc.stdout and "random allocations" in proc.stdout
    got = _reload_without_hf_oto({"x": str(tmp_path / "export")}, tmp_path)
    before = json.loads((base / "config.json").read_text())
    heads = [before["num_attention_heads"], before["num_key_value_heads"]]
    fewer_heads = any(a < b for a, b in zip(got["x.heads"].tolist(), heads, strict=True))
    assert int(got["x.intermediate"]) < 64 or fewer_heads  # pruned: FFN channels, or heads and kv groups
    manifest = json.loads((tmp_path / "export" / "qfa_manifest.json").read_text())
    assert manifest["average_bits"] <= 3.0 + 1e-9
    assert manifest["replay_fraction"] == 0.25  # what the run trained on reaches the export
    assert "25% of the run's training draws were text the source model sampled itself" in \
        (tmp_path / "export" / "README.md").read_text()
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "export" / "README.md").data  # the source's provenance reaches the export
    assert (card.base_model, card.license) == ("org/original-model", "mit") and card.eval_results
    again = refused(capsys, "qfa-search", run, "--budget", "3.0", "--out", tmp_path / "export")
    assert "is not empty" in again  # an existing export is not replaced without --overwrite


def test_qfa_under_accelerate_ddp_moves_only_sampled_adapters(tmp_path):
    from jobs import ROOT, no_pad_tokenizer, word_corpus

    base = tmp_path / "base"
    tiny_model("llama", num_hidden_layers=2, intermediate_size=64).save_pretrained(base)
    no_pad_tokenizer(base)
    corpus = word_corpus(tmp_path / "words.txt", 400)
    # A long triangular period keeps the first 8 steps' widths at (almost always) 2 bits; take a seed
    # whose draws never reach 4 bits, so under DDP the 4-bit adapters must come out as they went in.
    seed = next(s for s in range(100) if all(
        set(BitSampler(QFAConfig(bits=(2, 4), schedule="triangular", seed=s), 2, 1000).sample(t)) == {2}
        for t in range(8)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", "0",
           str(ROOT / "scripts" / "prune_finetune.py"), str(ROOT / "configs" / "qfa_quickstart.yaml"),
           "--model_name_or_path", str(base), "--text_source", "null", "--train_files", str(corpus),
           "--block_size", "16", "--max_steps", "8", "--per_device_train_batch_size", "4", "--logging_steps", "4",
           "--qfa_group_size", "16", "--qfa_quantizer", "rtn", "--qfa_bits", "[2, 4]",
           "--qfa_schedule", "triangular", "--qfa_period", "1000", "--qfa_seed", str(seed),
           "--output_dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("QFA run (for qfa-search)") == 1  # rank 0 saves and reports once
    state = load_file(tmp_path / "run" / "qfa_run" / "qfa_state.safetensors")
    four = [v for k, v in state.items() if k.endswith("lora_B.4")]
    two = [v for k, v in state.items() if k.endswith("lora_B.2")]
    assert four and all((v == 0).all() for v in four)  # never sampled: untouched (B starts at zero)
    assert any((v != 0).any() for v in two)  # sampled: trained
    shared = [v for k, v in state.items() if k.endswith("lora_B.shared")]  # the default shared adapter
    assert shared and any((v != 0).any() for v in shared)  # trained on every step


def test_gptq_holds_one_decoder_layers_hessians_at_a_time(monkeypatch):
    """Every Hessian alive while GPTQ quantizes a weight belongs to that weight's decoder layer."""
    import gc
    import weakref

    import hf_oto.quant.prepare as prep

    alive: list[tuple[int, weakref.ref]] = []
    seen: list[set[int]] = []
    real = prep.gptq

    def watching(weight, hessian, bits, group_size):
        layer = next(i for n, i, m in targets if m.weight is weight)
        if not any(h() is hessian for _, h in alive):
            alive.append((layer, weakref.ref(hessian)))
        gc.collect()
        seen.append({i for i, h in alive if h() is not None} | {layer})
        return real(weight, hessian, bits, group_size)

    model = tiny_model("llama", num_hidden_layers=3, intermediate_size=64)
    config = QFAConfig(bits=(2, 4), quantizer="gptq", group_size=16)
    targets = prep.check_targets(model, config)
    monkeypatch.setattr(prep, "gptq", watching)
    prepare_qfa(model, config, [{"input_ids": IDS}])
    assert len(seen) == 2 * len(targets) and {i for s in seen for i in s} == {0, 1, 2}
    assert all(len(s) == 1 for s in seen)


def test_layer_by_layer_calibration_equals_one_pass_over_the_whole_model():
    """The per-layer replay sees exactly the inputs a plain forward pass gives each target."""
    from hf_oto.quant.prepare import check_targets, layer_hessians

    model = tiny_model("gemma2", num_hidden_layers=3, sliding_window=4)  # sliding and full layers alternate
    config = QFAConfig(bits=(4,), quantizer="gptq", group_size=16)
    targets = check_targets(model, config)
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_m, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = x.T @ x / x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, _, m in targets]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    got = {n: h for _, per_layer in layer_hessians(model, targets, [{"input_ids": ids}]) for n, h in per_layer.items()}
    assert got.keys() == sums.keys()
    for name in sums:
        torch.testing.assert_close(got[name], sums[name], rtol=1e-5, atol=1e-6)
