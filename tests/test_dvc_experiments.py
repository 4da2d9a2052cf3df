"""The DAG through DVC itself, in a copy of the project (tests/dvc_project.py): real data by one
setting (the synthetic world's files read as VQA v2), and `dvc exp run -S` on a key of every
config group, each re-running exactly the stages that read it.

The whole DAG through DVC takes about three minutes on the tiny world here, so the tests that
run all of it are marked ``slow``; the CI tests run DVC up to the feature store on real data,
and queue one experiment per config group against a recorded (not computed) pipeline state."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo

from pipeline.common.config import write_params
from pipeline.data.http_download import sha256_file
from tests.conftest import TINY_PIPELINE
from tests.dvc_project import dvc, git, make_project, tiny_real_preset

# the main run's stages and those of the tiny project's one training-seed replicate
TRAIN = {"train@lstm_cnn", "train@mlb", "train_replicate@lstm_cnn-1", "train_replicate@mlb-1"}
ATTRIBUTE = {"attribute@lstm_cnn", "attribute@mlb", "attribute_replicate@lstm_cnn-1",
             "attribute_replicate@mlb-1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny synthetic world's raw files (VQA v2 layout) and a scene_resnet pretrained on it,
    made outside any project, as a user's files on disk."""
    from pipeline import generate, pretrain_backbone
    from pipeline.common.config import compose

    root = tmp_path_factory.mktemp("world")
    cfg = compose([*TINY_PIPELINE, f"paths.root={root}"])
    generate.run(cfg)
    pretrain_backbone.run(cfg)
    return root / "data/raw/synthetic_tiny", root / "models/backbone/scene_resnet.pt"


def real_data_project(path: Path, world) -> Path:
    raw, weights = world
    project = make_project(path, tiny_real_preset(raw))
    (project / "models/backbone").mkdir(parents=True)
    shutil.copy(weights, project / "models/backbone/scene_resnet.pt")
    return project


def stale(project: Path, *targets: str) -> set[str]:
    out = dvc(project, "status", "--json", *targets).stdout
    return set(json.loads(out or "{}"))


def test_real_data_runs_through_dvc_up_to_the_features(world, tmp_path):
    """data=vqa_v2 on the tiny world's files: no world is generated, prepare reads them as real
    VQA, pretrain_backbone keeps the scene_resnet pretrained on the synthetic world (a persisted
    output: DVC neither deletes nor retrains it), and the features are named by data and
    backbone."""
    project = real_data_project(tmp_path / "p", world)
    weights = project / "models/backbone/scene_resnet.pt"
    digest = sha256_file(weights)
    dvc(project, "repro", "extract_features")
    assert not stale(project, "--with-deps", "extract_features")
    prepared = json.loads((project / "reports/metrics/prepare.json").read_text())
    assert (prepared["data"], prepared["source"]) == ("vqa_v2", "vqa")
    assert (project / "data/processed/vqa_v2/questions_val.json").is_file()
    assert not (project / "data/raw").exists()  # nothing generated
    pretrained = json.loads((project / "reports/metrics/pretrain_backbone.json").read_text())
    assert pretrained["pretrained_here"] is False and sha256_file(weights) == digest
    assert (project / "data/features/vqa_v2/scene_resnet").is_dir()


# --- dvc exp run -S: one key of every config group ---------------------------------------------

# -S value -> the stages that read it, and so become stale (dvc status) with it.
SET_PARAMS = {
    # data: a key that the backbone's input size interpolates (conf/backbone/scene_resnet.yaml),
    # which DVC could not set before it composed the config with Hydra; then a key of prepare's
    # alone, which does not generate the world again.
    "data.synthetic.image_size=96": {"generate@synthetic_tiny", "prepare", "pretrain_backbone",
                                     "extract_features", *TRAIN},
    "data.answer_top_k=50": {"prepare"},
    "backbone.pretrain.epochs=2": {"pretrain_backbone", "extract_features", *TRAIN},
    "extract.batch_size=16": {"extract_features"},
    "models.mlb.optim.lr=0.001": {"train@mlb", "train_replicate@mlb-1"},
    "trainer.lightning.log_every_n_steps=5": {*TRAIN, *ATTRIBUTE},
    "logger.project=elsewhere": TRAIN,
    "train.resume=false": TRAIN,
    "attribution.options.occlusion.grid=8": {*ATTRIBUTE, "sanity_check"},
    # interpolates ${seed} in the original file; DVC reported "Recursive interpolation detected"
    "evaluation.failure_prediction.folds=4": {"failure_prediction"},
    "evaluation.report.gallery.questions=4": {"report"},
}


def record_a_pipeline_state(project: Path) -> None:
    """Every stage's outputs as small stand-in files, committed to DVC's lock as if the stages
    had run: `dvc status` is then clean, and a changed param shows exactly the stages that read
    it (upstream outputs are unchanged, so nothing downstream of them is stale)."""
    repo = Repo(str(project))
    try:
        outs = [Path(o.fs_path) for stage in repo.index.stages for o in stage.outs]
    finally:
        repo.close()
    for path in outs:
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(path.name)
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "stand-in").write_text(path.name)
    dvc(project, "commit", "--force", "--quiet")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "recorded state")
    assert not stale(project)


@pytest.fixture
def recorded_project(tmp_path, monkeypatch):
    """The tiny project with a recorded pipeline state, as the working directory: DVC's Python
    API runs in this process (a DVC process per call would cost seconds each)."""
    project = make_project(tmp_path / "p")
    record_a_pipeline_state(project)
    monkeypatch.chdir(project)
    return project


def queue_with(project: Path, setting: str) -> str:
    """`dvc exp run --queue -S <setting>`; the queued experiment's params.yaml."""
    repo = Repo(str(project))
    try:
        repo.experiments.run(params=[setting], queue=True)
    finally:
        repo.close()
    return git(project, "show", "refs/exps/celery/stash:params.yaml").stdout


def stale_with(project: Path, params: str) -> set[str]:
    """The stages `dvc status` finds changed with ``params`` as params.yaml."""
    (project / "params.yaml").write_text(params)
    repo = Repo(str(project))
    try:
        return set(repo.status())
    finally:
        repo.close()
        git(project, "checkout", "params.yaml")


def test_set_param_on_every_group_reruns_exactly_the_stages_that_read_it(recorded_project, tmp_path):
    project = recorded_project
    for setting, expected in SET_PARAMS.items():
        params = queue_with(project, setting)
        # the queued experiment's params.yaml: conf/ composed with the -S value, byte for byte
        # what `python -m pipeline.common.config <setting>` writes
        write_params(tmp_path / "ours.yaml", [setting], conf_dir=project / "conf")
        assert (tmp_path / "ours.yaml").read_text() == params, setting
        key, value = setting.split("=")
        node = yaml.safe_load(params)
        for part in key.split("."):
            node = node[part]
        assert str(node).lower() == value.lower(), setting
        assert stale_with(project, params) == expected, setting
    queued = dvc(project, "queue", "status").stdout
    assert queued.count("Queued") == len(SET_PARAMS)


def test_set_param_chooses_a_config_group(recorded_project):
    """`-S backbone=resnet152`: a group choice, composed by Hydra; the DAG follows it."""
    text = queue_with(recorded_project, "backbone=resnet152")
    params = yaml.safe_load(text)
    assert params["backbone"]["name"] == "resnet152"
    assert params["backbone"]["pretrained"] == "./models/backbone/resnet152.json"
    assert {"pretrain_backbone", "extract_features", *TRAIN} <= stale_with(recorded_project, text)


# --- the whole DAG through DVC (slow) ------------------------------------------------------------

@pytest.mark.slow
def test_real_data_by_one_setting_runs_the_whole_dag_through_dvc(world, tmp_path):
    project = real_data_project(tmp_path / "p", world)
    dvc(project, "repro")
    assert not stale(project)
    readme = (project / "reports/README.md").read_text()
    assert "`data=vqa_v2`" in readme and "synthetic world (`data=" not in readme
    # Goyal et al.'s Table 1 against the human maps only (no ground truth on real data), with
    # the human row (agreement between annotators), in the table and in the report
    table = [row.split(",") for row in
             (project / "reports/tables/rank_correlation.csv").read_text().splitlines()]
    header, rows = table[0], table[1:]
    column = {name: header.index(name) for name in ("model", "method", "reference")}
    assert {row[column["reference"]] for row in rows} == {"human"}
    assert any(row[column["model"]] == row[column["method"]] == "human" for row in rows)
    assert "rank correlation with human attention" in readme and "| human | human |" in readme
    assert json.loads((project / "reports/metrics/evidence_slope.json").read_text())["skipped"]


def exp_show(project: Path) -> list[dict]:
    return json.loads(dvc(project, "exp", "show", "--json").stdout)


def experiments(rows: list[dict]) -> dict[str, dict]:
    """Experiment name -> its data (params, metrics), from `dvc exp show --json`."""
    out = {}
    for row in rows:
        for exp in row.get("experiments") or []:
            for rev in exp.get("revs") or []:
                out[rev.get("name") or rev["rev"]] = rev.get("data") or {}
    return out


def metric(data: dict, file: str, key: str):
    return data["metrics"][file]["data"][key]


@pytest.mark.slow
def test_an_experiment_runs_end_to_end_and_dvc_exp_show_lists_its_metrics(tmp_path):
    project = make_project(tmp_path / "p")
    dvc(project, "exp", "run", "--name", "folds4", "-S", "evaluation.failure_prediction.folds=4")
    assert not stale(project)
    first = experiments(exp_show(project))["folds4"]
    assert first["params"]["params.yaml"]["data"]["evaluation"]["failure_prediction"]["folds"] == 4
    accuracy = metric(first, "reports/metrics/train/mlb.json", "val/acc")
    assert 0 <= accuracy <= 1
    assert "rank_correlation" in json.dumps(first["metrics"])

    # a queued experiment on top: only the stages that read the key run, in a temporary copy
    git(project, "add", "-A")
    git(project, "commit", "-qm", "first experiment")
    dvc(project, "exp", "run", "--queue", "--name", "lr", "-S", "models.mlb.optim.lr=0.0005")
    dvc(project, "queue", "start")
    deadline = time.monotonic() + 1500
    while "Queued" in (s := dvc(project, "queue", "status").stdout) or "Running" in s:
        assert time.monotonic() < deadline, s
        time.sleep(10)
    assert "Success" in s, (s, dvc(project, "queue", "logs", "lr", check=False).stdout[-3000:])
    second = experiments(exp_show(project))["lr"]
    assert second["params"]["params.yaml"]["data"]["models"]["mlb"]["optim"]["lr"] == 0.0005
    assert metric(second, "reports/metrics/train/lstm_cnn.json", "val/acc") == metric(
        first, "reports/metrics/train/lstm_cnn.json", "val/acc")
    assert metric(second, "reports/metrics/train/mlb.json", "val/acc") is not None
