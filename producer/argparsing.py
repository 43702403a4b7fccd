"""argparse as the CLI uses it: an error is one line with a hint, as the commands' own errors
are (`clipfleet: error: ...`), and an unknown flag names the flags it may have meant instead
of printing the whole usage (`clipfleet run` has some 60 flags)."""
from __future__ import annotations

import argparse
import difflib
import re

_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<given>[^']*)' \(choose from (?P<choices>.*)\)$")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line; subcommand parsers are made of it too."""

    def error(self, message: str):
        wrong = _INVALID_CHOICE.search(message)
        if wrong is not None:  # a misspelt command or choice: name the close ones first
            choices = re.findall(r"'([^']*)'", wrong["choices"])
            close = difflib.get_close_matches(wrong["given"], choices, n=2, cutoff=0.6)
            if close:
                message = f"{message[:wrong.start()]}invalid choice: {wrong['given']!r} " \
                          f"(did you mean {' or '.join(close)}?)"
        self.exit(2, f"clipfleet: error: {message} (see: {self.prog} --help)\n")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """parser.parse_args, where arguments nobody takes are told apart: a flag gets the
    closest flags of the command it was given to."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = command_parser(parser, args)
        command.error(unknown_arguments(command, extra))
    return args


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser that `args` were parsed by: the deepest subcommand chosen."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                return command_parser(action.choices[chosen], args)
    return parser


def flags_of(parser: argparse.ArgumentParser) -> list[str]:
    return [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]


def unknown_arguments(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """One line about the arguments no flag took, with the flags each unknown one may mean."""
    flags = [arg for arg in extra if arg.startswith("-") and arg != "-"]
    if not flags:
        return f"unexpected argument{'s' if len(extra) > 1 else ''}: {' '.join(extra)}"
    known = flags_of(parser)
    parts = []
    for flag in flags:
        name = flag.split("=", 1)[0]
        close = suggestions(name, known)
        parts.append(f"{name} (did you mean {' or '.join(close)}?)" if close else name)
    return f"unknown flag{'s' if len(parts) > 1 else ''} {', '.join(parts)}"


def suggestions(name: str, known: list[str], n: int = 3) -> list[str]:
    """Flags that hold the typed name as a word of theirs first (`--threads` ->
    `--download-threads`), then those difflib finds close (`--shard-sise` -> `--shard-size`)."""
    word = name.lstrip("-").lower()
    holding = [flag for flag in known if word and word in flag.lstrip("-").split("-")] if word else []
    holding.sort(key=len)
    close = difflib.get_close_matches(name.lower(), known, n=n, cutoff=0.6)
    # Every flag holding the word: with one per stage (--download-threads, --clip-threads, ...)
    # the one meant can be any of them.
    return list(dict.fromkeys(holding[:6] + close))[:max(n, len(holding[:6]))]
