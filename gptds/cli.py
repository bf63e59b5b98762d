"""The argument parser of every gptds command: argparse with a subcommand that reports its own mistakes (its
usage, not the top-level one), the closest known flag for a mistyped one (also when the mistyped flag leaves
a required one missing), and the message printed once per launch (errors.report)."""

from __future__ import annotations

import argparse
import difflib
import re
import sys

from gptds.errors import report

CLOSE_MATCH_CUTOFF = 0.6  # difflib's similarity ratio: --max_stesp ~ --max_steps, --promt ~ --prompt


class ArgumentParser(argparse.ArgumentParser):
    """Subcommands get the same class (argparse's default parser_class is the parent's type)."""

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and not self._has_subcommands():
            # A leaf command: argparse would hand its unknown flags to the top-level parser, whose usage and
            # flags say nothing about this command.
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def error(self, message: str):
        report(f"{self.format_usage()}{self.prog}: error: {message}{self._hint(message)}")
        sys.exit(2)

    # ------------------------------------------------------------ hints

    def _has_subcommands(self) -> bool:
        return any(isinstance(a, argparse._SubParsersAction) for a in self._actions)

    def _long_flags(self) -> list[str]:
        return [s for a in self._actions if a.help != argparse.SUPPRESS for s in a.option_strings
                if s.startswith("--")]

    def _closest(self, word: str, candidates: list[str]) -> str | None:
        found = difflib.get_close_matches(word, candidates, n=1, cutoff=CLOSE_MATCH_CUTOFF)
        return found[0] if found else None

    def _unknown_flags(self) -> list[str]:
        known = set(self._option_string_actions)
        flags = [a.split("=", 1)[0] for a in getattr(self, "_argv", []) if a.startswith("--")]
        return [f for f in flags if f not in known and not any(k.startswith(f) for k in known)]

    def _hint(self, message: str) -> str:
        if message.startswith("unrecognized arguments:"):
            matches = {flag: match for flag in self._unknown_flags()
                       if (match := self._closest(flag, self._long_flags()))}
            if len(matches) == 1:
                return f" (did you mean {next(iter(matches.values()))}?)"
            return f" ({'; '.join(f'{f}: did you mean {m}?' for f, m in matches.items())})" if matches else ""
        required = re.match(r"the following arguments are required: (.*)", message)
        if required:
            missing = [m.strip() for m in required.group(1).split(",")]
            hints = [f"{flag} was given: did you mean {match}?" for flag in self._unknown_flags()
                     if (match := self._closest(flag, missing))]
            return f" ({'; '.join(hints)})" if hints else ""
        choice = re.match(r"argument .*: invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            match = self._closest(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
            return f" (did you mean {match}?)" if match else ""
        return ""
