"""One clear error for an input file that exists but is not what it should be.

A truncated copy, a flipped byte or a file of another kind otherwise surfaces as whatever
the parser happens to raise (`BadZipFile`, `zlib.error`, `PytorchStreamReader failed`,
`JSONDecodeError` at some line), which names neither the file nor the fix. Every project
loader turns those into a ``CorruptFileError``: the path, what was expected, what the
parser said, and how to get a good copy back (re-run the stage that writes it, or restore
the version DVC recorded).
"""

from __future__ import annotations

import os

from kedro.io.core import DatasetError

__all__ = ["CorruptFileError", "corrupt_file"]


class CorruptFileError(DatasetError):
    """An input file cannot be read as what it should be; the message names the fix."""


def corrupt_file(path: str | os.PathLike, what: str, error: BaseException, fix: str) -> CorruptFileError:
    """The error for ``path`` (expected to hold ``what``) that its parser refused with ``error``."""
    return CorruptFileError(
        f"{os.fspath(path)} is not a readable {what}: it is truncated or was altered after it was written "
        f"({type(error).__name__}: {error}). {fix} or restore the recorded version with `dvc checkout`."
    )
