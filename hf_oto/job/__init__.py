"""The main job's parts: settings (``args``), checks before any work (``preflight``), model building
(``build``) and the closing table (``summary``). ``hf_oto.main_job`` runs them in order."""
