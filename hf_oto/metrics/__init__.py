"""Causal-LM evaluation through ``trainer.evaluate()``: held-out perplexity and next-token accuracy.

The metrics are ``evaluate`` modules shipped inside the package (``perplexity/``,
``token_accuracy/``) and loaded from their local path, so evaluation works offline. Per-token
NLL and argmax are computed batch by batch in ``preprocess_logits_for_metrics`` (the full logits
are never gathered), and Trainer distributes and gathers them under DDP like any evaluation.
"""

from __future__ import annotations

import math
from functools import cache
from importlib import resources
from typing import Any

import torch

IGNORE_INDEX = -100


@cache
def load_metric(name: str):
    """One of the package's ``evaluate`` metric modules (``"perplexity"`` or ``"token_accuracy"``)."""
    import evaluate

    return evaluate.load(str(resources.files("hf_oto.metrics").joinpath(name)))


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token NLL (B x T-1, fp32) of ``logits`` (B x T x V) against ``labels`` (B x T);
    ignored labels (-100) score as token 0, for the caller to mask."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:].clamp_min(0),
                                             reduction="none")


def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL and argmax of the next-token predictions (Trainer's hook; keeps memory flat)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return token_nll(logits, labels), logits[:, :-1].argmax(-1)


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """``perplexity`` and ``token_accuracy`` over every scored token (Trainer's ``compute_metrics``)."""
    (nll, predictions), labels = eval_pred.predictions, eval_pred.label_ids
    mask = labels[:, 1:] != IGNORE_INDEX
    out = load_metric("perplexity").compute(nll=nll[mask])
    out.update(load_metric("token_accuracy").compute(predictions=predictions[mask],
                                                     references=labels[:, 1:][mask]))
    return {"perplexity": out["perplexity"], "token_accuracy": out["token_accuracy"]}


@torch.no_grad()
def evaluate_blocks(model: torch.nn.Module, blocks: torch.Tensor, batch: int = 8) -> dict[str, float]:
    """Perplexity and next-token accuracy of ``model`` on equal-length ``blocks``, outside a Trainer
    (one process; the benchmark scores one-shot baselines with it)."""
    model.eval()
    total, count, correct, tokens = 0.0, 0, 0, 0
    for i in range(0, len(blocks), batch):
        b = blocks[i:i + batch].to(next(model.parameters()).device)
        out = model(input_ids=b, labels=b)
        total += float(out.loss) * len(b)
        count += len(b)
        correct += int((out.logits[:, :-1].argmax(-1) == b[:, 1:]).sum())
        tokens += b[:, 1:].numel()
    return {"perplexity": math.exp(total / max(count, 1)), "token_accuracy": correct / max(tokens, 1)}


def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch: int = 8) -> float:
    """Held-out perplexity of ``model`` on equal-length ``blocks`` (see :func:`evaluate_blocks`)."""
    return evaluate_blocks(model, blocks, batch)["perplexity"]
