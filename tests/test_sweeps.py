"""Sweeps as users run them: Hydra multirun with the local joblib launcher, one folder per job."""
import json
import subprocess
import sys


def test_multirun_gives_one_complete_run_per_job(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.prepare", "-m", "paths=sweep", "hydra/launcher=local",
         "data=synthetic_tiny", "seed=0,1", f"hydra.sweep.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0_data=synthetic_tiny,seed=0", "1_data=synthetic_tiny,seed=1"]
    questions = []
    for job in jobs:
        table = json.loads((job / "data/processed/synthetic_tiny/questions_val.json").read_text())
        questions.append([r["question"] for r in table["records"]])
        assert (job / "reports/metrics/prepare.json").is_file()
    assert questions[0] != questions[1]  # the seed reached the world generator
