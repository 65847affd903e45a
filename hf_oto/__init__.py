"""hf_oto: structured pruning of Hugging Face models with the Only-Train-Once family (HESSO, CRIC)."""

from hf_oto.errors import ConstructionError, DiscoveryError, ExportError, HFOTOError
from hf_oto.export import save_pruned
from hf_oto.groups import (
    Group,
    GroupSet,
    PruningSpace,
    discover_groups,
    group_is_zero,
    register_rule,
    zero_groups,
)
from hf_oto.subnet import construct_subnet

__version__ = "0.1.0"

__all__ = [
    "ConstructionError", "DiscoveryError", "ExportError", "Group", "GroupSet", "HFOTOError",
    "PruningSpace", "construct_subnet", "discover_groups", "group_is_zero", "register_rule",
    "save_pruned", "zero_groups",
]
