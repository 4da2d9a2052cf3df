"""A copy of the project in a temporary folder, as a user's clone: git, DVC, dvc.yaml, conf/,
the pipeline's code and params.yaml. Tests run DVC there (``dvc repro``, ``dvc exp run -S``)
without touching the project's own workspace.

The copy's settings are an edit of its conf/, as a user makes them: ``dvc exp run -S``
recomposes params.yaml from conf/ with exactly the ``-S`` values given, so settings meant to
stay (the tiny world) belong in conf/, here a preset selected in conf/config.yaml."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"

# The tiny world of tests/conftest.py (TINY_PIPELINE) as a preset: every model's settings under
# models.<name>, which dvc.yaml's stages read (and the plain `model` block, so the two agree).
TINY_PRESET = """# @package _global_
defaults:
  - override /data: synthetic_tiny
  - override /logger: csv
backbone:
  channels: [8, 8, 16, 16]
  fc: [32, 32]
  pretrain: {epochs: 1, fc_epochs: 2}
model: {optim: {max_epochs: 2, batch_size: 32}}
models:
  lstm_cnn: {optim: {max_epochs: 2, batch_size: 32}}
  mlb: {optim: {max_epochs: 2, batch_size: 32}}
evaluation:
  pos_histogram: {tagger: textblob}
# one training-seed replicate, so that DVC's matrix stages run too
replicates: {seeds: [1]}
"""


def tiny_real_preset(raw: Path) -> str:
    """The tiny world's files read as real VQA v2 (the synthetic world is written in its layout)
    at ``raw``, with the tiny scene_resnet pretrained on the synthetic world."""
    return (TINY_PRESET.replace("override /data: synthetic_tiny", "override /data: vqa_v2")
            + f"data:\n  root: {raw}\n  image_size: 64\n")


def env() -> dict[str, str]:
    """Stages find this venv's python; git commits (DVC experiments commit) have an author."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.org",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.org"}


def run(cwd: Path, *args, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env(), capture_output=True,
                            text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, (args, result.stdout[-4000:], result.stderr[-4000:])
    return result


def dvc(cwd: Path, *args, **kwargs) -> subprocess.CompletedProcess:
    return run(cwd, DVC, *args, **kwargs)


def git(cwd: Path, *args) -> subprocess.CompletedProcess:
    return run(cwd, "git", *args)


def make_project(path: Path, preset: str = TINY_PRESET, commit: bool = True) -> Path:
    """The project at ``path``: code, config (with ``preset`` as its default preset and one
    torch thread), dvc.yaml, DVC's config (Hydra composition) and params.yaml as
    `make params` writes it, all committed to a fresh git repository."""
    path.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "pipeline", path / "pipeline", ignore=ignore)
    shutil.copytree(ROOT / "conf", path / "conf", ignore=ignore)
    (path / "conf" / "preset" / "test.yaml").write_text(preset)
    config = path / "conf" / "config.yaml"
    text = config.read_text()
    for old, new in (("  - preset: synthetic\n", "  - preset: test\n"), ("threads: null", "threads: 1")):
        assert old in text, old
        text = text.replace(old, new)
    config.write_text(text)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, path / name)
    git(path, "init", "-q")
    dvc(path, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", path / ".dvc" / "config")
    # `make params`, in the copy (python -m runs the copy's pipeline package)
    run(path, sys.executable, "-m", "pipeline.common.config")
    if commit:
        git(path, "add", "-A")
        git(path, "commit", "-qm", "project")
    return path
