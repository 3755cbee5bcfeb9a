"""Writing one file so that a reader sees the old file or the whole new one, never a
half-written one: a temporary file beside the target, flushed to disk, renamed over
it. Every single-file output of cera_rs (reports, JSON, figures, benchmark results)
goes through ``atomic_file``, or ``atomic_path`` for a writer that opens the file by
name (the GGUF adapter); a folder written as one (a run's adapter in the compare store)
through ``atomic_folder``, and files written into a folder that may hold others
(``cera_rs.save_pretrained``'s adapter folder) through ``atomic_update``."""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
"""The names of the temporaries beside a target (``.NAME.1a2b3c4d.tmp``): what a kill
leaves behind, and ``remove_temporaries`` removes."""


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _fsync(path: Path) -> None:
    """Flushes a file's or a folder's contents (for a folder: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new file beside ``path``, created with mode 0o666 so that the umask gives it
    the permissions of any new file (``tempfile.mkstemp`` would leave 0600)."""
    while True:
        tmp = _temp_name(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as err:  # name the file the caller asked for, not the temporary
            raise OSError(err.errno, err.strerror, str(path)) from None


def _create_temp_folder(path: Path) -> Path:
    """A new, empty folder beside ``path``, named as the temporaries are."""
    while True:
        tmp = _temp_name(path)
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue


def check_writable(path: str | os.PathLike) -> None:
    """Refuses, naming ``path``, a file whose folder does not exist or that is a
    folder itself: commands check their outputs before their work, not after."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")


def check_folder_writable(path: str | os.PathLike, parents: bool = True) -> None:
    """Refuses, naming it, an output folder that is a file or lies under a file (it
    and, if ``parents``, its missing parents are created later; else its parent must
    exist, as for ``mkdir`` without ``-p``): checked before the work, not after."""
    path = Path(path)
    for existing in (path, *path.parents):
        if existing.is_dir():
            break
        if existing.exists():
            where = "it is a file" if existing == path else f"{existing} is a file"
            raise NotADirectoryError(f"cannot write the folder {path}: {where}")
    if not parents and not path.exists() and not path.parent.is_dir():
        raise FileNotFoundError(
            f"cannot write the folder {path}: the folder {path.parent} does not exist"
        )


def check_folder_creatable(path: str | os.PathLike) -> None:
    """Refuses, naming it and why, an output folder that cannot be created (a
    read-only or virtual file system, no permission): the missing folders are made
    and removed again, so the check leaves nothing behind and the failure comes
    before the work, not as a bare errno after it."""
    path = Path(path)
    check_folder_writable(path)
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    try:
        for folder in reversed(missing):
            folder.mkdir()
    except OSError as err:
        raise type(err)(f"cannot create the output folder {path}: {err.strerror}") from None
    finally:
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:
                pass


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """For writers that open their output by name (``gguf.GGUFWriter``): yields the
    name of a new, empty temporary file beside ``path`` for the block to write and
    close. When the block ends without an exception the file is flushed to disk and
    moved onto ``path``; on any exception it is removed and ``path`` is left as it
    was. The folder must exist."""
    path = Path(path)
    check_writable(path)
    fd, tmp = _create_temp(path)
    os.close(fd)
    try:
        yield tmp
        _fsync(tmp)  # what any handle wrote to the file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)  # the rename itself survives a crash


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Opens a temporary file for writing (``mode`` "w" or "wb") and, when the block
    ends without an exception, moves it onto ``path`` (``atomic_path``); on any
    exception the temporary is removed and ``path`` is left as it was. The folder
    must exist."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A folder whose files are written together (a saved adapter): yields a new, empty
    temporary folder beside ``path`` for the block to fill. When the block ends without
    an exception its files are flushed to disk and it takes ``path``'s place (an old
    ``path`` is moved aside first, then removed: a folder cannot be renamed over a
    full one); on any exception it is removed and ``path`` is left as it was. A kill
    can leave temporaries behind: ``remove_temporaries``. The parent must exist."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist")
    tmp = _create_temp_folder(path)
    try:
        yield tmp
        for inner in sorted(tmp.rglob("*"), reverse=True):  # files before their folders
            _fsync(inner)
        _fsync(tmp)
        old = _temp_name(path) if path.exists() else None
        if old is not None:
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(path.parent)
    if old is not None:
        shutil.rmtree(old)


@contextmanager
def atomic_update(path: str | os.PathLike, last: Collection[str] = ()) -> Iterator[Path]:
    """Files written into a folder that may hold others (an adapter folder: PEFT saves a
    second adapter into a subfolder, a user may keep files beside): yields a new, empty
    temporary folder beside ``path`` for the block to fill. When the block ends without
    an exception, each file it wrote is flushed and moved to the same place under
    ``path`` (created with its parents), those named in ``last`` after the others, all
    or none (``_move_all``); files of ``path`` the block did not write stay. On any
    exception ``path`` is left as it was. ``atomic_folder`` instead replaces a folder
    whole, which would drop those other files."""
    path = Path(path)
    check_folder_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _create_temp_folder(path)
    try:
        yield staging
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name in last)
        for file in files:
            _fsync(file)
        _move_all(staging, files, path)
        _fsync(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_all(staging: Path, files: list[Path], target: Path) -> None:
    """Moves ``files`` (under ``staging``) to the same paths under ``target``, all or
    none: the previous version of each file is kept (as a hard link, or a copy) in
    ``staging`` until every move succeeded, and restored if one fails."""
    previous = staging / ".previous"
    done: list[tuple[Path, Path | None]] = []
    try:
        for file in files:
            relative = file.relative_to(staging)
            dest = target / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            backup = None
            if dest.is_file():
                backup = previous / relative
                backup.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(dest, backup)
                except OSError:
                    shutil.copy2(dest, backup)
            os.replace(file, dest)
            done.append((dest, backup))
    except BaseException:
        for dest, backup in reversed(done):
            if backup is None:
                dest.unlink(missing_ok=True)
            else:
                os.replace(backup, dest)
        raise


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Removes the temporary files and folders that writers killed mid-write left in
    ``folder`` (not below it), and returns them. Only while no writer is at work there."""
    folder = Path(folder)
    found = [p for p in folder.iterdir() if TEMPORARY.fullmatch(p.name)] if folder.is_dir() else []
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    return found
