"""Stage ``prepare``: raw VQA files in, the processed question tables and vocabularies out.

    python -m pipeline.prepare [data=synthetic|synthetic_tiny|vqa_v1|vqa_v2] [data.root=DIR]
                               [paths.root=DIR] [data.download=true] [data.on_error=skip]

With ``data=synthetic`` (the default) the raw files are first generated into ``data.root`` in the
real VQA v2 / COCO / VQA-HAT formats; with real data they must be under ``data.root`` (or are
downloaded with ``data.download=true``). Both then go through the same readers.

Writes ``${paths.processed_dir}/`` (one folder, replaced atomically):
    questions_{train,val}.json  one record per question: ids, image path, tokens, token ids,
                                answer type, the human answers and their soft scores
    images_{train,val}.json     the images each split needs (for feature extraction)
    hat_{train,val}.json        question id -> human attention map files (VQA-HAT layout)
    question_vocab.json, answer_vocab.json
    skipped.json                records skipped under data.on_error=skip (empty otherwise)
    config.yaml                 the resolved settings this stage ran with (seed, data), among
                                them data.question_mark: whether "?" is a token
and ``${paths.metrics_dir}/prepare.json`` (counts, vocabulary coverage, skipped records).
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.config import abspath, resolved_yaml, stage_main
from pipeline.data import processed, vqa_format
from pipeline.data.answers import answer_scores, normalize_answer
from pipeline.data.download import ensure_resources, resources_from_config
from pipeline.data.errors import DataError, RecordPolicy
from pipeline.data.synthetic import generate_world
from pipeline.data.vocab import AnswerVocab, QuestionVocab, tokenize
from pipeline.io import atomic_directory, write_json, write_text

log = logging.getLogger(__name__)

# Written into a generated world so that prepare never deletes a folder it did not make.
SYNTHETIC_MARKER = "synthetic_world.json"


def generate_synthetic(cfg: DictConfig, root: Path) -> dict:
    """(Re)generate the synthetic world at ``root``, atomically."""
    if root.exists() and any(root.iterdir()) and not (root / SYNTHETIC_MARKER).exists():
        raise DataError(
            f"data.root holds files that prepare did not generate (no {SYNTHETIC_MARKER}); "
            "refusing to replace them with a synthetic world. Point data.root at an empty or "
            "generated folder, or choose data=vqa_v1/vqa_v2 for real data.", root)
    with atomic_directory(root) as tmp:
        summary = generate_world(cfg.data.synthetic, tmp, progress=True)
        write_json(tmp / SYNTHETIC_MARKER, {"summary": summary})
    return summary


def _verified_images(records: list[vqa_format.QARecord], root: Path, policy: RecordPolicy,
                     verify: bool, split: str) -> list[vqa_format.QARecord]:
    """Drop questions whose image is missing or unreadable (after reporting the image)."""
    bad: set[int] = set()
    first_record = {}
    for r in records:
        first_record.setdefault(r.image_id, r)
    for image_id, rec in tqdm(first_record.items(), desc=f"checking {split} images", unit="img",
                              disable=not verify and len(first_record) < 10_000):
        path = root / rec.image
        try:
            if verify:
                vqa_format.check_image(path)
            elif not path.is_file():
                raise DataError("image file is missing", path)
        except DataError as e:
            policy.bad("image", image_id, f"{e} (needed by question {rec.question_id})", path)
            bad.add(image_id)
    kept = []
    for r in records:
        if r.image_id in bad:
            policy.skip_dependent("question", r.question_id, f"image {r.image_id} unusable")
        else:
            kept.append(r)
    return kept


def _hat_maps(root: Path, hat_dir: str, known_ids: set[int], kept_ids: set[int],
              policy: RecordPolicy, verify: bool) -> dict[int, list[str]]:
    """Human attention map files (relative to root) for the kept questions of one split.

    ``known_ids`` are all questions of the split file; a map of a known question that was
    skipped (say, its image is missing) is dropped with it, a map of an unknown one is bad."""
    directory = root / hat_dir
    if not directory.is_dir():
        raise DataError(f"VQA-HAT folder {hat_dir!r} not found (set data.hat.enabled=false to run "
                        "without human attention maps)", directory)
    out: dict[int, list[str]] = {}
    for qid, paths in vqa_format.hat_map_files(directory, policy).items():
        if qid not in known_ids:
            for p in paths:
                policy.bad("hat_map", qid, "question id is not in this split", p)
            continue
        if qid not in kept_ids:
            policy.skip_dependent("hat_map", qid, "its question was skipped")
            continue
        good = []
        for p in paths:
            try:
                if verify:
                    vqa_format.check_image(p)
                good.append(str(p.relative_to(root)))
            except DataError as e:
                policy.bad("hat_map", qid, str(e), p)
        if good:
            out[qid] = good
    return out


def _question_table(records, vocab: QuestionVocab, max_len: int, split: str, name: str,
                    question_mark: bool) -> dict:
    rows = []
    for r in records:
        tokens = tokenize(r.question, question_mark=question_mark)
        rows.append({
            "question_id": r.question_id,
            "image_id": r.image_id,
            "image": r.image,
            "question": r.question,
            "tokens": tokens,
            "token_ids": vocab.encode(tokens, max_len),
            "question_type": r.question_type,
            "answer_type": r.answer_type,
            "answers": r.answers,
            "answer": normalize_answer(r.multiple_choice_answer) if r.multiple_choice_answer else "",
            "answer_scores": answer_scores(r.answers) if r.answers else {},
        })
    return {"data": name, "split": split, "records": rows}


def run(cfg: DictConfig) -> dict:
    data = cfg.data
    root = abspath(data.root)
    policy = RecordPolicy(data.on_error)

    if data.source == "synthetic":
        log.info("generating the synthetic VQA world into %s", root)
        generate_synthetic(cfg, root)
    elif data.source == "vqa":
        ensure_resources(root, resources_from_config(data.resources), download=bool(data.download),
                         data_name=data.name)
    else:
        raise ValueError(f"data.source must be 'synthetic' or 'vqa', got {data.source!r}")

    splits: dict[str, list[vqa_format.QARecord]] = {}
    known_ids: dict[str, set[int]] = {}
    for key, split in data.splits.items():
        records = vqa_format.load_split(root, data.version, split, policy)
        known_ids[key] = {r.question_id for r in records}
        splits[key] = _verified_images(records, root, policy, bool(data.verify_images), split)
        log.info("%s (%s): %d questions on %d images", key, split, len(splits[key]),
                 len(vqa_format.image_ids(splits[key])))
    if "train" not in splits or not splits["train"]:
        raise DataError("the train split has no usable questions; vocabularies are built from it",
                        root)

    question_mark = bool(data.question_mark)  # recorded in config.yaml (processed.question_mark)
    train_tokens = [tokenize(r.question, question_mark=question_mark) for r in splits["train"]]
    question_vocab = QuestionVocab.build(train_tokens, min_count=int(data.question_min_count))
    answer_vocab = AnswerVocab.build(
        (normalize_answer(r.multiple_choice_answer) for r in splits["train"]), int(data.answer_top_k))

    hat: dict[str, dict[int, list[str]]] = {}
    if data.hat.enabled:
        for key, hat_dir in data.hat.dirs.items():
            if key in splits:
                kept = {r.question_id for r in splits[key]}
                hat[key] = _hat_maps(root, hat_dir, known_ids[key], kept, policy,
                                     bool(data.verify_images))

    out_dir = abspath(cfg.paths.processed_dir)
    # Metrics hold no wall-clock time (it is in the log): they must be identical run to run.
    metrics: dict = {"data": data.name, "source": data.source, "root": str(data.root), "splits": {}}
    with atomic_directory(out_dir) as tmp:
        for key, records in splits.items():
            split = data.splits[key]
            write_json(processed.questions_file(tmp, key),
                       _question_table(records, question_vocab, int(data.max_question_length),
                                       split, data.name, question_mark), indent=None)
            write_json(processed.images_file(tmp, key), {
                "split": split,
                "images": [{"image_id": i, "image": vqa_format.coco_image_path(split, i)}
                           for i in vqa_format.image_ids(records)],
            })
            write_json(processed.hat_file(tmp, key), {str(q): p for q, p in hat.get(key, {}).items()})
            answers = [normalize_answer(r.multiple_choice_answer) for r in records]
            metrics["splits"][key] = {
                "split": split,
                "questions": len(records),
                "images": len(vqa_format.image_ids(records)),
                "questions_with_hat": len(hat.get(key, {})),
                "answer_types": dict(sorted(Counter(r.answer_type for r in records).items())),
                # share of questions whose majority answer the classifier can output at all
                "answer_coverage": (sum(a in answer_vocab.index for a in answers) / len(answers)
                                    if answers else 0.0),
                "unknown_token_rate": _unknown_rate(records, question_vocab, question_mark),
            }
        question_vocab.save(tmp / processed.QUESTION_VOCAB)
        answer_vocab.save(tmp / processed.ANSWER_VOCAB)
        policy.write_skipped(tmp / processed.SKIPPED)
        write_text(tmp / processed.CONFIG, resolved_yaml(cfg, ["seed", "data"]))

    metrics.update({
        "question_vocab_size": len(question_vocab),
        "answer_vocab_size": len(answer_vocab),
        "skipped": policy.counts(),
    })
    write_json(abspath(cfg.paths.metrics_dir) / "prepare.json", metrics)
    if policy.skipped:
        log.warning("skipped %d records (%s); list in %s", len(policy.skipped), policy.counts(),
                    out_dir / processed.SKIPPED)
    log.info("wrote %s", out_dir)
    return metrics


def _unknown_rate(records, vocab: QuestionVocab, question_mark: bool) -> float:
    tokens = [t for r in records for t in tokenize(r.question, question_mark=question_mark)]
    return sum(t not in vocab.index for t in tokens) / len(tokens) if tokens else 0.0


main = stage_main(run)

if __name__ == "__main__":
    main()
