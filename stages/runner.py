"""What the stage modules share: the command-line shell (`--params`, validation, clean errors),
and the strict check on rejected utterances that manifest and featurize keep."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ctcflow.errors import CtcflowError
from ctcflow.params import DEFAULT_PARAMS, ParamsError, Section, load_section

S = TypeVar("S", bound=Section)


class StageError(RuntimeError):
    """A stage cannot go on; the message says why and what to do."""


def stage_main(
    section: str,
    schema: type[S],
    run: Callable[[S], object],
    description: str | None,
    argv: list[str] | None = None,
    prog: str | None = None,
) -> None:
    parser = argparse.ArgumentParser(
        prog=prog or f"ctcflow {section}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--params",
        default=str(DEFAULT_PARAMS),
        help=f"params file; only its '{section}:' section is read (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        run(load_section(section, schema, args.params))
    except (ParamsError, StageError, CtcflowError, FileNotFoundError) as err:
        # A missing input is usually an earlier stage not run yet: say so without a traceback.
        sys.exit(f"ctcflow {section}: error: {err}")
    except KeyboardInterrupt:
        # One line, not the traceback of wherever Ctrl-C landed. Raised on, so Python still shuts
        # down as usual (worker processes, atexit) and then dies of SIGINT, as DVC and shells expect.
        sys.excepthook = lambda *_: print(f"ctcflow {section}: interrupted", file=sys.stderr, flush=True)
        raise


def fail_if_strict(key: str, strict: bool, counts: dict, path: Path) -> None:
    """With `key` (manifest.strict, featurize.strict) true, any reject fails the stage; called once
    the stage has written its outputs, so the rejects file is there to read."""
    if strict and counts["total"]:
        raise StageError(f"{key}: {counts['total']} utterance(s) rejected; see {path}")
