"""The settings shared by tests/fixtures/make_compat.py (which wrote the fixtures) and tests/test_compat.py."""

from __future__ import annotations

import torch
from tiny import tiny_model

from hf_oto import discover_groups, zero_groups
from hf_oto.trainer import HFOTOTrainingArguments

IDS = torch.tensor([[5, 9, 17, 33, 8, 41, 12, 60, 3], [7, 7, 21, 50, 11, 4, 38, 29, 13]])
FORMS = {"stock": "uniform", "decilm": "per_layer_ffn", "remote_code": "global"}


def tokenizer():
    """A small byte-level BPE tokenizer (300 tokens), so that the exports convert to GGUF."""
    from hf_oto.data import train_tokenizer

    return train_tokenizer(["def main(argv=None):\n    return sorted(set(argv or []))\n" * 20], vocab=300)


def zeroed_model(layout: str):
    """A tiny seeded Llama with some groups zeroed: a kv group in layer 1 unless the layout is uniform-attention,
    FFN channels that differ per layer unless the layout is uniform."""
    torch.manual_seed(0)
    model = tiny_model("llama", intermediate_size=64, vocab_size=320).eval()  # room for a byte-level tokenizer
    space = discover_groups(model)
    names = []
    for g in space:
        index = int(g.name.rsplit(".", 1)[1])
        if not g.prunable:
            continue
        if g.kind == "ffn_channel" and index < (8 if g.layer == 0 or layout == "uniform" else 24):
            names.append(g.name)
        if g.kind == "kv_group" and index == 0 and layout != "per_layer_ffn" and (g.layer == 1 or layout == "uniform"):
            names.append(g.name)
    zero_groups(model, space, names)
    return model, space


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 12):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 64, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_args(out, **kw) -> HFOTOTrainingArguments:
    base = dict(output_dir=str(out), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-3, report_to=[],
                use_cpu=True, logging_steps=4, save_strategy="no", seed=0, data_seed=0, target_sparsity=0.5,
                start_pruning_step=0.25, pruning_steps=0.5, pruning_periods=3, pruning_layout="uniform",
                dataloader_num_workers=0, disable_tqdm=True, distill=False)
    base.update(kw)
    return HFOTOTrainingArguments(**base)
