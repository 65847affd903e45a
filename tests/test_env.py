"""`hf-oto env` / `--version` and the lock file that scripts/setup.sh and CI install from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import tomllib
from jobs import hfoto

from hf_oto.env import KEY_PACKAGES, LOCK_FILE, lock_differences, locked_versions

ROOT = Path(__file__).resolve().parents[1]


def test_the_lock_pins_every_package_that_changes_behaviour():
    lock = locked_versions()
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "evaluate", "safetensors",
                 "huggingface-hub", "compressed-tensors", "gguf", "tokenizers", "numpy", "pytest", "ruff"):
        assert name in lock, name
    # Every runtime dependency of pyproject.toml is locked (its name, without the version range).
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = dep.split(";")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower().replace("_", "-")
        assert name in lock, name


def test_lock_differences_names_what_differs(tmp_path):
    fake = tmp_path / "lock.txt"
    fake.write_text("# comment\ntorch==0.0.1\nno-such-package-hf-oto==1.0 ; python_version >= '3.11'\n")
    lock = locked_versions(fake)
    assert lock == {"torch": "0.0.1", "no-such-package-hf-oto": "1.0"}
    diffs = lock_differences(lock)
    assert diffs["no-such-package-hf-oto"] == ("1.0", None) and diffs["torch"][0] == "0.0.1"


def test_env_prints_the_key_versions_and_the_lock_state(tmp_path):
    proc = hfoto("env", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in KEY_PACKAGES:
        assert f"- {name}: " in proc.stdout
    assert "accelerator: " in proc.stdout and str(LOCK_FILE) in proc.stdout
    version = hfoto("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("hf-oto ")


def test_the_installed_versions_are_the_locked_ones():
    """scripts/setup.sh installs the lock; only HF_OTO_LATEST=1 (the documented switch) installs others."""
    if os.environ.get("HF_OTO_LATEST", "0") != "0":
        pytest.skip("HF_OTO_LATEST is set: the newest versions were installed on purpose")
    assert lock_differences() == {}


def test_bf16_on_a_cpu_with_slow_bf16_kernels_is_warned_about(tmp_path, monkeypatch):
    import hf_oto.env as env
    from hf_oto.job.preflight import precision_warnings
    from hf_oto.trainer import HFOTOTrainingArguments

    assert env.cpu_bf16_slowdown(size=32, repeats=1) > 0
    args = HFOTOTrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True, report_to=[])
    monkeypatch.setattr(env, "cpu_bf16_slowdown", lambda: 9.0)
    (line,) = precision_warnings(args)
    assert "9x slower than fp32" in line and "bf16: false" in line
    monkeypatch.setattr(env, "cpu_bf16_slowdown", lambda: 0.8)
    assert precision_warnings(args) == []
    fp32 = HFOTOTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    monkeypatch.setattr(env, "cpu_bf16_slowdown", lambda: 9.0)
    assert precision_warnings(fp32) == []
    teacher = HFOTOTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], distill=True,
                                     distill_teacher_dtype="bfloat16")
    (line,) = precision_warnings(teacher)
    assert "distill_teacher_dtype: bfloat16" in line and "9x slower than fp32" in line and "'auto'" in line
    for fine in (dict(distill_teacher_dtype="auto"), dict(distill_teacher_dtype="same"), dict(distill=False)):
        args = HFOTOTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                      **{"distill": True, "distill_teacher_dtype": "bfloat16", **fine})
        assert precision_warnings(args) == []
    monkeypatch.setattr(env, "cpu_bf16_slowdown", lambda: 0.8)
    assert precision_warnings(teacher) == []
