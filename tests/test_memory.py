"""Training on a CPU keeps freed memory for reuse (hf_oto.job.memory)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[1] / "hf_oto" / "job" / "memory.py"
# Load the module by path (no torch import: a fresh process in well under a second), optionally apply it,
# then allocate and free a 64 MB block 20 times and count the page faults that took.
SCRIPT = textwrap.dedent("""
    import importlib.util, resource, sys
    spec = importlib.util.spec_from_file_location("memory", sys.argv[1])
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    applied = memory.keep_freed_memory() if sys.argv[2] == "keep" else False
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        block = bytearray(64 << 20)  # zero-filled: every page is touched
        del block
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str, env: dict[str, str] | None = None) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(MODULE), mode], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator setting (Linux only)")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    applied, plain = _faults("plain")
    pages = 20 * (64 << 20) // resource.getpagesize()
    assert not applied and plain >= pages * 0.9  # every allocation faults its pages in
    applied, kept = _faults("keep")
    if not applied:
        pytest.skip("not glibc")  # musl and others: nothing to set
    assert kept * 5 < plain  # about the first allocation's faults only
    off = dict(os.environ, HF_OTO_KEEP_FREED_MEMORY="0")
    applied, again = _faults("keep", off)
    assert not applied and again >= plain * 0.9  # the switch turns it off
