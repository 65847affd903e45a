"""Tiny random models of every supported architecture, built in-process from configs."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
           moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2)
ARCHS = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2),
    "qwen2": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=8),
    "gemma": dict(num_key_value_heads=1, head_dim=8),
    "gemma2": dict(num_key_value_heads=2, head_dim=8),
    "phi3": dict(num_key_value_heads=2),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_inner=48),
    "gpt_neox": dict(),
    "opt": dict(ffn_dim=48, word_embed_proj_dim=32),
    "mixtral": dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24),
    "bert": dict(),
    # Found by an architecture sweep: heads unprunable (norm over all heads, constant-index k/v), FFN prunable.
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2, ffn_hidden_size=48),
    "falcon_mqa": dict(model_type="falcon", multi_query=True, ffn_hidden_size=48),
    "olmo2": dict(num_key_value_heads=2),
    "olmoe": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16),
    # DeepSeek: multi-head latent attention (MLA) and fine-grained MoE with shared experts, with and
    # without the low-rank query (q_lora_rank), with and without dense first layers.
    "deepseek_v3": dict(model_type="deepseek_v3", **MLA, q_lora_rank=24, n_shared_experts=1, first_k_dense_replace=1,
                        n_group=1, topk_group=1),
    "deepseek_v3_q": dict(model_type="deepseek_v3", **MLA, q_lora_rank=None, n_shared_experts=1,
                          first_k_dense_replace=0, n_group=1, topk_group=1),
    "deepseek_v2": dict(model_type="deepseek_v2", **MLA, q_lora_rank=None, n_shared_experts=2, first_k_dense_replace=1),
    "deepseek_v2_lora": dict(model_type="deepseek_v2", **MLA, q_lora_rank=24, n_shared_experts=2,
                             first_k_dense_replace=0),
    # relu^2 (aten.square) FFNs
    "arcee": dict(num_key_value_heads=2),
    "nemotron": dict(num_key_value_heads=2, head_dim=8),
}
ENCODERS = {"bert"}


def tiny_config(arch: str, **overrides):
    kw = dict(COMMON)
    kw.update(ARCHS[arch])
    kw.update(overrides)
    return AutoConfig.for_model(kw.pop("model_type", arch), **kw)


def tiny_model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    cls = AutoModel if arch in ENCODERS else AutoModelForCausalLM
    model = cls.from_config(cfg).eval()
    # Random init leaves biases and norms at 0/1; perturb them so every slice matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids)[0].float()


def export_layouts(model, space, root, arch: str, ids: torch.Tensor, layouts) -> dict[str, dict]:
    """Construct and save the zeroed ``model`` in each layout: "arch-layout" -> the case the round-trip
    tests read (model, subnet, sub, manifest, full = the zeroed model's logits on ``ids``, dir)."""
    from hf_oto import construct_subnet, save_pruned

    full = logits(model, ids)
    cases = {}
    for layout in layouts:
        sub = construct_subnet(model, space, layout=layout)
        out = save_pruned(sub, root / f"{arch}-{layout}", source=f"tiny-{arch}")
        cases[f"{arch}-{layout}"] = dict(model=model, subnet=sub, sub=sub.model, manifest=sub.manifest, full=full,
                                         dir=out)
    return cases


def reload_cases(cases: dict[str, dict], ids: torch.Tensor, workdir) -> dict[str, torch.Tensor]:
    """Logits of every case of :func:`export_layouts` on ``ids``, reloaded in one interpreter that cannot
    import hf_oto (with the shipped code where the export has some)."""
    import json

    dirs = {key: {"dir": str(c["dir"]), "remote": "auto_map" in json.loads((c["dir"] / "config.json").read_text())}
            for key, c in cases.items()}
    return reload_logits(dirs, ids, workdir)


def make_hesso(model, space, base_optimizer=None, *, cric=None, base_kwargs=None, param_groups=None, **config):
    """HESSO from flat keyword settings (the tests' shorthand); layout defaults to "global" here, and the
    criterion to HESSO's own saliency, ranked by mean score (what these tests were written against)."""
    from hf_oto.optim import HESSO, HESSOConfig

    config.setdefault("layout", "global")
    config.setdefault("criterion", "hesso")
    config.setdefault("selection", "saliency")
    return HESSO(model, space, base_optimizer or torch.optim.AdamW, HESSOConfig(**config), cric=cric,
                 base_kwargs=base_kwargs, param_groups=param_groups)


RELOAD = """
import json, torch, transformers
from safetensors.torch import save_file
jobs = json.loads(sys.argv[1])
ids = torch.tensor(jobs["ids"])
out = {}
for key, job in jobs["dirs"].items():
    cls = getattr(transformers, job.get("auto", "AutoModelForCausalLM"))
    model = cls.from_pretrained(job["dir"], trust_remote_code=job.get("remote", False)).eval()
    with torch.no_grad():
        out[key] = model(input_ids=ids)[0].float().contiguous()
assert "hf_oto" not in sys.modules
save_file(out, jobs["result"])
"""


def reload_logits(dirs: dict[str, dict], ids: torch.Tensor, workdir) -> dict[str, torch.Tensor]:
    """Logits of every export in ``dirs`` (key -> {"dir", "auto", "remote"}), loaded in one fresh
    interpreter that cannot import hf_oto."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from hf_oto.export.verify import NO_HF_OTO_PRELUDE, child_env

    result = Path(workdir) / "reloaded.safetensors"
    jobs = {"ids": ids.tolist(), "result": str(result), "dirs": dirs}
    subprocess.run([sys.executable, "-c", NO_HF_OTO_PRELUDE + RELOAD, json.dumps(jobs)], check=True,
                   env=child_env(), cwd=workdir)
    return load_file(result)
