"""Where a command writes: checked before any work, so that a wrong path costs no minutes of training or
sampling and ends in one line that says what to change, not a traceback after the work is done."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import TypeVar

from .errors import EgakuError

T = TypeVar("T")

# names that --data and --model take that are not paths: the built-in model and data sets
RESERVED_NAMES = frozenset({"builtin", "tiny", "shapes", "digits"})


def check_output(path: str | Path, flag: str = "--out", folder: bool = True) -> Path:
    """``path`` can be written as a folder (``folder=True``: it is one, or can be made) or as a file (it is not
    a folder, and its folder can be made): the nearest part of it that exists is a folder in which a file can
    be created. Returns it as a Path."""
    if not str(path).strip():
        raise EgakuError(f"{flag} is empty; give a {'folder' if folder else 'file'} to write to", param="out")
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise EgakuError(f"{flag} {path} is a file, not a folder; give a folder (it is created when missing)",
                         param="out")
    if not folder and path.is_dir():
        raise EgakuError(f"{flag} {path} is a folder; give a file name (such as {path / 'report.json'})", param="out")
    start = path if folder else path.parent
    nearest = next((p for p in (start, *start.parents) if p.exists()), Path("."))
    if not nearest.is_dir():
        raise EgakuError(f"{flag} {path} cannot be written: {nearest} is a file, not a folder; choose another "
                         f"{flag}", param="out")
    try:  # permissions alone do not say it (root may write anywhere, but not in /proc or on a read-only disk)
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as exc:
        raise EgakuError(f"{flag} {path} cannot be written: no file can be made in {nearest} ({exc.strerror}); "
                         f"choose another {flag}", param="out") from None
    return path


def check_outside(out: str | Path, inputs: dict[str, str], flag: str = "--out",
                  why: str = "the run's samples and checkpoints would be read as training images") -> None:
    """A run's output folder may not lie in one of its input folders (``inputs``: flag -> folder): its sample
    grids and checkpoints would be read as data by the next run, or by the same run when it resumes. (With
    another ``flag`` and ``why``: one input folder that may not lie in another.)"""
    real_out = os.path.realpath(out)
    for input_flag, folder in inputs.items():
        # a built-in data set's name ('shapes') is no folder, even where the working directory holds one of that name
        if not folder or folder in RESERVED_NAMES or not os.path.isdir(folder):
            continue
        real_in = os.path.realpath(folder)
        if real_out == real_in or real_out.startswith(real_in.rstrip(os.sep) + os.sep):
            raise EgakuError(f"{flag} {out} lies inside {input_flag} {folder}: {why}; give {flag} a folder "
                             f"outside it", param=flag.lstrip("-").replace("-", "_"))


def checked_run_paths(opts: T, inputs: dict[str, str]) -> T:
    """A trainer's options with their paths made absolute (``config.absolute_paths``: a resume from another
    working directory finds the same folders), after its ``--out`` is checked, before any work: writable, and
    outside each input folder (``inputs``: flag -> option name, such as ``{"--data": "data"}``)."""
    from .config import absolute_paths

    opts = absolute_paths(opts)
    check_output(opts.out)
    check_outside(opts.out, {flag: getattr(opts, name) for flag, name in inputs.items()})
    return opts


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB pieces: A1111's model and embedding hashes start with it,
    and the LoRA trainer's disk cache names images by it."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()
