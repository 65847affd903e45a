"""The public API: top-level names, lazy loading, and the README's Python examples as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_hf_oto_loads_no_heavy_module():
    code = ("import sys, hf_oto; heavy = ('torch', 'transformers', 'datasets', 'peft');"
            "print(','.join(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_every_public_name_resolves_and_low_level_names_stay_in_their_step():
    import hf_oto
    from hf_oto.groups import Group, GroupSet, group_is_zero, register_rule  # noqa: F401 - they live here

    for name in hf_oto.__all__:
        assert getattr(hf_oto, name) is not None, name
    for name in ("HFOTOTrainer", "HFOTOTrainingArguments", "HESSO", "HESSOConfig", "CRICConfig", "discover_groups",
                 "construct_subnet", "save_pruned", "push_pruned", "oneshot_prune"):
        assert name in hf_oto.__all__
    for name in ("Group", "GroupSet", "group_is_zero", "register_rule"):
        assert name not in hf_oto.__all__
    with pytest.raises(AttributeError):
        hf_oto.no_such_name  # noqa: B018


def test_hesso_config_is_frozen_validated_and_recorded(tmp_path):
    import dataclasses

    from hf_oto import ConfigError, HESSOConfig

    config = HESSOConfig(target_sparsity=0.4, pruning_steps=20, pruning_periods=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.target_sparsity = 0.9
    record = dataclasses.asdict(config)
    assert record["target_sparsity"] == 0.4 and record["layout"] == "uniform" and "weights" in record
    for bad in (dict(target_sparsity=1.2), dict(layout="ragged"), dict(pruning_steps=2, pruning_periods=3)):
        with pytest.raises(ConfigError):
            HESSOConfig(**bad)


def _readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("index", range(len(_readme_blocks())))
def test_readme_python_examples_run_as_written(tmp_path, index):
    code = _readme_blocks()[index]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
