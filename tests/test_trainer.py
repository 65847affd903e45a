"""HFOTOTrainer: prune while training, log metrics, resume exactly, export a loadable repo."""

from __future__ import annotations

import pytest
import torch
from tiny import logits, tiny_model
from transformers import AutoModelForCausalLM

from hf_oto.errors import ConfigError
from hf_oto.trainer import HFOTOTrainer, HFOTOTrainingArguments


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=12):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 64, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-3,
                report_to=[], use_cpu=True, logging_steps=4, save_strategy="no", seed=0, data_seed=0,
                target_sparsity=0.5, start_pruning_step=0.25, pruning_steps=0.5, pruning_periods=3,
                pruning_layout="uniform", dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return HFOTOTrainingArguments(**base)


def test_prune_while_training_and_export(tmp_path):
    model = tiny_model("llama", num_hidden_layers=2, intermediate_size=64)
    trainer = HFOTOTrainer(model=model, args=_args(tmp_path), train_dataset=Tokens())
    trainer.train()
    assert (trainer.hesso.config.criterion, trainer.hesso.config.selection) == ("wanda_sp", "saliency")  # "auto"
    m = trainer.hesso.metrics()
    goal = trainer.hesso.target_params
    assert abs(m["pruned_params"] - goal) <= 0.05 * goal  # tiny model: coarse groups
    logged = [h for h in trainer.state.log_history if "pruning/pruned_param_fraction" in h]
    assert logged and logged[-1]["pruning/pruned_param_fraction"] > 0
    out = trainer.save_pruned_model(str(tmp_path / "pruned"))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 64, (2, 9))
    model.eval()
    assert (logits(reloaded, ids) - logits(model, ids)).abs().max() <= 1e-5
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in model.parameters())


def test_resume_from_checkpoint_continues_the_schedule_exactly(tmp_path):
    full = tiny_model("llama")
    HFOTOTrainer(model=full, args=_args(tmp_path / "a"), train_dataset=Tokens()).train()

    first = tiny_model("llama")
    args = _args(tmp_path / "b", save_strategy="steps", save_steps=5)
    HFOTOTrainer(model=first, args=args, train_dataset=Tokens()).train()
    ckpt = tmp_path / "b" / "run" / "checkpoint-5"
    assert ckpt.exists()

    resumed = tiny_model("llama")
    trainer = HFOTOTrainer(model=resumed, args=_args(tmp_path / "c"), train_dataset=Tokens())
    trainer.train(resume_from_checkpoint=str(ckpt))
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_resuming_with_a_changed_pruning_config_is_refused(tmp_path):
    first = tiny_model("llama")
    HFOTOTrainer(model=first, args=_args(tmp_path / "b", save_strategy="steps", save_steps=5),
                 train_dataset=Tokens()).train()
    changed = HFOTOTrainer(model=tiny_model("llama"), args=_args(tmp_path / "c", target_sparsity=0.3),
                           train_dataset=Tokens())
    with pytest.raises(ValueError, match="changed pruning config"):
        changed.train(resume_from_checkpoint=str(tmp_path / "b" / "run" / "checkpoint-5"))


def test_bad_pruning_settings_stop_when_the_trainer_is_built(tmp_path):
    with pytest.raises(ValueError, match="cannot be reached"):
        HFOTOTrainer(model=tiny_model("llama"), args=_args(tmp_path, target_sparsity=0.99), train_dataset=Tokens())
    with pytest.raises(ValueError, match="at least pruning_periods"):
        HFOTOTrainer(model=tiny_model("llama"), args=_args(tmp_path, pruning_steps=2, pruning_periods=4),
                     train_dataset=Tokens())
    with pytest.raises(ValueError, match="pruning schedule needs 15 optimizer steps"):  # 12 steps of training
        HFOTOTrainer(model=tiny_model("llama"), args=_args(tmp_path, start_pruning_step=3, pruning_steps=12),
                     train_dataset=Tokens())
    with pytest.raises(ValueError, match="CRIC"):
        HFOTOTrainer(model=tiny_model("llama"), args=_args(tmp_path, use_cric=True, cric_sampling_steps=5,
                                                           cric_max_cycles=3), train_dataset=Tokens())


def test_lora_training_prunes_base_and_adapters_and_exports_merged(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", intermediate_size=64)
    frozen_before = base.model.layers[0].mlp.up_proj.weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"]))
    trainer = HFOTOTrainer(model=model, args=_args(tmp_path), train_dataset=Tokens())
    trainer.train()
    hesso = trainer.hesso
    assert hesso.config.criterion == "hesso"  # "auto" with LoRA: the frozen base has no gradient
    assert int(hesso.pruned.sum()) > 0
    # base weights are frozen (not in the base optimizer) yet projected: pruned rows are zero
    up = model.base_model.model.model.layers[0].mlp.up_proj
    assert not up.base_layer.weight.requires_grad
    assert (up.base_layer.weight == 0).all(dim=1).any() and not torch.equal(up.base_layer.weight, frozen_before)
    out = trainer.save_pruned_model(str(tmp_path / "pruned"))
    merged = __import__("copy").deepcopy(model).merge_and_unload().eval()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 64, (2, 9))
    assert (logits(reloaded, ids) - logits(merged, ids)).abs().max() <= 1e-5
    assert hasattr(model, "peft_config")  # the trained peft model itself was not merged

    # pruned base + pruned adapter: loads with PeftModel.from_pretrained and computes the same logits
    from peft import PeftModel

    base_dir = trainer.save_pruned_model(str(tmp_path / "base"), merge_adapters=False)
    adapter_dir = tmp_path / "base-adapter"
    assert (adapter_dir / "adapter_model.safetensors").exists() and (adapter_dir / "adapter_config.json").exists()
    import json

    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    small_base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert sum(p.numel() for p in small_base.parameters()) == sum(p.numel() for p in reloaded.parameters())
    adapted = PeftModel.from_pretrained(small_base, str(adapter_dir)).eval()
    model.eval()
    assert (logits(adapted, ids) - logits(model, ids)).abs().max() <= 1e-5
    assert (logits(adapted, ids) - logits(reloaded, ids)).abs().max() <= 1e-5


def test_lora_targets_missing_prunable_modules_are_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="target_modules"):
        HFOTOTrainer(model=model, args=_args(tmp_path), train_dataset=Tokens())


def test_training_by_epochs_sizes_the_schedule_from_the_data(tmp_path):
    """transformers calls create_optimizer() directly: the step count comes from the epochs and the data."""
    model = tiny_model("llama", intermediate_size=64)
    args = _args(tmp_path, max_steps=-1, num_train_epochs=3)
    trainer = HFOTOTrainer(model=model, args=args, train_dataset=Tokens(n=32))
    trainer.train()
    assert trainer.state.global_step == 12  # 3 epochs x 32 examples / batch 8
    record = trainer.hesso.record()
    assert (record.start_pruning_step, record.pruning_steps) == (3, 6)  # 0.25 and 0.5 of 12 steps
    assert trainer.hesso.metrics()["pruned_param_fraction"] > 0.4


def test_tokenizer_without_pad_token_trains_on_equal_length_blocks(tmp_path):
    from jobs import no_pad_tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(no_pad_tokenizer(tmp_path / "tok"))
    trainer = HFOTOTrainer(model=tiny_model("llama"), args=_args(tmp_path, max_steps=4, pruning_periods=1),
                           train_dataset=Tokens(), processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 4
    ragged = [{"input_ids": torch.ones(3, dtype=torch.long)}, {"input_ids": torch.ones(5, dtype=torch.long)}]
    from hf_oto.errors import ConfigError

    with pytest.raises(ConfigError, match="no pad token"):
        trainer.data_collator(ragged)


def test_export_generates_with_the_kv_cache(tmp_path):
    """Trainer turns use_cache off for training; the export gets the model's own setting back."""
    import json

    model = tiny_model("llama", intermediate_size=64)
    assert model.config.use_cache is True
    trainer = HFOTOTrainer(model=model, args=_args(tmp_path), train_dataset=Tokens())
    assert model.config.use_cache is False  # what Trainer does to the training model
    trainer.train()
    out = trainer.save_pruned_model(str(tmp_path / "pruned"))
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen.get("use_cache", True) is True
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    result = reloaded.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, do_sample=False,
                               return_dict_in_generate=True, pad_token_id=0)
    assert result.past_key_values is not None and result.sequences.shape[1] == 6


@pytest.mark.parametrize("kw, expected", [
    ({}, ("wanda_sp", "saliency")),
    ({"qfa": True}, ("fisher", "per_param")),  # QFA's quantized layers are not watched
    ({"use_cric": True}, ("taylor", "saliency")),  # CRIC does not combine with the knapsack
    ({"saliency_ema": 0.9}, ("hesso", "saliency")),
    ({"pruning_criterion": "taylor"}, ("taylor", "saliency")),
    ({"pruning_criterion": "fisher", "pruning_selection": "saliency"}, ("fisher", "saliency")),
    ({"pruning_layout": "per_layer_ffn"}, ("fisher", "per_param")),  # activations do not compare across layers
    ({"pruning_layout": "per_layer_ffn", "pruning_criterion": "wanda_sp"}, ("wanda_sp", "saliency")),
])
def test_auto_criterion_and_selection_resolve(tmp_path, kw, expected):
    cfg = _args(tmp_path, **kw).hesso_config(100)
    assert (cfg.criterion, cfg.selection) == expected
    assert _args(tmp_path, **kw).hesso_config(100, lora=True).criterion == ("hesso" if "pruning_criterion" not in kw
                                                                              else kw["pruning_criterion"])


def test_a_checkpoint_trained_under_rule_2_resumes_with_the_criterion_it_had(tmp_path):
    """Rule 2 picked wanda_sp for per-layer widths too; a checkpoint saved under it keeps that on resume."""
    args = _args(tmp_path, pruning_layout="per_layer_ffn")
    args.auto_rule = 2  # what resume sets from the checkpoint
    assert args.hesso_config(100).criterion == "wanda_sp"
    args.auto_rule = 1
    assert args.hesso_config(100).criterion == "fisher"


@pytest.mark.parametrize("kw, message", [
    ({"pruning_selection": "knapsack"}, r"pruning_selection must be one of \('auto', 'saliency', 'per_param'\)"),
    ({"pruning_criterion": "gradient"},
     r"pruning_criterion must be one of \('auto', 'hesso', 'taylor', 'fisher', 'wanda_sp'\)"),
])
def test_unknown_criterion_or_selection_names_the_trainers_choices(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        _args(tmp_path, **kw).hesso_config(100)


def test_settings_that_mirror_a_config_dataclass_have_its_defaults(tmp_path):
    from hf_oto.optim import CRICConfig, HESSOConfig
    from hf_oto.quant.config import QFAConfig
    from hf_oto.trainer.distill import DistillConfig

    args = _args(tmp_path)
    from dataclasses import fields

    mirrored = {"distill_": DistillConfig, "qfa_": QFAConfig, "cric_": CRICConfig}
    for prefix, config in mirrored.items():  # the declared defaults (QFAConfig resolves shared_rank None later)
        for name, value in ((f.name, f.default) for f in fields(config)):
            if hasattr(args, prefix + name):
                got = getattr(args, prefix + name)
                assert (tuple(got) if isinstance(got, list) else got) == value, prefix + name
    trainer_names = {"pruning_layout": "layout", "pruning_criterion": "criterion", "pruning_selection": "selection",
                     "pruning_pricing": "pricing"}
    plain = HFOTOTrainingArguments(output_dir=str(tmp_path))
    for name in ("ffn_multiple", "min_keep", "saliency_ema", "target_sparsity", "pruning_periods", *trainer_names):
        assert getattr(plain, name) == getattr(HESSOConfig(), trainer_names.get(name, name)), name
