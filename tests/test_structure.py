"""Files a newcomer must not break: the remote code shipped verbatim into exports, the metric modules."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import torch

PACKAGE = Path(__file__).resolve().parent.parent / "hf_oto"


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_remote_code_imports_only_torch_and_transformers():
    """subnet/remote_code.py is copied into every per-layer export: it must load without hf_oto."""
    allowed = {"__future__", "copy", "inspect", "typing", "torch", "transformers"}
    assert _imported_roots(PACKAGE / "subnet" / "remote_code.py") <= allowed


def test_metric_modules_import_what_evaluate_can_provide():
    """evaluate copies these modules into its own cache: they may import only these packages."""
    for name in ("perplexity", "token_accuracy"):
        assert _imported_roots(PACKAGE / "metrics" / name / f"{name}.py") <= {"math", "datasets", "evaluate", "numpy"}


def test_trainer_metrics_equal_a_plain_evaluation():
    """compute_metrics on Trainer's per-batch NLL/argmax gives what a direct pass over the blocks gives."""
    from tiny import tiny_model
    from transformers.trainer_utils import EvalPrediction

    from hf_oto.metrics import compute_metrics, evaluate_blocks, preprocess_logits_for_metrics

    model = tiny_model("llama")
    blocks = torch.randint(3, 64, (10, 12), generator=torch.Generator().manual_seed(0))
    nll, pred = [], []
    with torch.no_grad():
        for i in range(0, 10, 4):
            logits = model(input_ids=blocks[i:i + 4]).logits
            n, p = preprocess_logits_for_metrics(logits, blocks[i:i + 4])
            nll.append(n.numpy())
            pred.append(p.numpy())
    got = compute_metrics(EvalPrediction(predictions=(np.concatenate(nll), np.concatenate(pred)),
                                         label_ids=blocks.numpy()))
    want = evaluate_blocks(model, blocks)
    assert abs(got["perplexity"] - want["perplexity"]) <= 1e-4 * want["perplexity"]
    assert got["token_accuracy"] == want["token_accuracy"]
