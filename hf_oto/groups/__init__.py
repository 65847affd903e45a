"""Step 1 of the data flow: find the prunable groups of a model."""

from hf_oto.groups.discover import discover_groups, register_rule
from hf_oto.groups.experts import route_around_removed_experts, with_experts
from hf_oto.groups.names import unwrap_peft
from hf_oto.groups.space import Group, GroupSet, PruningSpace, SliceSpec, group_is_zero, zero_groups

__all__ = [
    "Group", "GroupSet", "PruningSpace", "SliceSpec", "discover_groups", "group_is_zero",
    "register_rule", "route_around_removed_experts", "unwrap_peft", "with_experts", "zero_groups",
]
