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
from hf_oto.io import JSONObject, write_text_atomic

MANIFEST_FILE = "pruning_manifest.json"
VERSION = 2
Scalar = float | int | str | bool | None  # a JSON leaf: what metrics and settings values are


def _split(cls: type, data: JSONObject, what: str) -> tuple[JSONObject, JSONObject]:
    """``data`` as (the fields ``cls`` knows, the rest); one clear error when a required field is missing."""
    if not isinstance(data, dict):
        raise ExportError(f"a {what} record is a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - {"other"}
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ExportError(f"the {what} record lacks {', '.join(missing)}")
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


def _scope(granularity: str, experts: bool, prices: tuple[dict[str, Scalar], ...]) -> JSONObject:
    """The optional entries of a method's record, written only where they differ from what ran before
    they existed: what was prunable beyond heads and channels, and measured pricing's trials."""
    out: JSONObject = {}
    if granularity != "width":
        out["granularity"] = granularity
    if experts:
        out["experts"] = True
    if prices:
        out["prices"] = [dict(p) for p in prices]
    return out


def _with_prices(known: JSONObject) -> JSONObject:
    return dict(known, prices=tuple(dict(p) for p in known.get("prices") or ()))


@dataclass(frozen=True)
class HESSORecord:
    """The HESSO settings that ran, resolved (no ``"auto"``): what the manifest, the card, the recipe
    and HESSO's checkpoints record. A field a record predates reads as the value that ran before it
    existed (``criterion`` "hesso", ``selection`` and ``pricing`` "saliency", ``granularity`` "width").
    ``weights`` are the saliency weights by term; ``cric`` the CRIC settings (None: no CRIC);
    ``prices`` measured pricing's trials, one per period start; ``target_params`` the resolved target."""

    target_params: int
    layout: str
    start_pruning_step: int
    pruning_steps: int
    pruning_periods: int
    ffn_multiple: int
    min_keep: int = 1
    target_sparsity: float | None = None
    criterion: str = "hesso"
    selection: str = "saliency"
    pricing: str = "saliency"
    saliency_ema: float | None = None
    ema_interval: int = 10
    tolerance: float = 0.01
    weights: dict[str, float] = field(default_factory=dict)
    cric: dict[str, Scalar] | None = None
    granularity: str = "width"
    experts: bool = False
    prices: tuple[dict[str, Scalar], ...] = ()
    other: JSONObject = field(default_factory=dict)

    # not compared on resume: prices are measured as the run goes, and target_params is the sparsity resolved
    RESUME_EXEMPT = ("prices", "target_sparsity", "other")
    ORDER = ("target_sparsity", "target_params", "layout", "start_pruning_step", "pruning_steps", "pruning_periods",
             "ffn_multiple", "min_keep", "weights", "saliency_ema", "ema_interval", "tolerance", "selection",
             "criterion", "pricing", "cric")

    def to_dict(self) -> JSONObject:
        """The JSON form (optional fields only when they differ from what ran before they existed)."""
        out = {k: getattr(self, k) for k in self.ORDER}
        out["weights"] = dict(self.weights)
        out["cric"] = None if self.cric is None else dict(self.cric)
        return {**out, **_scope(self.granularity, self.experts, self.prices), **self.other}

    @classmethod
    def from_dict(cls, data: JSONObject) -> HESSORecord:
        known, other = _split(cls, data, "hesso")
        known["weights"] = dict(known.get("weights") or {})
        return cls(**_with_prices(known), other=other)

    def changed(self, other: HESSORecord) -> list[str]:
        """The settings (by name) in which ``other`` differs from this record, prices aside."""
        mine, theirs = self.to_dict(), other.to_dict()
        keys = sorted((set(mine) | set(theirs)) - set(self.RESUME_EXEMPT))
        return [k for k in keys if mine.get(k) != theirs.get(k)]


@dataclass(frozen=True)
class OneShotRecord:
    """How ``hf-oto oneshot`` pruned: criterion, calibration data, budget rules and the fraction removed."""

    criterion: str
    calibration_batches: int
    batch_size: int
    block_size: int
    target_sparsity: float
    layout: str
    ffn_multiple: int
    pruned_fraction: float
    pricing: str | None = None  # None: written before pricing was recorded
    granularity: str = "width"
    experts: bool = False
    prices: tuple[dict[str, Scalar], ...] = ()
    other: JSONObject = field(default_factory=dict)

    def to_dict(self) -> JSONObject:
        out: JSONObject = {k: getattr(self, k) for k in ("criterion", "calibration_batches", "batch_size",
                                                            "block_size", "target_sparsity", "layout",
                                                            "ffn_multiple")}
        if self.pricing is not None:
            out["pricing"] = self.pricing
        return {**out, **_scope(self.granularity, self.experts, self.prices), "pruned_fraction": self.pruned_fraction,
                **self.other}

    @classmethod
    def from_dict(cls, data: JSONObject) -> OneShotRecord:
        known, other = _split(cls, data, "oneshot")
        return cls(**_with_prices(known), other=other)


@dataclass(frozen=True)
class LMEvalRecord:
    """lm-evaluation-harness scores: ``tasks`` maps task -> metric -> value; ``limit`` examples per task."""

    tasks: dict[str, dict[str, float]]
    limit: int | None = None

    def to_dict(self) -> JSONObject:
        return {"tasks": {t: dict(m) for t, m in self.tasks.items()}, "limit": self.limit}

    @classmethod
    def from_dict(cls, data: JSONObject) -> LMEvalRecord:
        known, _ = _split(cls, data, "lm_eval")
        return cls(tasks={t: dict(m) for t, m in known["tasks"].items()}, limit=known.get("limit"))


@dataclass(frozen=True)
class GGUFRecord:
    """The GGUF file a model was read from, and what its header's ``general.*`` fields say it is."""

    file: str
    name: str | None = None
    organization: str | None = None
    basename: str | None = None
    finetune: str | None = None
    size_label: str | None = None
    license: str | None = None

    def to_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, data: JSONObject) -> GGUFRecord:
        known, _ = _split(cls, data, "gguf")
        return cls(**{k: None if v is None else str(v) for k, v in known.items()})


@dataclass(frozen=True)
class ElasticRecord:
    """One size cut out of an elastic (once-for-all) run: the size, every size the run trained, and how
    its nested keep-sets were ranked and scheduled."""

    size: float
    sizes: tuple[float, ...]
    criterion: str
    selection: str
    layout: str
    ffn_multiple: int
    start: int
    freeze: int
    refresh_every: int
    samples: int
    steps: int
    granularity: str = "width"

    def to_dict(self) -> JSONObject:
        return dict(dataclasses.asdict(self), sizes=list(self.sizes))

    @classmethod
    def from_dict(cls, data: JSONObject) -> ElasticRecord:
        known, _ = _split(cls, data, "elastic")
        return cls(**dict(known, sizes=tuple(float(s) for s in known["sizes"])))


# Manifest fields held as typed records: name -> record class (read from and written as JSON objects)
RECORDS: dict[str, type] = {"hesso": HESSORecord, "oneshot": OneShotRecord, "lm_eval": LMEvalRecord,
                            "gguf": GGUFRecord, "elastic": ElasticRecord}


@dataclass(frozen=True)
class SetRecord:
    """One set of groups (the groups of one kind in one module) and which of them the model kept."""

    module: str
    kind: str
    layer: int
    groups: int
    kept: tuple[int, ...]

    def to_dict(self) -> JSONObject:
        return {"module": self.module, "kind": self.kind, "layer": self.layer, "groups": self.groups,
                "kept": list(self.kept)}


@dataclass(frozen=True)
class Manifest:
    """What a pruned model kept and how it was made (``pruning_manifest.json``).

    ``layout`` is ``"uniform"`` (every layer keeps the same counts) or ``"per-layer"``. ``hesso`` and
    ``oneshot`` are the settings records of the method that ran (:class:`HESSORecord`,
    :class:`OneShotRecord`); ``eval`` maps metric names to values; ``lm_eval`` holds lm-eval's scores;
    ``gguf`` the GGUF file the model came from; ``elastic`` the elastic run a size was cut from;
    ``replay_fraction`` the share of the training draws (or one-shot calibration blocks) that were text
    the source model sampled itself (:mod:`hf_oto.replay`; None: none). Keys this
    version does not know are kept in ``other``.
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
    hesso: HESSORecord | None = None
    oneshot: OneShotRecord | None = None
    eval: dict[str, Scalar] = field(default_factory=dict)
    eval_dataset: str | None = None
    lm_eval: LMEvalRecord | None = None
    elastic: ElasticRecord | None = None
    datasets: tuple[str, ...] | None = None
    gguf: GGUFRecord | None = None
    replay_fraction: float | None = None
    adapter: str | None = None
    other: JSONObject = field(default_factory=dict)
    version: int = VERSION

    @property
    def per_layer(self) -> bool:
        """Whether the export ships a per-layer config (DeciLM or remote code) rather than the stock one."""
        return (self.export_format or "stock") != "stock"

    def with_(self, **changes: Any) -> Manifest:
        """A copy with ``changes`` (records as objects or their JSON form); names this version does not
        know go to ``other``."""
        known = {f.name for f in dataclasses.fields(self)}
        other = dict(self.other, **{k: v for k, v in changes.items() if k not in known})
        fields_ = _typed({k: v for k, v in changes.items() if k in known})
        return dataclasses.replace(self, **fields_, other=other)

    def to_dict(self) -> JSONObject:
        """The JSON form (``other`` spread at the top level, as it was read)."""
        out: JSONObject = {"version": self.version}
        for f in dataclasses.fields(self):
            if f.name in ("other", "version"):
                continue
            value = getattr(self, f.name)
            if f.name == "sets":
                value = [s.to_dict() for s in value]
            elif f.name == "datasets" and value is not None:
                value = list(value)
            elif f.name in RECORDS and value is not None:
                value = value.to_dict()
            out[f.name] = value
        out.update(self.other)
        return out

    @classmethod
    def from_dict(cls, data: JSONObject) -> Manifest:
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
        values = _typed(values)
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

    def removed_blocks(self) -> dict[str, tuple[int, ...]]:
        """"attention"/"mlp" -> source layers that stay but lost that whole block (depth pruning)."""
        gone = set(self.removed_layers())
        out = {block: tuple(sorted(s.layer for s in self.sets if s.kind == f"{block}_block" and not s.kept
                                   and s.layer not in gone)) for block in ("attention", "mlp")}
        return {block: layers for block, layers in out.items() if layers}

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


def _typed(values: dict[str, Any]) -> dict[str, Any]:
    """Manifest field values with records given in their JSON form read into their classes."""
    out = dict(values)
    for name, cls in RECORDS.items():
        if isinstance(out.get(name), dict):
            out[name] = cls.from_dict(out[name])
    if out.get("datasets") is not None:
        out["datasets"] = tuple(out["datasets"])
    return out
