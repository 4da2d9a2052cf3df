"""Stage ``generate``: the synthetic VQA world, written into ``data.root`` in the real VQA v2 /
COCO / VQA-HAT file formats, with its exact ground truth.

    python -m pipeline.generate [data=synthetic|synthetic_tiny] [seed=N] [paths.root=DIR]

``prepare`` does this itself before reading the files (``prepare.generate``, default true), so a
plain run needs no separate step. ``dvc.yaml`` runs it as a stage of its own,
``generate@<data>`` (one per entry of ``data.generate``: none for data sets on disk), and runs
prepare with ``prepare.generate=false``: then a change of prepare's own settings (vocabulary
sizes, tokenisation) does not generate the world again.

The folder is replaced atomically and carries a marker, ``synthetic_world.json`` (the
generator's summary and settings): prepare never replaces a folder without it, and checks that a
world it did not generate itself was made with the current ``data.synthetic`` settings.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.common.config import abspath, stage_main
from pipeline.common.errors import DataError
from pipeline.data.synthetic import generate_world
from pipeline.common.files import atomic_directory, read_json, write_json

log = logging.getLogger(__name__)

# Written into a generated world so that prepare never deletes a folder it did not make.
SYNTHETIC_MARKER = "synthetic_world.json"


def settings(cfg: DictConfig) -> dict:
    """The generator's settings, as recorded in the marker."""
    return OmegaConf.to_container(cfg.data.synthetic, resolve=True)


def generate_synthetic(cfg: DictConfig, root: Path) -> dict:
    """(Re)generate the synthetic world at ``root``, atomically."""
    if root.exists() and any(root.iterdir()) and not (root / SYNTHETIC_MARKER).exists():
        raise DataError(
            f"data.root holds files that prepare did not generate (no {SYNTHETIC_MARKER}); "
            "refusing to replace them with a synthetic world. Point data.root at an empty or "
            "generated folder, or choose data=vqa_v1/vqa_v2 for real data.", root)
    with atomic_directory(root) as tmp:
        summary = generate_world(cfg.data.synthetic, tmp, progress=True)
        write_json(tmp / SYNTHETIC_MARKER, {"summary": summary, "settings": settings(cfg)})
    return summary


def check_generated(cfg: DictConfig, root: Path) -> None:
    """The world at ``root`` exists and was generated with the current settings (worlds from
    before the marker recorded them are taken as they are)."""
    marker = root / SYNTHETIC_MARKER
    if not marker.is_file():
        raise DataError(f"no synthetic world here (no {SYNTHETIC_MARKER}): run `python -m "
                        "pipeline.generate` (dvc stage generate@<data>) first, or prepare with "
                        "prepare.generate=true", root)
    recorded = read_json(marker).get("settings")
    if recorded is not None and recorded != settings(cfg):
        raise DataError("the synthetic world here was generated with other data.synthetic "
                        "settings: run `python -m pipeline.generate` (dvc stage "
                        "generate@<data>) again, or prepare with prepare.generate=true", root)


def run(cfg: DictConfig) -> dict:
    if cfg.data.source != "synthetic":
        raise DataError(f"data={cfg.data.name} is read from disk (data.source={cfg.data.source}); "
                        "only the synthetic world is generated", cfg.data.root)
    root = abspath(cfg.data.root)
    log.info("generating the synthetic VQA world into %s", root)
    return generate_synthetic(cfg, root)


main = stage_main(run)

if __name__ == "__main__":
    main()
