"""Benchmark: does training from the feature store use memory independent of the store's size?

    python -m pipeline.benchmarks.feature_store [bench.feature_store.rows=2700]
        [bench.feature_store.scale=10] [bench.feature_store.grid=[128,8,8]]
        [bench.feature_store.batch_size=64] [bench.feature_store.workdir=DIR]

Writes two synthetic stores of random float16 features with the same grid shape, one with
``bench.feature_store.rows`` rows and one ``bench.feature_store.scale`` times larger, then runs
one training-like epoch over each in a fresh subprocess (so that nothing allocated by one run is
counted in the other): batches of rows in random order read through
:class:`~pipeline.data.feature_store.FeatureStore`, a linear classifier's forward, backward and
SGD step. Each subprocess reports its peak resident memory (``ru_maxrss``). Prints and writes
``${paths.metrics_dir}/bench_feature_store.json`` (both peaks and their ratio); a ratio near 1
means reading costs memory per batch, not per file.

The defaults (``bench.feature_store`` in conf/bench/default.yaml) are the default preset's store
(2500 + 200 images, 128 x 8 x 8 grids); for ResNet-152's res5c use
``bench.feature_store.grid=[2048,14,14] bench.feature_store.rows=200``.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.common.config import abspath, stage_main
from pipeline.data.feature_store import FeatureStore, FeatureStoreWriter
from pipeline.common.files import write_json

NUM_CLASSES = 32
# Random rows are generated and written this many bytes (float32) at a time.
WRITE_CHUNK_BYTES = 64 << 20
# What the peak ratio should stay under for reading to count as independent of the store size.
RATIO_LIMIT = 1.2


def write_synthetic_store(features_dir: Path, split_key: str, rows: int,
                          grid_shape: tuple[int, int, int], seed: int) -> Path:
    """A store of ``rows`` random grids, written through the real writer."""
    rng = np.random.default_rng(seed)
    chunk = max(1, WRITE_CHUNK_BYTES // (4 * int(np.prod(grid_shape))))
    writer = FeatureStoreWriter(features_dir, split_key, range(rows), grid_shape, {"seed": seed},
                                backbone="random", input_size=0, chunk_rows=chunk)
    for start in range(0, rows, chunk):
        count = min(chunk, rows - start)
        writer.append(torch.from_numpy(rng.standard_normal((count, *grid_shape), dtype=np.float32)))
    return writer.finish()


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024   # Linux reports KiB, macOS bytes


def train_one_epoch(store_dir: Path, batch_size: int, seed: int) -> dict:
    """One epoch of a linear classifier on the flattened grids, in random row order."""
    store = FeatureStore.open(store_dir.parent, store_dir.name)
    torch.manual_seed(seed)
    model = nn.Linear(int(np.prod(store.grid_shape)), NUM_CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    order = torch.randperm(len(store)).numpy()
    rss_before_epoch = psutil.Process().memory_info().rss
    start = time.perf_counter()
    for first in range(0, len(store), batch_size):
        rows = order[first:first + batch_size]
        features = store.grid(rows).flatten(1)
        labels = torch.from_numpy(rows % NUM_CLASSES)
        loss = nn.functional.cross_entropy(model(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    return {
        "rows": len(store),
        "store_bytes": sum(p.stat().st_size for p in store_dir.iterdir()),
        "rss_before_epoch_bytes": rss_before_epoch,
        "peak_rss_bytes": peak,
        # The peak is mostly torch itself; this is what the epoch added on top.
        "epoch_rss_growth_bytes": peak - rss_before_epoch,
        "epoch_seconds": round(seconds, 3),
    }


# What each measuring subprocess runs: one epoch over the store, its measurement as JSON.
EPOCH_CODE = ("import sys; from pipeline.benchmarks.feature_store import epoch_main; "
              "epoch_main(sys.argv[1:])")


def epoch_main(argv: list[str]) -> dict:
    """The subprocess's entry: ``STORE_DIR BATCH_SIZE SEED``; prints the measurement as JSON."""
    store_dir, batch_size, seed = argv
    measurement = train_one_epoch(Path(store_dir), int(batch_size), int(seed))
    print(json.dumps(measurement))
    return measurement


def measure_in_subprocess(store_dir: Path, batch_size: int, seed: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", EPOCH_CODE, str(store_dir), str(batch_size), str(seed)],
        check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(cfg: DictConfig) -> dict:
    settings = cfg.bench.feature_store
    rows, scale = int(settings.rows), int(settings.scale)
    batch_size, seed = int(settings.batch_size), int(settings.seed)
    grid_shape = tuple(int(size) for size in settings.grid)
    workdir = abspath(settings.workdir) if settings.get("workdir") else None
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_feature_store.", dir=workdir) as tmp:
        for name, count in (("small", rows), ("large", rows * scale)):
            print(f"writing the {name} store: {count} x {grid_shape} float16", flush=True)
            store_dir = write_synthetic_store(Path(tmp), name, count, grid_shape, seed)
            runs[name] = measure_in_subprocess(store_dir, batch_size, seed)
            print(f"  {name}: store {runs[name]['store_bytes'] / 2**20:.0f} MiB, peak RSS "
                  f"{runs[name]['peak_rss_bytes'] / 2**20:.0f} MiB "
                  f"(+{runs[name]['epoch_rss_growth_bytes'] / 2**20:.0f} MiB during the epoch), "
                  f"epoch {runs[name]['epoch_seconds']:.1f} s", flush=True)
    ratio = runs["large"]["peak_rss_bytes"] / runs["small"]["peak_rss_bytes"]
    report = {
        "grid_shape": list(grid_shape),
        "batch_size": batch_size,
        "scale": scale,
        **runs,
        "peak_rss_ratio": round(ratio, 4),
        "ratio_limit": RATIO_LIMIT,
        "within_limit": ratio <= RATIO_LIMIT,
    }
    out = write_json(abspath(cfg.paths.metrics_dir) / "bench_feature_store.json", report)
    print(f"peak RSS ratio large/small: {ratio:.3f} (limit {RATIO_LIMIT}); wrote {out}")
    return report


main = stage_main(run)

if __name__ == "__main__":
    main()
