"""The jobs behind the command line and their parts.

Jobs: ``prune_job`` (``hf-oto prune``: fine-tune and prune), ``oneshot_job`` (``hf-oto oneshot``) and
``evaluate_job`` (``hf-oto eval``). Parts: settings (``args``), checks before any work (``preflight``),
model building (``build``), the recipe (``recipe``), logging (``log``) and the closing table (``summary``).
"""
