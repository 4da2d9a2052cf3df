"""Hydra plumbing shared by every stage: the config folder, composing configs outside a Hydra
app (tests, notebooks), and the decorator that turns a ``run(cfg)`` function into a stage."""
from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.data.errors import DataError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
log = logging.getLogger("pipeline")


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose the project's config exactly as a stage would see it (without Hydra's own
    ``hydra.*`` node), e.g. ``compose(["data=synthetic_tiny", "paths.root=/tmp/run"])``."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def stage_main(run: Callable[[DictConfig], object]) -> Callable[[], None]:
    """Wrap ``run(cfg)`` as the Hydra entry point of a stage.

    Bad input (:class:`DataError`, which includes unusable model files) and missing files end
    the stage with their message and exit code 2 instead of a traceback: the message names the
    file and record, or the stage to run, which is what the user needs.
    """

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    @functools.wraps(run)
    def main(cfg: DictConfig) -> None:
        start = time.perf_counter()
        try:
            set_threads(cfg.get("threads"))
            run(cfg)
        except (DataError, FileNotFoundError) as e:
            log.error("%s", e)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        from hydra.core.hydra_config import HydraConfig

        log.info("stage %s finished in %.1f s", HydraConfig.get().job.name,
                 time.perf_counter() - start)

    return main


def set_threads(threads: object) -> None:
    """Pin torch's intra-op CPU threads to ``threads`` (the root config's ``threads``); ``None``
    leaves torch's default. Anything but a positive whole number is a :class:`ValueError`."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive whole number or null, got {threads!r}")
    import torch

    torch.set_num_threads(threads)
    log.info("torch uses %d CPU thread(s)", threads)


def resolved_yaml(cfg: DictConfig, keys: Sequence[str]) -> str:
    """The ``keys`` sections of the config, every interpolation resolved, as saved next to a
    stage's outputs. Only the sections the stage reads: a record of unrelated settings would
    change the output, and with it every downstream stage, whenever those settings change."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return OmegaConf.to_yaml({key: resolved[key] for key in keys})


def abspath(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()
