"""Measured pricing: each kind of group is priced by the loss its removal measures, not by the criterion's units."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from compat_setup import Tokens, trainer_args
from tiny import tiny_model

from hf_oto import discover_groups, oneshot_prune, zero_groups
from hf_oto.errors import ConfigError
from hf_oto.optim import HESSO, HESSOConfig
from hf_oto.optim.budget import BudgetRules, Plan, build_items, select
from hf_oto.optim.oneshot import batch_loss
from hf_oto.optim.pricing import price_kinds, zeroing_probe
from hf_oto.trainer import HFOTOTrainer
from hf_oto.trainer.resume import CHECKPOINT_SETTINGS, changed_pruning_settings

IDS = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(0))


def _model_and_space():
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8).eval()
    return model, discover_groups(model)


def _kinds(space) -> dict[str, torch.Tensor]:
    out = {}
    for k, gs in enumerate(space.sets):
        flags = out.setdefault(gs.kind, torch.zeros(len(space), dtype=torch.bool))
        off = space.set_offset(k)
        flags[off:off + gs.count] = True
    return out


def test_the_probe_sees_the_groups_zeroed_and_leaves_the_weights_bit_for_bit():
    model, space = _model_and_space()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = batch_loss(model, [{"input_ids": IDS}])
    probe = zeroing_probe(dict(model.named_parameters()), space, loss)
    flagged = torch.zeros(len(space), dtype=torch.bool)
    flagged[[0, 5, len(space) - 1]] = True
    seen = probe(flagged)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    zeroed = copy.deepcopy(model)
    zero_groups(zeroed, space, [space[i].name for i in torch.nonzero(flagged).flatten().tolist()])
    assert seen == pytest.approx(batch_loss(zeroed, [{"input_ids": IDS}])(), abs=1e-6)
    assert probe(torch.zeros(len(space), dtype=torch.bool)) == pytest.approx(loss(), abs=0)


def test_a_kind_the_criterion_underprices_is_priced_by_its_measured_loss():
    """The scores call kv groups nearly free; the probe says removing one costs 100x an FFN chunk of equal size."""
    model, space = _model_and_space()
    kinds = _kinds(space)
    scores = torch.where(kinds["kv_group"], 0.01, 1.0)

    def probe(groups: torch.Tensor) -> float:  # a stand-in loss: kv groups are the expensive kind
        kv, ffn = float((groups & kinds["kv_group"]).sum()), float((groups & kinds["ffn_channel"]).sum())
        return 2.0 + 1.0 * kv + 0.01 * ffn

    rules = BudgetRules(selection="per_param", tolerance=0.05)
    target = 5120  # ~28%: reachable by FFN chunks and a query slot alone (the tiny model's steps are coarse)
    none = torch.zeros(len(space), dtype=torch.bool)
    priced, trials = price_kinds(space, scores, none, target, probe, rules)
    by_kind = {t.kind: t for t in trials}
    assert by_kind["kv_group"].measured == pytest.approx(float(2 * 1.0))  # one kv group in each of 2 layers
    ffn = by_kind["ffn_channel"]
    assert ffn.measured == pytest.approx(0.01 * ffn.groups)
    assert by_kind["query_head"].measured == 0.0  # free by the stand-in: priced near zero, not at zero
    assert 0 < by_kind["query_head"].factor * by_kind["query_head"].predicted < 1e-4
    for t in (by_kind["kv_group"], ffn):  # the tried groups' priced scores add up to the measured loss increase
        assert t.predicted * t.factor == pytest.approx(t.measured, rel=1e-5)

    def plan(s):
        p = Plan(space)
        select(p, build_items(space, s, p, rules), target, 0.05)
        return p.mask()

    assert bool((plan(scores) & kinds["kv_group"]).any())  # the criterion's units: kv groups go first
    assert not bool((plan(priced) & kinds["kv_group"]).any())  # measured: FFN channels pay instead


def test_oneshot_prune_with_a_probe_records_one_trial_per_kind_and_meets_the_target():
    model, space = _model_and_space()
    scores = torch.ones(len(space))
    prices = []
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = oneshot_prune(model, space, scores, target_params=5120, rules=BudgetRules(tolerance=0.05),
                         probe=batch_loss(model, [{"input_ids": IDS}]), prices=prices)
    assert {p.kind for p in prices} == {gs.kind for gs in space.sets if gs.prunable}
    ffn_step = 2 * 8 * 96  # the finest step: 8 channels of 96 parameters in both layers
    short = 5120 - plan.pruned_params()
    assert abs(short) <= 0.05 * 5120 or 0 < short <= ffn_step / 2  # the planner's rule (budget.select)
    gone = {space[i].name for i in torch.nonzero(plan.mask()).flatten().tolist()}
    reference = copy.deepcopy(model)
    reference.load_state_dict(before)
    zero_groups(reference, space, sorted(gone))  # the trials left no trace: only the plan's groups are zeroed
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference.state_dict()[k]), k


def test_measured_pricing_without_a_probe_is_refused():
    model, space = _model_and_space()
    with pytest.raises(ConfigError, match="pricing 'measured' needs a probe"):
        HESSO(model, space, config=HESSOConfig(target_sparsity=0.3, pricing="measured"))
    with pytest.raises(ConfigError, match="pricing must be one of"):
        HESSOConfig(pricing="exact")


def _args(tmp_path, **kw):
    return trainer_args(tmp_path / "run", **kw)


def test_the_trainer_prices_by_default_at_every_period_start_and_records_the_trials(tmp_path):
    model = tiny_model("llama")
    trainer = HFOTOTrainer(model=model, args=_args(tmp_path), train_dataset=Tokens())
    trainer.train()
    h = trainer.hesso
    assert h.config.pricing == "measured"  # pruning_pricing "auto"
    assert [p["period"] for p in h.prices] == [0, 1, 2]
    assert all(t["measured"] == t["measured"] and t["groups"] > 0 for p in h.prices for t in p["kinds"])
    assert list(h.record().prices) == h.prices  # the manifest and the card read record()
    saliency = HFOTOTrainer(model=tiny_model("llama"), args=_args(tmp_path / "s", pruning_pricing="saliency"),
                            train_dataset=Tokens())
    saliency.train()
    assert saliency.hesso.prices == [] and "prices" not in saliency.hesso.record().to_dict()


def test_a_checkpoint_from_before_pricing_resumes_with_saliency_pricing_and_explicit_measured_is_a_change(tmp_path):
    ckpt = tmp_path / "checkpoint-5"
    ckpt.mkdir()
    old = _args(tmp_path).pruning_settings()
    old.pop("pruning_pricing")
    (ckpt / CHECKPOINT_SETTINGS).write_text(json.dumps(old, default=str))
    assert changed_pruning_settings(ckpt, _args(tmp_path)) == {}
    assert changed_pruning_settings(ckpt, _args(tmp_path, pruning_pricing="measured")) == {
        "pruning_pricing": ("saliency", "measured")}


def test_under_gradient_accumulation_the_probe_is_the_mean_over_the_steps_micro_batches(tmp_path):
    trainer = HFOTOTrainer(model=tiny_model("llama"), train_dataset=Tokens(),
                           args=_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2))
    seen: dict[int, list[torch.Tensor]] = {}  # global step -> its micro-batches' input_ids
    step, probe, calls = trainer.training_step, trainer._probe_loss, []

    def training_step(model, inputs, *args, **kwargs):
        seen.setdefault(trainer.state.global_step, []).append(inputs["input_ids"].clone())
        return step(model, inputs, *args, **kwargs)

    @torch.no_grad()
    def recorded() -> float:
        loss, model = probe(), trainer.model
        model.eval()
        calls.append((loss, [float(model(input_ids=i, labels=i).loss) for i in seen[trainer.state.global_step]]))
        model.train()
        return loss

    trainer.training_step, trainer._probe_loss = training_step, recorded
    trainer.train()
    assert calls and all(len(each) == 2 for _, each in calls)
    for loss, each in calls:
        assert loss == pytest.approx(sum(each) / 2, abs=1e-5)
    assert any(abs(each[0] - each[1]) > 1e-3 for _, each in calls)  # the last micro-batch alone would differ
