"""The recipe every ``hf-oto prune`` export carries (``hf_oto_recipe.yaml``), and reruns from it.

A recipe holds the settings the job ran with (the YAML file and the command line merged, exactly
what ``hf-oto prune`` accepts), the data files with their sizes and SHA-256, the model source, the
pruning settings as they resolved, and the library versions. ``hf-oto prune --recipe FILE`` (or the
file given as the config) reruns it; a data file that changed since is refused in one line.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from hf_oto.errors import ConfigError
from hf_oto.io import JSONObject

RECIPE_FILE = "hf_oto_recipe.yaml"
VERSION = 1


def file_facts(path: str) -> JSONObject:
    """Path, size and SHA-256 of a data file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"path": str(path), "bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def recipe_text(settings: JSONObject, resolved: JSONObject | None = None, job: str = "prune") -> str:
    """The recipe of a ``job`` (``prune`` or ``oneshot``) run with ``settings`` (YAML text)."""
    import platform

    from hf_oto.env import KEY_PACKAGES, installed_version

    def listed(value) -> list[str]:  # a single file may be given as one string
        return [value] if isinstance(value, str) else list(value or [])

    files = listed(settings.get("train_files")) + listed(settings.get("eval_files"))
    doc = {
        "hf_oto_recipe": VERSION,
        "job": job,
        "settings": settings,
        "data": [file_facts(f) for f in files],
        "resolved": resolved or {},
        "versions": {"python": platform.python_version(),  # the python-stdlib text depends on it
                     **{name: installed_version(name) for name in KEY_PACKAGES}},
    }
    rerun = ("hf-oto prune --recipe THIS_FILE --output_dir NEW_DIR --pruned_output_dir NEW_DIR/pruned"
             if job == "prune" else "hf-oto oneshot --recipe THIS_FILE --out NEW_DIR")
    header = f"# hf-oto recipe: the settings that produced this export. Rerun: {rerun}\n"
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def is_recipe(values: JSONObject) -> bool:
    return "hf_oto_recipe" in values


def recipe_settings(values: JSONObject, where: str, job: str = "prune") -> JSONObject:
    """The settings of a ``job`` recipe read from ``where``, after checking it and its data files."""
    if values.get("job", "prune") != job:
        raise ConfigError(f"{where} is a recipe of hf-oto {values.get('job')}: rerun it with "
                          f"hf-oto {values.get('job')} --recipe {where}")
    if values.get("hf_oto_recipe") != VERSION:
        raise ConfigError(f"{where}: recipe version {values.get('hf_oto_recipe')!r} is not one this hf-oto reads "
                          f"({VERSION})")
    settings = values.get("settings")
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: a recipe needs a 'settings' mapping")
    for entry in values.get("data") or []:
        path = Path(entry["path"])
        if not path.is_file():
            raise ConfigError(f"{where}: data file {path} is gone")
        if file_facts(str(path))["sha256"] != entry["sha256"]:
            raise ConfigError(f"{where}: data file {path} changed since the recipe was written (SHA-256 differs)")
    return dict(settings)
