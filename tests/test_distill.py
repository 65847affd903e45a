"""Distillation while pruning: a frozen dense teacher, its KL term, and what it must never do."""

from __future__ import annotations

import pytest
import torch
from test_trainer import Tokens, _args
from tiny import ARCHS, ENCODERS, logits, tiny_model

from hf_oto.errors import ConfigError
from hf_oto.trainer import HFOTOTrainer
from hf_oto.trainer.distill import kl_sum, make_teacher, teacher_dtype, token_mask


def test_teacher_gets_no_gradient_and_does_not_change(tmp_path):
    model = tiny_model("llama", num_hidden_layers=2, intermediate_size=64)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = HFOTOTrainer(model=model, args=_args(tmp_path, distill=True, distill_hidden_weight=0.1),
                           train_dataset=Tokens())
    teacher = trainer.teacher
    assert teacher is not model and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    trainer.train()
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, start[name]), name  # the dense starting model, unchanged
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())  # the student did train
    assert trainer.hesso.metrics()["pruned_params"] > 0
    logged = [h for h in trainer.state.log_history if "distill/kl" in h]
    assert logged and logged[-1]["distill/kl"] > 0 and logged[-1]["distill/hidden"] > 0
    assert logged[-1]["distill/teacher_mib"] == pytest.approx(trainer.teacher_bytes / 2**20)
    assert trainer.teacher_bytes >= sum(p.numel() * p.element_size() for p in model.parameters())


def test_kl_term_is_zero_for_an_identical_student_and_positive_otherwise(tmp_path):
    model = tiny_model("llama", num_hidden_layers=2)
    trainer = HFOTOTrainer(model=model, args=_args(tmp_path, distill=True, distill_weight=1.0), train_dataset=Tokens())
    batch = {k: torch.stack([Tokens()[i][k] for i in range(4)]) for k in ("input_ids", "labels")}
    model.train()
    assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    assert trainer.compute_loss(model, dict(batch)).item() > 1e-4


def test_kl_counts_only_labelled_positions():
    student, teacher = torch.randn(1, 5, 7), torch.randn(1, 5, 7)
    labels = torch.tensor([[1, 2, -100, -100, 3]])  # positions 0 and 3 predict labelled tokens
    mask = token_mask({"input_ids": labels.clamp_min(0)}, labels)
    assert mask.tolist() == [[True, False, False, True]]
    by_hand = sum(torch.nn.functional.kl_div(student[0, i].log_softmax(-1), teacher[0, i].log_softmax(-1),
                                             log_target=True, reduction="sum") for i in (0, 3))
    assert kl_sum(student, teacher, mask, 1.0).item() == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_kl_value_and_gradient_match_the_definition(temperature, masked):
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 9, 50) * 3, torch.randn(2, 9, 50) * 3
    mask = torch.rand(2, 8) > 0.4 if masked else torch.ones(2, 8, dtype=torch.bool)
    s = student.clone().requires_grad_()
    kl_sum(s, teacher, mask, temperature).backward()
    ref = student.double().requires_grad_()
    by_hand = sum(torch.nn.functional.kl_div((ref[i, j] / temperature).log_softmax(-1),
                                             (teacher[i, j].double() / temperature).log_softmax(-1),
                                             log_target=True, reduction="sum")
                  for i in range(2) for j in range(8) if mask[i, j])
    by_hand.backward()
    assert kl_sum(student, teacher, mask, temperature).item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert (s.grad.double() - ref.grad).abs().max() <= 1e-6
    assert s.grad[:, -1].abs().max() == 0  # the last position predicts nothing


def test_lora_teacher_is_the_plain_base_model(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_model("llama", num_hidden_layers=2, intermediate_size=64)
    ids = torch.randint(3, 64, (2, 9))
    expected = logits(base, ids)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj",
                                                                             "up_proj", "down_proj"]))
    trainer = HFOTOTrainer(model=model, args=_args(tmp_path, distill=True, distill_teacher_device="cpu"),
                           train_dataset=Tokens())
    assert not any("lora" in n for n, _ in trainer.teacher.named_parameters())
    assert (logits(trainer.teacher, ids) - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("setting, message", [
    ({"distill_weight": 1.5}, "distill_weight must be in [0, 1]"),
    ({"distill_temperature": 0.0}, "distill_temperature must be positive"),
    ({"distill_teacher_device": "gpu"}, "distill_teacher_device must be one of"),
    ({"distill_teacher_dtype": "int8"}, "distill_teacher_dtype must be one of"),
])
def test_bad_distill_settings_stop_before_training(tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        HFOTOTrainer(model=tiny_model("llama"), args=_args(tmp_path, distill=True, **setting), train_dataset=Tokens())


@pytest.mark.parametrize("arch", sorted(set(ARCHS) - ENCODERS))
def test_a_bfloat16_teacher_holds_half_precision_weights_and_agrees_with_the_model(arch):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 64, (2, 9))
    expected = logits(model, ids)
    teacher = make_teacher(model, "cpu", "bfloat16")
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    buffers = dict(model.named_buffers())
    for name, b in teacher.named_buffers():  # rotary frequencies and the like stay as they were
        assert b.dtype == buffers[name].dtype and torch.equal(b, buffers[name]), name
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is not touched
    got = logits(teacher, ids)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # bfloat16 rounding (which can flip an MoE router's choice for a token), not a different model
    assert (got - expected).norm() <= 0.05 * expected.norm()  # up to 0.027 measured (olmoe)


def test_a_bfloat16_teacher_trains_the_student_with_half_the_teacher_memory(tmp_path):
    model = tiny_model("llama", num_hidden_layers=2, intermediate_size=64)
    full = HFOTOTrainer(model=model, args=_args(tmp_path / "a", distill=True), train_dataset=Tokens())
    half = HFOTOTrainer(model=model, args=_args(tmp_path / "b", distill=True, distill_teacher_dtype="bfloat16"),
                        train_dataset=Tokens())
    assert half.teacher_bytes * 2 == pytest.approx(full.teacher_bytes, rel=0.02)
    half.train()
    logged = [h for h in half.state.log_history if "distill/kl" in h]
    assert logged and 0 < logged[-1]["distill/kl"] < float("inf")
    assert {p.dtype for p in half.model.parameters()} == {torch.float32}  # only the teacher is in bfloat16
    assert half.args.pruning_settings()["distill_teacher_dtype"] == "bfloat16"  # recorded with the run


def test_auto_teacher_dtype_is_bfloat16_only_where_the_cpu_multiplies_it_fast(tmp_path, monkeypatch):
    import hf_oto.env as env

    for ratio, expected in ((0.5, "bfloat16"), (0.9, "same"), (9.0, "same")):
        monkeypatch.setattr(env, "cpu_bf16_slowdown", lambda ratio=ratio: ratio)
        assert teacher_dtype("auto", "cpu") == expected
        assert teacher_dtype("float16", "cpu") == "float16" and teacher_dtype("same", "cpu") == "same"
    monkeypatch.setattr(env, "cpu_bf16_slowdown", lambda: 0.5)
    trainer = HFOTOTrainer(model=tiny_model("llama"), args=_args(tmp_path, distill=True, distill_teacher_dtype="auto"),
                           train_dataset=Tokens())
    assert {p.dtype for p in trainer.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
