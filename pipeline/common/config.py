"""Hydra plumbing shared by every stage: the config folder, composing configs outside a Hydra
app (tests, notebooks), the decorator that turns a ``run(cfg)`` function into a stage, and
``params.yaml``, the composed config that DVC's stages read.

Two ways to run a stage:

- **plain**: ``python -m pipeline.train model=lstm_cnn seed=1`` composes ``conf/`` with the
  overrides, as any Hydra app (multirun included);
- **params mode**: ``python -m pipeline.train params=params.yaml model=lstm_cnn`` reads the
  stage's config from ``params.yaml`` instead: the whole composition of ``conf/``, every
  interpolation resolved, as ``python -m pipeline.common.config`` (``make params``) or
  ``dvc exp run -S`` (DVC's own Hydra composition, ``.dvc/config``) wrote it. ``dvc.yaml``
  runs every stage this way, so an experiment's ``-S`` values reach the stages. ``model=<name>``
  there selects ``models.<name>`` of the file as ``cfg.model``; other ``key=value`` overrides
  apply on top of the file; group choices (``data=...``) belong in the file, not here.
  Hydra still sets up the log and the run folder from ``conf/hydra``.

``python -m pipeline.common.config [overrides] [-o params.yaml] [--check]`` writes (or checks) the
file, composed exactly as DVC composes it for ``dvc exp run -S``.
"""
from __future__ import annotations

import argparse
import copy
import functools
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.common.errors import DataError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
CONFIG_NAME = "config"
PARAMS_FILE = "params.yaml"
PARAMS_ARG = "params"
log = logging.getLogger("pipeline")


def compose(overrides: Sequence[str] = (), config_name: str = CONFIG_NAME,
            conf_dir: str | Path = CONF_DIR) -> DictConfig:
    """Compose the project's config exactly as a stage would see it (without Hydra's own
    ``hydra.*`` node), e.g. ``compose(["data=synthetic_tiny", "paths.root=/tmp/run"])``."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


# --- params.yaml ------------------------------------------------------------------------------

def write_params(path: str | Path = PARAMS_FILE, overrides: Sequence[str] = (),
                 conf_dir: str | Path = CONF_DIR, config_name: str = CONFIG_NAME) -> Path:
    """Write the composed, resolved config to ``path`` (atomically), with DVC's own function for
    ``dvc exp run -S`` (``dvc.utils.hydra.compose_and_dump``), so the file is byte for byte what
    DVC writes for the same overrides. The plugins path is the project folder, as DVC's default."""
    from dvc.utils.hydra import compose_and_dump
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.common.files import atomic_path

    conf_dir = Path(conf_dir).resolve()
    path = Path(path)
    GlobalHydra.instance().clear()
    with atomic_path(path) as tmp:
        compose_and_dump(tmp, str(conf_dir), None, config_name, str(conf_dir.parent),
                         list(overrides))
        tmp.chmod(0o644)
    return path


def composed_params(overrides: Sequence[str] = (), conf_dir: str | Path = CONF_DIR,
                    config_name: str = CONFIG_NAME) -> dict:
    """What :func:`write_params` would write, as plain Python data."""
    return OmegaConf.to_container(compose(overrides, config_name, conf_dir), resolve=True)


def _flat(data, prefix: str = "") -> dict[str, object]:
    if isinstance(data, dict) and data:
        out = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def params_differences(params: dict, fresh: dict) -> list[str]:
    """Dotted keys whose values differ between two compositions (or that only one has)."""
    a, b = _flat(params), _flat(fresh)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, ...) != b.get(k, ...))


def conf_dir_for(params_path: str | Path) -> Path:
    """The config folder a params file was composed from: ``conf/`` next to it (the project
    folder, as DVC's ``hydra.config_dir``), else the package's own."""
    here = Path(params_path).resolve().parent / "conf"
    return here if (here / f"{CONFIG_NAME}.yaml").is_file() else CONF_DIR


def stale_params_message(params_path: str | Path, params: dict | None = None) -> str | None:
    """A warning when ``params_path`` differs from a fresh composition of ``conf/`` without
    overrides: either an experiment's ``-S`` values (on purpose) or an edit of ``conf/`` that
    ``make params`` has not carried over yet. None when they agree."""
    if params is None:
        params = OmegaConf.to_container(OmegaConf.load(params_path))
    differ = params_differences(params, composed_params(conf_dir=conf_dir_for(params_path)))
    if not differ:
        return None
    shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
    return (f"{params_path} differs from a fresh composition of conf/ at {shown}. That is expected "
            "in a DVC experiment (`dvc exp run -S`); if you edited conf/, run `make params` "
            "(python -m pipeline.common.config) so that the stages see the edit.")


# --- params mode ------------------------------------------------------------------------------

@dataclass
class ParamsMode:
    """A stage's config read from a params file (see the module docstring)."""
    path: Path
    config: DictConfig
    hydra_args: list[str]
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path, args: Sequence[str], check_stale: bool = True) -> "ParamsMode":
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import HydraException

        path = Path(path)
        if not path.is_file():
            raise DataError(f"no params file: write it with `python -m pipeline.common.config -o {path}` "
                            "(make params)", path)
        from hydra._internal.utils import get_args_parser

        try:  # Hydra's own command line: its flags (-c job, --info...) and the overrides
            parsed = get_args_parser().parse_args(list(args))
        except SystemExit as e:
            raise DataError(f"bad command line: {' '.join(args)}", path) from e
        if parsed.multirun:
            raise DataError("a sweep composes conf/ for every job: run it without params=... "
                            "(README, Sweeps)", path)
        try:
            overrides = OverridesParser.create().parse_overrides(list(parsed.overrides))
        except HydraException as e:
            raise DataError(f"bad override: {e}", path) from e
        groups = _config_groups(conf_dir_for(path))
        ours = set(parsed.overrides)
        hydra_args, keys, model = [a for a in args if a not in ours], [], None
        for o in overrides:
            name = o.key_or_group
            if name == "hydra" or name.startswith(("hydra.", "hydra/")):
                hydra_args.append(o.input_line)
            elif name == "model" and o.package is None and not o.is_delete():
                model = str(o.value())
            elif name in groups or o.package is not None:
                raise DataError(
                    f"`{o.input_line}` chooses a config group, which params mode takes from the "
                    f"file: compose it in, e.g. `python -m pipeline.common.config {o.input_line}` or "
                    f"`dvc exp run -S {o.input_line}`", path)
            else:
                keys.append(o)

        data = OmegaConf.to_container(OmegaConf.load(path))
        warnings = []
        if check_stale and (message := stale_params_message(path, data)):
            warnings.append(message)
        cfg = OmegaConf.create(data)
        OmegaConf.set_struct(cfg, True)  # as Hydra's config: a misspelt key is an error
        # `model.*` overrides apply after `model=<name>` has chosen models.<name> (else the choice
        # would drop them: `model=lstm_cnn model.optim.max_epochs=3`); the others before it (so
        # that `models.lstm_cnn.optim.lr=...` reaches the chosen model too).
        on_model = [o for o in keys if o.key_or_group.startswith("model.")]
        _apply_overrides(cfg, [o for o in keys if o not in on_model], path)
        models = cfg.get("models") or {}
        if "model" in cfg and models.get(cfg.model.get("name")) not in (None, cfg.model):
            warnings.append(
                f"{path}: `model` differs from `models.{cfg.model.name}`; stages run by DVC read "
                f"`models.<name>` (set e.g. `dvc exp run -S models.{cfg.model.name}.optim.lr=...`)")
        if model is not None:
            if model not in models:
                raise DataError(
                    f"{path} has no models.{model}: compose it under `models` (a line "
                    f"`- model@models.{model}: {model}` in conf/config.yaml's defaults), then "
                    "`make params`", path)
            cfg.model = OmegaConf.to_container(models[model])
        _apply_overrides(cfg, on_model, path)
        OmegaConf.resolve(cfg)
        # Hydra's own composition (log and run folder) follows the file's log folder.
        hydra_args.append(f"paths.log_dir={_quote(cfg.paths.log_dir)}")
        return cls(path, cfg, hydra_args, warnings)


def _apply_overrides(cfg: DictConfig, overrides: list, path: Path) -> None:
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.errors import HydraException

    try:
        ConfigLoaderImpl._apply_overrides_to_config(overrides, cfg)
    except HydraException as e:
        raise DataError(f"{e}", path) from e


def _config_groups(conf_dir: Path) -> set[str]:
    return {p.relative_to(conf_dir).as_posix() for p in conf_dir.rglob("*") if p.is_dir()}


def _quote(value: object) -> str:
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _split_params_arg(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """``params=<file>`` (or ``params`` alone: params.yaml) and the other arguments."""
    found, rest = None, []
    for a in args:
        if a == PARAMS_ARG or a.startswith(f"{PARAMS_ARG}="):
            found = a.partition("=")[2] or PARAMS_FILE
        else:
            rest.append(a)
    return found, rest


_PARAMS: ParamsMode | None = None  # the params file of the running stage (params mode)


def stage_main(run: Callable[[DictConfig], object]) -> Callable[[], None]:
    """Wrap ``run(cfg)`` as the entry point of a stage: a Hydra app, plain or in params mode.

    Bad input (:class:`DataError`, which includes unusable model files) and missing files end
    the stage with their message and exit code 2 instead of a traceback: the message names the
    file and record, or the stage to run, which is what the user needs.
    """

    @hydra.main(config_path=str(CONF_DIR), config_name=CONFIG_NAME, version_base="1.3")
    @functools.wraps(run)
    def hydra_main(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        start = time.perf_counter()
        if _PARAMS is not None:
            cfg = _PARAMS.config
            _record_params_config(cfg, HydraConfig.get())
            log.info("config from %s (params mode)", _PARAMS.path)
            for message in _PARAMS.warnings:
                log.warning("%s", message)
        try:
            set_threads(cfg.get("threads"))
            run(as_replicate(cfg))
        except (DataError, FileNotFoundError) as e:
            _fail(e)
        log.info("stage %s finished in %.1f s", HydraConfig.get().job.name,
                 time.perf_counter() - start)

    @functools.wraps(run)
    def main() -> None:
        global _PARAMS
        params_path, rest = _split_params_arg(sys.argv[1:])
        if params_path is None:
            return hydra_main()
        try:
            _PARAMS = ParamsMode.load(params_path, rest)
        except DataError as e:
            _fail(e)
        argv = sys.argv
        sys.argv = [argv[0], *_PARAMS.hydra_args]
        try:
            return hydra_main()
        finally:
            sys.argv, _PARAMS = argv, None

    return main


def _fail(e: Exception) -> None:
    log.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _record_params_config(cfg: DictConfig, hydra_cfg) -> None:
    """Hydra saved the composition of conf/ as the run's config.yaml: put the config the stage
    really runs with there instead."""
    subdir = hydra_cfg.output_subdir
    if subdir is None:
        return
    target = Path(hydra_cfg.runtime.output_dir) / str(subdir) / "config.yaml"
    if target.parent.is_dir():
        target.write_text(OmegaConf.to_yaml(cfg))


# --- training-seed replicates -----------------------------------------------------------------

def training_seeds(cfg: DictConfig) -> list[int]:
    """The main run's ``train.seed`` then every ``replicates.seeds`` entry: the training runs the
    rank-correlation table spreads over. A repeated seed would count one run twice: an error."""
    seeds = [int(cfg.train.seed), *(int(s) for s in (cfg.get("replicates") or {}).get("seeds") or [])]
    if len(set(seeds)) != len(seeds):
        raise DataError(f"replicates.seeds {seeds[1:]} repeats a seed or the main run's train.seed "
                        f"({seeds[0]}): each replicate needs a seed of its own")
    return seeds


# The output folders of a run that a replicate has its own of: each gets replicates/seed<k>/.
REPLICATE_PATHS = ("models_dir", "checkpoints_dir", "metrics_dir", "log_dir", "attributions_dir")


def replicate_config(cfg: DictConfig, seed: int) -> DictConfig:
    """The config of training-seed replicate ``seed``: ``train.seed = seed``, and every output
    folder of the run (models, checkpoints, metrics, logs, attribution stores) with
    ``replicates/seed<k>`` appended, e.g. ``models/replicates/seed1/mlb/model.pt`` and
    ``attributions/<data>/replicates/seed1/mlb``. Inside the main folders, so the stages that
    read every model's store (rank_correlation, report) already depend on the replicates' through
    ``paths.attributions_dir``, and a run without replicates has no folder missing. dvc.yaml's
    ``*_replicate`` stages name the same places as their outputs (tests/test_replicates.py checks
    that the two agree). Every other setting, the data and the backbone included, is the main
    run's."""
    seed = int(seed)
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.replicate = seed
        out.train.seed = seed
        for key in REPLICATE_PATHS:
            out.paths[key] = f"{cfg.paths[key]}/replicates/seed{seed}"
    return out


def as_replicate(cfg: DictConfig) -> DictConfig:
    """``cfg`` itself, or the replicate's config when ``replicate`` is set (a stage's command line
    ``replicate=k``)."""
    replicate = cfg.get("replicate")
    if replicate is None:
        return cfg
    if isinstance(replicate, bool) or not isinstance(replicate, int):
        raise DataError(f"replicate is a training seed (a whole number) or null, got {replicate!r}")
    if replicate == int(cfg.train.seed):
        raise DataError(f"replicate={replicate} is the main run's train.seed: its outputs are the "
                        "main run's; drop `replicate=` or pick another seed")
    return replicate_config(cfg, replicate)


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


def instantiate_trainer(trainer_cfg: DictConfig, **stage_args):
    """The Lightning Trainer of ``trainer.lightning`` (its ``_target_`` and arguments) with what
    only the stage knows added: callbacks, logger, stage-specific settings. A stage's argument
    wins over the config's; an argument the Trainer does not take fails here. Converted to plain
    lists and dicts: the Trainer gets no OmegaConf containers (``devices: [0, 1]``, callbacks)."""
    return hydra.utils.instantiate(trainer_cfg.lightning, _convert_="all", **stage_args)


# --- python -m pipeline.common.config ----------------------------------------------------------------

def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.common.config",
        description="Write params.yaml: conf/ composed with the overrides and resolved, as DVC "
                    "composes it for `dvc exp run -S` (dvc.yaml's stages read it).")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=vqa_v2 seed=1")
    parser.add_argument("-o", "--output", default=PARAMS_FILE, help="default: %(default)s")
    parser.add_argument("--config-dir", default=str(CONF_DIR), help="default: the project's conf/")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the file differs from the composition")
    args = parser.parse_args(argv)
    if args.check:
        output = Path(args.output)
        if not output.is_file():
            print(f"{output} is missing: run `make params`", file=sys.stderr)
            return 1
        differ = params_differences(OmegaConf.to_container(OmegaConf.load(output)),
                                    composed_params(args.overrides, args.config_dir))
        if differ:
            print(f"{output} is out of date at {', '.join(differ)}: run `make params`",
                  file=sys.stderr)
            return 1
        print(f"{output} is up to date")
        return 0
    path = write_params(args.output, args.overrides, args.config_dir)
    print(f"wrote {path}" + (f" ({' '.join(args.overrides)})" if args.overrides else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
