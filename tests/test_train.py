"""Training end to end on the tiny world: prepare -> pretrain_backbone -> extract_features ->
train, then the model file, resuming, NaN handling, loggers."""
import json
import logging

import pytest
import torch

from tests.conftest import TINY_PIPELINE
from pipeline import extract_features, pretrain_backbone, prepare, train
from pipeline.common.config import compose
from pipeline.data import processed
from pipeline.data.feature_store import FeatureStore
from pipeline.data.images import ImageTransform
from pipeline.data.vqa_format import load_image
from pipeline.models import lightning as lightning_module
from pipeline.models import load_model

TINY = TINY_PIPELINE


def tiny_cfg(root, *overrides):
    return compose([*TINY, f"paths.root={root}", *overrides])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A prepared tiny world with a pretrained backbone and extracted features."""
    root = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(root)
    prepare.run(cfg)
    pretrain_backbone.run(cfg)
    extract_features.run(cfg)
    return root


@pytest.fixture
def torch_flags(monkeypatch):
    """A Trainer's ``deterministic`` sets torch-wide flags (and CUBLAS_WORKSPACE_CONFIG): put
    them back for the tests that follow in this process."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    yield monkeypatch
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark = saved[2]


@pytest.mark.parametrize("overrides", [
    [],
    ["model=lstm_cnn", "trainer.deterministic=false", "trainer.lightning.log_every_n_steps=3",
     "model.optim.max_epochs=5", "model.optim.gradient_clip=null"],
    ["trainer=ddp"],
])
def test_the_trainer_gets_the_configs_arguments(tmp_path, torch_flags, overrides):
    torch_flags.setenv("DDP_ACCELERATOR", "cpu")  # what trainer=ddp runs on here
    torch_flags.setenv("DDP_PRECISION", "32-true")
    cfg = tiny_cfg(tmp_path, *overrides)
    args = cfg.trainer.lightning
    trainer = train.build_trainer(cfg, callbacks=[], loggers=False, root_dir=tmp_path)
    assert type(trainer.accelerator).__name__ == "CPUAccelerator" and args.accelerator == "cpu"
    assert type(trainer.strategy).__name__ == {"auto": "SingleDeviceStrategy", "ddp": "DDPStrategy"}[args.strategy]
    assert (trainer.num_devices, trainer.num_nodes) == (args.devices, args.num_nodes)
    assert trainer.precision == args.precision
    assert trainer.log_every_n_steps == args.log_every_n_steps
    assert trainer.max_epochs == cfg.model.optim.max_epochs
    assert trainer.gradient_clip_val == cfg.model.optim.gradient_clip
    assert torch.are_deterministic_algorithms_enabled() == cfg.trainer.deterministic


def test_an_argument_the_trainer_does_not_take_fails_loudly(tmp_path, torch_flags):
    from hydra.errors import InstantiationException

    cfg = tiny_cfg(tmp_path, "+trainer.lightning.max_epoch=3")  # a typo of max_epochs
    with pytest.raises(InstantiationException, match="unexpected keyword argument 'max_epoch'"):
        train.build_trainer(cfg, callbacks=[], loggers=False, root_dir=tmp_path)


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_train_writes_model_metrics_and_checkpoint(world, name):
    cfg = tiny_cfg(world, f"model={name}")
    metrics = train.run(cfg)
    saved = json.loads((world / f"reports/metrics/train/{name}.json").read_text())
    assert saved["model"] == name and 0.0 <= saved["val/acc"] <= 1.0
    assert saved["val/acc"] == pytest.approx(metrics["val/acc"])
    assert {"val/acc_yes_no", "val/acc_number", "val/acc_other", "epochs", "seconds"} <= set(saved)
    out = world / "models" / name
    checkpoints = world / "checkpoints" / name
    assert (checkpoints / "best.ckpt").is_file()
    assert not (checkpoints / "last.ckpt").exists()  # finished: nothing to resume
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]  # what the evaluation depends on

    # the exported model, end to end from pixels, answers as the head did on cached features
    question_vocab, answer_vocab = processed.load_vocabs(world / "data/processed/synthetic_tiny")
    model = load_model(out / "model.pt", question_vocab=question_vocab, answer_vocab=answer_vocab)
    records = processed.load_question_table(world / "data/processed/synthetic_tiny", "val")[:4]
    transform = ImageTransform(model.backbone.input_size, model.backbone.mean, model.backbone.std)
    images = torch.stack([transform(load_image(world / "data/raw/synthetic_tiny" / r["image"]))
                          for r in records])
    tokens = model.encode_questions([r["question"] for r in records])
    with torch.no_grad():
        end_to_end = model(images, tokens)
        store = FeatureStore.open(world / "data/features/synthetic_tiny/scene_resnet", "val")
        rows = [store.row_of(r["image_id"]) for r in records]
        cached = store.read(model.head.feature_kind, rows)
        assert model.head.feature_kind == {"lstm_cnn": "fc7", "mlb": "grid"}[name]
        from_cache = model.head(cached, tokens)
    torch.testing.assert_close(end_to_end, from_cache, atol=2e-2, rtol=2e-2)  # float16 store
    # the Lightning checkpoint loads into the same model
    from_ckpt = load_model(checkpoints / "best.ckpt")
    torch.testing.assert_close(from_ckpt(images, tokens), end_to_end)
    # Text questions are tokenised as prepare tokenised the training questions: "?" kept
    # (data.question_mark, recorded in the processed data and from there in the model file).
    assert processed.question_mark(world / "data/processed/synthetic_tiny") is True
    assert model.question_mark is True and from_ckpt.question_mark is True
    for row, r in enumerate(records):
        assert r["tokens"][-1] == "?"
        assert tokens[row].tolist() == r["token_ids"] + [0] * (tokens.shape[1] - len(r["token_ids"]))


def test_interrupted_training_resumes_from_last_checkpoint(world, monkeypatch):
    cfg = tiny_cfg(world, "model=lstm_cnn", "model.optim.max_epochs=3", "model.optim.patience=0")
    started_at = []
    original_start = lightning_module.VQALightningModule.on_train_start

    def record_start(self):
        started_at.append(self.current_epoch)
        return original_start(self)

    def crash_in_second_epoch(self):
        if self.current_epoch == 1:
            raise RuntimeError("killed")

    monkeypatch.setattr(lightning_module.VQALightningModule, "on_train_start", record_start)
    monkeypatch.setattr(lightning_module.VQALightningModule, "on_train_epoch_end", crash_in_second_epoch)
    with pytest.raises(RuntimeError, match="killed"):
        train.run(cfg)
    last = world / "checkpoints/lstm_cnn/last.ckpt"
    assert last.is_file()
    monkeypatch.setattr(lightning_module.VQALightningModule, "on_train_epoch_end", lambda self: None)
    metrics = train.run(cfg)
    assert started_at[0] == 0 and started_at[1] >= 1  # the second run did not start over
    assert metrics["epochs"] == 3 and not last.exists()


def separate_outputs(world, root, name):
    """Overrides that send a training run's outputs (model, checkpoints, metrics, logs) to
    ``root/name`` while it reads ``world``'s data, features and pretrained backbone."""
    out = root / name
    return [f"paths.models_dir={out}/models", f"paths.checkpoints_dir={out}/checkpoints",
            f"paths.metrics_dir={out}/metrics", f"paths.log_dir={out}/logs",
            f"backbone.weights={world}/models/backbone/scene_resnet.pt"]


def test_resumed_training_ends_with_the_weights_of_an_uninterrupted_run(world, tmp_path, monkeypatch):
    """README: an interrupted run resumes from last.ckpt. Same process, same machine, same
    settings: the resumed run must end with exactly the weights of a run that was never
    interrupted (torch.equal per tensor), having seen the same batches. Early stopping is off
    (patience 0) and there is no schedule (lr_decay null), so nothing else decides the end."""
    settings = ["model=lstm_cnn", "model.optim.max_epochs=3", "model.optim.patience=0"]
    batches, finals = {}, {}
    run_name = []
    step, end = lightning_module.VQALightningModule.training_step, lightning_module.VQALightningModule.on_train_end

    def record_step(self, batch, batch_idx):
        batches.setdefault(run_name[-1], []).append((self.current_epoch, batch["index"].tolist()))
        return step(self, batch, batch_idx)

    def record_end(self):
        finals[run_name[-1]] = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        return end(self)

    monkeypatch.setattr(lightning_module.VQALightningModule, "training_step", record_step)
    monkeypatch.setattr(lightning_module.VQALightningModule, "on_train_end", record_end)

    run_name.append("straight")
    straight = train.run(tiny_cfg(world, *settings, *separate_outputs(world, tmp_path, "straight")))

    def killed_before_second_epoch(self):  # last.ckpt holds the end of epoch 0 by then
        if self.current_epoch == 1:
            raise RuntimeError("killed")

    interrupted = tiny_cfg(world, *settings, *separate_outputs(world, tmp_path, "resumed"))
    run_name.append("killed")
    monkeypatch.setattr(lightning_module.VQALightningModule, "on_train_epoch_start", killed_before_second_epoch)
    with pytest.raises(RuntimeError, match="killed"):
        train.run(interrupted)
    assert (tmp_path / "resumed/checkpoints/lstm_cnn/last.ckpt").is_file()
    monkeypatch.setattr(lightning_module.VQALightningModule, "on_train_epoch_start", lambda self: None)
    run_name.append("resumed")
    resumed = train.run(interrupted)

    assert resumed["epochs"] == straight["epochs"] == 3
    assert "killed" not in finals and [e for e, _ in batches["killed"]] == [0] * len(batches["killed"])
    # the resumed run trained epochs 1 and 2 only, on the batches the uninterrupted run saw
    assert [e for e, _ in batches["resumed"]][0] == 1
    assert batches["killed"] + batches["resumed"] == batches["straight"], \
        "the resumed epochs saw other batches than the uninterrupted run"
    a, b = finals["straight"], finals["resumed"]
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"weights differ after resuming: {differ}"
    # the exported model files too (the best epoch's weights, the same epoch in both)
    assert resumed["best_epoch"] == straight["best_epoch"]
    saved = [torch.load(tmp_path / run / "models/lstm_cnn/model.pt", weights_only=True)["head_state"]
             for run in ("straight", "resumed")]
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


def test_training_in_two_processes_gives_the_same_weights(world, tmp_path):
    """Two separate processes with different PYTHONHASHSEED (set iteration order, hashing) train
    the same model file, tensor for tensor (same machine, same thread count). MLB here; both
    models, and every later stage, in tests/test_end_to_end.py (slow)."""
    import os
    import subprocess
    import sys

    name = "mlb"
    states = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.train", *TINY, f"model={name}", "threads=1",
             f"paths.root={world}", *separate_outputs(world, tmp_path, f"hash{hash_seed}")],
            capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        states.append(torch.load(tmp_path / f"hash{hash_seed}/models/{name}/model.pt", weights_only=True))
    first, second = states
    assert first.keys() == second.keys()
    for part in ("head_state", "backbone_state"):
        assert first[part].keys() == second[part].keys()
        differ = [k for k in first[part] if not torch.equal(first[part][k], second[part][k])]
        assert not differ, (part, differ)
    rest = [k for k in first if k not in ("head_state", "backbone_state")]
    assert {k: first[k] for k in rest} == {k: second[k] for k in rest}  # vocabularies, metadata
    metrics = [json.loads((tmp_path / f"hash{s}/metrics/train/{name}.json").read_text()) for s in ("1", "2")]
    assert {k: v for k, v in metrics[0].items() if k != "seconds"} == \
        {k: v for k, v in metrics[1].items() if k != "seconds"}


def test_changed_settings_do_not_resume(world, monkeypatch, caplog):
    cfg = tiny_cfg(world, "model=lstm_cnn", "model.optim.patience=0")

    def crash_in_second_epoch(self):  # the first epoch's last.ckpt is written by then
        if self.current_epoch == 1:
            raise RuntimeError("killed")

    monkeypatch.setattr(lightning_module.VQALightningModule, "on_train_epoch_end", crash_in_second_epoch)
    with pytest.raises(RuntimeError):
        train.run(cfg)
    assert (world / "checkpoints/lstm_cnn/last.ckpt").is_file()
    monkeypatch.setattr(lightning_module.VQALightningModule, "on_train_epoch_end", lambda self: None)
    with caplog.at_level(logging.WARNING):
        train.run(tiny_cfg(world, "model=lstm_cnn", "model.optim.patience=0", "model.optim.lr=0.002"))
    assert "other settings; starting afresh" in caplog.text


def test_nan_loss_stops_with_step_and_batch(world, monkeypatch):
    monkeypatch.setattr(lightning_module, "soft_cross_entropy",
                        lambda logits, scores: logits.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match=r"step 0, epoch 0, batch 0 \(dataset rows"):
        train.run(tiny_cfg(world, "model=mlb"))


def test_soft_cross_entropy_matches_definition():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [1.0, 2.0, 3.0]])
    scores = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.9]])
    expected = (-(1.0 / 1.3) * torch.log_softmax(logits[0], 0)[0]
                - (0.3 / 1.3) * torch.log_softmax(logits[0], 0)[1]
                - torch.log_softmax(logits[2], 0)[2]) / 2  # the all-zero row is left out
    torch.testing.assert_close(lightning_module.soft_cross_entropy(logits, scores), expected)


def test_wandb_logs_offline(world, tmp_path, monkeypatch):
    """logger=wandb, offline (no network): the run's own file, read back, holds the training
    curve (train/loss at every step with log_every_n_steps=1), every validation metric per epoch
    and the resolved config."""
    import math

    import wandb

    from tests.wandb_records import offline_runs

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny_cfg(world, "model=lstm_cnn", "logger=wandb", "model.optim.max_epochs=1",
                   "trainer.lightning.log_every_n_steps=1", *separate_outputs(world, tmp_path, "wandb"))
    assert cfg.logger.mode == "offline"
    metrics = train.run(cfg)
    wandb.finish()  # the stage leaves Lightning's run open until the process exits
    runs = offline_runs(tmp_path / "wandb" / "logs" / "wandb")
    assert len(runs) == 1
    run = runs[0]
    assert run["job_type"] == "train" and run["name"] == "train_lstm_cnn"
    assert run["config"]["model"]["name"] == "lstm_cnn" and run["config"]["seed"] == 0
    history = run["history"]
    train_loss = [step["train/loss"] for step in history if "train/loss" in step]
    assert len(train_loss) == metrics["train_questions"] // 32 + (metrics["train_questions"] % 32 > 0)
    assert all(math.isfinite(v) and v > 0 for v in train_loss)
    validation = [step for step in history if "val/acc" in step]
    assert len(validation) == 2  # the epoch, then the final validation of the best checkpoint
    for key in ("val/loss", "val/acc", "val/acc_yes_no", "val/acc_number", "val/acc_other"):
        assert all(key in step for step in validation), key
    assert validation[-1]["val/acc"] == pytest.approx(metrics["val/acc"])
    assert validation[-1]["val/loss"] == pytest.approx(metrics["val/loss"])


# Run by torchrun in place of `-m pipeline.train`: the stage itself, with each rank writing its
# head's weights when fit starts and when it ends (the test's independent view of training).
DDP_SCRIPT = """
import sys
import torch
from pipeline import train
from pipeline.models import lightning as L

out = sys.argv.pop(1)
fit_start, train_end = L.VQALightningModule.on_fit_start, L.VQALightningModule.on_train_end


def save(self, when):
    state = {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
    torch.save(state, f"{out}/{when}_rank{self.global_rank}.pt")


def on_fit_start(self):
    save(self, "initial")
    return fit_start(self)


def on_train_end(self):
    save(self, "final")
    return train_end(self)


L.VQALightningModule.on_fit_start, L.VQALightningModule.on_train_end = on_fit_start, on_train_end
train.main()
"""


def test_ddp_over_two_cpu_processes(world, tmp_path):
    """Lightning DDP (gloo) launched by torchrun, as on a cluster: both ranks train the same
    weights (they start equal and end equal, bit for bit: gradients are all-reduced), training
    moves them, the logs and metrics are well-formed, and the model file it writes loads. No
    claim about the loss falling: 3 epochs on 40 images are training dynamics, which may differ
    on another CPU."""
    import csv
    import math
    import os
    import subprocess
    import sys

    out = world / "ddp"
    weights = tmp_path / "weights"
    weights.mkdir()
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "DDP_ACCELERATOR": "cpu", "DDP_PRECISION": "32-true", "OMP_NUM_THREADS": "1"}
    epochs = 3
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(weights), "trainer=ddp", *TINY, "model=mlb", f"model.optim.max_epochs={epochs}",
         "model.optim.patience=0", "trainer.num_workers=0", "trainer.lightning.log_every_n_steps=1",
         f"paths.root={world}", f"paths.models_dir={out}/models", f"paths.metrics_dir={out}/metrics",
         f"paths.checkpoints_dir={out}/checkpoints",
         f"backbone.weights={world}/models/backbone/scene_resnet.pt",
         f"paths.log_dir={out}/logs"],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((out / "metrics" / "train" / "mlb.json").read_text())
    assert metrics["model"] == "mlb" and metrics["epochs"] == epochs
    assert metrics["val_questions"] == 60 and metrics["train_questions"] == 200  # 12 and 40 images x 5
    assert 1 <= metrics["best_epoch"] <= epochs
    for key in ("val/acc", "val/acc_yes_no", "val/acc_number", "val/acc_other"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert math.isfinite(metrics["val/loss"]) and metrics["val/loss"] > 0

    rows = list(csv.DictReader(open(next((out / "logs" / "csv").rglob("metrics.csv")))))
    val = [r for r in rows if r.get("val/loss")]
    # one row per epoch, then the final validation of the best checkpoint
    assert [int(r["epoch"]) for r in val[:epochs]] == list(range(epochs)) and len(val) == epochs + 1
    for r in val:
        assert math.isfinite(float(r["val/loss"])) and float(r["val/loss"]) > 0
        assert 0.0 <= float(r["val/acc"]) <= 1.0
    assert float(val[-1]["val/acc"]) == pytest.approx(metrics["val/acc"])
    # every step logged (log_every_n_steps=1): 200 questions split over 2 ranks, batches of 32
    train_loss = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(train_loss) == epochs * math.ceil(200 / 2 / 32)
    assert all(math.isfinite(v) and v > 0 for v in train_loss), train_loss

    state = {name: torch.load(weights / f"{name}.pt", weights_only=True)
             for name in ("initial_rank0", "initial_rank1", "final_rank0", "final_rank1")}
    for when in ("initial", "final"):
        a, b = state[f"{when}_rank0"], state[f"{when}_rank1"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), when
    initial, final = state["initial_rank0"], state["final_rank0"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    moved = [k for k in initial if not torch.equal(initial[k], final[k])]
    assert "classifier.weight" in moved and len(moved) > len(initial) // 2, moved

    model = load_model(out / "models" / "mlb" / "model.pt")
    assert model.name == "mlb" and not model.training
    saved = model.head.state_dict()
    assert saved.keys() == initial.keys()
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)  # the best epoch is a trained one
