"""Step 6 of the data flow: upload an exported folder to the Hugging Face Hub."""

from hf_oto.hub.push import push_pruned

__all__ = ["push_pruned"]
