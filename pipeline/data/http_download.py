"""Downloading one file over HTTP(S): resumed from a ``.part`` file with a ``Range`` request,
retried with a doubling backoff on transient failures, verified (size, sha256) before it is
renamed into place. :mod:`pipeline.data.download` decides what to fetch and unpacks it.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from pipeline.common.errors import DataError

log = logging.getLogger(__name__)

USER_AGENT = "vqa-explain-pipeline (python urllib)"
# Seconds before the first retry; doubled on each further retry and capped, so that a briefly
# overloaded server gets some room without making a hopeless download wait for minutes.
RETRY_BACKOFF_S = 1.0
RETRY_BACKOFF_MAX_S = 30.0
# Statuses that say "try again later" rather than "this request is wrong".
_RETRY_STATUSES = frozenset({408, 429})


class IntegrityError(DataError):
    """A file's size or sha256 differs from the expected value."""


class _TransientError(Exception):
    """A failure worth retrying: refused or dropped connection, timeout, 5xx/408/429."""


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in chunks (archives are several GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, where: str, sha256: str | None, size: int | None) -> str:
    """Check ``path`` against the expected size and sha256 (when known); return its sha256."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise IntegrityError(f"size mismatch: expected {size} bytes, got {actual_size}", where)
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256.lower():
        raise IntegrityError(f"sha256 mismatch: expected {sha256.lower()}, got {digest}", where)
    return digest


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range`` header; ``None`` where not stated."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", header or "")
    if not match:
        return None, None
    start, total = match.groups()
    return (None if start is None else int(start)), (None if total == "*" else int(total))


def _transfer(url: str, part: Path, chunk_size: int, progress: bool, timeout: float) -> bool:
    """One HTTP request that appends to (or restarts) ``part``.

    Returns True when ``part`` holds the complete body, False when it was discarded and the
    download must start again from zero. Raises :class:`_TransientError` for failures worth
    retrying and :class:`DataError` for permanent ones (404, 403...).
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        request = urllib.request.Request(url, headers=headers)
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        # The error holds the open response (and socket); its headers are already parsed.
        e.close()
        if e.code == 416 and offset:
            # The requested start is at or beyond the end: the part is either complete (a run
            # killed between the last byte and the rename) or longer than the remote file.
            _, total = _content_range(e.headers.get("Content-Range"))
            if total == offset:
                return True
            log.info("%s: partial download does not fit the remote file; restarting", url)
            part.unlink()
            return False
        if e.code >= 500 or e.code in _RETRY_STATUSES:
            raise _TransientError(f"HTTP {e.code} {e.reason}") from e
        raise DataError(f"download failed: HTTP {e.code} {e.reason}", url) from e
    except (http.client.HTTPException, OSError) as e:
        # URLError (refused connection, DNS failure) and socket timeouts are OSErrors.
        raise _TransientError(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from e

    with response:
        # file:// URLs have no status; they always send the whole file.
        status = getattr(response, "status", None) or 200
        if status == 206:
            start, _ = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                # Appending a range that does not start where the part ends would corrupt it.
                log.info("%s: server sent bytes from %s, not %d; restarting", url, start, offset)
                part.unlink()
                return False
        elif offset:
            log.info("%s: server does not resume downloads; restarting from zero", url)
            offset = 0
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header is not None else None
        received = 0
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=None if length is None else offset + length,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.stem,
            disable=not progress,
            leave=False,
        ) as bar:
            while True:
                try:
                    chunk = response.read(chunk_size)
                except (http.client.HTTPException, OSError) as e:
                    raise _TransientError(
                        f"connection lost after {offset + received} bytes: {e!r}"
                    ) from e
                if not chunk:
                    break
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        # http.client returns an empty read, not an error, when the peer closes early, so a
        # dropped connection shows only as fewer bytes than Content-Length announced.
        if length is not None and received < length:
            raise _TransientError(
                f"connection closed after {offset + received} of {offset + length} bytes"
            )
    return True


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    size: int | None = None,
    chunk_size: int = 1 << 20,
    progress: bool = True,
    timeout: float = 60,
    retries: int = 3,
) -> str:
    """Download ``url`` to ``dest`` and return the file's sha256 hex digest.

    Bytes go to ``<dest>.part``; an existing part is resumed with a ``Range`` request (a server
    that answers 200 instead of 206 restarts it from zero). Refused or dropped connections,
    timeouts and 5xx/408/429 answers are retried ``retries`` times with a doubling backoff,
    each retry resuming from what arrived. The finished part is checked against ``size`` and
    ``sha256`` when given (a mismatch deletes it and raises :class:`IntegrityError`) and only
    then renamed onto ``dest``, so ``dest`` exists only as a complete, verified file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    failures = 0
    while True:
        try:
            if _transfer(url, part, chunk_size, progress, timeout):
                break
        except _TransientError as e:
            failures += 1
            if failures > retries:
                raise DataError(
                    f"download failed after {failures} attempts, last error: {e}", url
                ) from e
            delay = min(RETRY_BACKOFF_S * 2 ** (failures - 1), RETRY_BACKOFF_MAX_S)
            log.warning("%s: %s; retry %d/%d in %.1f s", url, e, failures, retries, delay)
            time.sleep(delay)
    try:
        digest = verify_file(part, url, sha256, size)
    except IntegrityError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    log.info("downloaded %s -> %s (sha256 %s)", url, dest, digest)
    return digest
