"""Sweeps as users run them: Hydra multirun with the local joblib launcher, one folder per job.

``paths=isolated`` puts every path of a job under its folder (a sweep of prepare itself);
``paths=sweep`` reads the main run's inputs (processed data, features, the pretrained backbone)
and writes only the job's outputs under its folder, so a training sweep does not prepare,
pretrain or extract again, and a later stage run as the same sweep finds each job's model."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_PIPELINE

ROOT = Path(__file__).resolve().parents[1]


def multirun(stage: str, *overrides: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "-m", *overrides],
                            capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    assert result.returncode == 0, (stage, result.stderr[-3000:])
    return result


def test_isolated_multirun_gives_one_complete_run_per_job(tmp_path):
    multirun("prepare", "paths=isolated", "hydra/launcher=local", "data=synthetic_tiny", "seed=0,1",
             f"hydra.sweep.dir={tmp_path}")
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0_data=synthetic_tiny,seed=0", "1_data=synthetic_tiny,seed=1"]
    questions = []
    for job in jobs:
        table = json.loads((job / "data/processed/synthetic_tiny/questions_val.json").read_text())
        questions.append([r["question"] for r in table["records"]])
        assert (job / "reports/metrics/prepare.json").is_file()
    assert questions[0] != questions[1]  # the seed reached the world generator


def files(root: Path) -> dict[str, int]:
    """Every file under ``root`` and its modification time (ns)."""
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns
            for p in root.rglob("*") if p.is_file()}


def job_folders(sweep: Path) -> dict[str, Path]:
    """The job folders of a sweep over ``model`` (named ``<num>_<overrides>``), by model."""
    jobs = {}
    for p in sweep.iterdir():
        if p.is_dir() and not p.name.startswith("."):
            match = re.search(r"(?:_|,)model=([^,]+)", p.name)
            assert match and p.name.split("_", 1)[0].isdigit(), p.name
            jobs[match.group(1)] = p
    return jobs


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A main run of the tiny world up to the feature store, under its own root."""
    from pipeline import extract_features, prepare, pretrain_backbone
    from pipeline.common.config import compose

    root = tmp_path_factory.mktemp("main")
    cfg = compose([*TINY_PIPELINE, f"paths.root={root}"])
    for stage in (prepare, pretrain_backbone, extract_features):
        stage.run(cfg)
    return root


@pytest.fixture(scope="module")
def training_sweep(upstream, tmp_path_factory):
    """Two training jobs (joblib launcher) on the main run of ``upstream``: the sweep folder, its
    job folders by model, the overrides, and the main run's files before the sweep."""
    before = files(upstream)
    sweep = tmp_path_factory.mktemp("sweep") / "multirun"
    overrides = [*TINY_PIPELINE, "threads=1", "paths=sweep", f"paths.root={upstream}",
                 f"hydra.sweep.dir={sweep}", "model=mlb,lstm_cnn"]
    multirun("train", *overrides, "hydra/launcher=local")
    return sweep, job_folders(sweep), overrides, before


def test_a_training_sweep_reads_the_main_run_and_writes_only_its_own_outputs(upstream, training_sweep):
    """Each job's folder holds its model, checkpoint, metrics and log, and nothing upstream; the
    main run's files are untouched and no upstream stage ran again."""
    sweep, jobs, _, before = training_sweep
    assert sorted(jobs) == ["lstm_cnn", "mlb"]
    for model, job in jobs.items():
        written = set(files(job))
        assert f"models/{model}/model.pt" in written
        assert f"reports/metrics/train/{model}.json" in written
        assert any(f.startswith(f"checkpoints/{model}/") for f in written), written
        # the job's log is training's alone: no upstream stage ran in it
        logs = {Path(f).name for f in written if f.endswith(".log")}
        assert logs == {"train.log"}, logs
        # nothing upstream was written under the job: no data, features or backbone
        assert not any(f.startswith(("data/", "models/backbone")) for f in written), sorted(written)
        metrics = json.loads((job / f"reports/metrics/train/{model}.json").read_text())
        assert metrics["model"] == model and metrics["data"] == "synthetic_tiny"
    # the main run: the same files, unmodified (processed data, features, backbone, metrics)
    assert files(upstream) == before


def test_a_later_stage_follows_the_sweep_with_the_submitit_launcher(upstream, training_sweep):
    """attribute run as the same sweep (same overrides, same sweep folder) finds the same job
    folders and explains each job's own model; its own setting (the methods) is left out of the
    folder names. With submitit's launcher (SLURM's, here its local executor), each job resolves
    its folder from its own Hydra config in its own process."""
    sweep, jobs, overrides, before = training_sweep
    multirun("attribute", *overrides, "hydra/launcher=submitit_local",
             "attribution.methods=[random]",
             "hydra.job.config.override_dirname.exclude_keys=[paths,paths.root,hydra/launcher,"
             "attribution.methods]")
    assert job_folders(sweep) == jobs
    for model, job in jobs.items():
        index = json.loads((job / "attributions/synthetic_tiny" / model / "index.json").read_text())
        assert index["model"] == model and list(index["methods"]) == ["random"]
        assert (job / "reports/metrics" / f"attribute_{model}.json").is_file()
    assert files(upstream) == before
