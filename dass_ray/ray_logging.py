"""Quieter Ray worker logs: run in every worker of our jobs (``worker_process_setup_hook``).

Kept free of heavy imports (no torch, no ray.train): every Ray worker process of the job
imports this module before it runs anything, and session 10 measured that a hook which
pre-imports the ML stack makes every worker pay for it (docs/measurements.md, Translation speed).

What it silences, and why:

- Ray Train v2's ``PlacementGroupCleaner`` asks the State API once a second whether the
  train controller is alive. A local Ray started without the dashboard (``ensure_ray``)
  has no State API, so it logged "Failed to query Ray Train Controller actor state" every
  second of every Ray Train stage (937 lines in a 17-minute demo run, 2026-11-30).
  The cleaner only matters when a driver dies without tearing its training down; its
  errors (a failed cleanup) still come through at ERROR level.
- Ray Train v2 patches ``print`` in its workers to go to Train's logger *and*, when Ray has
  wrapped stdout (as it does in workers), to the original ``print``: every line of our
  training loops reached the driver twice. With the patch off (``RAY_TRAIN_ENABLE_PRINT_PATCH=0``,
  read when the Train worker starts, after this hook) ``print`` is the plain one: once.
"""
from __future__ import annotations

import logging
import os

NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"  # ray.train.v2._internal.constants.ENABLE_PRINT_PATCH_ENV_VAR


def quiet_worker_logs() -> None:
    """Raise the level of :data:`NOISY_LOGGERS` to ERROR and turn Train's print patch off in
    this process (unless the user set ``RAY_TRAIN_ENABLE_PRINT_PATCH`` themselves)."""
    os.environ.setdefault(PRINT_PATCH_ENV, "0")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
