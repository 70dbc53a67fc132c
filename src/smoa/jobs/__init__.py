"""Jobs: end-to-end runs of the whole system (the main job behind ``smoa run``)."""

from __future__ import annotations

from smoa.jobs.main_job import format_table, main, run_main_job

__all__ = ["format_table", "main", "run_main_job"]
