import os
import sys
import warnings
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # parallel workers share the cores instead of each taking all
    from hf_oto.env import usable_cores

    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // _workers)))

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore", message=".*must be `None` or an integer within the vocabulary.*")


def pytest_report_header(config):
    """The versions under test and whether they are the locked ones (README: "Locked installs")."""
    from hf_oto.env import report

    return ["hf-oto environment:", *report().splitlines()]


@pytest.fixture(scope="session", autouse=True)
def _children_write_temporary_files_under_pytests_tree(tmp_path_factory):
    """Subprocesses (accelerate launch's torchelastic folders, the export checks) put their temporary files in
    pytest's own temporary tree, which pytest prunes, instead of leaving them in /tmp."""
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("children"))
    yield
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before


def _devices():
    import torch

    yield "cpu"
    reason = "no CUDA device on this machine (the same test runs on one when present)"
    yield pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=reason))


def pytest_generate_tests(metafunc):
    """``device``: every test that takes it runs on the CPU, and on CUDA whenever a GPU is present
    (reported as skipped, with the reason, where there is none)."""
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", list(_devices()))
