"""The feature store and the extract_features stage on the tiny synthetic world with a small
random-weight SceneResNet saved in the pretrain_backbone file format."""
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline import extract_features, prepare
from pipeline.common.config import compose
from pipeline.data import processed
from pipeline.common.errors import DataError, MissingDataError
from pipeline.data.feature_store import (PROGRESS_FILE, FeatureStore, FeatureStoreWriter,
                                         NonFiniteFeaturesError, partial_dir)
from pipeline.data.images import ImageTransform
from pipeline.data.vqa_format import load_image
from pipeline.models.backbones import SceneResNet, build_backbone

CHANNELS = [8, 8, 16, 16]


class SimulatedKill(Exception):
    """Stands in for the process being killed in the middle of an extraction."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The prepared tiny world and a random-weight backbone file (shared: both are read-only)."""
    root = tmp_path_factory.mktemp("world")
    prepare.run(compose(["data=synthetic_tiny", f"paths.root={root}"]))
    torch.manual_seed(0)
    net = SceneResNet(CHANNELS, input_size=64, num_labels=5)
    # Non-trivial BatchNorm statistics, so that eval mode (running stats) is really exercised.
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    weights = root / "scene_resnet.pt"
    torch.save({"state_dict": net.state_dict(), "channels": CHANNELS, "input_size": 64,
                "num_labels": 5}, weights)
    return root, weights


def stage_cfg(world, out, *overrides):
    """The stage's config; features and metrics go under ``out``, the world is shared."""
    root, weights = world
    return compose(["data=synthetic_tiny", f"paths.root={root}", f"backbone.channels={CHANNELS}",
                    f"backbone.weights={weights}", f"paths.features_dir={out}/features",
                    f"paths.metrics_dir={out}/metrics", *overrides])


def counting_backbone(monkeypatch):
    """Make the stage's backbone count the images it is run on; returns the counter."""
    seen = {"images": 0}

    def build(cfg):
        backbone = build_backbone(cfg)
        backbone.register_forward_hook(
            lambda module, inputs, output: seen.__setitem__("images", seen["images"] + len(inputs[0])))
        return backbone

    monkeypatch.setattr(extract_features, "build_backbone", build)
    return seen


def kill_after_first_chunk(monkeypatch):
    """Let the first progress checkpoint be written, then 'kill' the run."""
    commit = FeatureStoreWriter._commit

    def commit_then_die(self):
        commit(self)
        raise SimulatedKill

    monkeypatch.setattr(FeatureStoreWriter, "_commit", commit_then_die)


def read_arrays(features_dir, key):
    store = FeatureStore.open(features_dir, key)
    rows = np.arange(len(store))
    return store.image_ids, store.grid(rows).numpy(), store.pooled(rows).numpy()


def test_store_holds_the_backbone_grid_of_every_image(world, tmp_path):
    cfg = stage_cfg(world, tmp_path, "extract.batch_size=8", "extract.chunk_rows=16")
    metrics = extract_features.run(cfg)
    features_dir = tmp_path / "features"
    backbone = build_backbone(cfg.backbone)
    transform = ImageTransform(backbone.input_size, backbone.mean, backbone.std)
    for key in ("train", "val"):
        images = processed.load_images(cfg.paths.processed_dir, key)
        store = FeatureStore.open(features_dir, key)
        index = json.loads((features_dir / key / "index.json").read_text())
        assert index["image_ids"] == store.image_ids == [im["image_id"] for im in images]
        assert index["grid_shape"] == [16, 4, 4] and index["dtype"] == "float16"
        assert index["backbone"] == "scene_resnet" and index["input_size"] == 64
        assert metrics["splits"][key]["images"] == len(store) == len(images)
        # The files are plain .npy arrays in index.json's row order.
        on_disk = np.load(features_dir / key / "grid.npy", mmap_mode="r")
        assert on_disk.shape == (len(images), 16, 4, 4) and on_disk.dtype == np.float16

        picked = images[:: max(1, len(images) // 4)]
        pixels = torch.stack([transform(load_image(Path(cfg.data.root) / im["image"]))
                              for im in picked])
        with torch.no_grad():
            expected = backbone(pixels)
        rows = [store.row_of(im["image_id"]) for im in picked]
        assert rows == [images.index(im) for im in picked]
        grid = store.grid(rows)
        assert grid.dtype == torch.float32
        torch.testing.assert_close(grid, expected, rtol=2e-3, atol=2e-3)
        np.testing.assert_array_equal(on_disk[rows], grid.numpy().astype(np.float16))
        torch.testing.assert_close(store.pooled(rows), expected.mean(dim=(2, 3)), rtol=2e-3, atol=1e-3)
        torch.testing.assert_close(store.grid(rows[0]), grid[0])
        all_rows = np.arange(len(store))
        torch.testing.assert_close(store.pooled(all_rows), store.grid(all_rows).mean(dim=(2, 3)),
                                   rtol=2e-3, atol=1e-3)
    assert sorted(p.name for p in features_dir.iterdir()) == ["train", "val"]   # no .partial
    written = json.loads((tmp_path / "metrics" / "extract_features.json").read_text())
    assert written == metrics and written["grid_shape"] == [16, 4, 4]
    on_disk_bytes = sum(p.stat().st_size for p in features_dir.rglob("*") if p.is_file())
    assert written["bytes_total"] == on_disk_bytes


def test_killed_extraction_resumes_where_it_stopped(world, tmp_path, monkeypatch):
    settings = ("extract.batch_size=4", "extract.chunk_rows=8")
    extract_features.run(stage_cfg(world, tmp_path / "uninterrupted", *settings))

    cfg = stage_cfg(world, tmp_path / "killed", *settings)
    with monkeypatch.context() as patch:
        kill_after_first_chunk(patch)
        with pytest.raises(SimulatedKill):
            extract_features.run(cfg)
    features_dir = tmp_path / "killed" / "features"
    progress = json.loads((partial_dir(features_dir, "train") / PROGRESS_FILE).read_text())
    assert progress["rows_done"] == 8
    with pytest.raises(MissingDataError, match="did not finish.*python -m pipeline.extract_features"):
        FeatureStore.open(features_dir, "train")

    seen = counting_backbone(monkeypatch)
    extract_features.run(cfg)
    n_train = len(processed.load_images(cfg.paths.processed_dir, "train"))
    n_val = len(processed.load_images(cfg.paths.processed_dir, "val"))
    # The grid-shape probe is one blank image; then only the rows after the checkpoint.
    assert seen["images"] == 1 + (n_train - 8) + n_val
    for key in ("train", "val"):
        for resumed, clean in zip(read_arrays(features_dir, key),
                                  read_arrays(tmp_path / "uninterrupted" / "features", key)):
            np.testing.assert_array_equal(resumed, clean)
    assert sorted(p.name for p in features_dir.iterdir()) == ["train", "val"]


def test_changed_image_list_starts_over(world, tmp_path, monkeypatch):
    # A private copy of the processed data, so that its image list can be changed.
    processed_dir = tmp_path / "processed"
    shutil.copytree(stage_cfg(world, tmp_path).paths.processed_dir, processed_dir)
    cfg = stage_cfg(world, tmp_path, f"paths.processed_dir={processed_dir}",
                    "extract.batch_size=4", "extract.chunk_rows=8")
    with monkeypatch.context() as patch:
        kill_after_first_chunk(patch)
        with pytest.raises(SimulatedKill):
            extract_features.run(cfg)

    listing = json.loads(processed.images_file(processed_dir, "train").read_text())
    listing["images"] = listing["images"][1:]
    processed.images_file(processed_dir, "train").write_text(json.dumps(listing))
    seen = counting_backbone(monkeypatch)
    extract_features.run(cfg)
    n_val = len(processed.load_images(processed_dir, "val"))
    assert seen["images"] == 1 + len(listing["images"]) + n_val
    store = FeatureStore.open(tmp_path / "features", "train")
    assert store.image_ids == [im["image_id"] for im in listing["images"]]


def test_writer_resumes_only_for_the_same_images_and_config(tmp_path):
    grids = torch.randn(10, 4, 3, 3)

    def writer(image_ids, config):
        return FeatureStoreWriter(tmp_path, "val", image_ids, (4, 3, 3), config, "net", 48,
                                  chunk_rows=4)

    first = writer(range(10), {"weights": "a"})
    first.append(grids[:4])                      # a full chunk: committed
    first.append(grids[4:6])                     # not yet: lost with the "killed" writer
    assert writer(range(10), {"weights": "a"}).rows_done == 4
    assert writer(range(1, 11), {"weights": "a"}).rows_done == 0
    first = writer(range(10), {"weights": "a"})  # the restart above discarded the chunk
    first.append(grids[:4])
    assert writer(range(10), {"weights": "b"}).rows_done == 0

    resumed = writer(range(10), {"weights": "b"})
    resumed.append(grids[:4])
    resumed = writer(range(10), {"weights": "b"})
    assert resumed.rows_done == 4
    resumed.append(grids[4:])
    resumed.finish()
    store = FeatureStore.open(tmp_path, "val")
    torch.testing.assert_close(store.grid(np.arange(10)), grids, rtol=1e-3, atol=2e-3)
    assert not partial_dir(tmp_path, "val").exists()
    assert not (tmp_path / "val" / PROGRESS_FILE).exists()

    # A finished store is replaced as a whole by the next one.
    replacement = writer(range(20, 30), {"weights": "c"})
    replacement.append(torch.zeros(10, 4, 3, 3))
    replacement.finish()
    store = FeatureStore.open(tmp_path, "val")
    assert store.image_ids == list(range(20, 30)) and store.grid(3).abs().max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"]


def test_missing_store_names_the_stage(tmp_path):
    with pytest.raises(MissingDataError, match="python -m pipeline.extract_features"):
        FeatureStore.open(tmp_path / "features", "val")


class PooledRows(Dataset):
    def __init__(self, store):
        self.store = store

    def __len__(self):
        return len(self.store)

    def __getitem__(self, row):
        return self.store.pooled(row)


def test_store_reads_in_dataloader_workers(tmp_path):
    writer = FeatureStoreWriter(tmp_path, "train", range(12), (4, 2, 2), {}, "net", 32)
    writer.append(torch.randn(12, 4, 2, 2))
    writer.finish()
    store = FeatureStore.open(tmp_path, "train")
    expected = store.pooled(np.arange(12))            # maps the file in this process first
    copy = pickle.loads(pickle.dumps(store))           # what spawned workers receive
    torch.testing.assert_close(copy.pooled(np.arange(12)), expected)
    loader = DataLoader(PooledRows(store), batch_size=5, num_workers=2)
    torch.testing.assert_close(torch.cat(list(loader)), expected)


def test_store_holds_fc7_when_the_backbone_has_fc_layers(world, tmp_path):
    root, _ = world
    torch.manual_seed(1)
    net = SceneResNet(CHANNELS, input_size=64, num_labels=5, fc=(12, 10))
    weights = tmp_path / "scene_resnet_fc.pt"
    torch.save({"state_dict": net.state_dict(), "channels": CHANNELS, "input_size": 64,
                "num_labels": 5, "fc": [12, 10]}, weights)
    cfg = stage_cfg(world, tmp_path, f"backbone.weights={weights}", "extract.chunk_rows=8")
    metrics = extract_features.run(cfg)
    assert metrics["fc7_channels"] == 10 and metrics["fc7_source"].startswith("fc6-fc7 (12, 10)")
    backbone = build_backbone(cfg.backbone)
    transform = ImageTransform(backbone.input_size, backbone.mean, backbone.std)
    images = processed.load_images(cfg.paths.processed_dir, "val")
    store = FeatureStore.open(tmp_path / "features", "val")
    assert store.index["fc7_channels"] == 10
    pixels = torch.stack([transform(load_image(Path(cfg.data.root) / im["image"])) for im in images])
    with torch.no_grad():
        expected = backbone.fc7(backbone(pixels))
    assert (expected > 0).any()
    rows = np.arange(len(store))
    # computed from the float32 grid, stored as float16
    torch.testing.assert_close(store.fc7(rows), expected, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(store.read("fc7", rows), store.fc7(rows))


def test_store_without_fc7_says_how_to_get_it(world, tmp_path):
    cfg = stage_cfg(world, tmp_path)
    extract_features.run(cfg)
    store = FeatureStore.open(tmp_path / "features", "val")
    assert store.index["fc7_channels"] is None
    with pytest.raises(MissingDataError, match="image_feature=pooled"):
        store.fc7([0])


def corrupting_backbone(monkeypatch, image_path, corruption):
    """Make the stage's backbone return ``corruption`` (nan, inf or a value beyond float16's
    range) in the grid of one image, recognised by its pixels."""
    def build(cfg):
        backbone = build_backbone(cfg)
        transform = ImageTransform(backbone.input_size, backbone.mean, backbone.std)
        target = transform(load_image(image_path))

        def corrupt(module, inputs, grid):
            grid = grid.clone()
            for row, pixels in enumerate(inputs[0]):
                if torch.equal(pixels, target):
                    grid[row, 0, 0, 0] = corruption
            return grid

        backbone.register_forward_hook(corrupt)
        return backbone

    monkeypatch.setattr(extract_features, "build_backbone", build)


@pytest.mark.parametrize("corruption", [float("nan"), float("inf"), 1e6])
def test_extraction_refuses_non_finite_features(world, tmp_path, monkeypatch, corruption):
    """A backbone whose grid is NaN, inf or beyond float16's 65504 for one image: the stage
    stops naming that image, the count and the fix, and no finished store appears."""
    cfg = stage_cfg(world, tmp_path, "extract.batch_size=4", "extract.chunk_rows=4")
    images = processed.load_images(cfg.paths.processed_dir, "train")
    bad = images[6]  # in the second batch: the first chunk is committed before
    corrupting_backbone(monkeypatch, Path(cfg.data.root) / bad["image"], corruption)
    with pytest.raises(NonFiniteFeaturesError) as e:
        extract_features.run(cfg)
    message = str(e.value)
    assert isinstance(e.value, DataError)
    assert f"image(s) {bad['image_id']} are not finite" in message
    assert "1 value(s) of grid.npy in their batch" in message
    assert "backbone.weights" in message and "mean and std" in message
    if corruption == 1e6:
        assert "beyond float16's largest value 65504" in message
        assert "extract.dtype=float32" in message
    else:
        assert "inf or NaN already in float32" in message
        assert "extract.dtype" not in message  # float32 would not help
    features_dir = tmp_path / "features"
    assert not (features_dir / "train").exists()
    assert sorted(p.name for p in features_dir.iterdir()) == ["train.partial"]
    progress = json.loads((partial_dir(features_dir, "train") / PROGRESS_FILE).read_text())
    assert progress["rows_done"] == 4
    with pytest.raises(MissingDataError, match="did not finish"):
        FeatureStore.open(features_dir, "train")

    # The stage's exit: the message and exit code 2, as for any bad input.
    from pipeline.common.config import stage_main

    with pytest.raises(SystemExit) as exit_info:
        with monkeypatch.context() as patch:
            patch.setattr("sys.argv", ["extract_features", *[
                f"{k}={v}" for k, v in [("data", "synthetic_tiny"), ("paths.root", world[0]),
                                        ("backbone.channels", CHANNELS),
                                        ("backbone.weights", world[1]),
                                        ("paths.features_dir", tmp_path / "features"),
                                        ("paths.metrics_dir", tmp_path / "metrics"),
                                        ("extract.batch_size", 4), ("extract.chunk_rows", 4),
                                        ("hydra.run.dir", tmp_path / "hydra"),
                                        ("hydra.output_subdir", "null")]]])
            stage_main(extract_features.run)()
    assert exit_info.value.code == 2


def test_float32_store_keeps_values_beyond_float16(world, tmp_path, monkeypatch):
    """extract.dtype=float32, the fix the error names for values beyond 65504: stored as they
    are, index.json says float32, and the reader checks the dtype against it."""
    cfg = stage_cfg(world, tmp_path, "extract.batch_size=4", "extract.dtype=float32")
    images = processed.load_images(cfg.paths.processed_dir, "val")
    corrupting_backbone(monkeypatch, Path(cfg.data.root) / images[1]["image"], 1e6)
    metrics = extract_features.run(cfg)
    assert metrics["dtype"] == "float32"
    store = FeatureStore.open(tmp_path / "features", "val")
    assert store.index["dtype"] == "float32" and store.dtype == np.float32
    assert np.load(tmp_path / "features" / "val" / "grid.npy", mmap_mode="r").dtype == np.float32
    assert store.grid(1)[0, 0, 0] == 1e6 and torch.isfinite(store.grid(np.arange(len(store)))).all()
    index_file = tmp_path / "features" / "val" / "index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps({**index, "dtype": "float16"}))
    with pytest.raises(MissingDataError, match="not a float16 array"):
        FeatureStore.open(tmp_path / "features", "val")
    index_file.write_text(json.dumps({**index, "dtype": "int8"}))
    with pytest.raises(MissingDataError, match="dtype must be one of"):
        FeatureStore.open(tmp_path / "features", "val")


def test_writer_checks_fc7_and_the_cast_before_writing(tmp_path):
    writer = FeatureStoreWriter(tmp_path, "val", ["a", "b", "c"], (4, 2, 2), {}, "net", 32,
                                fc7_channels=3, fc7_source="test")
    fc7 = torch.ones(3, 3)
    fc7[2, 1] = 7e4  # beyond float16 in fc7 only
    with pytest.raises(NonFiniteFeaturesError, match=r"image\(s\) c are not finite: 1 value\(s\) of fc7.npy"):
        writer.append(torch.ones(3, 4, 2, 2), fc7)
    assert writer.rows_written == 0
    writer.append(torch.ones(3, 4, 2, 2), torch.ones(3, 3))
    writer.finish()
    # 65504 itself is float16's largest value: stored
    writer = FeatureStoreWriter(tmp_path, "train", [1, 2], (4, 2, 2), {}, "net", 32)
    writer.append(torch.full((2, 4, 2, 2), 65504.0))
    writer.finish()
    assert FeatureStore.open(tmp_path, "train").grid(0).max() == 65504
    with pytest.raises(ValueError, match="dtype must be one of"):
        FeatureStoreWriter(tmp_path, "x", [1], (4, 2, 2), {}, "net", 32, dtype="bfloat16")
