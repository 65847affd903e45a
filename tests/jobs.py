"""Helpers for tests that run ``hf-oto`` as a user does: a real CLI in a subprocess on tiny settings."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from hf_oto.cli import main

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY_LLAMA = ("{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
              "num_attention_heads: 4, num_key_value_heads: 2, head_dim: 8, tie_word_embeddings: true}")
# Without the reload of the export in a fresh interpreter (about 10 s of imports here): the tests of that
# check pass --verify_export after SMALL.
SMALL = ["--max_steps", "8", "--pruning_periods", "2", "--max_text_mb", "0.2", "--train_tokenizer_vocab", "512",
         "--block_size", "32", "--logging_steps", "4", "--per_device_train_batch_size", "4",
         "--init_config", TINY_LLAMA, "--no_verify_export"]

# Runs the CLI; HF_OTO_TEST_KILL_AT=N makes the process SIGKILL itself right after checkpoint N is saved.
CLI = """
import os, signal, sys
kill_at = int(os.environ.get("HF_OTO_TEST_KILL_AT", "0"))
if kill_at:
    from transformers import TrainerCallback
    from hf_oto.trainer import HFOTOTrainer

    class _Kill(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    _init = HFOTOTrainer.__init__
    def _patched(self, *a, **k):
        _init(self, *a, **k)
        self.add_callback(_Kill())
    HFOTOTrainer.__init__ = _patched
from hf_oto.cli import main
sys.exit(main(sys.argv[1:]))
"""


def hfoto(*args: str, cwd: Path, kill_at: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """``hf-oto ARGS`` in a fresh Python process (output captured)."""
    env = dict(os.environ, HF_OTO_TEST_KILL_AT=str(kill_at), PYTHONUNBUFFERED="1")
    env.pop("HF_OTO_DEBUG", None)
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def user_error(proc: subprocess.CompletedProcess) -> str:
    """The one-line error of a refused run (asserts exit code 2, no traceback, one line)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("hf-oto: error: "), lines
    return lines[0]


def refused(capsys, *args) -> str:
    """``hf-oto ARGS`` in this process, refused: exit code 2 and one ``hf-oto: error:`` line (returned).

    For bad input that must be caught before anything loads; a subprocess adds seconds of imports and
    checks nothing more (``user_error`` covers the real process for runs that get further)."""
    capsys.readouterr()  # what the test's own set-up printed
    assert main([str(a) for a in args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "Warning" not in ln]
    assert len(err) == 1 and err[0].startswith("hf-oto: error: "), err
    return err[0]


def ran(capsys, *args) -> str:
    """``hf-oto ARGS`` in this process, run to the end (exit code 0); what it printed, stdout then stderr.

    For runs whose results are what a test checks: a subprocess adds seconds of imports and checks nothing
    more (the tests that use :func:`hfoto` cover the real process: exit codes, one-line errors, a kill)."""
    capsys.readouterr()  # what the test's own set-up printed
    code = main([str(a) for a in args])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    return printed.out + printed.err


def word_corpus(path: Path, lines: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(f"w{rng.randrange(60)}" for _ in range(12)) for _ in range(lines)) + "\n")
    return path


def no_pad_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer with an EOS token and no pad token (as Llama's and Mistral's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(60)} | {"[UNK]": 60, "</s>": 61}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    assert fast.pad_token is None
    fast.save_pretrained(folder)
    return folder
