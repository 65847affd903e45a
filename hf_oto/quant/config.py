"""QFAConfig: the quantization-aware once-for-all settings in one frozen, validated object."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from hf_oto.errors import ConfigError
from hf_oto.io import JSONObject

SUPPORTED_BITS = (2, 3, 4, 8)
QUANTIZERS = ("gptq", "rtn")
SCHEDULES = ("uniform", "triangular")
Quantizer = Literal["gptq", "rtn"]
Schedule = Literal["uniform", "triangular"]
SHARED = "shared"  # the key of the adapter every width adds (shared_rank > 0)


def adapter_ranks(bits: tuple[int, ...], rank: int, shared_rank: int) -> dict[str, int]:
    """The adapters of a QFA layer by key: one of ``rank`` per width, and ``"shared"`` when ``shared_rank``."""
    ranks = {str(b): rank for b in bits}
    if shared_rank:
        ranks[SHARED] = shared_rank
    return ranks


@dataclass(frozen=True)
class QFAConfig:
    """One training run that serves every per-layer bit-width configuration (LLM-QFA).

    The frozen weights of ``target_modules`` (names or name endings inside a decoder layer, such as
    ``"mlp.down_proj"``; default: every linear inside the decoder layers) are
    quantized group-wise (``group_size`` input columns share a scale) once per width in ``bits``,
    with GPTQ on calibration batches (``quantizer="gptq"``) or round-to-nearest (``"rtn"``). Each
    targeted linear gets one low-rank adapter per width, on the group-pooled input (QA-LoRA), so it
    folds into that width's codes at export. Every optimizer step samples one width per decoder layer:
    ``schedule="uniform"`` draws each layer's width uniformly; ``"triangular"`` moves the mean width
    from the lowest to the highest and back over ``period`` steps (None: one period per run), so the
    extreme configurations get trained as often as the middle ones. ``seed`` fixes the draws (the
    draw of step ``t`` depends only on ``seed`` and ``t``, which makes resume exact). ``shared_rank``
    adds one more adapter that every width adds to its own (None: of rank ``rank``; 0: none): it trains
    on every step where a width's own adapter trains on the steps that draw it, and it folds into each
    width's codes like the width's own.
    """

    bits: tuple[int, ...] = (2, 3, 4)
    group_size: int = 32
    symmetric: bool = True
    target_modules: tuple[str, ...] | None = None
    quantizer: Quantizer = "gptq"
    calibration_batches: int = 8
    schedule: Schedule = "uniform"
    period: int | None = None
    seed: int = 0
    rank: int = 8
    alpha: float = 16.0
    shared_rank: int | None = None

    def __post_init__(self) -> None:
        bits = tuple(sorted({int(b) for b in self.bits}))
        object.__setattr__(self, "bits", bits)
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        bad = [b for b in bits if b not in SUPPORTED_BITS]
        if not bits or bad:
            raise ConfigError(f"QFA bit-widths must be chosen from {SUPPORTED_BITS}, got {list(self.bits)}")
        if self.group_size < 1 or self.group_size % 8:
            raise ConfigError(f"QFA group_size must be a positive multiple of 8, got {self.group_size}")
        if not self.symmetric:
            raise ConfigError("asymmetric QFA is not offered: transformers cannot load compressed-tensors' "
                              "asymmetric checkpoints (0.20.0 and 0.20.1); symmetric QFA mirrors each group's grid "
                              "where that fits better (see README, QFA); use symmetric=True")
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"QFA quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"QFA schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.period is not None and self.period < 2:
            raise ConfigError(f"QFA period must be at least 2 steps, got {self.period}")
        if self.shared_rank is None:
            object.__setattr__(self, "shared_rank", self.rank)
        if self.shared_rank < 0:
            raise ConfigError(f"QFA shared_rank must be 0 (no shared adapter) or positive, got {self.shared_rank}")
        if self.rank < 1 or self.alpha <= 0 or self.calibration_batches < 1:
            raise ConfigError(f"QFA rank, alpha and calibration_batches must be positive, got "
                              f"{self.rank}, {self.alpha}, {self.calibration_batches}")

    def adapter_ranks(self) -> dict[str, int]:
        """Each adapter of a QFA layer by its key (the width, or ``"shared"``) and its rank."""
        return adapter_ranks(self.bits, self.rank, self.shared_rank)

    def to_dict(self) -> JSONObject:
        """``asdict(self)``: what checkpoints, the run folder and the card record."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: JSONObject) -> QFAConfig:
        data = dict(data)
        data.setdefault("shared_rank", 0)  # runs saved before the shared adapter existed have none
        data["bits"] = tuple(data["bits"])
        if data.get("target_modules") is not None:
            data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)
