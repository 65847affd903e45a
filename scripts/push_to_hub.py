"""Upload an hf-oto export to the Hugging Face Hub (same as ``hf-oto push``). Needs network and a token.

Usage: python scripts/push_to_hub.py OUT_DIR REPO_ID [--private]
"""

import sys

from hf_oto.cli import main

if __name__ == "__main__":
    sys.exit(main(["push", *sys.argv[1:]]))
