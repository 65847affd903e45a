"""Exceptions raised by hf_oto. Each one carries a message meant for the user."""


class HFOTOError(Exception):
    """Base class of every error hf_oto raises on purpose."""


class DiscoveryError(HFOTOError):
    """The pruning space could not be derived from the model's config and traced graph."""


class ConstructionError(HFOTOError):
    """A sub-network could not be built from the zeroed model."""


class ExportError(HFOTOError):
    """A pruned model could not be written as a Hugging Face repo."""
