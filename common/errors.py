"""One error contract for every script: known failures become one line naming the file and the problem.

    if __name__ == "__main__":
        raise SystemExit(run_cli(main))

:func:`run_cli` calls ``main()`` and turns the failures a user can fix (bad or truncated NPZ / npy /
checkpoint files, a full disk, unreadable DICOM / NIfTI / CSV, config errors, every domain's input
errors) into ``error: <file>: <problem>`` on stderr with exit code 2. ``--debug`` on the command line
shows the full traceback instead. Anything else is a bug and keeps its traceback.

Domains raise :class:`InputError` (or a subclass) with a message that starts with the file and names
the field; a script that processed none of its N inputs raises :class:`NothingProcessedError`.
"""

from __future__ import annotations

import errno
import sys
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class InputError(ValueError):
    """Bad input that the user can fix. The message names the file and the field (or says what is missing)."""

    def __init__(self, message: str, path: str | Path | None = None):
        if path is not None and not str(message).startswith(str(path)):
            message = f"{path}: {message}"
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class NothingProcessedError(InputError):
    """A script was given N inputs and produced an output for none of them."""


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (locked by a live run, resumed with a changed model ...)."""


def _known_types() -> tuple[type[BaseException], ...]:
    """Exception types whose message is shown as one line. Optional libraries are added when installed."""
    from common.checkpoint import CheckpointError
    from common.config import ConfigError

    types: list[type[BaseException]] = [InputError, RunFolderError, ConfigError, CheckpointError,
                                         zipfile.BadZipFile, FileNotFoundError, IsADirectoryError,
                                         NotADirectoryError, PermissionError, UnicodeDecodeError]
    try:
        from common.dicom_series import DicomSeriesError
        types.append(DicomSeriesError)
    except ImportError:  # pragma: no cover - optional dependency missing
        pass
    try:
        from pydicom.errors import InvalidDicomError
        types.append(InvalidDicomError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from nibabel.filebasedimages import ImageFileError
        types.append(ImageFileError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from pandas.errors import EmptyDataError, ParserError
        types += [EmptyDataError, ParserError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, also when torch.save reports it as a RuntimeError from its zip writer."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return True
    text = str(exc)
    return "No space left on device" in text or "file write failed" in text or "disk full" in text.lower()


def one_line(exc: BaseException) -> str:
    """The message shown for a known failure: file first when the exception carries one."""
    if is_disk_full(exc):
        where = getattr(exc, "filename", None)
        return f"{where + ': ' if where else ''}disk full while writing ({_first_line(exc)}); free space and rerun"
    if isinstance(exc, OSError) and getattr(exc, "filename", None) and str(exc.filename) not in str(exc.strerror):
        return f"{exc.filename}: {exc.strerror or type(exc).__name__}"
    text = _first_line(exc)
    return text if text else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else ""


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; known failures print one line and return 2 (``--debug``: re-raise)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    from common.cli import close_active_runs

    try:
        main(argv)
    except SystemExit:
        close_active_runs()
        raise
    except KeyboardInterrupt as exc:
        close_active_runs(exc)
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - sorted into known and unknown below
        close_active_runs(exc)
        if debug or not (isinstance(exc, _known_types()) or is_disk_full(exc)):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        print("(run again with --debug for the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
