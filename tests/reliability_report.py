"""The reliability figures the test suite produces (issue: faults injected, runs resumed exactly, hostile
inputs tried and refused cleanly, data lost), merged by test module into one JSON file: by default
runs/reliability-report.json, or $GPTDS_RELIABILITY_REPORT."""

import json
import os
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
TOTALS = ("faults_injected", "runs_resumed_exactly", "inputs_tried", "inputs_refused_cleanly", "data_lost")


def report_path() -> Path:
    return Path(os.environ.get("GPTDS_RELIABILITY_REPORT", ROOT / "runs" / "reliability-report.json"))


def write_report(section: str, figures: dict) -> Path:
    """Merge one test module's figures into the report; sections of an earlier pytest process are dropped."""
    path = report_path()
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
