"""How a multi-process run reports a failure: shared by launcher and ranks.

Each rank that `keras-tp launch` starts runs this file as its main program
(`python .../processes.py SCRIPT ARGS...`): it runs SCRIPT as `__main__`
and, when the script raises or exits non-zero, writes the error (one line
plus the traceback) to the JSON file named by `KERAS_TP_ERROR_FILE`, so
that the launcher can print the failing rank's error once instead of every
rank's cascade of follow-on errors. The file is run by path, not with
`python -m`, so that nothing (Keras, a backend) is imported before the
script has set its own environment; the top level uses the standard
library only.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback

ERROR_FILE_ENV = "KERAS_TP_ERROR_FILE"
TIMEOUT_ENV = "KERAS_TP_TIMEOUT"
DEFAULT_TIMEOUT = 300.0


def resolve_timeout(timeout: float | None = None) -> float:
    """The timeout in seconds: `timeout`, else `$KERAS_TP_TIMEOUT`, else 300.

    Raises:
        ValueError: when the value is not a positive number.
    """
    source = "timeout"
    if timeout is None:
        source = TIMEOUT_ENV
        timeout = os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)
    try:
        value = float(timeout)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(timeout, bool) or not value > 0 or value == float("inf"):
        raise ValueError(
            "The timeout must be a positive number of seconds. "
            f"Received: {source}={timeout!r}"
        )
    return value


def error_line(exc: BaseException) -> str:
    """`Type: first line of the message`, as a one-line error summary."""
    text = str(exc).strip().splitlines()
    name = type(exc).__name__
    return f"{name}: {text[0]}" if text else name


def write_error(
    message: str, *, tb: str = "", origin: int | None = None
) -> None:
    """Record this rank's failure in `$KERAS_TP_ERROR_FILE`, if set.

    Written to a temporary name and renamed, so the launcher never reads
    half a record. `origin` is the rank that caused the failure when it
    is not this one (a rank stopped because another one failed).
    """
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    record = {"error": message, "traceback": tb, "origin": origin}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as fh:
            json.dump(record, fh)
        os.replace(tmp, path)
    except OSError:
        pass  # reporting must never mask the error being reported


def read_error(path: str) -> dict | None:
    """A record written by `write_error`, or None when there is none."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def launched() -> bool:
    """Whether this process is a rank that `keras-tp launch` started."""
    return bool(os.environ.get(ERROR_FILE_ENV))


def format_traceback(exc: BaseException, skip: tuple[str, ...] = ()) -> str:
    """The traceback of `exc` without its outer frames from files in `skip`
    (a prefix each, as runpy's frames are named `<frozen runpy>`)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(skip):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


# The rank's main program ---------------------------------------------------


def _report_and_exit(exc: BaseException) -> None:
    # An excepthook: another one (`initialize`'s) may wrap it. os._exit
    # skips the backends' exit barriers, which would wait for ranks that
    # are still running (JAX's waits up to its shutdown timeout).
    skip = (__file__, runpy.__file__, "<frozen runpy")
    write_error(error_line(exc), tb=format_traceback(exc, skip))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _excepthook(exc_type, exc, tb) -> None:
    _report_and_exit(exc)


def run_script(script: str, args: list[str]) -> None:
    """Run `script` as `__main__` with `args`, as `python script args` does.

    An uncaught exception or a non-zero `sys.exit` is written to
    `$KERAS_TP_ERROR_FILE` and ends the process with status 1 (the
    exit status for `sys.exit(n)`).
    """
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    sys.excepthook = _excepthook
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            detail = e.code if isinstance(e.code, int) else repr(e.code)
            write_error(f"SystemExit: exited with status {detail}")
        raise


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: processes.py SCRIPT [ARGS...]")
    run_script(sys.argv[1], sys.argv[2:])
