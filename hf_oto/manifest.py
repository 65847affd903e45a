"""The pruning manifest: what a pruned model kept and how it was made, written and read only here.

``construct_subnet`` builds the structural part (sets, parameter and FLOP counts); ``save_pruned``
adds where the model came from and how it was pruned, and writes ``pruning_manifest.json``. The
card, the plot, the GGUF converter, the push checks, the adapter export and the jobs read the typed
:class:`Manifest`. Files written before the manifest had a version (hf-oto 0.1) are read as version 1:
the same fields, no ``version`` key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_oto.errors import ExportError
from hf_oto.io import write_text_atomic

MANIFEST_FILE = "pruning_manifest.json"
VERSION = 2


@dataclass(frozen=True)
class SetRecord:
    """One set of groups (the groups of one kind in one module) and which of them the model kept."""

    module: str
    kind: str
    layer: int
    groups: int
    kept: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "kind": self.kind, "layer": self.layer, "groups": self.groups,
                "kept": list(self.kept)}


@dataclass(frozen=True)
class Manifest:
    """What a pruned model kept and how it was made (``pruning_manifest.json``).

    ``layout`` is ``"uniform"`` (every layer keeps the same counts) or ``"per-layer"``. ``hesso`` and
    ``oneshot`` are the settings records of the method that ran (``HESSO.record()`` and the one-shot
    job's record); ``eval`` maps metric names to values; ``lm_eval`` holds ``{"tasks": {task:
    {metric: value}}, "limit": ...}``. Keys this version does not know are kept in ``other``.
    """

    model_type: str
    params_before: int
    params_after: int
    layout: str
    sets: tuple[SetRecord, ...]
    flops_per_token_before: int | None = None
    flops_per_token_after: int | None = None
    export_format: str | None = None
    source: str | None = None
    base_model: str | None = None
    license: str | None = None
    auto_class: str = "AutoModelForCausalLM"
    hesso: dict[str, Any] | None = None
    oneshot: dict[str, Any] | None = None
    eval: dict[str, Any] = field(default_factory=dict)
    eval_dataset: str | None = None
    lm_eval: dict[str, Any] | None = None
    datasets: tuple[str, ...] | None = None
    gguf: dict[str, Any] | None = None
    adapter: str | None = None
    other: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION

    @property
    def per_layer(self) -> bool:
        """Whether the export ships a per-layer config (DeciLM or remote code) rather than the stock one."""
        return (self.export_format or "stock") != "stock"

    def with_(self, **changes: Any) -> Manifest:
        """A copy with ``changes``; names this version does not know go to ``other``."""
        known = {f.name for f in dataclasses.fields(self)}
        other = dict(self.other, **{k: v for k, v in changes.items() if k not in known})
        fields_ = {k: v for k, v in changes.items() if k in known}
        if "datasets" in fields_ and fields_["datasets"] is not None:
            fields_["datasets"] = tuple(fields_["datasets"])
        return dataclasses.replace(self, **fields_, other=other)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``other`` spread at the top level, as it was read)."""
        out: dict[str, Any] = {"version": self.version}
        for f in dataclasses.fields(self):
            if f.name in ("other", "version"):
                continue
            value = getattr(self, f.name)
            if f.name == "sets":
                value = [s.to_dict() for s in value]
            elif f.name == "datasets" and value is not None:
                value = list(value)
            out[f.name] = value
        out.update(self.other)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Read any version's JSON form (version 1: hf-oto 0.1, no ``version`` key)."""
        if not isinstance(data, dict):
            raise ExportError("a pruning manifest is a JSON object")
        version = int(data.get("version", 1))
        if version > VERSION:
            raise ExportError(f"this pruning manifest is version {version}; this hf-oto reads up to {VERSION} "
                              "(upgrade hf-oto)")
        missing = [k for k in ("model_type", "params_before", "params_after", "layout", "sets") if k not in data]
        if missing:
            raise ExportError(f"not an hf-oto pruning manifest: it lacks {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)} - {"other", "version"}
        values = {k: v for k, v in data.items() if k in known}
        values["sets"] = tuple(SetRecord(s["module"], s["kind"], int(s["layer"]), int(s["groups"]),
                                         tuple(int(j) for j in s["kept"])) for s in data["sets"])
        if values.get("datasets") is not None:
            values["datasets"] = tuple(values["datasets"])
        values["eval"] = dict(values.get("eval") or {})
        other = {k: v for k, v in data.items() if k not in known and k != "version"}
        return cls(**values, other=other, version=VERSION)

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """The manifest of an export folder (one clear error when it is missing or corrupt)."""
        path = Path(folder) / MANIFEST_FILE
        if not path.is_file():
            raise ExportError(f"{folder} has no {MANIFEST_FILE}: not an hf-oto export")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ExportError(f"{path} is corrupt: {exc}") from None
        return cls.from_dict(data)

    def write(self, folder: str | Path) -> Path:
        """Write ``pruning_manifest.json`` into ``folder`` (atomically)."""
        path = Path(folder) / MANIFEST_FILE
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1))
        return path

    def removed_layers(self) -> tuple[int, ...]:
        """Source decoder layers removed whole (depth pruning); set records keep the source's layer numbers."""
        return tuple(sorted(s.layer for s in self.sets if s.kind == "layer" and not s.kept))

    def export_layer(self, layer: int) -> int | None:
        """The index in the export of source layer ``layer`` (None when it was removed)."""
        gone = self.removed_layers()
        return None if layer in gone else layer - sum(1 for g in gone if g < layer)

    def kept_by_kind(self) -> dict[str, tuple[int, int]]:
        """kind -> (groups kept, groups) over the whole model."""
        out: dict[str, list[int]] = {}
        for s in self.sets:
            cell = out.setdefault(s.kind, [0, 0])
            cell[0] += len(s.kept)
            cell[1] += s.groups
        return {k: (v[0], v[1]) for k, v in out.items()}
