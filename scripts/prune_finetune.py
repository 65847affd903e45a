"""Fine-tune and prune a causal LM from a YAML config (same as ``hf-oto prune``).

Usage: python scripts/prune_finetune.py configs/quickstart.yaml [--key value ...]
Works under ``accelerate launch`` too.
"""

import sys

from hf_oto.cli import main

if __name__ == "__main__":
    sys.exit(main(["prune", *sys.argv[1:]]))
