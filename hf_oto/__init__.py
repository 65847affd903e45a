"""hf_oto: structured pruning of Hugging Face models with the Only-Train-Once family (HESSO, CRIC),
and quantization-aware once-for-all fine-tuning (LLM-QFA).

What users import lives here (``from hf_oto import HFOTOTrainer, HESSOConfig, ...``). The heavy
parts (torch, transformers) load on first use of a name (PEP 562), so ``import hf_oto`` and
``hf-oto --help`` stay fast. Lower-level pieces stay in their step's package: ``hf_oto.groups``
(``Group``, ``GroupSet``, ``group_is_zero``, ``register_rule``), ``hf_oto.optim``, ``hf_oto.export``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hf_oto.errors import (
    ConfigError,
    ConstructionError,
    DataError,
    DiscoveryError,
    ExportError,
    HFOTOError,
    ResumeError,
)

__version__ = "0.1.0"

# name -> the module that defines it, in data-flow order
_LAZY = {
    "discover_groups": "hf_oto.groups",
    "PruningSpace": "hf_oto.groups",
    "zero_groups": "hf_oto.groups",
    "exclude_groups": "hf_oto.groups.exclude",
    "HESSO": "hf_oto.optim",
    "HESSOConfig": "hf_oto.optim",
    "CRICConfig": "hf_oto.optim",
    "SaliencyWeights": "hf_oto.optim",
    "Elastic": "hf_oto.optim.elastic",
    "ElasticConfig": "hf_oto.optim.elastic",
    "oneshot_prune": "hf_oto.optim.oneshot",
    "oneshot_scores": "hf_oto.optim.oneshot",
    "QFAConfig": "hf_oto.quant",
    "qfa_search": "hf_oto.quant",
    "joint_search": "hf_oto.quant",
    "load_qfa_run": "hf_oto.quant",
    "HFOTOTrainer": "hf_oto.trainer",
    "HFOTOTrainingArguments": "hf_oto.trainer",
    "construct_subnet": "hf_oto.subnet",
    "Subnet": "hf_oto.subnet",
    "Manifest": "hf_oto.manifest",
    "save_pruned": "hf_oto.export",
    "save_quantized": "hf_oto.export.quantized",
    "export_size": "hf_oto.export.sizes",
    "push_pruned": "hf_oto.hub",
}

__all__ = [
    "CRICConfig", "ConfigError", "ConstructionError", "DataError", "DiscoveryError", "Elastic", "ElasticConfig",
    "ExportError", "HESSO",
    "HESSOConfig", "HFOTOError", "HFOTOTrainer", "HFOTOTrainingArguments", "Manifest", "PruningSpace", "QFAConfig",
    "ResumeError", "SaliencyWeights", "Subnet", "__version__", "construct_subnet", "discover_groups",
    "exclude_groups", "export_size", "joint_search", "load_qfa_run", "oneshot_prune", "oneshot_scores", "push_pruned",
    "qfa_search", "save_pruned", "save_quantized", "zero_groups",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_oto' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from hf_oto.export import save_pruned
    from hf_oto.export.quantized import save_quantized
    from hf_oto.export.sizes import export_size
    from hf_oto.groups import PruningSpace, discover_groups, zero_groups
    from hf_oto.hub import push_pruned
    from hf_oto.manifest import Manifest
    from hf_oto.optim import HESSO, CRICConfig, HESSOConfig, SaliencyWeights
    from hf_oto.optim.elastic import Elastic, ElasticConfig
    from hf_oto.optim.oneshot import oneshot_prune, oneshot_scores
    from hf_oto.quant import QFAConfig, joint_search, load_qfa_run, qfa_search
    from hf_oto.subnet import Subnet, construct_subnet
    from hf_oto.trainer import HFOTOTrainer, HFOTOTrainingArguments
