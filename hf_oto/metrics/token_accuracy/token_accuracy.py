"""Next-token top-1 accuracy (an ``evaluate`` metric module shipped with hf_oto).

Loaded with ``evaluate.load(<path of this folder>)``, which works offline.
"""

import datasets
import evaluate
import numpy as np


class TokenAccuracy(evaluate.Metric):
    """The share of scored tokens whose most likely prediction is the actual next token."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Next-token top-1 accuracy.",
            citation="",
            inputs_description="predictions: argmax token ids; references: the actual next tokens.",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        p, r = np.asarray(predictions), np.asarray(references)
        return {"token_accuracy": float((p == r).mean()) if r.size else float("nan")}
