"""Locate the real VQA / COCO / VQA-HAT files under a data root and, on request, download them.

The data config lists downloadable *resources* (``data.resources``): a URL, the file name it is
saved under in ``<root>/downloads/``, optional ``sha256`` and ``size``, whether it is a zip to
unpack into ``<root>``, and the paths (relative to ``<root>``) it ``provides``. A resource is
missing when any of those paths is absent.

Offline (the default, ``data.download=false``) a missing resource stops ``prepare`` with a
:class:`MissingDataError` that lists every missing path, its URL and how to get it; an archive
already placed in ``<root>/downloads/`` by hand is verified and unpacked without any network
access. With ``data.download=true`` missing files are fetched: downloads resume from a
``.part`` file, are retried on transient failures, are verified (size, sha256) before they are
renamed into place, and the sha256 of every file is recorded in
``<root>/downloads/checksums.json`` so that later downloads of a resource whose config pins no
checksum are verified against the first one. Zip members are unpacked into a temporary folder
and moved into place afterwards, so a killed run never leaves a half-written file at a
``provides`` path.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.common.errors import DataError, MissingDataError
from pipeline.data.http_download import IntegrityError, download_file, sha256_file, verify_file
from pipeline.common.files import read_json, write_json

__all__ = [
    "Resource",
    "IntegrityError",
    "resources_from_config",
    "missing_resources",
    "describe_missing",
    "sha256_file",
    "download_file",
    "extract_zip",
    "fetch_resources",
    "ensure_resources",
]

log = logging.getLogger(__name__)

DOWNLOADS_DIR = "downloads"
CHECKSUMS_FILE = "checksums.json"

_REQUIRED_FIELDS = ("name", "url", "filename")
_OPTIONAL_FIELDS = ("sha256", "size", "extract", "provides")


@dataclass
class Resource:
    """One downloadable file and the paths under the data root that it provides.

    ``provides`` may be left empty only for a file that is not extracted; it then defaults to
    the downloaded file itself (``downloads/<filename>``).
    """

    name: str
    url: str
    filename: str
    sha256: str | None = None
    size: int | None = None
    extract: bool = False
    provides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.name or not self.url:
            raise ValueError(
                f"resource needs a name and a url, got name={self.name!r} url={self.url!r}"
            )
        if _unsafe_relative(self.filename) or len(PurePosixPath(self.filename).parts) != 1:
            raise ValueError(
                f"resource {self.name!r}: filename must be a plain file name, got {self.filename!r}"
            )
        if isinstance(self.provides, str):
            self.provides = [self.provides]
        self.provides = [str(p) for p in self.provides or []]
        if not self.provides:
            if self.extract:
                raise ValueError(
                    f"resource {self.name!r} is extracted but lists no `provides` paths, so there is "
                    "no way to tell whether it is in place"
                )
            self.provides = [f"{DOWNLOADS_DIR}/{self.filename}"]
        for path in self.provides:
            if _unsafe_relative(path):
                raise ValueError(
                    f"resource {self.name!r}: provides path {path!r} must be relative to the data root"
                )
        if self.sha256 is not None:
            self.sha256 = str(self.sha256).lower()
            if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
                raise ValueError(
                    f"resource {self.name!r}: sha256 must be 64 hex digits, got {self.sha256!r}"
                )
        if self.size is not None:
            self.size = int(self.size)
        self.extract = bool(self.extract)


def _unsafe_relative(name: str) -> bool:
    """True for paths that could point outside the folder they are joined to."""
    posix = PurePosixPath(name.replace("\\", "/"))
    return not name or posix.is_absolute() or ".." in posix.parts or bool(PureWindowsPath(name).drive)


def resources_from_config(items: Iterable[Any] | None) -> list[Resource]:
    """Build :class:`Resource` objects from ``data.resources`` (OmegaConf list or plain dicts).

    Unknown keys are rejected so that a typo (``sha265``) does not silently disable a check.
    """
    if isinstance(items, (DictConfig, ListConfig)):
        items = OmegaConf.to_container(items, resolve=True)
    resources: list[Resource] = []
    for index, item in enumerate(items or []):
        if isinstance(item, DictConfig):
            item = OmegaConf.to_container(item, resolve=True)
        if not isinstance(item, dict):
            raise ValueError(f"data.resources[{index}] must be a mapping, got {type(item).__name__}")
        problems = []
        absent = [k for k in _REQUIRED_FIELDS if k not in item]
        if absent:
            problems.append(f"missing keys {absent}")
        unknown = sorted(set(item) - set(_REQUIRED_FIELDS) - set(_OPTIONAL_FIELDS))
        if unknown:
            allowed = list(_REQUIRED_FIELDS + _OPTIONAL_FIELDS)
            problems.append(f"unknown keys {unknown} (allowed: {allowed})")
        if problems:
            name = item.get("name", "?")
            raise ValueError(f"data.resources[{index}] ({name}): " + "; ".join(problems))
        resources.append(Resource(**item))
    names = [r.name for r in resources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"data.resources: duplicate names {duplicates}")
    return resources


def missing_resources(root: str | os.PathLike, resources: Iterable[Resource]) -> list[Resource]:
    """The resources of which at least one ``provides`` path is absent under ``root``."""
    root = Path(root)
    return [r for r in resources if any(not (root / p).exists() for p in r.provides)]


def describe_missing(
    root: str | os.PathLike, missing: Iterable[Resource], data_name: str | None = None
) -> str:
    """A message listing each missing path with its resource and URL, and how to get them.

    ``data_name`` is the data config to put in the suggested command (``data=vqa_v2``).
    """
    root = Path(root)
    missing = list(missing)
    downloads = root / DOWNLOADS_DIR
    lines = [f"input data missing under {root} ({len(missing)} resource(s)):"]
    for r in missing:
        lines.append(f"  - resource {r.name}: {r.url}")
        unzipped = " (unzipped into the data root)" if r.extract else ""
        lines.append(f"      save as {downloads / r.filename}{unzipped}")
        lines.extend(f"      missing {root / p}" for p in r.provides if not (root / p).exists())
    lines += [
        "To download them (needs network access), run:",
        f"  python -m pipeline.prepare data={data_name or '<data config>'} data.download=true",
        f"or download each URL by hand into {downloads}/ under the name shown (the next run verifies "
        f"and unpacks it without network access), or place the missing paths under {root} yourself.",
    ]
    return "\n".join(lines)


def _check_member(name: str, archive: Path) -> None:
    if _unsafe_relative(name):
        raise DataError(
            f"refusing archive member {name!r}: an absolute path or '..' would write outside "
            "the data root",
            archive,
        )


def _move_into_place(src: Path, dst: Path) -> None:
    """Rename ``src`` onto ``dst``; an existing directory at ``dst`` is merged into instead.

    A whole new directory is renamed in one step, so a ``provides`` directory (``val2014``)
    appears only once all of its files are there.
    """
    if src.is_dir() and dst.is_dir():
        for child in src.iterdir():
            _move_into_place(child, dst / child.name)
    else:
        os.replace(src, dst)


def extract_zip(archive: str | os.PathLike, root: str | os.PathLike) -> list[str]:
    """Unpack a zip archive into ``root``; return the top-level names it put in place.

    Every member name is checked first (absolute paths and ``..`` raise :class:`DataError`
    before anything is written). Members are extracted into a temporary folder under
    ``<root>/downloads`` (same filesystem, so the final moves are renames) and moved into
    place only after the whole archive has been read without error.
    """
    archive, root = Path(archive), Path(root)
    staging_parent = root / DOWNLOADS_DIR
    staging_parent.mkdir(parents=True, exist_ok=True)
    prefix = f".extract-{archive.name}."
    # A killed earlier extraction of this archive leaves its staging folder behind; unpacked
    # COCO images take ~13 GB, so do not let them pile up.
    for stale in staging_parent.glob(prefix + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        raise DataError(
            f"not a valid zip archive ({e}); delete it to download it again", archive
        ) from e
    with zf:
        names = zf.namelist()
        for name in names:
            _check_member(name, archive)
        top_level = sorted({PurePosixPath(n).parts[0] for n in names if PurePosixPath(n).parts})
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=staging_parent))
        try:
            log.info("extracting %s (%d members) into %s", archive, len(names), root)
            try:
                zf.extractall(staging)
            except (zipfile.BadZipFile, EOFError) as e:
                raise DataError(
                    f"corrupt zip archive ({e}); delete it to download it again", archive
                ) from e
            for entry in top_level:
                _move_into_place(staging / entry, root / entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return top_level


def _read_checksums(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    try:
        return read_json(path)
    except json.JSONDecodeError as e:
        raise DataError(
            f"unreadable checksum record ({e}); delete it to start a fresh record", path
        ) from e


def fetch_resources(
    root: str | os.PathLike, resources: Iterable[Resource], progress: bool = True
) -> dict[str, dict[str, Any]]:
    """Put every missing resource in place; return ``{name: {"sha256", "bytes"}}`` of those handled.

    A file already in ``<root>/downloads/`` (an earlier download, or placed by hand) is
    verified and used instead of downloading again. The expected sha256 and size come from
    the config, or else from ``checksums.json``, which is updated after every file so that a
    run killed later keeps the record of the files it completed.
    """
    root = Path(root)
    downloads = root / DOWNLOADS_DIR
    checksums_path = downloads / CHECKSUMS_FILE
    recorded = _read_checksums(checksums_path)
    fetched: dict[str, dict[str, Any]] = {}
    for resource in missing_resources(root, resources):
        archive = downloads / resource.filename
        known = recorded.get(resource.filename, {})
        sha = resource.sha256 or known.get("sha256")
        size = resource.size if resource.size is not None else known.get("bytes")
        local = archive.exists()
        try:
            if local:
                log.info("%s: using %s already on disk", resource.name, archive)
                digest = verify_file(archive, str(archive), sha, size)
            else:
                log.info("%s: downloading %s", resource.name, resource.url)
                digest = download_file(
                    resource.url, archive, sha256=sha, size=size, progress=progress
                )
        except IntegrityError as e:
            # Say where the expectation came from and how to get past it.
            hints = []
            if resource.sha256 is None and known:
                hints.append(
                    f"the expected values were recorded in {checksums_path} by an earlier download; "
                    f"if the remote file changed on purpose, remove its {resource.filename!r} entry"
                )
            if local:
                hints.append(f"delete {archive} to download it again")
            if not hints:
                raise
            raise IntegrityError("; ".join([str(e), *hints])) from e
        nbytes = archive.stat().st_size
        recorded[resource.filename] = {"sha256": digest, "bytes": nbytes, "url": resource.url}
        write_json(checksums_path, recorded)
        if resource.extract:
            extract_zip(archive, root)
        absent = [p for p in resource.provides if not (root / p).exists()]
        if absent:
            raise DataError(
                f"resource {resource.name!r} is in place but {absent} still do not exist; "
                "check its `provides` list in the data config against the archive contents",
                archive,
            )
        fetched[resource.name] = {"sha256": digest, "bytes": nbytes}
    return fetched


def ensure_resources(
    root: str | os.PathLike,
    resources: Iterable[Resource],
    download: bool,
    progress: bool = True,
    data_name: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Make sure every resource is in place under ``root``; return what :func:`fetch_resources` did.

    Without ``download``, resources whose file is already in ``<root>/downloads/`` are still
    verified and unpacked (no network needed); any other missing resource raises
    :class:`MissingDataError` listing the missing paths, their URLs and how to get them.
    """
    root = Path(root)
    resources = list(resources)
    missing = missing_resources(root, resources)
    if not missing:
        return {}
    if download:
        return fetch_resources(root, missing, progress=progress)
    on_disk = [r for r in missing if (root / DOWNLOADS_DIR / r.filename).exists()]
    fetched = fetch_resources(root, on_disk, progress=progress)
    still_missing = missing_resources(root, missing)
    if still_missing:
        raise MissingDataError(describe_missing(root, still_missing, data_name))
    return fetched
