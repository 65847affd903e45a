"""Perplexity from per-token negative log-likelihoods (an ``evaluate`` metric module shipped with hf_oto).

Loaded with ``evaluate.load(<path of this folder>)``, which works offline. It imports only
``datasets``, ``evaluate`` and ``numpy``: ``evaluate`` copies it into its own module cache.
"""

import math

import datasets
import evaluate
import numpy as np


class Perplexity(evaluate.Metric):
    """exp(mean NLL) over every scored token."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Perplexity: exp of the mean per-token negative log-likelihood.",
            citation="",
            inputs_description="nll: the negative log-likelihood of every scored token (natural log).",
            features=datasets.Features({"nll": datasets.Value("float64")}),
        )

    def _compute(self, nll):
        values = np.asarray(nll, dtype=np.float64)
        mean = float(values.mean()) if values.size else float("nan")
        return {"perplexity": math.exp(mean), "nll": mean}
