"""The console a user sees: third-party notices that do not concern a gptds user are held back, the rest
(gptds's own lines, real warnings and errors) pass. Importing this module installs the filters, so the CLI
(__main__) imports it before deepspeed and bitsandbytes load, whose notices come at import time; the held
records are printed after all when the run is verbose (`--verbose` or GPTDS_VERBOSE=1, see set_verbose).

Each held notice is listed with the reason it does not concern the user; anything not listed passes."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

VERBOSE_ENV = "GPTDS_VERBOSE"  # "1": show third-party notices too (the same as --verbose)


@dataclass(frozen=True)
class Notice:
    logger: str     # the logging.Logger that emits it
    pattern: str    # a regular expression the message starts with
    why: str        # why a gptds user does not need it


HELD = (
    Notice("DeepSpeed", r"Setting accelerator to CPU",
           "on a machine without a GPU, DeepSpeed picks its CPU accelerator, as gptds expects; every process "
           "says so at import"),
    Notice("DeepSpeed", r"\*+ You are using ZeRO with an untested optimizer",
           "gptds sets zero_allow_untested_optimizer for bitsandbytes' 8-bit AdamW on purpose; its ZeRO 1/2/3 "
           "runs and exact resumes are tested here"),
    Notice("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward",
           "a 4-bit matmul kernel for CPUs with AVX512-BF16, downloaded from the hub; gptds never runs 4-bit "
           "matmuls (it uses the 8-bit optimizer only)"),
)
# Python warnings that DeepSpeed or torch raise on every rank, about their own code.
HELD_WARNINGS = (
    (FutureWarning, r"`torch\.distributed\.[\w.]+` (is deprecated|will be deprecated|is a private function)",
     "torch's deprecations of collectives DeepSpeed's ZeRO calls (all_gather_into_tensor, reduce_scatter_tensor); "
     "nothing a user can change"),
)


class _Hold(logging.Filter):
    """Drops the held notices of one logger while not verbose, keeping them for set_verbose(True)."""

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if _verbose or not self.pattern.match(record.getMessage()):
            return True
        self.held.append(record)
        return False


_verbose = os.environ.get(VERBOSE_ENV) == "1"
_filters: dict[str, _Hold] = {}


def install() -> None:
    """Attach the filters (idempotent). A logger's filters survive its later configuration by the library
    (DeepSpeed sets the level and handlers of its logger when it is imported, after this)."""
    for name in {n.logger for n in HELD}:
        if name not in _filters:
            _filters[name] = _Hold([n.pattern for n in HELD if n.logger == name])
            logging.getLogger(name).addFilter(_filters[name])
    if not _verbose:
        for category, message, _ in HELD_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)


def set_verbose(verbose: bool) -> None:
    """Verbose: show third-party notices from now on, and those held back so far (import-time ones)."""
    global _verbose
    if not verbose or _verbose:
        return
    _verbose = True
    for category, message, _ in HELD_WARNINGS:
        warnings.filterwarnings("default", message=message, category=category)
    for name, hold in _filters.items():
        held, hold.held = hold.held, []
        for record in held:
            logging.getLogger(name).handle(record)


def is_verbose() -> bool:
    return _verbose


@contextlib.contextmanager
def held_output() -> Iterator[None]:
    """Hold back what third-party code prints (print and progress bars, not logging) inside the block,
    e.g. DeepSpeed's checkpoint reader announcing each step of its work on every rank; the caller says why
    the user does not need it. Verbose: it passes."""
    if _verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


install()
