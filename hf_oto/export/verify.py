"""Code that proves an export loads without hf_oto: a prelude for a fresh Python process."""

NO_HF_OTO_PRELUDE = """
import importlib.abc, sys
class _BlockHFOTO(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_oto" or name.startswith("hf_oto."):
            raise ImportError("hf_oto must not be needed to load an export")
sys.meta_path.insert(0, _BlockHFOTO())
"""
