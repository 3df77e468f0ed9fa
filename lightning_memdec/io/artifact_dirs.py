"""Artefact directories: `meta.json`, atomic publication, resumable work directories, checked memmaps.

Every pipeline stage writes one directory. Work happens in ``<out>.partial/`` and the directory is
renamed into place only once complete, so a reader never sees half an artefact and a killed stage
leaves its progress behind for the next run to continue.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lightning_memdec import __version__

META = "meta.json"
RUN_CONFIG = "run_config.json"


class ArtifactError(ValueError):
    """An input artefact is missing, inconsistent or corrupt; the message says what to fix."""


class Interrupted(SystemExit):
    """SIGTERM stopped a resumable command (a chunked stage, a training) before its end. Exit status 143 (128 +
    SIGTERM): what ``timeout``, ``docker stop`` and schedulers expect of a process their SIGTERM stopped (Lightning's
    own stop of a training exits 0, as if it had finished); ``str()`` is the message printed."""

    def __init__(self, message: str):
        super().__init__(128 + signal.SIGTERM)
        self.message = message

    def __str__(self) -> str:
        return self.message

    @classmethod
    def said(cls, message: str, rank: int = 0, world_size: int = 1) -> Interrupted:
        """The error, its message printed first (the exit status alone says nothing), naming the rank on several."""
        message = f"rank {rank}: {message}" if world_size > 1 else message
        print(message, file=sys.stderr, flush=True)
        return cls(message)


class ArtifactMeta(dict):
    """A meta.json object whose missing key is an :class:`ArtifactError` naming the file, the key and the fix (an
    artefact of another version, or edited by hand), not a bare ``KeyError`` deep inside a stage."""

    def __init__(self, fields: dict, source: Path):
        super().__init__(fields)
        self.source = source

    def __missing__(self, key):
        kind = dict.get(self, "kind")
        what = f"the {kind} artefact" if isinstance(kind, str) else "the artefact"
        raise ArtifactError(
            f"{self.source} has no {key!r} entry: {what} in {self.source.parent} was written by another version of "
            "lightning_memdec or edited by hand; rebuild it with this version (rerun the stage that made it "
            "with --overwrite)."
        )


def wrong_path(path: str | Path, what: str, want_dir: bool) -> str:
    """Why ``path`` is not the file/directory asked for: it is the other kind, or it does not exist."""
    path, wanted = Path(path), "directory" if want_dir else "file"
    if path.exists():
        return f"{what} {path} is a {'directory' if path.is_dir() else 'file'}, but a {wanted} is needed here"
    return f"{what} {path} does not exist"


def check_writable_dir(path: str | Path, setting: str) -> None:
    """An output directory must be one this process can create or write: found before the work, not after it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{wrong_path(path, setting, want_dir=True)}; choose another {setting}.")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ArtifactError(
            f"{setting} {path} cannot be written: {existing} is not a writable directory; choose another {setting}."
        )


def keep_earlier_report(out: str | Path, names: tuple[str, ...]) -> Path | None:
    """A report command (evaluate, downstream) may run again into its ``out`` (evaluate reuses the datastores it
    built there): before it writes its new report, the earlier run's files ``names`` move to
    ``out/earlier/<that report's UTC time>/``, so no figure is replaced without a copy. Returns that directory."""
    out = Path(out)
    if not (out / "report.json").is_file():
        return None
    stamp = datetime.fromtimestamp((out / "report.json").stat().st_mtime, UTC).strftime("%Y%m%dT%H%M%SZ")
    keep = out / "earlier" / stamp
    suffix = 1
    while keep.exists():  # two reports within one second
        keep, suffix = out / "earlier" / f"{stamp}-{suffix}", suffix + 1
    keep.mkdir(parents=True)
    for name in names:
        if (out / name).exists():
            (out / name).replace(keep / name)
    warnings.warn(f"{out} held an earlier report: kept in {keep}.", stacklevel=2)
    return keep


def sha256_file(path: str | Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while chunk := f.read(1 << 20 if remaining is None else min(1 << 20, remaining)):
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return digest.hexdigest()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_meta(directory: str | Path, kind: str | None = None) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / META
    if not directory.is_dir():
        raise ArtifactError(
            f"{wrong_path(directory, 'artefact directory', want_dir=True)}; give the directory a stage wrote "
            "(the one holding meta.json), or build it first (see `memdec --help`)."
        )
    if not path.is_file():
        partial = partial_dir(directory)
        hint = f" An unfinished run is in {partial}: run the same command again to resume." if partial.exists() else ""
        raise ArtifactError(f"{directory} has no {META}: it is not a finished lightning_memdec artefact.{hint}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"), object_hook=lambda fields: ArtifactMeta(fields, path))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(
            f"{path} is not valid UTF-8 JSON ({err}); the artefact is corrupt, rebuild {directory}."
        ) from err
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} holds a JSON {type(meta).__name__}, not an object; rebuild {directory}.")
    if kind is not None and meta.get("kind") != kind:
        raise ArtifactError(
            f"{directory} holds a {meta['kind']!r} artefact, but a {kind!r} artefact is needed here."  # no kind: named
        )
    return meta


def meta_sha256(directory: str | Path) -> str:
    """A short hash of an artefact's meta.json bytes: what identifies artefacts that carry no content hash."""
    read_meta(directory)
    return sha256_file(Path(directory) / META)[:16]


def base_meta(kind: str, **fields: Any) -> dict[str, Any]:
    return {"kind": kind, "library_version": __version__, **fields}


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def is_secondary_rank() -> bool:
    """True in a process a distributed launcher started as other than global rank 0: it must not lock an output,
    nor create, clear or record its work directory (rank 0 does, while the others may be starting at the same time)."""
    return any(os.environ.get(name, "0") not in ("", "0") for name in RANK_VARIABLES)


def partial_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def start_work_dir(out: str | Path, run_config: dict[str, Any], overwrite: bool) -> Path:
    """Return the ``.partial`` work directory for ``out``, resuming it when its run config matches.

    Refuses to touch a finished ``out`` unless ``overwrite``; refuses to mix progress from a run
    with different settings (the user must pass ``--overwrite`` to start afresh).
    """
    out = Path(out)
    work = partial_dir(out)
    if out.exists() and not out.is_dir():  # --overwrite replaces artefact directories, never a user's file
        raise ArtifactError(f"{wrong_path(out, 'output', want_dir=True)}; remove it or choose another --out.")
    if is_secondary_rank() and not overwrite and ((work / META).is_file() or out.exists()):
        raise AlreadyPublished(out, rank0_decides=True)  # what rank 0 finds here, this rank must not start without
    if not is_secondary_rank():
        finished = finish_interrupted_publish(work, out)
        if finished is not None and same_settings(finished, run_config) and not overwrite:
            raise AlreadyPublished(out)  # this very run, stopped while publishing: done
    if out.exists():  # a run of other settings stopped while publishing is now in place too: refused alike
        if not overwrite:
            raise ArtifactError(f"{out} already exists; pass --overwrite to replace it, or choose another output.")
    if is_secondary_rank():  # under torchrun/srun all ranks start together: rank 0 alone prepares the directory
        return work
    if work.exists():
        recorded = recorded_settings(work)
        if not same_settings(recorded, run_config):
            if not overwrite:
                differences = settings_differences(recorded, run_config)
                unrecorded = isinstance(recorded, dict) and any(name not in recorded for name in jsonable(run_config))
                earlier = (
                    " (a setting not set there was not recorded by the version that started it, which alone can "
                    "resume it)"
                    if unrecorded
                    else ""
                )
                raise ArtifactError(
                    f"{work} holds an unfinished run with different settings ({differences}); rerun with its settings "
                    f"to resume it{earlier}, or pass --overwrite to discard it."
                )
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / RUN_CONFIG).exists():
        write_json_atomic(work / RUN_CONFIG, run_config)
    return work


def recorded_settings(work: Path) -> Any:
    """The settings a run recorded in its work directory (None: none recorded)."""
    path = Path(work) / RUN_CONFIG
    return json.loads(path.read_text()) if path.is_file() else None


def same_settings(recorded: dict[str, Any] | None, run_config: dict[str, Any]) -> bool:
    """Whether a run's recorded settings are ``run_config``'s. A setting an earlier version recorded that this one
    does not is not compared: this version's output does not depend on it (build-datastore recorded the model's path
    beside its weights' hash; a resume across the upgrade was refused, its progress lost to --overwrite). A setting
    this version records that the record lacks is compared (and differs): what it was then is not known."""
    here = jsonable(run_config)
    return isinstance(recorded, dict) and {name: value for name, value in recorded.items() if name in here} == here


def settings_differences(recorded: dict[str, Any] | None, run_config: dict[str, Any]) -> str:
    """What an unfinished run's recorded settings and this run's differ in, named so a user can rerun with the
    recorded ones (and keep the progress) rather than discard it: ``nprobe: 32 there, 8 here; seed: …``."""
    if not isinstance(recorded, dict):
        return "its settings are not recorded"
    here = jsonable(run_config)

    def shown(settings: dict[str, Any], name: str) -> str:
        return json.dumps(settings[name]) if name in settings else "not set"

    names = sorted(here)  # what the record holds beyond these is not compared (:func:`same_settings`)
    return "; ".join(
        f"{n}: {shown(recorded, n)} there, {shown(here, n)} here" for n in names if shown(recorded, n) != shown(here, n)
    )


def publish(work: Path, out: str | Path, meta: dict[str, Any]) -> Path:
    """Write meta.json into ``work`` and rename it to ``out`` (replacing an old ``out`` last). The run's settings
    stay in the work directory until it is in place: a run stopped in between is finished by the next, which must
    know whether they were its own."""
    out = Path(out)
    write_json_atomic(work / META, meta)  # from here on the work is finished: a rerun publishes it (see below)
    _fsync_dir(work)
    swap_in(work, out)
    return out


def swap_in(work: Path, out: Path) -> None:
    """Rename ``work`` to ``out`` and drop the run's settings it kept until then (:func:`publish`); an old ``out``
    is set aside as ``<out>.old`` first and deleted last."""
    trash = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(out, trash)
    os.replace(work, out)
    (out / RUN_CONFIG).unlink(missing_ok=True)
    shutil.rmtree(trash, ignore_errors=True)
    _fsync_dir(out.parent)


class AlreadyPublished(ArtifactError):
    """The output a stage was asked for is complete: an earlier run finished it and was stopped while publishing.

    ``rank0_decides``: on a secondary rank, which starts beside rank 0 and cannot tell a publication rank 0 is
    completing from an output that was there before (rank 0 refuses that one): either way it does not go on into the
    ranks' set-up, where it would wait for a rank 0 that has stopped (it hung there)."""

    def __init__(self, out: Path, rank0_decides: bool = False):
        if rank0_decides:
            message = f"{out} is in place or being put in place; rank 0 says whether it is this run's, and exits."
        else:
            message = f"{out} is complete: the run that built it was stopped while publishing it; it is in place."
        super().__init__(message)
        self.out = out


def finish_interrupted_publish(work: Path, out: Path) -> dict[str, Any] | None:
    """Complete the publication of a run stopped inside :func:`publish`: a work directory holding meta.json is
    finished (renamed into place; its run's settings returned, ``{}`` where none were recorded); an old output set
    aside without a finished one to replace it is put back (None). Without this a rerun called the finished work
    "an unfinished run with different settings", and the old output stayed as ``<out>.old``, named nowhere."""
    trash = out.with_name(out.name + ".old")
    if (work / META).is_file():
        settings = recorded_settings(work)
        swap_in(work, out)
        return {} if settings is None else settings
    if trash.is_dir() and not out.exists():
        os.replace(trash, out)
    elif trash.is_dir():
        shutil.rmtree(trash)
    return None


def jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples as lists, keys as strings): settings compared as they are recorded."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
