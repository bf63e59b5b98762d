"""Runs a list of gptds training commands inside one set of ranks, so that a test matrix pays the cost
of starting processes once. Launched by the tests as
    deepspeed --num_gpus 2 --no_local_rank tests/dist_runner.py SPEC.json OUT.json
SPEC.json is a list of {"name", "argv"} (argv as for `gptds`, e.g. ["pretrain", "--max_steps", "4"]); each
runs through the CLI parser and gptds.train.train, the real loop. Rank 0 writes OUT.json: per name the
RunResult fields, or the error a run raised."""

import dataclasses
import json
import sys
import traceback

from gptds import dist
from gptds.__main__ import build_parser
from gptds.config import run_config_from_flags
from gptds.train import train


def main(spec_path: str, out_path: str) -> None:
    info = dist.init_distributed()
    results = {}
    for scenario in json.load(open(spec_path)):
        args = build_parser().parse_args(scenario["argv"])
        try:
            result = dataclasses.asdict(train(run_config_from_flags(args.command, args)))
        except Exception as e:  # recorded for the test to show; the next scenario still runs
            result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        results[scenario["name"]] = result
        if info.is_main:  # written after each scenario: a crash still leaves the ones before
            with open(out_path, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
