"""The whole pipeline as ``dvc.yaml`` runs it (``python -m pipeline.<stage>``, one process per
stage), on the tiny world, twice, in two output roots and with different ``PYTHONHASHSEED``:
every table, the processed data and the trained weights come out identical (same machine, same
thread count). Long (some thirty processes): marked ``slow``, run by ``make test-all``."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_PIPELINE

MODELS = ("lstm_cnn", "mlb")
STAGES = [("prepare",), ("pretrain_backbone",), ("extract_features",),
          *[("train", f"model={m}") for m in MODELS], *[("attribute", f"model={m}") for m in MODELS],
          ("rank_correlation",), ("pos_histogram",), ("failure_prediction",), ("hadamard_study",),
          ("gating_study",), ("sanity_check",), ("evidence_slope",)]
TABLES = ["rank_correlation", "rank_correlation_by_answer_type", "pos_histogram", "pos_ground_truth",
          "failure_prediction", "hadamard", "gating_top_neurons", "gating_top_neuron_overlap",
          "gating_score_correlation", "gating_sweep", "sanity", "evidence_slope"]


def run_pipeline(root: Path, hash_seed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    for stage, *overrides in STAGES:
        result = subprocess.run(
            [sys.executable, "-m", f"pipeline.{stage}", *TINY_PIPELINE, "threads=1",
             "evaluation.pos_histogram.tagger=textblob", f"paths.root={root}", *overrides],
            capture_output=True, text=True, timeout=900, env=env)
        assert result.returncode == 0, (stage, overrides, result.stderr[-3000:])


def files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_the_pipeline_in_fresh_processes_reproduces_every_table(tmp_path):
    roots = {seed: tmp_path / f"hash{seed}" for seed in ("1", "2")}
    for seed, root in roots.items():
        run_pipeline(root, seed)
    a, b = roots["1"], roots["2"]

    # every table of every evaluation stage, byte for byte (CSV and Markdown)
    tables = files(a / "reports" / "tables")
    assert {f"{name}.csv" for name in TABLES} <= set(tables), sorted(tables)
    assert tables == files(b / "reports" / "tables")

    # the processed data (config.yaml names its own root, so it is left out)
    processed = "data/processed/synthetic_tiny"
    first = {k: v for k, v in files(a / processed).items() if k != "config.yaml"}
    assert "questions_val.json" in first and first == {
        k: v for k, v in files(b / processed).items() if k != "config.yaml"}

    # the trained weights, tensor for tensor (the files' metadata name their root's paths)
    for name in MODELS:
        sa, sb = (torch.load(r / "models" / name / "model.pt", weights_only=True) for r in (a, b))
        for part in ("head_state", "backbone_state"):
            assert sa[part].keys() == sb[part].keys()
            assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part]), (name, part)

    # the attribution stores, array for array
    for name in MODELS:
        store_a, store_b = (r / "attributions" / "synthetic_tiny" / name for r in (a, b))
        npz = sorted(p.name for p in store_a.glob("*.npz"))
        assert npz and npz == sorted(p.name for p in store_b.glob("*.npz"))
        for file in npz:
            with np.load(store_a / file) as x, np.load(store_b / file) as y:
                assert x.files == y.files, (name, file)
                for key in x.files:
                    np.testing.assert_array_equal(x[key], y[key], err_msg=f"{name}/{file}/{key}")
