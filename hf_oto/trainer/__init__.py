"""Step 3 of the data flow: Hugging Face Trainer glue for HESSO/CRIC."""

from hf_oto.trainer.args import HFOTOTrainingArguments
from hf_oto.trainer.trainer import HFOTOTrainer

__all__ = ["HFOTOTrainer", "HFOTOTrainingArguments"]
