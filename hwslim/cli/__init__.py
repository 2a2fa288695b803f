"""The ``hwslim`` command. Each subcommand lives in its own module here and is thin:
parse, build the library's objects, call the library, print a table (or ``--json``).

A user error (:class:`hwslim.core.errors.HwslimError`) prints one line on stderr and exits 2.
A reader that closes stdout early (``hwslim models --json | head -1``) ends the command
quietly with status 141, as a tool killed by SIGPIPE reports (128 + 13).
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys

from hwslim.core.version import __version__
from hwslim.core.errors import HwslimError
from hwslim.core.report import print_table  # noqa: F401  (the commands print with it)

# subcommand -> module under hwslim.cli that defines register(subparsers)
COMMANDS = ["models", "cost", "train", "finetune", "profile", "search", "export", "verify", "eval", "demo"]

# PyTorch CPU threads for train, search, export, eval and profile unless --threads says
# otherwise. Measured with benchmarks/threads.py on the 2-core development machine while
# other jobs ran (benchmarks/results/threads.csv): one thread was several times faster
# than two (PyTorch's default there) for every workload, because OpenMP threads that
# share busy cores wait on each other. More threads pay off only on idle, larger machines.
DEFAULT_THREADS = 1


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (exit 2), like every other user error; a mistyped flag gets a
    "did you mean" naming the nearest of the command's own flags."""

    _words: list[str] = []

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._words = list(sys.argv[1:] if args is None else args)  # what error() looks through for typos
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse's, but a word no command knows is refused by the command it was given to."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._commands().get(getattr(ns, "command", None), self)
            command.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def _commands(self) -> dict[str, "_Parser"]:
        subs = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(subs[0].choices) if subs else {}

    def error(self, message: str):  # type: ignore[override]
        from hwslim.core.report import did_you_mean

        flags = [a for a in self._option_string_actions if a.startswith("--")]
        for word in self._words:
            name = word.split("=", 1)[0]
            if name.startswith("--") and name not in self._option_string_actions and did_you_mean(name, flags):
                message = f"unrecognized arguments: {name};{did_you_mean(name, flags)}"
                break
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.I | re.A)


def parse_number(text: str, whole: bool = False) -> float | int:
    """The one reader of every numeric flag: plain decimal notation only.

    Python's ``int``/``float`` also take ``0_04`` (read as 4) and other spellings; a flag
    value like that is a typo, refused here (ArgumentTypeError). ``nan`` and ``inf`` are
    read, so that the flag's own range check names them.
    """
    text = text.strip()
    if not _NUMBER.fullmatch(text) or whole and not re.fullmatch(r"[+-]?\d+", text, re.A):
        raise argparse.ArgumentTypeError(f"expected {'a whole number' if whole else 'a number'}, got {text!r}")
    return int(text) if whole else float(text)


def add_import_options(p: argparse.ArgumentParser) -> None:
    """``--keep``, ``--fix-unsupported``, ``--outputs`` and ``--width-mult``: how a ``--model`` is imported or built."""
    from hwslim.importing.raw_outputs import OUTPUTS, OUTPUTS_HELP

    p.add_argument("--keep", metavar="REGEX", help="imported models: modules whose name matches keep their width")
    p.add_argument("--fix-unsupported", action="store_true", help=FIX_UNSUPPORTED_HELP)
    p.add_argument("--outputs", choices=OUTPUTS, default="full", help=OUTPUTS_HELP)
    p.add_argument("--width-mult", type=positive_float, help="supernet width multiplier (default: the model's)")


def retired(parser: argparse.ArgumentParser, old: str, new: str, meaning: str) -> None:
    """Refuse ``old``, a flag whose meaning moved to ``new``, with one line naming the new flag
    (exit 2): a command line written for the old meaning must not run with another one."""

    class Refuse(argparse.Action):
        def __call__(self, p, namespace, values, option_string=None):
            p.error(f"{old} is now {new}: {meaning}")

    parser.add_argument(old, nargs="?", action=Refuse, help=argparse.SUPPRESS)


def _int_at_least(low: int | None, what: str):
    def parse(text: str) -> int:
        v = parse_number(text, whole=True)
        if low is not None and v < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
        return v

    return parse


positive_int = _int_at_least(1, "at least 1")  # argparse type: an integer >= 1
nonneg_int = _int_at_least(0, "0 or more")  # argparse type: an integer >= 0
whole_int = _int_at_least(None, "")  # argparse type: any integer (a seed)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    v = parse_number(text)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def nonneg_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    v = parse_number(text)
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hwslim",
        description="Hardware-aware AutoSlim: channel counts for the best accuracy under a real budget.",
    )
    parser.add_argument("--version", action="version", version=f"hwslim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"hwslim.cli.{name}_cmd").register(sub)
    return parser


EXIT_CLOSED_PIPE = 128 + 13  # what a shell reports for a process killed by SIGPIPE


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 1 a budget not met (verify), 2 a user error
    (one line on stderr), 130 interrupted (one line; 143 for SIGTERM), 141 its stdout was
    closed (``| head``)."""
    from hwslim.core import interrupt

    words = sys.argv[1:] if argv is None else argv
    command = f"hwslim {words[0]}" if words and words[0] in COMMANDS else "hwslim"  # named before parsing
    with interrupt.handled():
        try:
            parser = build_parser()  # imports torch: Ctrl-C here is handled too
            args = parser.parse_args(argv)  # --help writes to stdout too
            command = f"hwslim {args.command}"
            status = _run(args)
            sys.stdout.flush()  # a reader that left shows up here, not in the interpreter's exit flush
            return status
        except BrokenPipeError:
            return _stdout_closed()
        except HwslimError as e:
            print(f"{command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{command}: {interrupt.what()}", file=sys.stderr)
            return interrupt.exit_status()
        except OSError as e:
            if interrupt.received():
                print(f"{command}: {interrupt.what()}", file=sys.stderr)
                return interrupt.exit_status()
            # a full disk or a directory that went away mid-run: earlier outputs are intact
            print(f"{command}: error: {_os_error(e)}", file=sys.stderr)
            return 2
        except Exception:
            if interrupt.received():  # a library turned the interrupt into another exception
                print(f"{command}: {interrupt.what()}", file=sys.stderr)
                return interrupt.exit_status()
            raise


def _run(args) -> int:
    """The command's status. A SystemExit from code the command ran for the user (a model
    builder calling ``sys.exit``) is a user error, never a silent exit 0: argparse's own
    exits (``--help``, usage errors) happen while parsing, before this."""
    try:
        return int(args.func(args) or 0)
    except SystemExit as e:
        raise HwslimError(f"code run for this command called sys.exit({e.code!r}) (a model builder or a module "
                          "named on the command line?); nothing was done") from None


def entry() -> int:
    """The console script and ``python -m hwslim``: :func:`main`, then a Ctrl-C during the
    interpreter's shutdown (torch's teardown takes a while) no longer kills a finished run
    with a signal status: its work is done and its files are written."""
    import signal

    drop_cwd_from_path()
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code


def drop_cwd_from_path() -> None:
    """``python -m hwslim`` puts the working directory first on ``sys.path`` (and an empty
    entry of ``$PYTHONPATH``, as in ``PYTHONPATH=/x:``, puts it there too), so a file there
    named like a package (``onnxruntime.py``) would run instead of it: take it off. A model
    file there still imports (:func:`hwslim.importing.specs.import_user_module` looks there
    last); hwslim's own source tree, when that is the working directory, stays."""
    if not sys.path:
        return
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:  # the working directory was deleted: nothing there to import
        return
    source_tree = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # hwslim/cli/..
    if cwd != source_tree:
        sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != cwd]


def _os_error(e: OSError) -> str:
    from hwslim.core.outputs import describe_os_error

    return describe_os_error(e)


def _stdout_closed() -> int:
    """The reader of stdout went away (``| head``): stop without a traceback.

    Python's own advice (the ``signal`` module's notes on SIGPIPE): point stdout at
    devnull, so the interpreter's flush at exit does not fail on the closed pipe again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout replaced by an object without a descriptor
        pass
    return EXIT_CLOSED_PIPE


def set_threads(threads: int | None) -> int:
    """Set PyTorch's CPU threads: ``threads``, else :data:`DEFAULT_THREADS`; returns the count."""
    import torch

    n = threads if threads is not None else DEFAULT_THREADS
    torch.set_num_threads(n)
    return n


def threads_note(threads: int | None) -> str:
    """For a command's header line: how many PyTorch threads, and whether by default."""
    n = threads if threads is not None else DEFAULT_THREADS
    return f"{n} PyTorch CPU thread{'s' if n != 1 else ''}" + (" (default; --threads N to change)"
                                                                if threads is None else " (--threads)")


def with_header(header: str, log=None):
    """A log callable that first prints ``header`` on stderr: a command's header line appears
    once its inputs have passed their checks (a bad input still gives one line)."""
    shown = False
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def emit(msg: str) -> None:
        nonlocal shown
        if not shown:
            shown = True
            print(header, file=sys.stderr, flush=True)
        log(msg)

    return emit


FIX_UNSUPPORTED_HELP = ("imported models: units that reach a channel shuffle or a slice of the channels keep their "
                        "width (they are listed) instead of the model being refused")


def note_fixed_units(net, log=None) -> None:
    """Say on stderr (or through ``log``) which units the import kept fixed (a fixed-width operator's,
    or ``--fix-unsupported``'s), if any."""
    from hwslim.importing.fx_trace import fixed_units_note

    note = fixed_units_note(net)
    if note is not None:
        (log or (lambda msg: print(msg, file=sys.stderr, flush=True)))(note)


def add_command(sub, name: str, func, doc: str | None) -> argparse.ArgumentParser:
    """A subparser whose help text is the command's docstring (first line as summary)."""
    doc = (doc or "").strip()
    p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p






if __name__ == "__main__":
    sys.exit(main())
