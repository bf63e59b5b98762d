"""The reliability figures the fault-injection and hostile-input suites count (faults injected, runs resumed
exactly, hostile inputs tried and refused cleanly, data lost), merged by test module into one JSON file, and
only when asked: bench/reliability.py runs those suites with $GPTDS_RELIABILITY_REPORT set to a file of its
own and turns it into bench/results/reliability-cpu-<date>.json. A plain test run writes nothing (tests write
only to temporary folders)."""

import json
import os
from pathlib import Path

import psutil
import pytest

TOTALS = ("faults_injected", "runs_resumed_exactly", "inputs_tried", "inputs_refused_cleanly",
          "inputs_accepted_correctly", "data_lost")


def report_path() -> Path | None:
    path = os.environ.get("GPTDS_RELIABILITY_REPORT")
    return Path(path) if path else None


def write_report(section: str, figures: dict) -> Path | None:
    """Merge one test module's figures into the report, if one was asked for; sections of an earlier pytest
    process are dropped."""
    path = report_path()
    if path is None:
        return None
    session = f"{os.getpid()}-{psutil.Process().create_time():.0f}"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        report = {}
    if report.get("session") != session:
        report = {"session": session}
    report[section] = figures
    sections = [v for k, v in report.items() if isinstance(v, dict) and k != "totals"]
    report["totals"] = {key: sum(s.get(key, 0) for s in sections) for key in TOTALS}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def figures_fixture(section: str, figures: dict):
    """A module-scoped autouse fixture that hands a test module's figures to write_report when it ends."""
    @pytest.fixture(scope="module", autouse=True)
    def report():
        yield figures
        write_report(section, figures)
    return report
