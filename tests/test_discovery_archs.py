"""Discovery on architectures users bring: every FFN is found or recorded with its real reason."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from hf_oto import DiscoveryError, discover_groups
from hf_oto.groups import trace as tr


class _Act(torch.nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act

    def forward(self, x):
        return self.act(x)


def test_every_transformers_activation_traces_to_known_elementwise_ops():
    """An activation whose ops are unknown would hide an FFN (relu2 -> aten.square did, on arcee/nemotron)."""
    from transformers.activations import ACT2CLS, ACT2FN

    unknown = {}
    for name in sorted(ACT2CLS):
        if name == "prelu":  # its weight may hold one value per channel: deliberately not element-wise
            continue
        ep = torch.export.export(_Act(ACT2FN[name]), (torch.randn(2, 8),), strict=False)
        ops = {n.target for n in ep.graph.nodes if n.op == "call_function"}
        missing = {str(o) for o in ops - tr.ELEMENTWISE_OPS - tr.SHAPE_OPS - tr.IGNORED}
        if missing:
            unknown[name] = sorted(missing)
    assert not unknown


@pytest.mark.parametrize("arch", ["arcee", "nemotron"])
def test_relu_squared_ffns_are_prunable(arch):
    space = discover_groups(tiny_model(arch))
    ffn = [s for s in space.sets if s.block == "mlp"]
    assert len(ffn) == 2 and all(s.prunable and s.kind == "ffn_channel" and s.count == 48 for s in ffn)


# Falcon's output projection is Linear(hidden_size, hidden_size) whatever the head count, so its heads
# cannot be saved smaller in the stock config. Which check says so first depends on the transformers
# version: up to 5.23 Falcon split q/k/v by hand (with constant-index k/v the trace cannot follow); from
# 5.25 it uses the shared attention code, the trace finds the kv groups, and the config check refuses.
FALCON_WIDTH = "input width stays 32 in the stock code"


@pytest.mark.parametrize("arch, ffn_kind, why", [
    ("falcon", "ffn_channel", ("mixes channels of several heads", FALCON_WIDTH)),
    ("falcon_mqa", "ffn_channel", ("do not form equal query groups", FALCON_WIDTH)),
    ("olmo2", "ffn_channel", ("mixes channels of several heads",)),  # q/k norms span all heads
    ("olmoe", "expert_channel", ("mixes channels of several heads",)),
])
def test_unprunable_heads_do_not_stop_the_ffn(arch, ffn_kind, why):
    space = discover_groups(tiny_model(arch))
    attn = [s for s in space.sets if s.block == "attention"]
    assert attn and all(not s.prunable and any(w in s.reason for w in why) for s in attn)
    ffn = [s for s in space.sets if s.block == "mlp"]
    assert ffn and all(s.prunable and s.kind == ffn_kind for s in ffn)


def test_an_unrecognised_ffn_is_recorded_with_its_reason_and_shown_by_inspect(tmp_path, capsys):
    model = tiny_model("llama", hidden_act="prelu")  # PReLU: not element-wise to hf-oto
    space = discover_groups(model)
    ffn = [s for s in space.sets if s.block == "mlp"]
    assert len(ffn) == 2 and all(not s.prunable for s in ffn)
    assert all("FFN not recognised" in s.reason and "aten.prelu" in s.reason for s in ffn)
    assert all(s.prunable for s in space.sets if s.block == "attention")
    from hf_oto.cli import main

    model.config.save_pretrained(tmp_path)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path)]) == 0
    assert "no: FFN not recognised" in capsys.readouterr().out


def test_a_layer_without_any_recognised_ffn_is_recorded(monkeypatch):
    """Before aten.square was known, arcee's layers had no FFN record at all; now such a layer gets one."""
    monkeypatch.setattr(tr, "ELEMENTWISE_OPS", tr.ELEMENTWISE_OPS - {torch.ops.aten.square.default})
    space = discover_groups(tiny_model("arcee"))
    ffn = [s for s in space.sets if s.block == "mlp"]
    assert len(ffn) == 2 and all(not s.prunable and "aten.square" in s.reason for s in ffn)


def test_unprunable_head_reasons_state_the_real_cause():
    helium = discover_groups(_helium())  # head_dim set explicitly; o_proj is Linear(hidden_size, hidden_size)
    attn = [s for s in helium.sets if s.block == "attention"]
    assert len(attn) == 4  # kv groups and query heads in each of 2 layers
    for s in attn:  # one reason, naming each layer's own module
        assert s.reason.startswith(f"model.layers.{s.layer}.self_attn.o_proj's input width stays 32")
        assert "derives head_dim" not in s.reason
    gpt2 = discover_groups(tiny_model("gpt2"))
    assert all("derives head_dim from hidden_size / num_attention_heads" in s.reason
               for s in gpt2.sets if s.block == "attention")


def _helium():
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("helium", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, intermediate_size=48)
    return AutoModelForCausalLM.from_config(cfg)


def test_a_config_that_contradicts_the_model_is_named_as_the_problem():
    model = tiny_model("gpt_neox")
    model.config.num_key_value_heads = 2  # GPT-NeoX does not read this field: its code builds 4 kv heads
    with pytest.raises(DiscoveryError) as err:
        discover_groups(model)
    message = str(err.value)
    assert "num_key_value_heads=2 (the model computes 4 kv heads)" in message
    assert "the config contradicts the model's own code" in message and "register_rule" not in message


def test_copied_layers_name_their_own_modules_in_their_reasons():
    """Identical layers copy the traced layer's groups; the recorded reason names the layer it is about."""
    space = discover_groups(tiny_model("olmoe", num_hidden_layers=3))
    attn = [s for s in space.sets if s.block == "attention"]
    assert len(attn) == 3
    assert all(s.reason.startswith(f"model.layers.{s.layer}.self_attn") for s in attn)


def test_a_model_of_the_same_class_and_config_is_traced_once(monkeypatch):
    """The trace of a meta twin is reused for the same class and config (the job's pre-flight, then its
    trainer), and taken again when the config differs; the spaces are those of a fresh trace."""
    import hf_oto.groups.discover as discover

    calls = []
    real = tr.trace_model
    monkeypatch.setattr(tr, "trace_model", lambda twin, causal: calls.append(twin.config.intermediate_size)
                        or real(twin, causal))
    monkeypatch.setattr(discover, "_TRACES", type(discover._TRACES)())  # an empty cache for this test
    first = discover_groups(tiny_model("llama", intermediate_size=48))
    again = discover_groups(tiny_model("llama", intermediate_size=48, seed=1))  # other weights, same structure
    other = discover_groups(tiny_model("llama", intermediate_size=40))
    assert calls == [48, 40]
    assert _described(again) == _described(first) and again.param_shapes == first.param_shapes
    monkeypatch.setattr(discover, "_TRACES", type(discover._TRACES)())
    fresh = discover_groups(tiny_model("llama", intermediate_size=48))
    assert calls == [48, 40, 48]
    assert _described(fresh) == _described(again)
    assert {s.count for s in other.sets if s.kind == "ffn_channel"} == {40}


def _described(space) -> list:
    return [(s.prefix, s.kind, s.count, s.prunable, s.reason,
             [(sl.param, sl.dim, sl.index.tolist()) for sl in s.slices]) for s in space.sets]
