"""hf_oto: structured pruning of Hugging Face models with the Only-Train-Once family (HESSO, CRIC)."""

from hf_oto.errors import ConstructionError, DiscoveryError, ExportError, HFOTOError
from hf_oto.groups import (
    Group,
    GroupSet,
    PruningSpace,
    discover_groups,
    group_is_zero,
    register_rule,
    zero_groups,
)

__version__ = "0.1.0"

__all__ = [
    "ConstructionError", "DiscoveryError", "ExportError", "Group", "GroupSet", "HFOTOError",
    "PruningSpace", "discover_groups", "group_is_zero", "register_rule", "zero_groups",
]
