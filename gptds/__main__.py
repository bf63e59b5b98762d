"""The `gptds` command line: subcommands only, each a typed settings dataclass whose fields are its flags
(config.add_flags) handed to the function that does the work. User mistakes (UserError) print one line
and exit 2, without a traceback; so do errors of the machine (OSError: disk full, no permission), with
exit status 1. Under a launcher the line is printed once, not once per rank (errors.report). Third-party
notices that do not concern the user are held back unless --verbose or GPTDS_VERBOSE=1 (notices.py)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys

from gptds import dist, notices  # notices before the imports below: it holds back notices they print
from gptds.chat import ChatConfig, chat
from gptds.cli import ArgumentParser
from gptds.config import add_flags, add_run_flags, from_flags, run_config_from_flags
from gptds.convert import CONVERSIONS
from gptds.data.prepare import (
    PrepareChatConfig,
    PrepareDollyConfig,
    PrepareTextConfig,
    prepare_chat,
    prepare_dolly,
    prepare_text,
)
from gptds.errors import EveryRankError, UserError, report
from gptds.evaluate import EvaluateConfig, evaluate_checkpoint
from gptds.generate import GenerateConfig, generate_from_checkpoint
from gptds.rl import PrepareTaskConfig, prepare_task
from gptds.staging import free_space
from gptds.train import train


def _command(subparsers, name: str, help_text: str, cls, run) -> argparse.ArgumentParser:
    """Subcommand `name` whose flags are the fields of dataclass `cls`; run(settings) does the work."""
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    add_flags(p, cls)
    _everywhere_flags(p)
    p.set_defaults(func=lambda args: run(from_flags(cls, args)))
    return p


def _train(job: str):
    def run(args):
        train(run_config_from_flags(job, args))
    return run


def _stdout_is_data(fn):
    """For commands whose stdout is their result: library chatter (DeepSpeed logs to stdout) goes to
    stderr while fn runs, and only the returned text reaches stdout."""
    def run(settings):
        with contextlib.redirect_stdout(sys.stderr):
            out = fn(settings)
        print(out)
    return run


def _streamed_to_stdout(fn):
    """For commands whose stdout is their result, written as it is produced: fn(settings, out=stdout) writes
    it, while library chatter goes to stderr."""
    def run(settings):
        out = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            fn(settings, out=out)
        out.write("\n")
        out.flush()
    return run



def _everywhere_flags(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """Flags taken before the subcommand or after it. --local_rank=N: `deepspeed` (without --no_local_rank)
    and torch.distributed.launch pass it, before the subcommand or after it; the rank's device comes from the
    LOCAL_RANK environment variable either way. A subcommand's default must not undo the top level's value."""
    default = (lambda value: value) if top_level else (lambda value: argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=default(None), help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", default=default(False),
                        help=f"also show third-party notices that gptds holds back (or {notices.VERBOSE_ENV}=1)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="gptds", description="GPT-2 pretraining and instruction fine-tuning "
                            "on DeepSpeed ZeRO. `gptds pretrain` with no flags runs the bundled demo.")
    _everywhere_flags(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True)

    prepare = sub.add_parser("prepare", help="tokenise a corpus or instruction data into shards")
    kinds = prepare.add_subparsers(dest="kind", required=True)
    _command(kinds, "text", "text files, JSONL/JSON, parquet or a Hugging Face dataset", PrepareTextConfig,
             prepare_text)
    _command(kinds, "dolly", "databricks-dolly-15k (or Alpaca-layout) instruction records", PrepareDollyConfig,
             prepare_dolly)
    _command(kinds, "chat", "conversations (OpenAI messages, ShareGPT, or Dolly/Alpaca as one turn) in ChatML",
             PrepareChatConfig, prepare_chat)
    _command(kinds, "task", "an RL task's training prompts and answers as conversations (the format fine-tune "
             "before `gptds rl`)", PrepareTaskConfig, prepare_task)

    for job, help_text in (("pretrain", "pretrain on token shards (or a mixture of prepared folders)"),
                           ("finetune", "fine-tune on prepared conversations or instruction records (or a mixture)"),
                           ("rl", "reinforcement learning with verifiable rewards (GRPO-style) on a task's prompts")):
        p = sub.add_parser(job, help=help_text, description=help_text)
        add_run_flags(p, job)
        _everywhere_flags(p)
        p.set_defaults(func=_train(job))

    _command(sub, "chat", "talk to a chat model (interactive, or --message for one reply on stdout)", ChatConfig,
             chat)
    _command(sub, "generate", "continue a prompt with a model (printed as it is generated)", GenerateConfig,
             _streamed_to_stdout(generate_from_checkpoint))
    _command(sub, "evaluate", "HellaSwag accuracy (and validation loss) of a model, as JSON", EvaluateConfig,
             _stdout_is_data(lambda cfg: json.dumps(evaluate_checkpoint(cfg))))

    convert = sub.add_parser("convert", help="ZeRO checkpoints to consolidated / Hugging Face / universal form")
    conversions = convert.add_subparsers(dest="conversion", required=True)
    for name, (help_text, cls, run) in CONVERSIONS.items():
        _command(conversions, name, help_text, cls, run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    notices.set_verbose(args.verbose)
    try:
        args.func(args)
    except UserError as e:
        if not isinstance(e, EveryRankError) or dist.prints_shared_errors():  # every rank's alike: rank 0's
            report(f"gptds {args.command}: error: {e}")
        return 2
    except OSError as e:  # the machine, not a bug: a full disk, a folder without write permission
        where = f"{e.filename}: " if e.filename else ""
        free = free_space(e.filename or ".") if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        report(f"gptds {args.command}: error: {where}{e.strerror or e}{free}")
        return 1
    except KeyboardInterrupt:
        report(f"gptds {args.command}: interrupted")
        return 130
    except Exception as e:
        if not dist.peer_failed(e):
            raise
        print(f"gptds {args.command}: rank {dist.info().rank} stopped: another rank failed (its error is above)",
              file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The `gptds` program (its console script, and `python -m gptds`, which the launchers start): main(), then,
    once a process group exists, an exit that skips the interpreter's teardown. Tearing down torch's
    distributed state after the work is done and saved sometimes aborts a rank ("terminate called without an
    active exception", SIGABRT: exit status -6, which fails the whole launch); seen 3 times in about 40 launches
    of 2 CPU ranks here, with and without destroy_process_group at exit. Everything gptds writes is closed by
    then (checkpoints, metrics, TensorBoard, W&B), and stdout and stderr are flushed first."""
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.joined():
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
