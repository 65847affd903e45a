"""The main job's output: one ``logging`` logger, rank-aware like Trainer's own logs.

The main process logs at ``log_level`` (``passive``, the default, means INFO here, so the summary
shows), every other process at ``log_level_replica`` (WARNING unless set), as ``TrainingArguments``
documents them. Messages go to stdout as plain lines.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "hf_oto"
_MARK = "_hf_oto_job_handler"


def job_logger(targs) -> logging.Logger:
    """The ``hf_oto`` logger, set for this process from ``targs`` (``log_level``, ``log_level_replica``,
    ``should_log``), writing to the current stdout."""
    from transformers.training_args import trainer_log_levels

    main = trainer_log_levels[targs.log_level]
    replica = trainer_log_levels[targs.log_level_replica]
    level = (logging.INFO if main == -1 else main) if targs.should_log else (
        logging.WARNING if replica == -1 else replica)
    logger = logging.getLogger(LOGGER)
    for handler in [h for h in logger.handlers if getattr(h, _MARK, False)]:
        logger.removeHandler(handler)  # a previous job's handler may hold a stdout that is gone
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    setattr(handler, _MARK, True)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def log() -> logging.Logger:
    return logging.getLogger(LOGGER)
