"""Atomic outputs: a write that fails half-way leaves the previous complete output (or none)."""
import pytest

from pipeline.common.files import atomic_directory, atomic_path, read_json, write_json


class Killed(Exception):
    pass


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out" / "table.json"
    write_json(target, {"v": 1})
    with pytest.raises(Killed):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise Killed
    assert read_json(target) == {"v": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.json"]


def test_atomic_path_keeps_suffix_and_replaces(tmp_path):
    target = tmp_path / "maps.npz"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".npz" and tmp.parent == tmp_path
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"


def test_atomic_directory(tmp_path):
    target = tmp_path / "world"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(Killed):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("second, half written")
            raise Killed
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["world"]  # no temporary left behind
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("replaced")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["world"]


def test_saved_weights_are_byte_identical_run_to_run(tmp_path):
    """The same tensors saved twice (through different temporary files) give the same bytes,
    so DVC sees an unchanged output when a stage reproduces its weights exactly."""
    import torch

    from pipeline.common.files import save_torch

    state = {"w": torch.arange(6.0).view(2, 3), "meta": [1, 2]}
    first = save_torch(state, tmp_path / "a" / "weights.pt").read_bytes()
    second = save_torch(state, tmp_path / "b" / "weights.pt").read_bytes()
    assert first == second
    assert torch.equal(torch.load(tmp_path / "a" / "weights.pt", weights_only=True)["w"], state["w"])
