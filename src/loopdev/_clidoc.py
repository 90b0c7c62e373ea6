"""The CLI's documents, generated from its argparse parser: ``loopdev(8)``, the
Sphinx CLI reference, and bash and zsh completion.

One source (``loopdev.cli.build_parser()`` and the losetup drop-in's option
table) for all four, checked in under ``data/`` and ``docs/`` so that neither
an install nor the documentation build needs to run this. After changing the
CLI: ``python -m loopdev._clidoc --write`` in the checkout (``--check``: are
they current?).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from loopdev import __version__, losetup
from loopdev.cli import PROG, build_parser

OUTPUTS = {
    "data/loopdev.8": "man",
    "data/completions/loopdev": "bash",
    "data/completions/_loopdev": "zsh",
    "docs/cli.rst": "rst",
}
# Values completed with file names (the rest take free text).
_FILE_METAVARS = {
    "FILE",
    "PATH",
    "DIR",
    "DEVICE",
    "DEVICE|FILE",
    "<loopdev>",
    "<loopdev>...",
    "<file>",
}
DATE = "2026"

_DESCRIPTION = (
    "loopdev sets up and controls Linux loop devices like losetup(8), in one "
    "process: attach an image file to a free loop device (registering its "
    "partitions even where the kernel has no partition parser), list, find, "
    "resize and detach devices, and serve loop devices to unprivileged users "
    "(the broker). It works in containers whose /dev is a static tmpfs."
)
_LOSETUP = (
    "loopdev losetup ARGS..., or loopdev run under the name losetup (a symlink), "
    "takes util-linux 2.38 losetup's options and gives its standard output and "
    "exit status; put it first in PATH inside a container. Its options:"
)
_EXIT = [
    ("0", "success"),
    ("1", "failure (one line on standard error: loopdev: message)"),
    ("2", "usage error (losetup drop-in: 1, as util-linux)"),
]
_ENVIRONMENT = [
    (
        "LOOPDEV_BROKER",
        "socket of a loopdev serve broker that library attaches go through (no root needed)",
    ),
]


class Option:
    """One option or positional argument of a command."""

    def __init__(self, names: list[str], metavar: str | None, help: str, optional_value: bool):
        self.names = names
        self.metavar = metavar
        self.help = help
        self.optional_value = optional_value

    @property
    def spelled(self) -> str:
        """``-o, --offset N`` (``--direct-io[=on|off|auto]`` for an optional value)."""
        text = ", ".join(self.names)
        if self.metavar and self.names:
            text += f"[={self.metavar}]" if self.optional_value else f" {self.metavar}"
        return text or (self.metavar or "")


class Command:
    def __init__(self, name: str, help: str, usage: str, options: list[Option]) -> None:
        self.name = name
        self.help = help
        self.usage = usage
        self.options = options


def _metavar(action: argparse.Action) -> str | None:
    if action.nargs == 0:
        return None
    if isinstance(action.metavar, str):
        return action.metavar
    return action.dest.upper()


def _usage_part(action: argparse.Action) -> str:
    meta = _metavar(action) or ""
    if not action.option_strings:
        if action.nargs == "*":
            return f"[{meta}...]"
        if action.nargs == "?":
            return f"[{meta}]"
        if action.nargs == argparse.REMAINDER:
            return f"{meta}..."
        return meta
    name = action.option_strings[0]
    if not meta:
        return f"[{name}]"
    if action.nargs == "?":
        return f"[{name}[={meta}]]"
    return f"[{name} {meta}]"


def _options(parser: argparse.ArgumentParser) -> list[Option]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        found.append(
            Option(
                list(action.option_strings),
                _metavar(action),
                action.help or "",
                action.nargs == "?" and bool(action.option_strings),
            )
        )
    return found


def commands() -> tuple[list[Option], list[Command]]:
    """The top-level options and each command, in the parser's order."""
    parser = build_parser()
    sub: argparse._SubParsersAction[argparse.ArgumentParser] = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    )
    helps = {c.dest: c.help or "" for c in sub._choices_actions}
    found = []
    for name, p in sub.choices.items():
        parts = [_usage_part(a) for a in p._actions if a.help != argparse.SUPPRESS]
        found.append(Command(name, helps[name], " ".join([PROG, name, *parts]), _options(p)))
    return _options(parser), found


def _losetup_options() -> list[Option]:
    """The drop-in's options, from the table its ``--help`` prints."""
    found = []
    for spelled, text in losetup._OPTIONS_HELP:
        m = re.fullmatch(r"\s*((?:--?[\w-]+(?:, )?)+)(.*)", spelled)
        if m is None:
            continue
        spelled_names: str = m.group(1)
        rest: str = m.group(2)
        names = [n.strip() for n in spelled_names.split(",")]
        rest = rest.strip()
        optional = rest.startswith("[=")
        metavar = rest[2:-1] if optional else rest or None
        found.append(Option(names, metavar, text, optional))
    return found


# --- man page (roff) -------------------------------------------------------------------


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line if line[:1] in ".'" else line) for line in text.splitlines())


def _man_option(option: Option) -> Iterator[str]:
    if not option.names and not option.help:
        return  # a positional the usage line already names
    yield ".TP"
    if option.names:
        names = ", ".join(f"\\fB{_roff(n)}\\fR" for n in option.names)
        if option.metavar:
            meta = f"\\fI{_roff(option.metavar)}\\fR"
            names += f"[={meta}]" if option.optional_value else f" {meta}"
        yield names
    else:
        yield f"\\fI{_roff(option.metavar or '')}\\fR"
    yield _roff(option.help)


def man() -> str:
    top, cmds = commands()
    lines = [
        '.\\" Generated by python -m loopdev._clidoc from loopdev.cli; do not edit.',
        f'.TH LOOPDEV 8 "{DATE}" "loopdev {__version__}" "System Administration"',
        ".SH NAME",
        "loopdev \\- set up and control loop devices",
        ".SH SYNOPSIS",
    ]
    for cmd in cmds:
        lines += [".HP", _roff(cmd.usage)]
    lines += [".HP", f"{PROG} \\-\\-version", ".HP", "losetup ARGS...", ".SH DESCRIPTION"]
    lines += [_roff(_DESCRIPTION), ".SH OPTIONS"]
    for option in top:
        lines += _man_option(option)
    lines.append(".SH COMMANDS")
    for cmd in cmds:
        lines += [".SS " + _roff(cmd.name), _roff(cmd.help + "."), ".PP", _roff(cmd.usage)]
        if cmd.name == "losetup":
            lines += [".PP", _roff(_LOSETUP)]
            for option in _losetup_options():
                lines += _man_option(option)
            continue
        for option in cmd.options:
            lines += _man_option(option)
    lines.append(".SH EXIT STATUS")
    for code, text in _EXIT:
        lines += [".TP", code, _roff(text)]
    lines.append(".SH ENVIRONMENT")
    for name, text in _ENVIRONMENT:
        lines += [".TP", f"\\fB{name}\\fR", _roff(text)]
    lines += [
        ".SH SEE ALSO",
        "\\fBlosetup\\fR(8), \\fBmount\\fR(8), \\fBloop\\fR(4)",
        ".PP",
        "The documentation: https://loopdev.readthedocs.io/",
        "",
    ]
    return "\n".join(lines)


# --- reStructuredText (the Sphinx CLI reference) -----------------------------------------


def _rst_text(text: str) -> str:
    return re.sub(r"([*`|_\\])", r"\\\1", text)


def _rst_option(option: Option) -> list[str]:
    if not option.names and not option.help:
        return []  # a positional the usage line already names
    return [f"``{option.spelled}``", f"   {_rst_text(option.help)}", ""]


def rst() -> str:
    top, cmds = commands()
    lines = [
        ".. Generated by python -m loopdev._clidoc from loopdev.cli; do not edit.",
        "",
        "CLI reference",
        "=============",
        "",
        _rst_text(_DESCRIPTION),
        "",
        "The same text is the man page ``loopdev(8)``, installed with the package.",
        "",
        "Options",
        "-------",
        "",
    ]
    for option in top:
        lines += _rst_option(option)
    for cmd in cmds:
        title = f"loopdev {cmd.name}"
        lines += [title, "-" * len(title), "", _rst_text(cmd.help) + ".", ""]
        lines += ["::", "", f"   {cmd.usage}", ""]
        if cmd.name == "losetup":
            lines += [_rst_text(_LOSETUP), ""]
            for option in _losetup_options():
                lines += [f"``{option.spelled}``", f"   {_rst_text(option.help)}", ""]
            continue
        for option in cmd.options:
            lines += _rst_option(option)
    lines += ["Exit status", "-----------", ""]
    for code, text in _EXIT:
        lines += [f"``{code}``", f"   {_rst_text(text)}", ""]
    lines += ["Environment", "-----------", ""]
    for name, text in _ENVIRONMENT:
        lines += [f"``{name}``", f"   {_rst_text(text)}", ""]
    return "\n".join(lines)


# --- completion --------------------------------------------------------------------------


def _takes_value(option: Option) -> bool:
    return bool(option.names) and option.metavar is not None and not option.optional_value


def bash() -> str:
    top, cmds = commands()
    names = " ".join(c.name for c in cmds)
    lines = [
        "# bash completion for loopdev; generated by python -m loopdev._clidoc, do not edit.",
        "_loopdev() {",
        '  local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]} cmd="" i',
        "  for ((i = 1; i < COMP_CWORD; i++)); do",
        "    case ${COMP_WORDS[i]} in -*) ;; *) cmd=${COMP_WORDS[i]}; break ;; esac",
        "  done",
        '  local opts="" files="" values=""',
        "  case $cmd in",
        '    "")',
        f'      opts="{" ".join(n for o in top for n in o.names)}"',
        "      [[ $cur == -* ]] ||",
        f'        {{ COMPREPLY=($(compgen -W "{names}" -- "$cur")); return; }} ;;',
    ]
    for cmd in cmds:
        options = _losetup_options() if cmd.name == "losetup" else cmd.options
        opts = " ".join(n.split("[")[0] for o in options for n in o.names)
        values = " ".join(n for o in options if _takes_value(o) for n in o.names)
        files = " ".join(
            n for o in options if _takes_value(o) and o.metavar in _FILE_METAVARS for n in o.names
        )
        lines += [
            f"    {cmd.name})",
            f'      opts="{opts}"',
            f'      values="{values}"',
            f'      files="{files}" ;;',
        ]
    lines += [
        "  esac",
        '  if [[ " $files " == *" $prev "* ]]; then',
        '    COMPREPLY=($(compgen -f -- "$cur"))',
        '  elif [[ " $values " == *" $prev "* ]]; then',
        "    COMPREPLY=()",
        "  elif [[ $cur == -* ]]; then",
        '    COMPREPLY=($(compgen -W "$opts" -- "$cur"))',
        "  else",
        '    COMPREPLY=($(compgen -f -- "$cur"))',
        "  fi",
        "}",
        "complete -o filenames -F _loopdev loopdev",
        "",
    ]
    return "\n".join(lines)


def _zsh_text(text: str) -> str:
    """For inside single quotes and an _arguments explanation in brackets."""
    return text.replace("'", "'\\''").replace("[", "\\[").replace("]", "\\]")


def _zsh_specs(options: list[Option]) -> Iterator[str]:
    for option in options:
        help = _zsh_text(option.help)
        if not option.names:
            action = "_files" if option.metavar in _FILE_METAVARS else " "
            many = "*" if option.metavar and option.metavar.endswith("...") else ""
            yield f"'{many}:{_zsh_text(option.metavar or '')}:{action}'"
            continue
        for name in option.names:
            name = name.split("[")[0]
            if _takes_value(option):
                action = "_files" if option.metavar in _FILE_METAVARS else " "
                eq = "=" if name.startswith("--") else ""
                yield f"'{name}{eq}[{help}]:{_zsh_text(option.metavar or '')}:{action}'"
            elif option.optional_value:
                yield f"'{name}=-[{help}]::{_zsh_text(option.metavar or '')}: '"
            else:
                yield f"'{name}[{help}]'"


def zsh() -> str:
    top, cmds = commands()
    lines = [
        "#compdef loopdev",
        "# zsh completion for loopdev; generated by python -m loopdev._clidoc, do not edit.",
        "",
        "_loopdev() {",
        "  local curcontext=$curcontext state line",
        "  local -a commands",
        "  commands=(",
    ]
    lines += [f"    '{c.name}:{_zsh_text(c.help)}'" for c in cmds]
    lines += [
        "  )",
        "  _arguments -C \\",
    ]
    lines += [f"    {spec} \\" for spec in _zsh_specs(top)]
    lines += [
        "    '1:command:->command' \\",
        "    '*::argument:->argument'",
        "  case $state in",
        "    command) _describe -t commands command commands ;;",
        "    argument)",
        "      case $words[1] in",
    ]
    for cmd in cmds:
        if cmd.name == "losetup":
            specs = [*_zsh_specs(_losetup_options()), "'*:file:_files'"]
        else:
            specs = list(_zsh_specs(cmd.options))
        lines.append(f"        {cmd.name})")
        lines.append("          _arguments \\")
        lines += [f"            {spec} \\" for spec in specs[:-1]]
        lines.append(f"            {specs[-1]} ;;")
    lines += ["      esac ;;", "  esac", "}", "", '_loopdev "$@"', ""]
    return "\n".join(lines)


GENERATORS = {"man": man, "rst": rst, "bash": bash, "zsh": zsh}


def generated() -> dict[str, str]:
    """Path below the checkout -> the text it must have."""
    return {path: GENERATORS[kind]() for path, kind in OUTPUTS.items()}


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    """``--write`` the files, or ``--check`` them (status 1 and their names if stale)."""
    args = sys.argv[1:] if argv is None else argv
    root = Path.cwd()  # the checkout
    texts = generated()
    if args == ["--write"]:
        for path, text in texts.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(text)
        return 0
    if args == ["--check"]:
        stale = [path for path, text in texts.items() if _read(root / path) != text]
        for path in stale:
            print(f"{path} is out of date: python -m loopdev._clidoc --write", file=sys.stderr)
        return 1 if stale else 0
    print("usage: python -m loopdev._clidoc --write | --check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
