"""The ``resnet152`` entry of bench.json: the costs of the ResNet-152 path at 448 px on this
machine, per image (extraction) and per question (every method of ``attribution.methods``, on
ResNet-152 with each ``bench.resnet152.models`` head at random weights), and from them the
projected wall time of Goyal et al.'s setting, the 1,374 VQA-HAT val questions (see
:mod:`pipeline.benchmarks.attribution`, which runs it).
"""
from __future__ import annotations

import logging
import os
import resource
import statistics
import time

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.attribution import explain
from pipeline.benchmarks.timing import timed
from pipeline.common.config import CONF_DIR

log = logging.getLogger(__name__)

RANDOM_INIT_LABEL = "random-init weights (timing only)"

def model_config(name: str) -> DictConfig:
    """``conf/model/<name>.yaml`` with its ``defaults`` (another model file) merged under it."""
    node = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    defaults = node.pop("defaults", []) if "defaults" in node else []
    bases = [model_config(str(d)) for d in defaults if str(d) != "_self_"]
    return OmegaConf.merge(*bases, node)


def resnet152_weights(cfg: DictConfig, resnet_settings: dict) -> tuple[dict, str, str]:
    """(state dict, kind, description) of the backbone the entry times: ``bench.resnet152.weights``,
    else ``backbone.weights`` when the run's backbone is resnet152, else the hub cache, else a
    calibrated random initialisation (labelled as such; the timings do not depend on it)."""
    from pipeline.models.backbones import find_resnet152_weights
    from pipeline.models.random_init import random_init_resnet152_state_dict

    given = resnet_settings.get("weights") or (cfg.backbone.get("weights")
                                 if cfg.backbone.name == "resnet152" else None)
    if given:  # a file the user named must exist
        path = find_resnet152_weights(str(given))
        return torch.load(path, map_location="cpu", weights_only=True), "file", str(path)
    try:
        path = find_resnet152_weights(None)
    except FileNotFoundError:
        log.warning("no ResNet-152 weights (bench.resnet152.weights, backbone.weights or the hub "
                    "cache): timing a random initialisation; %s", RANDOM_INIT_LABEL)
        state = random_init_resnet152_state_dict(int(cfg.get("seed", 0)))
        return state, "random-init", RANDOM_INIT_LABEL
    return torch.load(path, map_location="cpu", weights_only=True), "hub cache", str(path)


def random_vqa_model(backbone, model_name: str, vocabulary: int, max_length: int, seed: int):
    """``backbone`` with the head of ``conf/model/<model_name>.yaml`` at random weights (seeded)
    and synthetic vocabularies of ``vocabulary`` words and the model's ``num_answers`` answers:
    the costs of explaining it are those of a trained model of the same sizes."""
    from pipeline.data.vocab import PAD, UNK, AnswerVocab, QuestionVocab
    from pipeline.models.heads import build_head, head_feature_kind
    from pipeline.models.vqa_model import VQAModel

    model_cfg = model_config(model_name)
    arch = OmegaConf.to_container(model_cfg.arch, resolve=True)
    questions = QuestionVocab([PAD, UNK, *(f"w{i}" for i in range(int(vocabulary) - 2))])
    answers = AnswerVocab([f"a{i}" for i in range(int(model_cfg.num_answers))])
    torch.manual_seed(seed)
    head = build_head(str(model_cfg.name), arch, len(questions), len(answers),
                      backbone.feature_channels(head_feature_kind(str(model_cfg.name), arch)))
    return VQAModel(backbone, head, questions, answers, max_length, question_mark=True).eval()


def measure_resnet152(cfg: DictConfig, resnet_settings: dict) -> dict:
    """The ``resnet152`` entry of bench.json (module docstring): ms per image of extraction, ms per
    question of each method per head, and the projection to VQA-HAT val."""
    from pipeline.models.folding import folded_backbone
    from pipeline.models.backbones import ResNet152

    entry_start = time.perf_counter()
    load_before = os.getloadavg()
    seed = int(cfg.get("seed", 0))
    size, repeats = int(resnet_settings["input_size"]), max(1, int(resnet_settings["repeats"]))
    state, weights_kind, weights = resnet152_weights(cfg, resnet_settings)
    backbone = ResNet152(size, state).freeze()
    del state
    if resnet_settings["channels_last"]:
        backbone.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(seed)

    # Extraction: the backbone forward in inference mode, extract_batch_size images at a time.
    batch = int(resnet_settings["extract_batch_size"] or cfg.extract.batch_size)
    pixels = torch.randn(batch, 3, size, size, generator=generator)

    def forward():
        with torch.inference_mode():
            return backbone(pixels)

    seconds, grid = timed(forward, repeats)
    extract_ms = 1000.0 * seconds / batch
    log.info("resnet152 extraction at %d px: %.0f ms per image (batch %d)", size, extract_ms, batch)

    # Explaining: every configured method, one question per explain() call, each question on an
    # image of its own (nothing shared between questions: an upper bound when questions share an
    # image, whose occluded copies the attribute stage then runs once).
    attribution = cfg.attribution
    methods = list(attribution.methods)
    options = OmegaConf.to_container(attribution.options, resolve=True)
    options.update(score=None if attribution.score is None else str(attribution.score),
                   upsample=str(attribution.upsample))
    n, length = int(resnet_settings["questions"]), int(cfg.data.max_question_length)
    words = min(int(resnet_settings["question_words"]), length)
    images = torch.randn(n, 3, size, size, generator=generator)
    tokens = torch.zeros(n, length, dtype=torch.long)
    tokens[:, :words] = torch.randint(2, int(resnet_settings["question_vocab"]), (n, words),
                                      generator=generator)
    fold_start = time.perf_counter()
    folded_backbone(backbone)  # traced once per weights and stage run: not a per-question cost
    fold_seconds = time.perf_counter() - fold_start
    models = {}
    for k, name in enumerate(resnet_settings["models"]):
        model = random_vqa_model(backbone, str(name), int(resnet_settings["question_vocab"]), length,
                                 seed + k)
        explain(model, images[:1], tokens[:1], methods=["gradcam"], options=options)  # warm-up
        per_question = {m: [] for m in methods}  # per method: each question's median
        skipped = {}
        for q in range(n):
            runs = {m: [] for m in methods}
            for _ in range(repeats):
                for m, e in explain(model, images[q:q + 1], tokens[q:q + 1], methods=methods,
                                    options=options).items():
                    runs[m].append(1000.0 * e.seconds)
                    if e.skipped:
                        skipped[m] = e.skipped
            for m in methods:
                per_question[m].append(statistics.median(runs[m]))
        ms = {m: statistics.fmean(v) for m, v in per_question.items()}
        models[str(name)] = {"head": str(model_config(str(name)).name),
                             "ms_per_question": ms, "ms_per_question_total": sum(ms.values()),
                             "skipped": skipped}
        log.info("resnet152 + %s: %.1f s per question, all methods", name, sum(ms.values()) / 1000)

    # The projection: Goyal et al.'s Table 1 setting, VQA-HAT val, on this machine.
    questions = int(resnet_settings["vqahat_val_questions"])
    vqahat_images = int(resnet_settings["vqahat_val_images"] or questions)
    extract_s = vqahat_images * extract_ms / 1000.0
    attribute_s = {name: questions * v["ms_per_question_total"] / 1000.0
                   for name, v in models.items()}
    projected = extract_s + sum(attribute_s.values())
    return {
        "weights": weights,
        "weights_kind": weights_kind,
        "input_size": size,
        "grid_shape": list(grid.shape[1:]),
        "channels_last": bool(resnet_settings["channels_last"]),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "extract_batch_size": batch,
        "extract_ms_per_image": extract_ms,
        "questions_timed": n,
        "question_words": words,
        "methods": methods,
        "attribution_options": options,
        "batchnorm_folding_seconds": fold_seconds,
        "models": models,
        "projection": {
            "vqahat_val_questions": questions,
            "vqahat_val_images": vqahat_images,
            "extract_seconds": extract_s,
            "attribute_seconds": attribute_s,
            "attribute_seconds_by_method": {
                name: {m: questions * t / 1000.0 for m, t in v["ms_per_question"].items()}
                for name, v in models.items()},
            "projected_vqahat_val_seconds": projected,
            "projected_vqahat_val_hours": projected / 3600.0,
            # One model alone (Goyal et al. explain the LSTM-CNN): its extraction and explaining.
            "projected_vqahat_val_seconds_by_model": {
                name: extract_s + seconds for name, seconds in attribute_s.items()},
            "note": (f"a projection, not a measurement: {vqahat_images} images x the extraction "
                     f"time per image + {questions} questions x each model's time per question "
                     "with every method (one question per explain call, each on its own image, "
                     "so occlusion shares no copies: an upper bound when questions share images), "
                     "measured on this machine at this thread count; training (on VQA train) "
                     "and the evaluation stages (seconds) are not included"),
        },
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "seconds": time.perf_counter() - entry_start,
        "notes": {
            "weights": "timings do not depend on the weights' values; "
                       + ("these are random (BatchNorm calibrated), "
                          "pipeline.models.random_init.random_init_resnet152_state_dict"
                          if weights_kind == "random-init" else f"from {weights_kind}"),
            "heads": "each model's head at the sizes of conf/model/<name>.yaml, random weights, "
                     "a synthetic vocabulary of question_vocab words and num_answers answers",
            "timing": "extraction: median of `repeats` forwards of extract_batch_size images "
                      "(after a warm-up), per image; methods: Explanation.seconds of one "
                      "explain() call with every method per question, as the attribute stage "
                      "records them (passes shared by several methods count for the first), "
                      "median over `repeats`, mean over questions; BatchNorm folding for "
                      "occlusion (once per stage run) is batchnorm_folding_seconds",
            "load_average": "1-minute load average before and after: above the thread count, "
                            "another process shared the CPUs and the times are inflated",
        },
    }


def format_resnet152(entry: dict) -> str:
    lines = [f"resnet152 at {entry['input_size']} px, {entry['threads']} threads, "
             f"{entry['weights'] if entry['weights_kind'] != 'random-init' else RANDOM_INIT_LABEL}",
             f"{'extraction (backbone forward) per image':56s} {entry['extract_ms_per_image']:10.1f} ms"]
    for name, v in entry["models"].items():
        for m, t in v["ms_per_question"].items():
            lines.append(f"{name + ': ' + m:56s} {t:10.1f} ms/question"
                         + ("  (skipped)" if m in v["skipped"] else ""))
        lines.append(f"{name + ': every method':56s} {v['ms_per_question_total']:10.1f} ms/question")
    p = entry["projection"]
    lines.append(f"projected VQA-HAT val ({p['vqahat_val_questions']} questions, "
                 f"{p['vqahat_val_images']} images): {p['projected_vqahat_val_seconds']:.0f} s "
                 f"= {p['projected_vqahat_val_hours']:.1f} h (a projection; see note)")
    for name, seconds in p["projected_vqahat_val_seconds_by_model"].items():
        lines.append(f"  {name} alone: {seconds:.0f} s = {seconds / 3600:.1f} h")
    return "\n".join(lines)
