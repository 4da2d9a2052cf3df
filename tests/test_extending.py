"""The README's extension examples, executed as written: the new attribution method is checked
against Captum and carried through the attribute and rank-correlation stages; the new model is
trained, saved, reloaded, explained with every method and scored."""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from captum.attr import LayerGradientXActivation

from pipeline import attribute, rank_correlation, train
from pipeline.attribution import explain
from pipeline.attribution.base import METHODS
from pipeline.common.config import compose
from pipeline.evaluation import inputs
from pipeline.models import load_trained_model
from pipeline.models.heads import HEADS
from tests.conftest import TINY_PIPELINE

README = Path(__file__).resolve().parent.parent / "README.md"
ALL_METHODS = [str(m) for m in compose().attribution.methods]


def readme_blocks(heading: str, language: str) -> list[str]:
    """The ``language`` code blocks of the README section ``### heading``."""
    text = README.read_text()
    start = text.index(f"\n### {heading}\n")
    ends = [i for i in (text.find("\n### ", start + 1), text.find("\n## ", start + 1)) if i >= 0]
    section = text[start:min(ends, default=len(text))]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)
    assert blocks, f"README section {heading!r} has no {language} block"
    return blocks


@pytest.fixture
def readme_method():
    """The README's method module, executed; unregistered afterwards."""
    assert "gradient_x_activation" not in METHODS
    namespace: dict = {}
    exec(compile(readme_blocks("A new attribution method", "python")[0], "README.md", "exec"), namespace)
    try:
        yield namespace["gradient_x_activation"]
    finally:
        METHODS.pop("gradient_x_activation", None)


@pytest.fixture
def readme_model(tmp_path):
    """The README's head module, executed (its decorator registers the head), and its config
    file in a config folder that Hydra searches (as if written to conf/model/); unregistered
    afterwards. Returns the overrides that select it."""
    assert "bow_cnn" not in HEADS
    namespace: dict = {}
    exec(compile(readme_blocks("A new model", "python")[0], "README.md", "exec"), namespace)
    try:
        head = namespace["BagOfWordsCNNHead"]
        assert HEADS[head.name] is head
        conf = tmp_path / "conf"
        (conf / "model").mkdir(parents=True)
        (conf / "model" / f"{head.name}.yaml").write_text(readme_blocks("A new model", "yaml")[0])
        yield [f"hydra.searchpath=[file://{conf}]", f"model={head.name}"]
    finally:
        HEADS.pop("bow_cnn", None)


def stage_config(root, out, *overrides):
    """The tiny pipeline's config, writing stores and reports under ``out``."""
    return compose([*TINY_PIPELINE, f"paths.root={root}", f"paths.attributions_dir={out}/attributions",
                    f"paths.reports_dir={out}/reports", "evaluation.bootstrap.samples=100",
                    "attribution.options.occlusion.grid=4", *overrides])


@pytest.mark.parametrize("model_name", ["lstm_cnn", "mlb"])
def test_readme_method_matches_captum(trained_world, readme_method, model_name):
    cfg = compose([*TINY_PIPELINE, f"paths.root={trained_world}"])
    model = load_trained_model(cfg, model_name).eval()
    _, images, tokens = inputs.question_batch(cfg, model, "val", 8)
    ours = explain(model, images, tokens, methods=["gradient_x_activation"])["gradient_x_activation"]
    with torch.no_grad():
        predicted = model(images, tokens).argmax(1)
    layer = model.analysis_points()["conv"]
    theirs = LayerGradientXActivation(model, layer).attribute(
        images, target=predicted, additional_forward_args=(tokens,))
    expected = theirs.sum(dim=1).abs()
    assert ours.image_map_raw.shape == expected.shape
    torch.testing.assert_close(ours.image_map_raw, expected, rtol=1e-4, atol=1e-6)
    assert ours.image_map.shape == images.shape[:1] + images.shape[2:]


def test_readme_method_runs_through_the_stages(trained_world, readme_method, tmp_path):
    overrides = ["model=mlb", "attribution.methods=[random,gradient_x_activation]", "evaluation.models=[mlb]"]
    metrics = attribute.run(stage_config(trained_world, tmp_path, *overrides))
    assert metrics["methods"]["gradient_x_activation"]["nonfinite_questions"] == 0
    result = rank_correlation.run(stage_config(trained_world, tmp_path, *overrides))
    table = result["table"]
    for reference in ("human", "ground_truth"):
        row = table[(table.model == "mlb") & (table.method == "gradient_x_activation")
                    & (table.reference == reference)]
        assert len(row) == 1 and row.n.iloc[0] > 1
        row = row.iloc[0]
        random = table[(table.model == "mlb") & (table.method == "random") & (table.reference == reference)]
        assert len(random) == 1
        random = random.iloc[0]
        # Both intervals exist, so there is a verdict, and it is the documented rule recomputed
        # from the rows' own interval columns: the method's interval lies entirely above the
        # random map's interval (same model, same reference).
        assert all(np.isfinite([row.ci_low, row.ci_high, random.ci_low, random.ci_high]))
        assert row.ci_low <= row["mean"] <= row.ci_high
        verdict = bool(row.ci_low > random.ci_high)
        assert row.beats_random in (True, False) and row.beats_random == verdict, \
            (reference, row.to_dict(), random.to_dict())
    assert "gradient_x_activation" in (tmp_path / "reports/tables/rank_correlation.md").read_text()


def test_readme_model_trains_and_every_method_explains_it(trained_world, readme_model, tmp_path):
    cfg = stage_config(trained_world, tmp_path, *readme_model, "evaluation.models=[bow_cnn]")
    assert cfg.model.arch.embedding == 64  # the README's config file was read
    trained = train.run(cfg)
    assert trained["model"] == "bow_cnn" and 0.0 <= trained["val/acc"] <= 1.0

    # Saved and reloaded through the checkpoint format; Grad-CAM equals a hand computation.
    model = load_trained_model(cfg, "bow_cnn").eval()
    _, images, tokens = inputs.question_batch(cfg, model, "val", 6)
    gradcam = explain(model, images, tokens, methods=["gradcam"])["gradcam"].image_map_raw
    with torch.no_grad():
        grid = model.backbone(images)
    grid.requires_grad_(True)
    logits = model.head(grid, tokens)
    score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    (gradient,) = torch.autograd.grad(score, grid)
    by_hand = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * grid).sum(1)).detach()
    torch.testing.assert_close(gradcam, by_hand, rtol=1e-4, atol=1e-6)

    # Every configured method maps it, except what needs a point it lacks (attention: alpha).
    metrics = attribute.run(cfg)
    skipped = {m: v["skipped"] for m, v in metrics["methods"].items() if v.get("skipped")}
    assert list(skipped) == ["attention"] and "alpha" in skipped["attention"]
    assert set(metrics["methods"]) == set(ALL_METHODS)

    table = pd.DataFrame(rank_correlation.run(cfg)["table"])
    scored = set(table[(table.model == "bow_cnn") & (table.reference == "ground_truth")].method)
    assert scored == set(ALL_METHODS) - {"attention"}


@pytest.fixture
def readme_stage():
    """The README's evaluation stage module, executed."""
    namespace: dict = {"__name__": "map_concentration"}
    exec(compile(readme_blocks("A new evaluation stage", "python")[0], "README.md", "exec"), namespace)
    return namespace


def test_readme_evaluation_stage_runs_and_matches_a_plain_loop(explained_world, readme_stage, tmp_path):
    import yaml
    from omegaconf import OmegaConf

    from pipeline.evaluation.report import sections
    from pipeline.evaluation.report.assets import TableSpec

    setting = yaml.safe_load(readme_blocks("A new evaluation stage", "yaml")[0])
    assert setting == {"map_concentration": {"share": 0.1}}
    cfg = stage_config(explained_world, tmp_path, "evaluation.bootstrap.samples=100")
    OmegaConf.set_struct(cfg, False)
    cfg.evaluation.merge_with(setting)  # as if written to conf/evaluation/default.yaml
    # Read the explained world's stores, write the reports under tmp_path.
    cfg.paths.attributions_dir = str(explained_world / "attributions" / "synthetic_tiny")
    table = readme_stage["run"](cfg)["table"]

    # One row per model and method with an image map, from the stores' indexes.
    expected_rows = []
    for model in ("lstm_cnn", "mlb"):
        index = inputs.load_store(cfg, model)
        expected_rows += [(model, m) for m, info in index["methods"].items()
                          if not info.get("skipped") and "image_map" in info["arrays"]]
    assert sorted(zip(table.model, table.method)) == sorted(expected_rows)
    assert len(expected_rows) > 10

    # The means against a plain loop over the .npz files: top 10% of cells by a sort per map.
    for model, method in [("mlb", "gradcam"), ("lstm_cnn", "occlusion"), ("mlb", "random")]:
        with np.load(inputs.attribution_dir(cfg, model) / f"{method}.npz") as arrays:
            maps, valid = arrays["image_map"], arrays["valid"]
        shares = []
        for m, ok in zip(maps, valid):
            if not ok:
                continue
            cells = sorted((abs(float(v)) for v in m.ravel()), reverse=True)
            top = max(1, round(0.1 * len(cells)))
            shares.append(sum(cells[:top]) / max(sum(cells), 1e-12))
        row = table[(table.model == model) & (table.method == method)].iloc[0]
        assert row.n == len(shares)
        assert row["mean"] == pytest.approx(np.mean(shares), rel=1e-6)
        assert row.ci_low <= row["mean"] <= row.ci_high
    # A uniform-random map spreads its mass; Grad-CAM's ReLU map concentrates it.
    random_share = table[(table.model == "mlb") & (table.method == "random")]["mean"].iloc[0]
    assert 0.1 < random_share < 0.3

    # publish wrote the table and the metrics where the README's dvc.yaml entry declares them.
    stage = yaml.safe_load(readme_blocks("A new evaluation stage", "yaml")[1])["map_concentration"]
    assert stage["cmd"] == "python -m pipeline.map_concentration params=params.yaml"
    declared = [next(iter(o)) for o in stage["outs"] + stage["metrics"]]
    paths = {"${paths.reports_dir}": tmp_path / "reports", "${paths.metrics_dir}": tmp_path / "reports/metrics"}
    for entry in declared:
        prefix, rest = entry.split("/", 1)
        assert (paths[prefix] / rest).is_file(), entry
    written = {p.name for p in (tmp_path / "reports").rglob("map_concentration*")}
    assert written == {Path(e).name for e in declared}
    params = {p.split(".")[0] + "." + p.split(".")[1] for p in stage["params"]}
    assert params <= {"evaluation.models", "evaluation.bootstrap", "evaluation.seed",
                      "evaluation.map_concentration"}

    # The report section, rendered from the table the stage wrote.
    section = eval(readme_blocks("A new evaluation stage", "python")[1],
                   {"Section": sections.Section, "TableSpec": TableSpec})
    ctx = sections.Context(cfg, ["lstm_cnn", "mlb"], (), sections.Assembled())
    section.read(ctx)
    rendered = section.render(ctx)
    assert rendered.startswith("## How concentrated the maps are")
    assert "tables/map_concentration.md" in rendered and "gradcam" in rendered
    assert ctx.assembled.tables == ["map_concentration"]
