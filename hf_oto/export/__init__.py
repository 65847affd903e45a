"""Step 5 of the data flow: write the pruned model as a standard Hugging Face repo."""

from hf_oto.export.card import render_card
from hf_oto.export.save import save_pruned

__all__ = ["render_card", "save_pruned"]
