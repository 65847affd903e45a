"""Step 4 of the data flow: build the physically smaller model."""

from hf_oto.subnet.construct import Subnet, construct_subnet

__all__ = ["Subnet", "construct_subnet"]
