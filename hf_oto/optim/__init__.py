"""Step 2 of the data flow: the structured-sparsity optimizers (HESSO)."""

from hf_oto.optim.cric import CRICConfig
from hf_oto.optim.hesso import HESSO
from hf_oto.optim.saliency import SaliencyWeights

__all__ = ["CRICConfig", "HESSO", "SaliencyWeights"]
