"""LLM-QFA: quantization-aware once-for-all fine-tuning (one run serves every per-layer bit-width).

Data flow: :func:`prepare_qfa` quantizes the targeted linears once per width and adds one adapter
per width (and one that every width shares); the trainer samples a per-layer configuration each step
(:class:`BitSampler`); :func:`qfa_search` picks widths for a memory budget (:class:`BitSearch`: several
budgets of one model; :func:`joint_search`: a size and widths, on a run trained with elastic sizes);
:func:`hf_oto.export.quantized.save_quantized` writes one configuration as a compressed-tensors checkpoint.
"""

from hf_oto.quant.config import QFAConfig
from hf_oto.quant.joint import joint_search
from hf_oto.quant.layer import QFALinear
from hf_oto.quant.prepare import prepare_qfa, qfa_layers, set_bits
from hf_oto.quant.run import QFARun, load_qfa_run, save_qfa_run
from hf_oto.quant.sampler import BitSampler
from hf_oto.quant.search import BitSearch, qfa_search

__all__ = ["BitSampler", "BitSearch", "QFAConfig", "QFALinear", "QFARun", "joint_search", "load_qfa_run", "prepare_qfa",
           "qfa_layers", "qfa_search", "save_qfa_run", "set_bits"]
