"""Step 2 of the data flow: the structured-sparsity optimizer (HESSO, with CRIC) and the one-shot baselines."""

from hf_oto.optim.config import HESSOConfig
from hf_oto.optim.cric import CRICConfig
from hf_oto.optim.hesso import HESSO
from hf_oto.optim.saliency import SaliencyWeights

__all__ = ["CRICConfig", "HESSO", "HESSOConfig", "SaliencyWeights"]
