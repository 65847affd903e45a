"""CRIC: the corrective cycle keeps an indispensable group that single-shot saliency would prune."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import make_hesso
from torch import nn

from hf_oto.groups.space import FFNInfo, GroupSet, PruningSpace, SliceSpec
from hf_oto.optim import CRICConfig, SaliencyWeights

D_IN, HIDDEN, D_OUT = 8, 8, 4
INDISPENSABLE = 0  # tiny weights on a large-scale input: low magnitude, real effect
DECOYS = [5, 6, 7]  # larger weights on inputs that are always zero: no effect at all


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D_IN, HIDDEN, bias=False)
        self.fc2 = nn.Linear(HIDDEN, D_OUT, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _toy():
    torch.manual_seed(0)
    m = Toy()
    with torch.no_grad():
        m.fc1.weight.zero_()
        m.fc2.weight.zero_()
        for h in range(1, 5):  # ordinary important channels on inputs 1..4
            m.fc1.weight[h, h] = 1.0
            m.fc2.weight[:, h] = 0.8
        m.fc1.weight[INDISPENSABLE, 0] = 0.05
        m.fc2.weight[:, INDISPENSABLE] = 0.05
        for h in DECOYS:
            m.fc1.weight[h, h] = 0.3
            m.fc2.weight[:, h] = 0.3
    return m


def _space(model: Toy) -> PruningSpace:
    idx = torch.arange(HIDDEN).view(-1, 1)
    gs = GroupSet("toy", "ffn_channel", 0, "mlp", [SliceSpec("fc1.weight", 0, idx), SliceSpec("fc2.weight", 1, idx)],
                  D_IN + D_OUT, info=FFNInfo(width=HIDDEN, producers=("fc1.weight",), consumer="fc2.weight"))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return PruningSpace("toy", [gs], shapes, {}, "", 1, sum(p.numel() for p in model.parameters()))


def _batch(gen):
    x = torch.randn(64, D_IN, generator=gen)
    x[:, 0] *= 20.0
    x[:, 5:] = 0.0
    teacher = _toy()
    with torch.no_grad():
        y = teacher(x) + 0.02 * torch.randn(64, D_OUT, generator=gen)
    return x, y


def _hesso(model, cric):
    # SGD with lr 0: weights change only through HESSO/CRIC, so the loss isolates what the trials do.
    return make_hesso(model, _space(model), base_optimizer=torch.optim.SGD, base_kwargs={"lr": 0.0},
                 target_params=3 * (D_IN + D_OUT), start_pruning_step=2, pruning_steps=4, pruning_periods=1,
                 ffn_multiple=1, weights=SaliencyWeights(1, 0, 0, 0), cric=cric)


def _run(cric: CRICConfig | None, steps: int, model=None, opt=None):
    model = model or _toy()
    opt = opt or _hesso(model, cric)
    x, y = _batch(torch.Generator().manual_seed(1))  # one fixed batch: a noise-free loss signal
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.observe_loss(loss)
        opt.step()
    return model, opt


CRIC = CRICConfig(sampling_steps=6, min_cycles=3, max_cycles=5, loss_weight=1.0)


def test_single_shot_saliency_prunes_the_indispensable_channel():
    _, opt = _run(None, 8)
    assert bool(opt.pruned[INDISPENSABLE])


def test_cric_keeps_it_and_prunes_the_decoys():
    model, opt = _run(CRIC, 2 + 5 * 6 + 4)
    assert opt.cric.state.done and opt.prune_start is not None
    assert sorted(torch.nonzero(opt.pruned).flatten().tolist()) == DECOYS
    assert torch.all(model.fc1.weight[DECOYS] == 0) and model.fc1.weight[INDISPENSABLE, 0] != 0
    assert opt.cric.state.harm_sum[INDISPENSABLE] > 0


def test_cric_snapshots_only_the_trial_slices():
    _, opt = _run(CRIC, 2 + 1)  # inside the first cycle
    snap = opt.cric.state.snapshot
    assert snap and sum(v.numel() for v in snap.values()) == int(opt.cric.state.trial.sum()) * (D_IN + D_OUT)


def test_cric_needs_the_loss():
    model = _toy()
    opt = make_hesso(model, _space(model), target_params=D_IN + D_OUT, start_pruning_step=0, pruning_steps=2,
                pruning_periods=1, ffn_multiple=1, cric=CRIC)
    nn.functional.mse_loss(model(torch.randn(4, D_IN)), torch.zeros(4, D_OUT)).backward()
    with pytest.raises(RuntimeError, match="observe_loss"):
        opt.step()


def test_cric_resume_is_bit_exact_mid_cycle():
    ref, ref_opt = _run(CRIC, 30)
    first, opt = _run(CRIC, 11)  # inside the second cycle
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())
    model = _toy()
    model.load_state_dict(saved_model)
    opt2 = _hesso(model, CRIC)
    opt2.load_state_dict(saved_opt)
    _run(CRIC, 19, model=model, opt=opt2)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert torch.equal(ref_opt.cric.state.harm_sum, opt2.cric.state.harm_sum)
    assert torch.equal(ref_opt.pruned, opt2.pruned)


def test_invalid_cric_settings_are_rejected():
    model = _toy()
    with pytest.raises(ValueError, match="sampling_steps"):
        make_hesso(model, _space(model), target_params=12, pruning_steps=2, pruning_periods=1, ffn_multiple=1,
              cric=CRICConfig(sampling_steps=1))


def test_cric_with_the_per_param_knapsack_is_refused():
    """CRIC protects only what it trialled; the knapsack would then remove the untrialled groups."""
    model = _toy()
    with pytest.raises(ValueError, match="CRIC does not combine with selection 'per_param'"):
        make_hesso(model, _space(model), target_params=12, pruning_steps=2, pruning_periods=1, ffn_multiple=1,
                   selection="per_param", cric=CRIC)
