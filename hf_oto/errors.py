"""Exceptions raised by hf_oto. Each one carries a message meant for the user.

The command line prints an :class:`HFOTOError` as one line (exit code 2) and never a traceback;
set ``HF_OTO_DEBUG=1`` or pass ``--debug`` to see the traceback.
"""


class HFOTOError(Exception):
    """Base class of every error hf_oto raises on purpose."""


class DiscoveryError(HFOTOError):
    """The pruning space could not be derived from the model's config and traced graph."""


class ConstructionError(HFOTOError):
    """A sub-network could not be built from the zeroed model."""


class ExportError(HFOTOError):
    """A pruned model could not be written as a Hugging Face repo."""


class ConfigError(HFOTOError, ValueError):
    """A setting is invalid or cannot work (a YAML value, a pruning setting, a path)."""


class DataError(HFOTOError):
    """The training data cannot be used (missing file or column, no text, too little text)."""


class ResumeError(ConfigError):
    """A checkpoint cannot be resumed (missing, or saved with other pruning settings)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def only_a_path(name: str) -> bool:
    """Whether ``name`` can only be a local path, never a Hub id (absolute, ``.``-relative or ``~``): a
    missing one is then a mistyped path, refused at once."""
    return name.startswith((".", "/", "~"))
