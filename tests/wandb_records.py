"""Read what an offline wandb run wrote, without wandb's service or the network: the run's
``run-<id>.wandb`` file is a LevelDB-style log (wandb's 7-byte header ``:W&B`` + magic + version,
then 32 KiB blocks of records, each chunk with a 7-byte header: CRC32C, little-endian length,
type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) of ``wandb_internal_pb2.Record`` protobufs."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    """Every Record of one ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        pending += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
        else:
            assert kind in (FIRST, MIDDLE), f"{path}: unknown chunk type {kind}"
    return out


def _items(items) -> dict:
    """{key: value} of config, history or summary items. wandb writes a key either as ``key``
    or as a path ``nested_key`` (e.g. ["rank_correlation/rank_correlation", "nrows"] for a
    logged table's fields): paths become nested dicts, keyed by their first element."""
    out: dict = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


def complete_records(path: str | Path, timeout: float = 60.0) -> list:
    """The records of a finished run: wandb's service may still be writing the file when
    ``run.finish()`` returns, so wait (up to ``timeout`` seconds) for its last record, ``exit``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = records(path)
        except Exception:  # a record cut in the middle of being written
            found = []
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def offline_run(run_dir: str | Path) -> dict:
    """What one offline run holds: ``config`` (dict), ``history`` (list of step dicts),
    ``summary`` (the last value of each key, merged over the run's summary records), ``job_type``,
    ``name`` and ``dir`` (the run folder; logged media live under ``dir / "files"``)."""
    run_dir = Path(run_dir)
    files = list(run_dir.glob("run-*.wandb"))
    assert len(files) == 1, f"{run_dir}: expected one run file, found {files}"
    run = {"config": {}, "history": [], "summary": {}, "job_type": None, "name": None, "dir": run_dir}
    found = complete_records(files[0])
    assert any(r.WhichOneof("record_type") == "exit" for r in found), f"{files[0]}: the run never finished"
    for record in found:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["job_type"], run["name"] = record.run.job_type, record.run.display_name
            run["config"].update(_items(record.run.config.update))
        elif kind == "config":
            run["config"].update(_items(record.config.update))
        elif kind == "history":
            run["history"].append(_items(record.history.item))
        elif kind == "summary":
            for key, value in _items(record.summary.update).items():
                if isinstance(value, dict) and isinstance(run["summary"].get(key), dict):
                    run["summary"][key].update(value)
                else:
                    run["summary"][key] = value
    return run


def offline_runs(wandb_dir: str | Path) -> list[dict]:
    """Every offline run under a ``wandb`` folder (``offline-run-*``), oldest first."""
    return [offline_run(d) for d in sorted(Path(wandb_dir).glob("offline-run-*"))]


def logged(run: dict) -> dict:
    """Every key logged to the run's history, with its last value."""
    out: dict = {}
    for step in run["history"]:
        out.update(step)
    return out


def logged_tables(run: dict) -> dict:
    """key -> the logged wandb.Table as written to the run's files ({"columns", "data"})."""
    return {key: json.loads((run["dir"] / "files" / value["path"]).read_text())
            for key, value in logged(run).items()
            if isinstance(value, dict) and value.get("_type") == "table-file"}
