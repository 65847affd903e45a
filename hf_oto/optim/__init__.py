"""Step 2 of the data flow: the structured-sparsity optimizers (HESSO)."""

from hf_oto.optim.hesso import HESSO
from hf_oto.optim.saliency import SaliencyWeights

__all__ = ["HESSO", "SaliencyWeights"]
