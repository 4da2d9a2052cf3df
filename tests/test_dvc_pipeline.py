"""dvc.yaml: the model list lives in one place (``models`` in conf/evaluation/default.yaml), and a
model added there gets its train@ and attribute@ stages and feeds every evaluation stage, read
through DVC's own graph (no pipeline is run)."""
import shutil
from pathlib import Path

import networkx as nx
import pytest
from dvc.repo import Repo
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
EVALUATION_CONFIG = "conf/evaluation/default.yaml"
PER_MODEL = ("train", "attribute")
EVALUATION = ("rank_correlation", "pos_histogram", "failure_prediction", "hadamard_study", "gating_study",
              "sanity_check", "evidence_slope", "report")


def stage_graph(root: Path) -> tuple[nx.DiGraph, dict]:
    """DVC's stage graph of the project at ``root`` (edges point from a stage to the stages it
    depends on) and its stages by name."""
    repo = Repo(str(root))
    try:
        graph = repo.index.graph
        return graph, {stage.name: stage for stage in graph.nodes}
    finally:
        repo.close()


def upstream(graph: nx.DiGraph, stages: dict, name: str) -> set[str]:
    return {stage.name for stage in nx.descendants(graph, stages[name])}


def test_dvc_yaml_names_no_model_and_builds_stages_from_the_config_list():
    assert not {"lstm_cnn", "mlb"} & set((ROOT / "dvc.yaml").read_text().replace("/", " ").split())
    models = list(OmegaConf.load(ROOT / EVALUATION_CONFIG).models)
    graph, stages = stage_graph(ROOT)
    assert {f"{kind}@{m}" for kind in PER_MODEL for m in models} <= set(stages)
    for name in EVALUATION:
        assert name in stages
        # every evaluation stage runs after the training of every model it covers
        assert {f"train@{m}" for m in models} <= upstream(graph, stages, name), name


@pytest.fixture
def project_with_a_new_model(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "conf/evaluation").mkdir(parents=True)
    config = OmegaConf.load(ROOT / EVALUATION_CONFIG)
    config.models = [*config.models, "bow_cnn"]
    OmegaConf.save(config, tmp_path / EVALUATION_CONFIG)
    Repo.init(str(tmp_path), no_scm=True).close()
    return tmp_path


def test_a_model_added_to_the_config_list_needs_no_edit_of_dvc_yaml(project_with_a_new_model):
    graph, stages = stage_graph(project_with_a_new_model)
    assert {"train@bow_cnn", "attribute@bow_cnn"} <= set(stages)
    assert stages["train@bow_cnn"].cmd == "python -m pipeline.train model=bow_cnn"
    for name in EVALUATION:
        before = upstream(graph, stages, name)
        # the new model's stages feed each evaluation stage exactly where mlb's do
        for kind in PER_MODEL:
            assert (f"{kind}@mlb" in before) == (f"{kind}@bow_cnn" in before), (name, kind)
        assert "train@bow_cnn" in before, name
