"""dvc.yaml read through DVC's own graph (no stage is run): every path and the model list are
templated from params.yaml (the composed config), so one setting moves the whole DAG to another
data set or backbone, a model composed into the config gets its stages with no edit of dvc.yaml,
and every stage reads params.yaml."""
import shutil
from pathlib import Path

import networkx as nx
import pytest
import yaml
from dvc.repo import Repo
from omegaconf import OmegaConf

from pipeline.common.config import composed_params, write_params

ROOT = Path(__file__).resolve().parents[1]
PER_MODEL = ("train", "attribute")
EVALUATION = ("rank_correlation", "pos_histogram", "failure_prediction", "hadamard_study", "gating_study",
              "sanity_check", "evidence_slope", "faithfulness", "report")
UPSTREAM = ("prepare", "pretrain_backbone", "extract_features")


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


def project(path: Path, *overrides: str, conf: Path = ROOT / "conf") -> Path:
    """dvc.yaml and a params.yaml composed from ``conf`` with ``overrides``, in a DVC project."""
    path.mkdir(exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", path / "dvc.yaml")
    Repo.init(str(path), no_scm=True).close()
    write_params(path / "params.yaml", overrides, conf_dir=conf)
    return path


def paths_of(stage) -> list[str]:
    return [str(d) for d in stage.deps] + [str(o) for o in stage.outs]


def strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*strings(k), *strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def test_dvc_yaml_names_no_model_data_set_or_backbone():
    """Commands and data paths of dvc.yaml (its comments, config keys and code aside) are
    templated from the config."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()
    text = " ".join(s for s in strings([{k: v for k, v in s.get("do", s).items() if k != "params"}
                                        for s in stages]) if not s.startswith("pipeline/"))
    words = set(text.replace("/", " ").replace(".", " ").replace("=", " ").split())
    assert not {"lstm_cnn", "mlb", "synthetic", "synthetic_tiny", "vqa_v1", "vqa_v2", "vqa",
                "scene_resnet", "resnet152"} & words


def test_the_committed_params_yaml_is_the_composition_of_conf():
    """params.yaml is what `make params` writes from conf/ (edit conf/, then `make params`)."""
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == composed_params()


def test_dvc_composes_params_yaml_from_conf_with_hydra():
    repo = Repo(str(ROOT))
    try:
        hydra = repo.config["hydra"]
    finally:
        repo.close()
    assert hydra["enabled"] is True
    assert (hydra.get("config_dir", "conf"), hydra.get("config_name", "config")) == ("conf", "config")


def test_stages_come_from_the_config_and_read_params_yaml():
    models = composed_params()["evaluation"]["models"]
    assert models == list(composed_params()["models"])
    graph, stages = stage_graph(ROOT)
    assert {f"{kind}@{m}" for kind in PER_MODEL for m in models} <= set(stages)
    for name in EVALUATION:
        assert name in stages
        # every evaluation stage runs after the training of every model it covers
        assert {f"train@{m}" for m in models} <= upstream(graph, stages, name), name
    # faithfulness reads the stores and rank_correlation's table; the report reads its outputs
    assert {f"attribute@{m}" for m in models} | {"rank_correlation"} <= upstream(graph, stages, "faithfulness")
    assert "faithfulness" in upstream(graph, stages, "report")
    for name, stage in stages.items():
        assert " params=params.yaml" in stage.cmd, name
        assert any(str(d) == "params.yaml" for d in stage.deps), name  # its params are tracked
    for m in models:
        assert stages[f"train@{m}"].cmd == f"python -m pipeline.train params=params.yaml model={m}"
        train_params = next(d for d in stages[f"train@{m}"].deps if str(d) == "params.yaml")
        assert f"models.{m}" in train_params.params


def test_default_dag_generates_the_synthetic_world_and_pretrains_the_backbone():
    graph, stages = stage_graph(ROOT)
    assert [s for s in stages if s.startswith("generate@")] == ["generate@synthetic"]
    assert [str(o) for o in stages["generate@synthetic"].outs] == ["data/raw/synthetic"]
    assert "generate@synthetic" in upstream(graph, stages, "prepare")
    assert str(stages["pretrain_backbone"].outs[0]) == "models/backbone/scene_resnet.pt"
    assert "pretrain_backbone" in upstream(graph, stages, "train@mlb")
    assert "data/features/synthetic/scene_resnet" in paths_of(stages["extract_features"])


def test_one_setting_moves_the_dag_to_real_data(tmp_path):
    """`preset=vqa_v2` (what `dvc exp run -S preset=vqa_v2` composes): no world to generate, the
    raw files an input of prepare, ResNet-152's record in place of scene_resnet's training, and
    every path named by the new data set and backbone."""
    raw = tmp_path / "vqa"
    graph, stages = stage_graph(project(tmp_path / "p", "preset=vqa_v2", f"data.root={raw}"))
    assert not [s for s in stages if s.startswith("generate")]
    assert str(raw) in paths_of(stages["prepare"])
    assert [str(o) for o in stages["prepare"].outs if not o.metric] == ["data/processed/vqa_v2"]
    assert str(stages["pretrain_backbone"].outs[0]) == "models/backbone/resnet152.json"
    assert "data/features/vqa_v2/resnet152" in paths_of(stages["extract_features"])
    assert "attributions/vqa_v2/mlb" in paths_of(stages["attribute@mlb"])
    for name, stage in stages.items():
        assert not any("synthetic" in p or "scene_resnet" in p for p in paths_of(stage)), name
    for name in EVALUATION:
        assert {"extract_features", "train@mlb", "train@lstm_cnn"} <= upstream(graph, stages, name)


def test_scene_resnet_on_real_data_keeps_the_weights_pretrained_on_the_synthetic_world(tmp_path):
    _, stages = stage_graph(project(tmp_path, "data=vqa_v2", "data.root=/data/vqa"))
    weights = stages["pretrain_backbone"].outs[0]
    assert str(weights) == "models/backbone/scene_resnet.pt" and weights.persist
    assert "data/features/vqa_v2/scene_resnet" in paths_of(stages["extract_features"])


@pytest.fixture
def conf_with_a_new_model(tmp_path):
    """conf/ with the README's example model composed in: one line in conf/config.yaml's
    defaults and its file conf/model/bow_cnn.yaml."""
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    config = conf / "config.yaml"
    text = config.read_text()
    assert "  - model@models.mlb: mlb\n" in text
    config.write_text(text.replace("  - model@models.mlb: mlb\n",
                                   "  - model@models.mlb: mlb\n  - model@models.bow_cnn: bow_cnn\n"))
    model = OmegaConf.load(conf / "model" / "mlb.yaml")
    model.name = "bow_cnn"
    OmegaConf.save(model, conf / "model" / "bow_cnn.yaml")
    return conf


def test_a_model_composed_into_the_config_needs_no_edit_of_dvc_yaml(conf_with_a_new_model, tmp_path):
    graph, stages = stage_graph(project(tmp_path / "p", conf=conf_with_a_new_model))
    assert {"train@bow_cnn", "attribute@bow_cnn"} <= set(stages)
    assert stages["train@bow_cnn"].cmd == "python -m pipeline.train params=params.yaml model=bow_cnn"
    assert "models/bow_cnn/model.pt" in paths_of(stages["train@bow_cnn"])
    for name in EVALUATION:
        before = upstream(graph, stages, name)
        # the new model's stages feed each evaluation stage exactly where mlb's do
        for kind in PER_MODEL:
            assert (f"{kind}@mlb" in before) == (f"{kind}@bow_cnn" in before), (name, kind)
        assert "train@bow_cnn" in before, name


def test_training_seed_replicates_feed_rank_correlation_and_report(tmp_path):
    """replicates.seeds expands train_replicate / attribute_replicate per model and seed; the
    stages that read every replicate's store depend on them through paths.attributions_dir;
    with no seeds there are no replicate stages and no dependency is missing."""
    graph, stages = stage_graph(project(tmp_path / "three", "replicates.seeds=[1,2]"))
    for model in ("lstm_cnn", "mlb"):
        for seed in (1, 2):
            assert f"train_replicate@{model}-{seed}" in upstream(graph, stages, f"attribute_replicate@{model}-{seed}")
            for reader in ("rank_correlation", "report"):
                assert f"attribute_replicate@{model}-{seed}" in upstream(graph, stages, reader)
            # A replicate is trained on the main run's features, never on another replicate's.
            assert upstream(graph, stages, f"train_replicate@{model}-{seed}") == set(UPSTREAM) | {"generate@synthetic"}
    graph, stages = stage_graph(project(tmp_path / "none", "replicates.seeds=[]"))
    assert not [name for name in stages if "replicate" in name]
    assert {"rank_correlation", "report"} <= set(stages)
