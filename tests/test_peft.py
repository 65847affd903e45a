"""LoRA (peft) models: groups own the matching rows/columns of the adapter factors."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_model

from hf_oto import discover_groups, zero_groups
from hf_oto.groups import group_is_zero


def _lora_model():
    model = tiny_model("llama")
    cfg = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # peft starts B at zero; make every factor non-zero
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_()
    return peft_model


def test_names_match_the_plain_model():
    plain = discover_groups(tiny_model("llama"))
    lora = discover_groups(_lora_model())
    assert [g.name for g in plain] == [g.name for g in lora]
    assert plain.total_params == lora.total_params


def test_groups_own_lora_factors():
    model = _lora_model()
    space = discover_groups(model)
    kv = space[space.index_of("model.layers.1.self_attn.kv_group.0")]
    params = {p for p, _, _ in kv.slices}
    assert any("q_proj.lora_B" in p for p in params) and any("o_proj.lora_A" in p for p in params)
    assert any("q_proj.base_layer.weight" in p for p in params)
    ffn = space[space.index_of("model.layers.0.mlp.ffn_channel.5")]
    ffn_params = {p for p, _, _ in ffn.slices}
    assert any("up_proj.lora_B" in p for p in ffn_params) and any("down_proj.lora_A" in p for p in ffn_params)


def test_zeroing_a_group_zeroes_its_adapter_slices_and_nothing_else():
    model = _lora_model()
    space = discover_groups(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    name = "model.layers.0.mlp.ffn_channel.5"
    zero_groups(model, space, [name])
    assert bool(group_is_zero(model, space)[space.index_of(name)])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    owned = {p for p, _, _ in space[space.index_of(name)].slices}
    assert changed and changed <= owned
    lora_b = dict(model.named_parameters())[[p for p in owned if "up_proj.lora_B" in p][0]]
    assert torch.all(lora_b[5] == 0) and torch.any(lora_b[4] != 0)


def test_lora_saliency_uses_the_effective_weight():
    """Statistics of a LoRA model equal those of its merged twin: magnitude, and the update's terms."""
    import copy

    from hf_oto.optim.saliency import group_statistics, lora_factors

    model = _lora_model()
    space = discover_groups(model)
    params = dict(model.named_parameters())
    merged = copy.deepcopy(model).merge_and_unload()
    m_space = discover_groups(merged)
    m_params = dict(merged.named_parameters())
    lora = lora_factors(model)
    assert len(lora) == 2 * 6  # six target modules in each of two layers

    before = {n: p.detach().clone() for n, p in params.items() if "lora_" in n}
    with torch.no_grad():  # one "optimizer step" on the adapters only
        for n in before:
            params[n].add_(0.01 * torch.randn_like(params[n]))
    update = {n: params[n].detach() - before[n] for n in before}
    stats = group_statistics(params, space, update, lora)

    merged_after = copy.deepcopy(model).merge_and_unload()
    m_update = {n: p.detach() - m_params[n].detach() for n, p in merged_after.named_parameters()}
    expect = group_statistics(dict(merged_after.named_parameters()), m_space, m_update)
    for key in ("sq", "xu", "uu", "size"):
        torch.testing.assert_close(getattr(stats, key), getattr(expect, key), rtol=1e-4, atol=1e-5)
    assert float(stats.uu.sum()) > 0
