"""The reliability figures: runs the fault-injection and hostile-input suites (pytest) with
$GPTDS_RELIABILITY_REPORT pointing at a temporary file that the suites fill with their counts (faults
injected, runs resumed exactly, hostile inputs tried and refused with one line, data lost), and writes them,
with the pytest outcome and the machine, to bench/results/reliability-<device>-<date>.{json,md}. The
README's Reliability table is readme_table() of the newest such file (tests/test_structure.py checks it).

    python bench/reliability.py [--results_dir DIR] [-k EXPR]"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, ROOT, machine, md_table, venv_env, versions, write_report  # noqa: E402,I001

SUITES = ("tests/test_reliability.py", "tests/test_hostile_inputs.py", "tests/test_checkpoint_integrity.py",
          "tests/test_run_folder_lock.py", "tests/test_outputs.py", "tests/test_build_locks.py",
          "tests/test_data_faults.py")
COLUMNS = (("faults_injected", "faults injected"), ("runs_resumed_exactly", "runs resumed exactly"),
           ("inputs_tried", "hostile inputs tried"), ("inputs_refused_cleanly", "refused with a one-line error"),
           ("inputs_accepted_correctly", "accepted (valid: 4 MB one-line documents, blank ones among good ones)"),
           ("data_lost", "data lost"))


def readme_table(report: dict) -> str:
    """The README's Reliability table: one row of the totals of a report."""
    totals = report["totals"]
    lines = md_table([title for _, title in COLUMNS], [[totals.get(key, 0) for key, _ in COLUMNS]], "r" * len(COLUMNS))
    return "\n".join(lines) + "\n"


def newest_report(results_dir: Path = RESULTS_DIR) -> Path:
    return max(results_dir.glob("reliability-*.json"), key=lambda p: re.sub(r"^reliability-\w+-", "", p.stem))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results_dir", default=str(RESULTS_DIR))
    parser.add_argument("-k", default=None, help="pytest -k expression (a partial run, for trying the script)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gptds-reliability-") as tmp:
        figures_path = Path(tmp) / "figures.json"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITES,
                   *(["-k", args.k] if args.k else [])]
        env = {**venv_env(), "GPTDS_RELIABILITY_REPORT": str(figures_path)}
        started = time.monotonic()
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.monotonic() - started
        summary = (proc.stdout.strip().splitlines() or [""])[-1]
        if not figures_path.exists():
            raise SystemExit(f"the suites wrote no figures (pytest exited {proc.returncode}):\n{proc.stdout[-3000:]}")
        figures = json.loads(figures_path.read_text())
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|error|skipped)", summary)}
    report = {"date": datetime.date.today().isoformat(), "device": "cpu", "machine": machine(),
              "versions": versions(), "command": "python bench/reliability.py" + (f" -k {args.k}" if args.k else ""),
              "suites": list(SUITES), "pytest_exit_status": proc.returncode, "pytest_summary": summary,
              "tests": counts, "suite_seconds": round(seconds, 1), "totals": figures.pop("totals"),
              "sections": {k: v for k, v in figures.items() if k != "session"}}
    markdown = "\n".join([f"# Reliability ({report['date']})", "", f"`{report['command']}`: {summary} "
                          f"in {seconds:.0f} s.", "", readme_table(report)])
    json_path, md_path = write_report("reliability", report, markdown, args.results_dir)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
