r"""Crash-safe training checkpoints: nothing half-written is ever taken for whole.

A checkpoint ``<output_dir>/checkpoint-<step>/`` is complete when its manifest ``training_state.json``
exists. The manifest is written **last**, inside the temporary directory ``.tmp-checkpoint-<step>``,
and lists every file of the checkpoint with its size and SHA-256; only then is the directory renamed
to its final name (``os.replace``, atomic on POSIX). Old checkpoints are pruned by renaming them to
``.trash-checkpoint-<step>-<pid>`` first and deleting the trash afterwards, so a kill at any moment
leaves either a complete checkpoint under its valid name or a hidden directory that
:func:`list_checkpoints` never counts (and :func:`remove_stale` deletes at the next start).

* :func:`save_state` — ``accelerator.save_state`` into the temp dir, then :func:`finalize` and :func:`prune`.
* :func:`list_checkpoints` — complete checkpoints, oldest first, as ``(step, path)``.
* :func:`finalize` — write the manifest into the temp dir and rename it into place.
* :func:`prune` — keep the newest ``keep`` checkpoints (atomic rename to trash, then delete).
* :func:`verify` — re-check sizes and hashes; returns a sentence naming the first bad file.
* :func:`last_intact` — the newest checkpoint older than a given step that verifies.
* :func:`describe_write_failure` — the error text for a failed write ("disk full" when it is).
* :func:`compare_settings` — differences between the settings stored with a checkpoint and now.
* :func:`library_versions` — the versions of the libraries that write a checkpoint (stored in its manifest).
* :func:`staged_directory` — write a directory's new entries into a temporary directory first, move them in
  only when every file was written (``PSLDPipeline.save_pretrained``).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

__all__ = ["CHECKPOINT_RE", "MANIFEST", "CheckpointError", "save_state", "list_checkpoints", "file_manifest", "finalize", "prune",
           "remove_stale", "verify", "last_intact", "read_manifest", "is_disk_full", "describe_write_failure",
           "compare_settings", "dir_size", "library_versions", "staged_directory"]

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "training_state.json"
_STALE_RE = re.compile(r"^\.(tmp|trash)-checkpoint-")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); the message names the checkpoint."""


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints ``checkpoint-<step>`` (manifest present), oldest first, as ``(step, path)``.

    Temporary (``.tmp-checkpoint-*``) and trash (``.trash-checkpoint-*``) directories never match the
    name pattern; a directory with the right name but no manifest (copied by hand, or half-deleted by
    an older version of this code) is not counted either.
    """
    if not os.path.isdir(output_dir):
        return []
    out = []
    for d in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(d)
        path = os.path.join(output_dir, d)
        if m and os.path.isfile(os.path.join(path, MANIFEST)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (checkpoint manifests, shard provenance, converter records)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_manifest(directory: str) -> Dict[str, dict]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of every file under ``directory`` (manifest excluded)."""
    files = {}
    for root, _, names in os.walk(directory):
        for n in sorted(names):
            p = os.path.join(root, n)
            rel = os.path.relpath(p, directory).replace(os.sep, "/")
            if rel in (MANIFEST, MANIFEST + ".tmp"):
                continue
            files[rel] = {"size": os.path.getsize(p), "sha256": sha256_file(p)}
    return files


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover  (platforms without directory fds)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def finalize(tmp: str, final: str, state: dict) -> str:
    """Write the manifest (``state`` plus the file list with sizes and SHA-256) into ``tmp`` as its last
    file, fsync it, then rename ``tmp`` to ``final``. An existing ``final`` (same step saved again) is
    renamed to trash first and deleted only after the new one is in place. Returns ``final``."""
    manifest = dict(state, files=file_manifest(tmp))
    part = os.path.join(tmp, MANIFEST + ".tmp")
    with open(part, "w") as f:
        json.dump(manifest, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, os.path.join(tmp, MANIFEST))
    _fsync_dir(tmp)
    out = os.path.dirname(final)
    trash = None
    if os.path.exists(final):
        trash = os.path.join(out, f".trash-{os.path.basename(final)}-{os.getpid()}")
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_dir(out)
    if trash:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def prune(output_dir: str, keep: int) -> List[str]:
    """Delete all but the newest ``keep`` complete checkpoints: each is first renamed (atomically) to
    ``.trash-checkpoint-<step>-<pid>``, so it stops being a checkpoint before any of its files goes.
    Returns the removed checkpoint paths."""
    if keep < 1:
        raise ValueError(f"`keep` must be >= 1, got {keep}")
    cks = list_checkpoints(output_dir)
    removed = []
    for _, path in cks[: max(0, len(cks) - keep)]:
        trash = os.path.join(output_dir, f".trash-{os.path.basename(path)}-{os.getpid()}")
        os.replace(path, trash)
        removed.append(path)
    if removed:
        _fsync_dir(output_dir)
    for path in removed:
        shutil.rmtree(os.path.join(output_dir, f".trash-{os.path.basename(path)}-{os.getpid()}"), ignore_errors=True)
    return removed


def save_state(accelerator, output_dir: str, step: int, state: dict, keep: Optional[int] = None,
               before_rename: Optional[Callable[[], None]] = None) -> str:
    """Crash-safe ``accelerator.save_state``: write ``<output_dir>/.tmp-checkpoint-<step>`` (all processes:
    Accelerate writes the weights on the main process and one RNG file per process); the main process adds
    the manifest (``state`` plus every file's size and SHA-256) as the last file, renames the directory to
    ``checkpoint-<step>`` (:func:`finalize`) and keeps the newest ``keep`` checkpoints (:func:`prune`; None:
    all). Every process must call it. ``before_rename`` (tests) runs on the main process just before the
    rename. Returns the checkpoint path.

    Raises:
        CheckpointError: the write failed (disk full or another I/O error); the message names the
            checkpoint and says whether the disk is full; the temporary directory is removed.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    previous = list_checkpoints(output_dir)

    def failed(err):
        free = shutil.disk_usage(output_dir).free if os.path.isdir(output_dir) else None  # before the cleanup
        needed = max([dir_size(p) for _, p in previous] + [dir_size(tmp), 1 << 20])
        shutil.rmtree(tmp, ignore_errors=True)
        return CheckpointError(describe_write_failure(err, final, free, needed, previous[-1][1] if previous else None))

    try:
        accelerator.save_state(tmp)
    except Exception as err:  # noqa: BLE001  (re-raised with the checkpoint named)
        raise failed(err) from err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if before_rename is not None:
            before_rename()
        try:
            finalize(tmp, final, dict(step=step, **state))
        except Exception as err:  # noqa: BLE001
            raise failed(err) from err
        if keep is not None:
            prune(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def remove_stale(output_dir: str) -> List[str]:
    """Delete leftovers of killed runs (``.tmp-checkpoint-*``, ``.trash-checkpoint-*``); returns their names."""
    if not os.path.isdir(output_dir):
        return []
    gone = []
    for d in sorted(os.listdir(output_dir)):
        if _STALE_RE.match(d) and os.path.isdir(os.path.join(output_dir, d)):
            shutil.rmtree(os.path.join(output_dir, d), ignore_errors=True)
            gone.append(d)
    return gone


def read_manifest(path: str) -> dict:
    """The manifest of checkpoint ``path``; ``ValueError`` naming the file when it is missing or not JSON."""
    f = os.path.join(path, MANIFEST)
    try:
        with open(f) as fh:
            data = json.load(fh)
    except FileNotFoundError as err:
        raise ValueError(f"{f} is missing") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{f} is not valid JSON (truncated or corrupted: {err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{f} does not hold a JSON object")
    return data


def verify(path: str, required: Iterable[str] = ()) -> Optional[str]:
    """Check checkpoint ``path`` against its manifest. Returns ``None`` when intact, else a sentence naming
    the first bad file (missing, wrong size = truncated, wrong SHA-256 = corrupted). ``required`` lists
    files that must exist even in checkpoints written before manifests listed their files."""
    try:
        manifest = read_manifest(path)
    except ValueError as err:
        return str(err)
    files = manifest.get("files")
    for rel in required:
        if not os.path.isfile(os.path.join(path, rel)):
            return f"{os.path.join(path, rel)} is missing"
    if not isinstance(files, dict):
        return None  # written before manifests listed files: nothing more to check here
    for rel, meta in sorted(files.items()):
        p = os.path.join(path, rel)
        if not os.path.isfile(p):
            return f"{p} is missing"
        size = os.path.getsize(p)
        if size != meta.get("size"):
            return f"{p} has {size:,} bytes, the manifest says {meta.get('size'):,} (truncated or overwritten)"
        if sha256_file(p) != meta.get("sha256"):
            return f"{p} is corrupted (its SHA-256 differs from the manifest)"
    return None


def last_intact(output_dir: str, below_step: Optional[int] = None, required: Iterable[str] = ()) -> Optional[str]:
    """The newest complete checkpoint with step < ``below_step`` (any step when None) that verifies."""
    for step, path in reversed(list_checkpoints(output_dir)):
        if below_step is not None and step >= below_step:
            continue
        if verify(path, required) is None:
            return path
    return None


def dir_size(path: str) -> int:
    """Total bytes of the files under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.path.getsize(os.path.join(root, n))
            except OSError:
                pass
    return total


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_disk_full(err: BaseException, free_bytes: Optional[int] = None, needed_bytes: int = 1 << 20) -> bool:
    """True when ``err`` (or an exception it was raised from) is ENOSPC/EDQUOT, or when the writer's own
    error hides the errno (torch's zip writer: ``unexpected pos ...``) and the disk has less than
    ``needed_bytes`` free."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    return free_bytes is not None and free_bytes < needed_bytes


def describe_write_failure(err: BaseException, checkpoint: str, free_bytes: Optional[int], needed_bytes: int,
                           previous: Optional[str]) -> str:
    """One message for a failed checkpoint write: which checkpoint, whether the disk is full, what is kept."""
    kept = (f"the last complete checkpoint {previous} is intact" if previous else "no earlier checkpoint exists")
    free = "" if free_bytes is None else f" ({free_bytes / 2**20:.1f} MiB free, a checkpoint needs ~{needed_bytes / 2**20:.1f} MiB)"
    if is_disk_full(err, free_bytes, needed_bytes):
        return (f"disk full: could not write checkpoint {checkpoint}{free}; its temporary files were removed and {kept}. "
                f"Free some space, then rerun with `--resume_from_checkpoint latest`.")
    return (f"could not write checkpoint {checkpoint}: {type(err).__name__}: {err}; its temporary files were removed "
            f"and {kept}.")


def compare_settings(stored: dict, current: dict, fixed: Iterable[str], ignored: Iterable[str]):
    """Differences between the settings a checkpoint was trained with and the current ones.

    Returns ``(fixed_diffs, other_diffs)``: lists of ``(name, stored, current)``. ``fixed`` names settings
    that define the model (the diffusion, the network); ``ignored`` names settings that may change freely
    (step counts, logging, output); every other key present in both is compared.
    """
    fixed, ignored = set(fixed), set(ignored)
    hard, soft = [], []
    for k in sorted(set(stored) & set(current)):
        if k in ignored or k.startswith("_"):
            continue
        a, b = stored[k], current[k]
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            a, b = list(a) if isinstance(a, (list, tuple)) else a, list(b) if isinstance(b, (list, tuple)) else b
        if a != b:
            (hard if k in fixed else soft).append((k, stored[k], current[k]))
    return hard, soft


def library_versions() -> Dict[str, str]:
    """``{distribution: version}`` of the libraries whose code writes and reads a checkpoint (diffusers-psld,
    torch, diffusers, accelerate, safetensors); stored in each manifest, so that a checkpoint that does not
    load can name the versions that wrote it."""
    from importlib import metadata

    out = {}
    for name in ("diffusers-psld", "torch", "diffusers", "accelerate", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@contextlib.contextmanager
def staged_directory(target: "os.PathLike[str] | str") -> Iterator[str]:
    """Context manager: yields a temporary directory ``<target>/.tmp-save-*`` to write into; when the block
    ends without an error, each entry written there replaces the entry of the same name in ``target`` (a file
    with ``os.replace``; a directory is renamed to a hidden trash name first and deleted after the new one is in
    place), ``model_index.json`` last; other entries of ``target`` (checkpoints, logs, a model card) stay.

    When the block raises (a tensor that safetensors refuses, a full disk), the temporary directory is
    removed and ``target`` is left as it was (not even created). A saved directory therefore never holds a
    half-written component next to a ``model_index.json``.
    """
    target = os.fspath(target)
    created = not os.path.isdir(target)
    os.makedirs(target, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=target)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(target)  # only if nothing else appeared in it meanwhile
        raise
    try:
        for name in sorted(os.listdir(tmp), key=lambda n: (n == "model_index.json", n)):
            new, old = os.path.join(tmp, name), os.path.join(target, name)
            if os.path.lexists(old) and (os.path.isdir(new) or os.path.isdir(old)):
                trash = os.path.join(target, f".trash-{name}-{os.getpid()}")
                os.replace(old, trash)
                os.replace(new, old)
                if os.path.isdir(trash) and not os.path.islink(trash):
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    os.remove(trash)
            else:
                os.replace(new, old)
        _fsync_dir(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
