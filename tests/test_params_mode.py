"""params.yaml and params mode (pipeline/common/config.py): `python -m pipeline.common.config` writes the
composition of conf/ as DVC composes it, and `python -m pipeline.<stage> params=params.yaml`
runs a stage on that file (what dvc.yaml does), selecting models.<name> for `model=<name>`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from pipeline.common.config import ParamsMode, composed_params, write_params
from pipeline.common.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def test_write_params_is_dvc_s_composition(tmp_path):
    """The same function DVC runs for `dvc exp run -S`, so the files are byte for byte equal;
    resolved (no interpolation left) and free of Hydra's own node."""
    from dvc.utils.hydra import compose_and_dump

    ours, dvcs = tmp_path / "ours.yaml", tmp_path / "dvc.yaml"
    overrides = ["data=synthetic_tiny", "models.mlb.optim.lr=0.01", "backbone.pretrain.epochs=2"]
    write_params(ours, overrides)
    compose_and_dump(dvcs, str(ROOT / "conf"), None, "config", str(ROOT), overrides)
    assert ours.read_bytes() == dvcs.read_bytes()
    text = ours.read_text()
    assert "${" not in text and "hydra" not in yaml.safe_load(text)
    params = yaml.safe_load(text)
    assert params["models"]["mlb"]["optim"]["lr"] == 0.01
    # an interpolation across groups, resolved: scene_resnet's input size is the data's
    assert params["backbone"]["input_size"] == params["data"]["image_size"] == 64
    assert params["evaluation"]["models"] == list(params["models"]) == ["lstm_cnn", "mlb"]


def test_the_config_command_checks_and_writes_the_file(tmp_path):
    out = tmp_path / "params.yaml"
    command = [sys.executable, "-m", "pipeline.common.config", "-o", str(out)]
    assert subprocess.run([*command, "--check"], capture_output=True).returncode == 1  # missing
    assert subprocess.run([*command, "seed=3"], capture_output=True).returncode == 0
    assert yaml.safe_load(out.read_text())["seed"] == 3
    stale = subprocess.run([*command, "--check"], capture_output=True, text=True)
    assert stale.returncode == 1 and "seed" in stale.stderr and "make params" in stale.stderr
    assert subprocess.run([*command, "--check", "seed=3"], capture_output=True).returncode == 0


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    write_params(path, ["data=synthetic_tiny", "models.lstm_cnn.optim.lr=0.5"])
    return path


def test_model_selects_its_block_and_keys_apply_on_top(params_file):
    mode = ParamsMode.load(params_file, ["model=lstm_cnn", "seed=7", "hydra.job.name=x", "-c", "job"])
    cfg = mode.config
    assert cfg.model.name == "lstm_cnn" and cfg.model.optim.lr == 0.5
    assert cfg.model == cfg.models.lstm_cnn
    assert cfg.seed == 7 and cfg.data.name == "synthetic_tiny"
    # Hydra's own arguments go to Hydra (log and run folder), with the file's log folder
    assert mode.hydra_args[:2] == ["-c", "job"] and "hydra.job.name=x" in mode.hydra_args
    assert f"paths.log_dir='{cfg.paths.log_dir}'" in mode.hydra_args
    with pytest.raises(Exception, match="nope"):
        cfg.nope  # struct, as Hydra's config: a misspelt key is an error


@pytest.mark.parametrize("args, message", [
    (["data=vqa_v2"], "chooses a config group"),
    (["model@models.mlb=mlb_paper"], "chooses a config group"),
    (["model=bow_cnn"], "no models.bow_cnn"),
    (["no_such_key=1"], "no_such_key"),
    (["-m", "seed=0,1"], "sweep"),
])
def test_what_params_mode_refuses(params_file, args, message):
    with pytest.raises(DataError, match=message):
        ParamsMode.load(params_file, args)


def test_a_params_file_older_than_conf_is_named_in_a_warning(params_file, tmp_path):
    """A stage in params mode warns (does not fail) when the file differs from a fresh
    composition of conf/: an experiment's -S values, or an edit of conf/ not yet carried over."""
    assert ParamsMode.load(ROOT / "params.yaml", []).warnings == []
    [warning] = ParamsMode.load(params_file, []).warnings
    assert "make params" in warning and "data.name" in warning
    # `model` is what a plain run trains; stages run by DVC read models.<name>: a -S on `model`
    # alone is named
    write_params(params_file, ["model.optim.lr=0.5"])
    warnings = ParamsMode.load(params_file, ["model=mlb"]).warnings
    assert len(warnings) == 2 and "models.mlb" in warnings[1]
    fresh = tmp_path / "fresh.yaml"
    write_params(fresh)
    assert ParamsMode.load(fresh, []).warnings == []
    assert yaml.safe_load(fresh.read_text()) == composed_params()


def test_a_stage_runs_in_params_mode(tmp_path):
    """The stage reads the file, not conf/: here the world lands where the file's paths say, and
    Hydra's saved config of the run is the file's."""
    params = tmp_path / "params.yaml"
    write_params(params, ["data=synthetic_tiny", f"paths.root={tmp_path / 'run'}",
                          "data.synthetic.questions_per_image=2"])
    result = subprocess.run([sys.executable, "-m", "pipeline.generate", f"params={params}"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    marker = json.loads((tmp_path / "run/data/raw/synthetic_tiny/synthetic_world.json").read_text())
    assert marker["settings"]["questions_per_image"] == 2
    assert "make params" in result.stdout + result.stderr  # composed with overrides: warned
    saved = list((tmp_path / "run/logs/hydra/generate").glob("*/.hydra/config.yaml"))
    assert len(saved) == 1
    assert OmegaConf.load(saved[0]).data.synthetic.questions_per_image == 2


def test_prepare_reads_a_world_generated_before_and_refuses_a_stale_one(tmp_path):
    from pipeline import generate, prepare
    from pipeline.common.config import compose

    overrides = ["data=synthetic_tiny", f"paths.root={tmp_path}"]
    generate.run(compose(overrides))
    marker = tmp_path / "data/raw/synthetic_tiny/synthetic_world.json"
    before = marker.stat().st_mtime_ns
    prepare.run(compose([*overrides, "prepare.generate=false"]))
    assert marker.stat().st_mtime_ns == before  # read, not generated again
    with pytest.raises(DataError, match="other data.synthetic settings"):
        prepare.run(compose([*overrides, "prepare.generate=false",
                             "data.synthetic.questions_per_image=2"]))
