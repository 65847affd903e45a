"""Exports leave nothing behind: a killed export is cleaned up, the check process dies with its parent, modes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from tiny import tiny_model

from hf_oto import construct_subnet, discover_groups, save_pruned, zero_groups
from hf_oto.export.verify import NO_HF_OTO_PRELUDE
from hf_oto.io import STAGING_MARKER, STAGING_TAG


def _pruned():
    model = tiny_model("llama")
    space = discover_groups(model)
    zero_groups(model, space, [space[0].name])
    return construct_subnet(model, space, layout="uniform")


KILLED_EXPORT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    from tiny import tiny_model
    import hf_oto.export.save as save
    from hf_oto import construct_subnet, discover_groups, save_pruned
    _write = save._write
    def write_then_die(*a, **k):
        _write(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)  # the weights are written, the rename never happens
    save._write = write_then_die
    model = tiny_model("llama")
    save_pruned(construct_subnet(model, discover_groups(model)), sys.argv[1])
""")


def _staging(parent, name):
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}{STAGING_TAG}"))


def test_a_killed_export_is_cleaned_up_by_the_next_one(tmp_path):
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(out), os.path.dirname(__file__)],
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = _staging(tmp_path, "export")
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file() and not out.exists()
    # staging-like folders that are not a dead hf-oto writer's stay: no marker, or a live writer
    foreign = tmp_path / f".export{STAGING_TAG}users-own"
    foreign.mkdir()
    live = tmp_path / f".export{STAGING_TAG}live"
    live.mkdir()
    (live / STAGING_MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    save_pruned(_pruned(), out)
    assert (out / "config.json").is_file()
    assert _staging(tmp_path, "export") == sorted([foreign, live])


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
def test_the_export_check_process_ends_with_its_parent(tmp_path):
    child = NO_HF_OTO_PRELUDE + "\nimport time\ntime.sleep(120)\n"
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        from hf_oto.export.verify import child_env
        p = subprocess.Popen([sys.executable, "-c", {child!r}], env=child_env())
        print(p.pid, flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    child_pid = int(proc.stdout.readline())
    assert _running(child_pid)
    proc.kill()  # possibly before the child has even started its watchdog
    proc.wait()
    deadline = time.monotonic() + 20
    while _running(child_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(child_pid)


def test_export_folders_get_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        out = save_pruned(_pruned(), tmp_path / "export")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o750  # not the 0700 of a temporary directory
    assert not (out / STAGING_MARKER).exists()
