"""The root config's `threads`: how many CPU threads torch uses in a stage."""
import subprocess
import sys

import pytest
import torch

from pipeline.common.config import compose, set_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_leaves_torch_alone(restore_threads):
    assert compose().threads is None
    torch.set_num_threads(2)
    set_threads(None)
    assert torch.get_num_threads() == 2


def test_threads_pins_torch(restore_threads):
    torch.set_num_threads(2)
    set_threads(1)
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_thread_count_is_refused(bad, restore_threads):
    torch.set_num_threads(2)
    with pytest.raises(ValueError, match="threads"):
        set_threads(bad)
    assert torch.get_num_threads() == 2


def test_a_stage_applies_the_setting(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.prepare", "data=synthetic_tiny", "threads=1",
         f"paths.root={tmp_path}"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch uses 1 CPU thread(s)" in result.stdout + result.stderr
