"""Step 4 of the data flow: build the physically smaller model."""

from hf_oto.subnet.construct import construct_subnet

__all__ = ["construct_subnet"]
