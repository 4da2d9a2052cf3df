"""Downloads from a local HTTP server: resume, retries, verification, extraction, offline errors."""
from __future__ import annotations

import hashlib
import io
import json
import random
import re
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from omegaconf import OmegaConf

from pipeline.data import download as dl, http_download
from pipeline.common.errors import DataError, MissingDataError

QUESTIONS = "v2_OpenEnded_mscoco_val2014_questions.json"
ANNOTATIONS = "v2_mscoco_val2014_annotations.json"


@dataclass
class ServerState:
    """What the test server serves and how it misbehaves; ``requests`` records every GET."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    fail_500: dict[str, int] = field(default_factory=dict)  # path -> remaining 500 answers
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> body bytes sent, then close
    honour_range: bool = True
    range_from_zero: bool = False  # a buggy server: Range answered by 206 for the whole file


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        state: ServerState = self.server.state
        rng = self.headers.get("Range")
        state.requests.append((self.path, rng))
        if state.fail_500.get(self.path, 0) > 0:
            state.fail_500[self.path] -= 1
            self.send_error(500)
            return
        data = state.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, status = 0, 200
        if rng and state.honour_range:
            start = 0 if state.range_from_zero else int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = state.cut_after.pop(self.path, None)
        self.wfile.write(body if cut is None else body[:cut])
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = ServerState()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(http_download, "RETRY_BACKOFF_S", 0.0)


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- download_file --------------------------------------------------------------------------


def test_download_ok(server, tmp_path):
    data = random_bytes(300_000)
    server.state.files["/blob.bin"] = data
    dest = tmp_path / "out" / "blob.bin"
    digest = dl.download_file(server.base + "/blob.bin", dest, progress=False, chunk_size=4096)
    assert digest == sha(data)
    assert dest.read_bytes() == data
    assert not dest.with_suffix(".bin.part").exists()
    assert server.state.requests == [("/blob.bin", None)]


def test_resume_from_part_sends_range_and_bar_starts_at_offset(server, tmp_path, monkeypatch):
    data = random_bytes(200_000, seed=1)
    half = len(data) // 2
    server.state.files["/blob.bin"] = data
    dest = tmp_path / "blob.bin"
    dest.with_suffix(".bin.part").write_bytes(data[:half])
    bars = []
    real_tqdm = http_download.tqdm

    def recording_tqdm(*args, **kwargs):
        bars.append(kwargs)
        return real_tqdm(*args, **kwargs)

    monkeypatch.setattr(http_download, "tqdm", recording_tqdm)
    digest = dl.download_file(server.base + "/blob.bin", dest, sha256=sha(data), progress=False)
    assert server.state.requests == [("/blob.bin", f"bytes={half}-")]
    assert dest.read_bytes() == data
    assert digest == sha(data)
    assert bars[0]["initial"] == half and bars[0]["total"] == len(data)


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    data = random_bytes(50_000, seed=2)
    server.state.files["/blob.bin"] = data
    server.state.honour_range = False
    dest = tmp_path / "blob.bin"
    # Garbage in the part: appending the full 200 body to it would give a wrong file.
    dest.with_suffix(".bin.part").write_bytes(b"x" * 1000)
    dl.download_file(server.base + "/blob.bin", dest, progress=False)
    assert dest.read_bytes() == data


def test_206_from_wrong_offset_restarts(server, tmp_path):
    data = random_bytes(40_000, seed=8)
    server.state.files["/blob.bin"] = data
    server.state.range_from_zero = True
    dest = tmp_path / "blob.bin"
    dest.with_suffix(".bin.part").write_bytes(data[:1000])
    dl.download_file(server.base + "/blob.bin", dest, progress=False)
    assert dest.read_bytes() == data
    assert server.state.requests == [("/blob.bin", "bytes=1000-"), ("/blob.bin", None)]


def test_complete_part_is_verified_without_body(server, tmp_path):
    data = random_bytes(10_000, seed=3)
    server.state.files["/blob.bin"] = data
    dest = tmp_path / "blob.bin"
    dest.with_suffix(".bin.part").write_bytes(data)
    digest = dl.download_file(server.base + "/blob.bin", dest, sha256=sha(data), progress=False)
    assert digest == sha(data)
    assert dest.read_bytes() == data
    assert server.state.requests == [("/blob.bin", f"bytes={len(data)}-")]


def test_dropped_connection_is_resumed(server, tmp_path):
    data = random_bytes(120_000, seed=4)
    server.state.files["/blob.bin"] = data
    server.state.cut_after["/blob.bin"] = 30_000
    dest = tmp_path / "blob.bin"
    digest = dl.download_file(
        server.base + "/blob.bin", dest, size=len(data), progress=False, chunk_size=8192
    )
    assert dest.read_bytes() == data
    assert digest == sha(data)
    assert server.state.requests == [("/blob.bin", None), ("/blob.bin", "bytes=30000-")]


def test_checksum_mismatch_raises_and_leaves_nothing(server, tmp_path):
    data = random_bytes(5_000, seed=5)
    server.state.files["/blob.bin"] = data
    dest = tmp_path / "blob.bin"
    url = server.base + "/blob.bin"
    with pytest.raises(dl.IntegrityError) as info:
        dl.download_file(url, dest, sha256="0" * 64, progress=False)
    message = str(info.value)
    assert url in message and "0" * 64 in message and sha(data) in message
    assert not dest.exists()
    assert not dest.with_suffix(".bin.part").exists()


def test_size_mismatch_raises(server, tmp_path):
    server.state.files["/blob.bin"] = random_bytes(5_000, seed=6)
    dest = tmp_path / "blob.bin"
    with pytest.raises(DataError, match="expected 4999 bytes, got 5000"):
        dl.download_file(server.base + "/blob.bin", dest, size=4999, progress=False)
    assert not dest.exists()


def test_404_is_not_retried(server, tmp_path):
    url = server.base + "/nope.zip"
    with pytest.raises(DataError) as info:
        dl.download_file(url, tmp_path / "nope.zip", progress=False)
    assert url in str(info.value) and "404" in str(info.value)
    assert len(server.state.requests) == 1
    assert not (tmp_path / "nope.zip").exists()


def test_500_twice_then_success(server, tmp_path):
    data = random_bytes(20_000, seed=7)
    server.state.files["/blob.bin"] = data
    server.state.fail_500["/blob.bin"] = 2
    dest = tmp_path / "blob.bin"
    assert dl.download_file(server.base + "/blob.bin", dest, progress=False, retries=3) == sha(data)
    assert dest.read_bytes() == data
    assert len(server.state.requests) == 3


def test_persistent_500_gives_up_after_retries(server, tmp_path):
    server.state.files["/blob.bin"] = b"never served"
    server.state.fail_500["/blob.bin"] = 100
    url = server.base + "/blob.bin"
    with pytest.raises(DataError, match="after 3 attempts") as info:
        dl.download_file(url, tmp_path / "blob.bin", progress=False, retries=2)
    assert url in str(info.value) and "500" in str(info.value)
    assert len(server.state.requests) == 3


# --- resources, fetch, ensure -----------------------------------------------------------------


def vqa_zip() -> tuple[bytes, dict[str, bytes]]:
    members = {
        QUESTIONS: json.dumps(
            {"questions": [{"question_id": 1, "image_id": 42, "question": "What?"}]}
        ).encode(),
        ANNOTATIONS: json.dumps(
            {"annotations": [{"question_id": 1, "multiple_choice_answer": "yes"}]}
        ).encode(),
    }
    return make_zip(members), members


def resources_for(server) -> list[dl.Resource]:
    config = OmegaConf.create(
        {
            "resources": [
                {
                    "name": "v2_val",
                    "url": server.base + "/v2_Val_mscoco.zip",
                    "filename": "v2_Val_mscoco.zip",
                    "sha256": None,
                    "size": None,
                    "extract": True,
                    "provides": [QUESTIONS, ANNOTATIONS],
                },
                {"name": "readme", "url": server.base + "/README.txt", "filename": "README.txt"},
            ]
        }
    )
    return dl.resources_from_config(config.resources)


def test_resources_from_config_defaults_and_validation():
    plain = dl.resources_from_config([{"name": "a", "url": "http://x/a.txt", "filename": "a.txt"}])
    assert plain[0].provides == ["downloads/a.txt"] and plain[0].extract is False
    with pytest.raises(ValueError, match="unknown keys.*sha265"):
        dl.resources_from_config([{"name": "a", "url": "http://x", "filename": "a", "sha265": "0"}])
    with pytest.raises(ValueError, match="no `provides`"):
        dl.resources_from_config(
            [{"name": "a", "url": "http://x", "filename": "a.zip", "extract": True}]
        )
    with pytest.raises(ValueError, match="plain file name"):
        dl.resources_from_config([{"name": "a", "url": "http://x", "filename": "../a.zip"}])


def test_fetch_extracts_records_checksums_and_is_idempotent(server, tmp_path):
    archive, members = vqa_zip()
    server.state.files["/v2_Val_mscoco.zip"] = archive
    server.state.files["/README.txt"] = b"readme"
    resources = resources_for(server)
    root = tmp_path / "raw"

    fetched = dl.fetch_resources(root, resources, progress=False)

    for name, content in members.items():
        assert (root / name).read_bytes() == content
    assert (root / "downloads" / "README.txt").read_bytes() == b"readme"
    assert fetched == {
        "v2_val": {"sha256": sha(archive), "bytes": len(archive)},
        "readme": {"sha256": sha(b"readme"), "bytes": 6},
    }
    recorded = json.loads((root / "downloads" / "checksums.json").read_text())
    assert recorded["v2_Val_mscoco.zip"]["sha256"] == sha(archive)
    assert recorded["README.txt"]["sha256"] == sha(b"readme")
    assert not list((root / "downloads").glob(".extract-*"))

    server.state.requests.clear()
    assert dl.fetch_resources(root, resources, progress=False) == {}
    assert dl.ensure_resources(root, resources, download=False) == {}
    assert server.state.requests == []


def test_later_download_is_verified_against_recorded_checksum(server, tmp_path):
    archive, _ = vqa_zip()
    server.state.files["/v2_Val_mscoco.zip"] = archive
    server.state.files["/README.txt"] = b"readme"
    resources = resources_for(server)
    root = tmp_path / "raw"
    dl.fetch_resources(root, resources, progress=False)

    # The remote file changes and the local copies are gone: the new bytes must not be accepted.
    (root / QUESTIONS).unlink()
    (root / "downloads" / "v2_Val_mscoco.zip").unlink()
    server.state.files["/v2_Val_mscoco.zip"] = make_zip({QUESTIONS: b"{}", ANNOTATIONS: b"{}"})
    with pytest.raises(dl.IntegrityError, match="checksums.json"):
        dl.fetch_resources(root, resources, progress=False)
    assert not (root / QUESTIONS).exists()


def test_archive_on_disk_is_unpacked_offline(server, tmp_path):
    archive, members = vqa_zip()
    root = tmp_path / "raw"
    (root / "downloads").mkdir(parents=True)
    (root / "downloads" / "v2_Val_mscoco.zip").write_bytes(archive)
    (root / "downloads" / "README.txt").write_bytes(b"readme")

    fetched = dl.ensure_resources(root, resources_for(server), download=False, progress=False)

    # The plain file provides itself, so only the archive needed work.
    assert set(fetched) == {"v2_val"}
    assert (root / QUESTIONS).read_bytes() == members[QUESTIONS]
    assert server.state.requests == []


def test_ensure_without_download_lists_missing_paths_and_urls(server, tmp_path):
    resources = resources_for(server)
    root = tmp_path / "raw"
    with pytest.raises(MissingDataError) as info:
        dl.ensure_resources(root, resources, download=False, data_name="vqa_v2")
    message = str(info.value)
    for path in (QUESTIONS, ANNOTATIONS, "downloads/README.txt"):
        assert str(root / path) in message
    for r in resources:
        assert r.url in message
    assert "data=vqa_v2 data.download=true" in message
    assert server.state.requests == []


def test_ensure_with_download_fetches(server, tmp_path):
    archive, _ = vqa_zip()
    server.state.files["/v2_Val_mscoco.zip"] = archive
    server.state.files["/README.txt"] = b"readme"
    root = tmp_path / "raw"
    fetched = dl.ensure_resources(root, resources_for(server), download=True, progress=False)
    assert set(fetched) == {"v2_val", "readme"}
    assert dl.missing_resources(root, resources_for(server)) == []


def test_provides_not_in_archive_is_reported(server, tmp_path):
    server.state.files["/a.zip"] = make_zip({"other.json": b"{}"})
    resources = dl.resources_from_config(
        [
            {
                "name": "a",
                "url": server.base + "/a.zip",
                "filename": "a.zip",
                "extract": True,
                "provides": [QUESTIONS],
            }
        ]
    )
    with pytest.raises(DataError, match=re.escape(QUESTIONS)):
        dl.fetch_resources(tmp_path, resources, progress=False)


# --- extraction -------------------------------------------------------------------------------


@pytest.mark.parametrize("member", ["../evil.json", "/abs/evil.json", "ok/../../evil.json"])
def test_zip_slip_member_is_rejected(tmp_path, member):
    archive = tmp_path / "bad.zip"
    archive.write_bytes(make_zip({QUESTIONS: b"{}", member: b"pwned"}))
    root = tmp_path / "root"
    with pytest.raises(DataError, match="refusing archive member"):
        dl.extract_zip(archive, root)
    assert not (tmp_path / "evil.json").exists()
    assert not (root / QUESTIONS).exists()


def test_extraction_moves_whole_directories_and_merges_existing(tmp_path):
    root = tmp_path / "root"
    (root / "val2014").mkdir(parents=True)
    (root / "val2014" / "old.jpg").write_bytes(b"old")
    archive = tmp_path / "imgs.zip"
    archive.write_bytes(
        make_zip({"val2014/a.jpg": b"a", "val2014/sub/b.jpg": b"b", "train2014/c.jpg": b"c"})
    )
    assert dl.extract_zip(archive, root) == ["train2014", "val2014"]
    assert (root / "val2014" / "old.jpg").read_bytes() == b"old"
    assert (root / "val2014" / "sub" / "b.jpg").read_bytes() == b"b"
    assert (root / "train2014" / "c.jpg").read_bytes() == b"c"
