"""The central paths in bf16 and fp16 (dtype mismatches show on a CPU) and on every device present.

The ``device`` parameter (tests/conftest.py) runs each test on the CPU and, when a GPU is present, on
CUDA. The meta device stands in for a second device on a CPU-only machine: a tensor created on the CPU
that meets a weight on another device fails there the way it would on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from test_trainer import Tokens, _args
from tiny import make_hesso, tiny_model
from transformers import AutoModelForCausalLM

from hf_oto import construct_subnet, discover_groups
from hf_oto.errors import ConfigError
from hf_oto.groups import group_is_zero
from hf_oto.optim import CRICConfig
from hf_oto.quant import QFAConfig, prepare_qfa, qfa_layers
from hf_oto.quant.quantize import gptq, rtn
from hf_oto.trainer import HFOTOTrainer

DTYPES = [torch.bfloat16, torch.float16]
# AdamW's default eps (1e-8) is 0 in float16, so plain AdamW turns a float16 model to NaN in one step
# (hf-oto or not); the HESSO tests give the base optimizer an eps float16 can hold.
BASE = {"lr": 1e-3, "eps": 1e-4}
IDS = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(0))


def _model(dtype, device, **kw):
    return tiny_model("llama", **kw).to(device=device, dtype=dtype)


def _train(model, opt, steps, ids):
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if hasattr(opt, "observe_loss"):
            opt.observe_loss(loss)
        opt.step()


def _same_dtype_and_device(model, dtype, device):
    for name, p in model.named_parameters():
        assert p.dtype == dtype and p.device.type == device, (name, p.dtype, p.device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("criterion", ["hesso", "taylor", "fisher"])
def test_hesso_prunes_exactly_in_low_precision(criterion, dtype, device):
    model = _model(dtype, device)
    space = discover_groups(model)
    opt = make_hesso(model, space, base_kwargs=BASE, target_sparsity=0.5, start_pruning_step=2,
                     pruning_steps=6, pruning_periods=2, criterion=criterion)
    _train(model, opt, 8, IDS.to(device))
    _same_dtype_and_device(model, dtype, device)
    zero = group_is_zero(model, space)
    assert torch.equal(zero, opt.pruned) and opt.pruned.any()
    assert opt.metrics()["pruned_param_fraction"] >= 0.5 - 0.05
    small = construct_subnet(model, space).model
    _same_dtype_and_device(small, dtype, device)
    with torch.no_grad():
        a, b = model(input_ids=IDS.to(device)).logits.float(), small(input_ids=IDS.to(device)).logits.float()
    assert torch.isfinite(a).all() and (a - b).abs().max() <= 0.05 * a.abs().max()  # rounding order only


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cric_trials_and_restores_in_low_precision(dtype, device):
    model = _model(dtype, device)
    space = discover_groups(model)
    cric = CRICConfig(sampling_steps=2, min_cycles=1, max_cycles=2)
    opt = make_hesso(model, space, base_kwargs=BASE, target_sparsity=0.4, start_pruning_step=2,
                     pruning_steps=4, pruning_periods=1, cric=cric, criterion="hesso", selection="saliency")
    _train(model, opt, 14, IDS.to(device))
    _same_dtype_and_device(model, dtype, device)
    assert torch.equal(group_is_zero(model, space), opt.pruned) and opt.pruned.any()


def test_gptq_returns_codes_and_scales_on_the_weights_device():
    """The Hessian may live elsewhere (it did on the CPU while the weight was on the GPU): GPTQ follows
    the weight. The meta device plays the GPU here: any CPU tensor GPTQ made would meet it and fail."""
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    hessian = x.T @ x / 256
    for weight in (torch.randn(16, 64, device="meta"), torch.randn(16, 64, dtype=torch.bfloat16)):
        q = gptq(weight, hessian, 3, 32)
        assert q.codes.device == weight.device and q.scales.device == weight.device
        assert q.codes.dtype == torch.int8 and q.scales.dtype == torch.float32
    q = rtn(torch.randn(16, 64, device="meta"), 3, 32)
    assert q.codes.device.type == "meta" and q.scales.device.type == "meta"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quantizer", ["gptq", "rtn"])
def test_qfa_quantizes_and_trains_a_low_precision_model(quantizer, dtype, device):
    model = _model(dtype, device, num_hidden_layers=2, intermediate_size=64)
    ids = IDS.to(device)
    calibration = [{"input_ids": ids}] if quantizer == "gptq" else None
    prepare_qfa(model, QFAConfig(bits=(2, 4), quantizer=quantizer, group_size=16), calibration)
    layers = qfa_layers(model)
    assert layers
    for _, _, m in layers:
        assert m.codes(2).device.type == device and m.lora_A["2"].device.type == device
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(m.lora_A["4"].grad is not None for _, _, m in layers)


def test_trainer_distills_prunes_and_exports_a_bf16_model(tmp_path, device):
    model = _model(torch.bfloat16, device, num_hidden_layers=2, intermediate_size=64)
    trainer = HFOTOTrainer(model=model, args=_args(tmp_path, distill=True, use_cpu=device == "cpu", max_steps=8),
                           train_dataset=Tokens())
    trainer.train()
    _same_dtype_and_device(model, torch.bfloat16, device)
    assert torch.isfinite(torch.cat([p.detach().float().flatten() for p in model.parameters()])).all()
    assert trainer.hesso.metrics()["pruned_params"] > 0
    kl = [h["distill/kl"] for h in trainer.state.log_history if "distill/kl" in h]
    assert kl and all(0 < v < float("inf") for v in kl)
    out = trainer.save_pruned_model(str(tmp_path / "pruned"), overwrite=True)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    assert reloaded.config.intermediate_size < 64 or reloaded.config.num_key_value_heads < 2


def test_trainer_with_float32_weights_and_bf16_autocast(tmp_path, device):
    model = _model(torch.float32, device, num_hidden_layers=2, intermediate_size=64)
    trainer = HFOTOTrainer(model=model, args=_args(tmp_path, bf16=True, distill=True, use_cpu=device == "cpu",
                                                   max_steps=8), train_dataset=Tokens())
    trainer.train()
    _same_dtype_and_device(model, torch.float32, device)
    zero = group_is_zero(model, trainer.pruning_space)
    assert torch.equal(zero, trainer.hesso.pruned) and zero.any()


def test_trainable_float16_weights_are_refused_before_training(tmp_path):
    model = _model(torch.float16, "cpu", num_hidden_layers=2, intermediate_size=64)
    with pytest.raises(ConfigError, match="float16 .* NaN"):
        HFOTOTrainer(model=model, args=_args(tmp_path), train_dataset=Tokens())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "wanda_sp"])
def test_oneshot_criteria_score_a_low_precision_model_like_float32(criterion, dtype, device):
    """Scores are summed in float32 whatever the weights' dtype: the ranking matches the float32 model's."""
    from hf_oto.optim.oneshot import oneshot_prune, oneshot_scores

    batches = [{"input_ids": IDS.to(device)}]
    ref = tiny_model("llama")
    space = discover_groups(ref)
    want = oneshot_scores(ref, space, criterion, [{"input_ids": IDS}])
    model = _model(dtype, device)
    got = oneshot_scores(model, space, criterion, batches)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.corrcoef(torch.stack([want, got]))[0, 1] > 0.95
    plan = oneshot_prune(model, space, got, target_sparsity=0.3)
    assert torch.equal(group_is_zero(model, space), plan.mask())


def test_packing_and_slicing_follow_the_codes_device():
    """The export's int32 packing and its kept-index slicing make their tensors on the codes' device."""
    from hf_oto.export.quantized import _slice, pack_int32
    from hf_oto.quant.quantize import QuantizedWeight

    codes = torch.zeros(4, 64, dtype=torch.int8, device="meta")
    assert pack_int32(codes, 3).device.type == "meta"
    q = QuantizedWeight(codes, torch.zeros(4, 2, device="meta"), 3, 32)
    kept = {0: torch.tensor([0, 2]), 1: torch.arange(32, 64)}
    sliced = _slice(q, kept, "w")
    assert sliced.codes.shape == (2, 32) and sliced.codes.device.type == "meta"
