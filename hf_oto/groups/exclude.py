"""Keep chosen layers or modules out of pruning (``pruning_exclude``), like Torch-Pruning's
``ignored_layers`` and LLM-Pruner's layer ranges.

Each rule is a string:

- ``layers:0,-1`` - decoder layers by index (negative counts from the end), ``layers:2-5`` a range
  (inclusive); the first and last layers are the usual choice;
- anything else is a module-name pattern (``fnmatch``) on the module that owns a set of groups, e.g.
  ``*.self_attn`` (attention heads everywhere), ``model.layers.3.mlp``, ``*.layers.1[0-5].*``.

Matched sets become unprunable (``hf-oto inspect`` and the manifest say why); the planner meets the
target on the rest or refuses with the reachable maximum, as for any unprunable structure.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Sequence

from hf_oto.errors import ConfigError
from hf_oto.groups.space import PruningSpace, close_ties, kept_uniform


def excluded_layers(rule: str, num_layers: int) -> set[int]:
    """The layer indexes of a ``layers:`` rule (one ConfigError for a malformed or out-of-range one)."""
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in rule.split(":", 1)[1].split(","))):
        single, span = re.fullmatch(r"-?\d+", part), re.fullmatch(r"(\d+)-(\d+)", part)
        if single:
            lo = hi = int(part)
        elif span:
            lo, hi = int(span[1]), int(span[2])
        else:
            raise ConfigError(f"pruning_exclude {rule!r}: expected layers:I,J or layers:I-J (integers; -1 is the last)")
        if not (-num_layers <= lo < num_layers and -num_layers <= hi < num_layers) or (span and lo > hi):
            raise ConfigError(f"pruning_exclude {rule!r}: {part} is not a layer range of 0..{num_layers - 1}")
        out.update(range(lo % num_layers, hi % num_layers + 1))
    if not out:
        raise ConfigError(f"pruning_exclude {rule!r}: no layer given")
    return out


def exclude_groups(space: PruningSpace, rules: Sequence[str] | None, layout: str = "uniform") -> PruningSpace:
    """``space`` with the sets the ``rules`` match made unprunable (a new space; ``space`` is unchanged).

    A rule that matches nothing is refused (a typo would otherwise prune what it meant to keep). Under
    a layout that keeps a block's counts equal in every layer (``uniform``; attention under
    ``per_layer_ffn``), excluding that block in some layers but not all is refused, naming the layouts
    that allow it.
    """
    if not rules:
        return space
    layers: set[int] = set()
    patterns = []
    for rule in rules:
        if not isinstance(rule, str) or not rule.strip():
            raise ConfigError(f"pruning_exclude takes strings (layers:0,-1 or module patterns), got {rule!r}")
        if rule.startswith("layers:"):
            layers |= excluded_layers(rule, space.num_layers)
        elif re.fullmatch(r"-?\d+(-\d+)?", rule.strip()):  # [layers:0,-1] unquoted in YAML splits at the comma
            raise ConfigError(f"pruning_exclude {rule!r} is a layer number, not a module pattern; write the layers as "
                              "one quoted string, e.g. pruning_exclude: ['layers:0,-1'] (or --pruning_exclude "
                              "layers:0,-1)")
        else:
            patterns.append(rule)
    matched = {p: False for p in patterns}
    sets = []
    for gs in space.sets:
        hits = [p for p in patterns if fnmatch.fnmatchcase(gs.prefix, p)]
        for p in hits:
            matched[p] = True
        if gs.prunable and (gs.layer in layers or hits):
            why = f"excluded by pruning_exclude ({'layer ' + str(gs.layer) if gs.layer in layers else hits[0]})"
            gs = dataclasses.replace(gs, prunable=False, reason=why)
        sets.append(gs)
    missing = [p for p, hit in matched.items() if not hit]
    if missing:
        raise ConfigError(f"pruning_exclude pattern {missing[0]!r} matches no module with prunable groups "
                          f"(their names look like {space.sets[0].prefix!r}; hf-oto inspect lists them)")
    for kind in {gs.kind for gs in space.sets}:
        mine = [(old, new) for old, new in zip(space.sets, sets, strict=True) if old.kind == kind and old.prunable]
        first = mine[0][0] if mine else None
        if first and kept_uniform(layout, first.block, first.kind) and len({new.prunable for _, new in mine}) > 1:
            raise ConfigError(f"pruning_layout {layout} keeps every layer's {kind} count the same, so "
                              f"pruning_exclude cannot keep them in some layers only; use pruning_layout "
                              f"{'global' if kind != 'ffn_channel' else 'per_layer_ffn or global'}, or exclude "
                              f"them in every layer (e.g. '*.{mine[0][0].prefix.rsplit('.', 1)[-1]}')")
    return dataclasses.replace(space, sets=close_ties(sets))
