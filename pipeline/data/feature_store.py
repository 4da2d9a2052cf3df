"""Cached backbone features: one on-disk, memory-mapped store per split.

The backbone is frozen, so its output for an image never changes; training reads it from here
instead of running the CNN every epoch. Layout (written by ``python -m pipeline.extract_features``):

    <features_dir>/<split_key>/grid.npy     N x C x h x w float16, the ``conv`` grid of each image
    <features_dir>/<split_key>/pooled.npy   N x C float16, the grid's spatial mean (computed in
                                            float32 before the cast; not L2-normalised: models do it)
    <features_dir>/<split_key>/fc7.npy      N x D float16, the backbone's fc7 of the grid (when it
                                            has one; computed from the float32 grid)
    <features_dir>/<split_key>/index.json   {"image_ids": [...row order...], "backbone", "input_size",
                                            "grid_shape": [C, h, w], "dtype": "float16",
                                            "fc7_channels": D or null, "fc7_source": what fc7 is}

The arrays are real ``.npy`` files (``np.load(path, mmap_mode="r")`` reads them). ``dtype`` is
float16 by default; ``extract.dtype=float32`` stores float32 (twice the bytes), and index.json
says which. Every stored value is finite: the writer refuses a batch whose features are inf or
NaN, in float32 or after the cast (:class:`NonFiniteFeaturesError`).

An extraction in progress lives in ``<split_key>.partial/`` next to the final folder, with a
``progress.json`` that says how many rows are safely on disk. A killed extraction resumes from
there; the final folder appears (or replaces the previous one) by a rename, only when complete.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.common.errors import DataError, MissingDataError
from pipeline.common.files import read_json, replace_directory, write_json

log = logging.getLogger(__name__)

GRID_FILE = "grid.npy"
POOLED_FILE = "pooled.npy"
FC7_FILE = "fc7.npy"
INDEX_FILE = "index.json"
PROGRESS_FILE = "progress.json"
PARTIAL_SUFFIX = ".partial"
STORE_DTYPE = np.dtype(np.float16)  # the default (extract.dtype)
STORE_DTYPES = ("float16", "float32")
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: larger values become inf in the cast
EXTRACT_COMMAND = "python -m pipeline.extract_features"

Rows = int | Sequence[int] | np.ndarray | torch.Tensor


def store_dir(features_dir: str | os.PathLike, split_key: str) -> Path:
    """The folder of a finished split."""
    return Path(features_dir) / split_key


def partial_dir(features_dir: str | os.PathLike, split_key: str) -> Path:
    """The folder of a split whose extraction has not finished (or was interrupted)."""
    return Path(features_dir) / f"{split_key}{PARTIAL_SUFFIX}"


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a ``.npy`` file, read without mapping it."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran_order, dtype = read_header(f)
        if fortran_order:
            raise ValueError(f"{path} is stored in Fortran order; the store writes C order")
        return tuple(shape), dtype, f.tell()


def store_dtype(name: str | np.dtype | None) -> np.dtype:
    """The store's array dtype from its name (``extract.dtype``, index.json's ``dtype``);
    None is the default, float16."""
    if name is None:
        return STORE_DTYPE
    dtype = np.dtype(name) if str(name) in STORE_DTYPES else None
    if dtype is None:
        raise ValueError(f"feature store dtype must be one of {STORE_DTYPES}, got {name!r}")
    return dtype


def _npy_matches(path: Path, shape: tuple[int, ...], dtype: np.dtype = STORE_DTYPE) -> bool:
    """Whether ``path`` is a ``.npy`` of exactly ``shape`` and ``dtype`` (False if unreadable)."""
    try:
        found_shape, found_dtype, _ = _npy_header(path)
    except (OSError, ValueError, KeyError):
        return False
    return found_shape == shape and found_dtype == dtype


class NonFiniteFeaturesError(DataError):
    """The backbone gave features that are inf or NaN, or that float16 cannot hold: nothing of
    the batch is written. The message names the images, the count and the fix."""


class _RowReader:
    """Rows of one ``.npy`` file through a read-only memory map of this process.

    Pages a read touched are handed back right after the rows are copied out
    (``MADV_DONTNEED``): the data stays in the kernel's page cache, but the process does not
    keep it mapped, so its resident memory stays at about one batch whatever the file size.
    Without this, one epoch of random reads would leave the whole file resident."""

    def __init__(self, path: Path):
        shape, dtype, offset = _npy_header(path)
        with open(path, "rb") as f:
            # The map keeps its own reference to the file; the descriptor can be closed.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._array = np.ndarray(shape, dtype, buffer=self._map, offset=offset)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """A copy of ``array[rows]`` (``rows``: 1-D integer array)."""
        out = self._array[rows]
        self._map.madvise(mmap.MADV_DONTNEED)
        return out


class FeatureStore:
    """The features of one split, read-only; rows are read per call, never the whole file.

    Safe with DataLoader workers: the memory maps are opened lazily by the process that reads,
    reopened after a fork, and dropped when the store is pickled (spawned workers)."""

    def __init__(self, directory: Path, index: dict):
        self.directory = Path(directory)
        self.index = index
        self._row_of = {image_id: row for row, image_id in enumerate(index["image_ids"])}
        self._readers: dict[str, _RowReader] = {}
        self._readers_pid: int | None = None

    @classmethod
    def open(cls, features_dir: str | os.PathLike, split_key: str) -> "FeatureStore":
        """The finished store of ``split_key``; :class:`MissingDataError` naming the stage to run
        when it is missing, unfinished or does not match its index."""
        directory = store_dir(features_dir, split_key)
        if not (directory / INDEX_FILE).is_file():
            partial = partial_dir(features_dir, split_key)
            if partial.is_dir():
                raise MissingDataError(
                    f"the feature extraction of split {split_key!r} did not finish: rerun "
                    f"`{EXTRACT_COMMAND}` with the same overrides to resume it", partial)
            raise MissingDataError(
                f"features of split {split_key!r} not found: run `{EXTRACT_COMMAND}` with the same "
                "data=, backbone= and paths.root settings first", directory)
        index = read_json(directory / INDEX_FILE)
        n, grid_shape = len(index["image_ids"]), tuple(index["grid_shape"])
        try:
            dtype = store_dtype(index.get("dtype"))
        except ValueError as e:
            raise MissingDataError(f"{e} in index.json: rerun `{EXTRACT_COMMAND}`",
                                   directory / INDEX_FILE) from None
        arrays = [(GRID_FILE, (n, *grid_shape)), (POOLED_FILE, (n, grid_shape[0]))]
        if index.get("fc7_channels"):
            arrays.append((FC7_FILE, (n, int(index["fc7_channels"]))))
        for name, shape in arrays:
            if not _npy_matches(directory / name, shape, dtype):
                raise MissingDataError(
                    f"{name} is missing or is not a {dtype.name} array of shape {shape} as "
                    f"index.json says: rerun `{EXTRACT_COMMAND}`", directory / name)
        return cls(directory, index)

    def __len__(self) -> int:
        return len(self._row_of)

    @property
    def image_ids(self) -> list:
        """Image ids in row order."""
        return self.index["image_ids"]

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(self.index["grid_shape"])

    @property
    def backbone(self) -> str:
        return self.index["backbone"]

    @property
    def input_size(self) -> int:
        return int(self.index["input_size"])

    @property
    def dtype(self) -> np.dtype:
        """The arrays' dtype on disk (reads always return float32)."""
        return store_dtype(self.index.get("dtype"))

    def row_of(self, image_id) -> int:
        try:
            return self._row_of[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} has no features in {self.directory}") from None

    def grid(self, rows: Rows) -> torch.Tensor:
        """Grid features as float32: C x h x w for one row, B x C x h x w for a sequence."""
        return self._read(GRID_FILE, rows)

    def pooled(self, rows: Rows) -> torch.Tensor:
        """Pooled features as float32: C for one row, B x C for a sequence."""
        return self._read(POOLED_FILE, rows)

    def fc7(self, rows: Rows) -> torch.Tensor:
        """fc7 features as float32: D for one row, B x D for a sequence."""
        if not self.index.get("fc7_channels"):
            raise MissingDataError(
                f"these features have no fc7 (backbone {self.backbone} without fc6/fc7 layers): "
                "pretrain the backbone with backbone.fc=[fc6,fc7] and rerun "
                f"`{EXTRACT_COMMAND}`, or train with model.arch.image_feature=pooled",
                self.directory)
        return self._read(FC7_FILE, rows)

    def read(self, kind: str, rows: Rows) -> torch.Tensor:
        """Rows of ``grid``, ``pooled`` or ``fc7``."""
        readers = {"grid": self.grid, "pooled": self.pooled, "fc7": self.fc7}
        if kind not in readers:
            raise ValueError(f"unknown feature kind {kind!r}; known: {sorted(readers)}")
        return readers[kind](rows)

    def _read(self, name: str, rows: Rows) -> torch.Tensor:
        index = np.asarray(rows, dtype=np.int64)
        values = self._reader(name).read(index.reshape(-1))
        values = values.reshape(index.shape + values.shape[1:])
        return torch.from_numpy(values.astype(np.float32))

    def _reader(self, name: str) -> _RowReader:
        # A map inherited through fork belongs to the parent; each process maps for itself.
        if self._readers_pid != os.getpid():
            self._readers, self._readers_pid = {}, os.getpid()
        if name not in self._readers:
            self._readers[name] = _RowReader(self.directory / name)
        return self._readers[name]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"], state["_readers_pid"] = {}, None
        return state


def _json_normalised(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparing with a file."""
    return json.loads(json.dumps(value))


class FeatureStoreWriter:
    """Writes one split's store, resumably.

    Rows go into ``<split_key>.partial/`` in the order of ``image_ids``. Every ``chunk_rows`` rows
    the arrays are flushed and ``progress.json`` ({"rows_done", "image_ids", "config"}) is
    replaced atomically, so after a kill the rows it counts are on disk. A new writer for the
    same image list and ``config`` (the identity of the backbone and data; any JSON value)
    continues at ``rows_done``; for anything else it starts over. :meth:`finish` writes
    index.json and renames the folder into place.

    ``dtype`` (``float16``, the default, or ``float32``) is the arrays' type on disk. A batch
    with a non-finite value, in float32 or after the cast to ``dtype`` (float16 holds at most
    65504), raises :class:`NonFiniteFeaturesError` naming its images before anything of it is
    written; the partial folder keeps the rows before it.

    Usage: ``writer = FeatureStoreWriter(...)``; feed the grids of images
    ``image_ids[writer.rows_done:]`` in order to :meth:`append`; then :meth:`finish`.
    """

    def __init__(self, features_dir: str | os.PathLike, split_key: str, image_ids: Sequence,
                 grid_shape: Sequence[int], config: dict, backbone: str, input_size: int,
                 chunk_rows: int = 256, fc7_channels: int | None = None,
                 fc7_source: str | None = None, dtype: str | None = None):
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        self.dtype = store_dtype(dtype)
        self.final_dir = store_dir(features_dir, split_key)
        self.partial_dir = partial_dir(features_dir, split_key)
        self.image_ids = _json_normalised(list(image_ids))
        self.grid_shape = tuple(int(s) for s in grid_shape)
        self.config = _json_normalised(config)
        self.backbone = backbone
        self.input_size = int(input_size)
        self.chunk_rows = int(chunk_rows)
        self.fc7_channels = int(fc7_channels) if fc7_channels else None
        self.fc7_source = fc7_source
        self._arrays: dict[str, np.memmap] | None = None
        self.rows_done = self._resume_or_start()
        self.rows_written = self.rows_done

    @property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        n = len(self.image_ids)
        shapes = {GRID_FILE: (n, *self.grid_shape), POOLED_FILE: (n, self.grid_shape[0])}
        if self.fc7_channels:
            shapes[FC7_FILE] = (n, self.fc7_channels)
        return shapes

    def _resume_or_start(self) -> int:
        """Rows already on disk from an interrupted run with the same inputs, else 0 (after
        clearing the partial folder and allocating the arrays)."""
        progress_file = self.partial_dir / PROGRESS_FILE
        if progress_file.is_file():
            progress = read_json(progress_file)
            same_inputs = (progress["image_ids"] == self.image_ids
                           and progress["config"] == self.config
                           and all(_npy_matches(self.partial_dir / name, shape, self.dtype)
                                   for name, shape in self._shapes.items()))
            if same_inputs:
                log.info("resuming %s at row %d of %d", self.partial_dir, progress["rows_done"],
                         len(self.image_ids))
                return int(progress["rows_done"])
            log.info("%s was started for other images or another backbone: starting over",
                     self.partial_dir)
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        self.partial_dir.mkdir(parents=True)
        for name, shape in self._shapes.items():
            # Allocates a sparse file of the final size (rows are filled in place later) and
            # unmaps it at once: append() maps it again only for the rows it writes.
            np.lib.format.open_memmap(self.partial_dir / name, mode="w+", dtype=self.dtype,
                                      shape=shape)
        return 0

    def append(self, grid: torch.Tensor | np.ndarray,
               fc7: torch.Tensor | np.ndarray | None = None) -> None:
        """Store the grids (B x C x h x w, any float dtype) of the next B images, and their fc7
        (B x D) when the store has it."""
        grid = torch.as_tensor(grid).detach().to("cpu", torch.float32)
        if tuple(grid.shape[1:]) != self.grid_shape:
            raise ValueError(f"grid of shape {tuple(grid.shape[1:])} does not match the store's "
                             f"{self.grid_shape}")
        if (fc7 is None) != (self.fc7_channels is None):
            raise ValueError("fc7 rows must be given exactly when the store has fc7 "
                             f"(fc7_channels={self.fc7_channels})")
        start, end = self.rows_written, self.rows_written + grid.shape[0]
        if end > len(self.image_ids):
            raise ValueError(f"{end} rows appended to a store of {len(self.image_ids)} images")
        if fc7 is not None:
            fc7 = torch.as_tensor(fc7).detach().to("cpu", torch.float32)
            if tuple(fc7.shape) != (grid.shape[0], self.fc7_channels):
                raise ValueError(f"fc7 of shape {tuple(fc7.shape)} does not match "
                                 f"{(grid.shape[0], self.fc7_channels)}")
        # Pooled from the float32 grid, not from its float16 copy.
        rows = {GRID_FILE: grid.numpy(), POOLED_FILE: grid.mean(dim=(2, 3)).numpy()}
        if fc7 is not None:
            rows[FC7_FILE] = fc7.numpy()
        stored = self._checked_cast(rows, start)
        if self._arrays is None:
            self._arrays = {name: np.lib.format.open_memmap(self.partial_dir / name, mode="r+")
                            for name in self._shapes}
        for name, values in stored.items():
            self._arrays[name][start:end] = values
        self.rows_written = end
        if self.rows_written - self.rows_done >= self.chunk_rows:
            self._commit()

    def _checked_cast(self, rows: dict[str, np.ndarray], start: int) -> dict[str, np.ndarray]:
        """``rows`` (float32, by file name) cast to the store's dtype, after checking that every
        value is finite before and after the cast; else :class:`NonFiniteFeaturesError`."""
        with np.errstate(over="ignore"):  # an overflow in the cast is found and reported below
            stored = {name: values.astype(self.dtype) for name, values in rows.items()}
        for name, values in rows.items():
            bad = ~np.isfinite(values)
            if bad.any():
                raise self._non_finite_error(name, values, bad, False, start)
            bad = ~np.isfinite(stored[name])
            if bad.any():
                raise self._non_finite_error(name, values, bad, True, start)
        return stored

    def _non_finite_error(self, name: str, values: np.ndarray, bad: np.ndarray, in_cast: bool,
                          start: int) -> NonFiniteFeaturesError:
        """The error for the non-finite ``bad`` entries of ``values`` (float32 rows of ``name``
        from row ``start``): which images, how many values, what to do."""
        rows = np.flatnonzero(bad.reshape(len(bad), -1).any(1))
        images = [self.image_ids[start + int(r)] for r in rows]
        shown = ", ".join(map(str, images[:10]))
        if len(images) > 10:
            shown += f" and {len(images) - 10} more"
        finite = np.abs(values[np.isfinite(values)])
        largest = f"{finite.max():.4g}" if finite.size else "none"
        if in_cast:
            what = (f"finite in float32 but beyond {self.dtype.name}'s largest value "
                    f"{FLOAT16_MAX:g}, so they would be stored as inf (largest |value| {largest})")
        else:
            what = ("inf or NaN already in float32, as the backbone returned them (largest "
                    f"finite |value| {largest})")
        fix = (f"check the {self.backbone} weights (backbone.weights): trained weights keep the "
               "features far below float16's limit (ImageNet weights keep ResNet-152's res5c well "
               "inside it), whereas random, corrupt or foreign weights, or BatchNorm statistics "
               "that do not fit them, do not; and check that the images are normalised with the "
               "backbone's mean and std")
        if in_cast:
            fix += "; or store float32 features with extract.dtype=float32"
        return NonFiniteFeaturesError(
            f"{self.backbone} features of image(s) {shown} are not finite: {int(bad.sum())} "
            f"value(s) of {name} in their batch (rows {start}-{start + len(bad) - 1}, {bad.size} "
            f"values) are {what}. Nothing of this batch was written; the store stays unfinished in "
            f"{self.partial_dir.name}/. Fix: {fix}.", self.partial_dir)

    def _commit(self) -> None:
        """Make the written rows durable, then record them in progress.json."""
        for array in (self._arrays or {}).values():
            array.flush()
        # Unmapping after each chunk keeps the writer's memory at one chunk for any split size.
        self._arrays = None
        write_json(self.partial_dir / PROGRESS_FILE, {
            "rows_done": self.rows_written, "image_ids": self.image_ids, "config": self.config,
        }, indent=None)
        self.rows_done = self.rows_written

    def finish(self) -> Path:
        """Write index.json and move the complete store into place (replacing an old one)."""
        if self.rows_written != len(self.image_ids):
            raise ValueError(f"{self.rows_written} of {len(self.image_ids)} rows written; "
                             "finish() needs all of them")
        if self.rows_written > self.rows_done:
            self._commit()
        write_json(self.partial_dir / INDEX_FILE, {
            "image_ids": self.image_ids,
            "backbone": self.backbone,
            "input_size": self.input_size,
            "grid_shape": list(self.grid_shape),
            "dtype": self.dtype.name,
            "fc7_channels": self.fc7_channels,
            "fc7_source": self.fc7_source,
        }, indent=None)
        (self.partial_dir / PROGRESS_FILE).unlink(missing_ok=True)
        replace_directory(self.partial_dir, self.final_dir)
        return self.final_dir
