"""Fine-tune and prune a causal LM from a YAML config (same as ``hf-oto prune``).

Usage: python scripts/prune_finetune.py configs/quickstart.yaml [--key value ...]
Works under ``accelerate launch`` too.
"""

import sys

from hf_oto.main_job import run

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    run(sys.argv[1], sys.argv[2:])
