"""The prepare stage end to end on the tiny synthetic world and on real-layout fixtures."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from pipeline import generate, prepare
from pipeline.common.config import compose
from pipeline.data import processed
from pipeline.common.errors import DataError, MissingDataError


def tiny_cfg(tmp_path, *overrides):
    return compose(["data=synthetic_tiny", f"paths.root={tmp_path}", *overrides])


def real_cfg(tmp_path, root, *overrides):
    return compose(["data=vqa_v2", f"data.root={root}", f"paths.root={tmp_path / 'run'}", *overrides])


def _snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != "config.yaml"}


def test_prepare_synthetic_tiny(tmp_path):
    cfg = tiny_cfg(tmp_path)
    metrics = prepare.run(cfg)
    out = tmp_path / "data" / "processed" / "synthetic_tiny"
    train = processed.load_question_table(out, "train")
    val = processed.load_question_table(out, "val")
    qvocab, avocab = processed.load_vocabs(out)
    assert metrics["splits"]["train"]["questions"] == len(train) > 0
    assert metrics["splits"]["val"]["questions"] == len(val) > 0
    assert {r["answer_type"] for r in train} == {"yes/no", "number", "other"}
    rec = val[0]
    assert rec["token_ids"] == qvocab.encode(rec["tokens"], cfg.data.max_question_length)
    assert len(rec["answers"]) == 10 and rec["answer"] in rec["answer_scores"]
    assert (tmp_path / "data" / "raw" / "synthetic_tiny" / rec["image"]).is_file()
    hat = processed.load_hat_index(out, "val")
    assert set(hat) == {r["question_id"] for r in val}          # every val question has maps
    assert all(len(paths) == 3 for paths in hat.values())
    assert len(processed.load_images(out, "val")) == cfg.data.synthetic.num_images.val2014
    assert json.loads((out / "skipped.json").read_text())["skipped"] == []
    assert {"yes", "no"} <= set(avocab.answers[:6])             # among the most frequent answers
    assert metrics["splits"]["val"]["answer_coverage"] > 0.9
    assert (tmp_path / "reports" / "metrics" / "prepare.json").is_file()


def test_prepare_is_deterministic(tmp_path):
    prepare.run(tiny_cfg(tmp_path / "a"))
    prepare.run(tiny_cfg(tmp_path / "b"))
    rel = "data/processed/synthetic_tiny"
    assert _snapshot(tmp_path / "a" / rel) == _snapshot(tmp_path / "b" / rel)
    raw = "data/raw/synthetic_tiny"
    assert _snapshot(tmp_path / "a" / raw) == _snapshot(tmp_path / "b" / raw)


def test_prepare_real_layout(tmp_path, vqa_root):
    metrics = prepare.run(real_cfg(tmp_path, vqa_root))
    out = tmp_path / "run" / "data" / "processed" / "vqa_v2"
    val = processed.load_question_table(out, "val")
    assert len(val) == 4 and metrics["splits"]["val"]["questions_with_hat"] == 3
    dog = next(r for r in val if r["question"] == "What color is the dog?")
    assert dog["answer"] == "brown" and dog["answer_scores"]["brown"] == pytest.approx(1.0)
    assert dog["tokens"] == ["what", "color", "is", "the", "dog", "?"]  # data.question_mark: true
    assert processed.load_hat_index(out, "train") == {420: ["vqahat_train/420_1.png"]}


@pytest.mark.parametrize("question_mark", [True, False])
def test_prepare_records_the_question_mark_setting(tmp_path, vqa_root, question_mark):
    cfg = real_cfg(tmp_path, vqa_root, f"data.question_mark={str(question_mark).lower()}")
    metrics = prepare.run(cfg)
    out = tmp_path / "run" / "data" / "processed" / "vqa_v2"
    assert processed.question_mark(out) is question_mark
    qvocab, _ = processed.load_vocabs(out)
    assert ("?" in qvocab.index) is question_mark
    for split in ("train", "val"):
        for r in processed.load_question_table(out, split):
            assert (r["tokens"][-1] == "?") is question_mark, r["question"]
            assert r["token_ids"] == qvocab.encode(r["tokens"], cfg.data.max_question_length)
    assert metrics["splits"]["val"]["unknown_token_rate"] == 0.0  # "?" counted as a known word
    # Processed data written before the setting existed (no key): tokenised without "?".
    config = out / processed.CONFIG
    config.write_text("\n".join(line for line in config.read_text().splitlines()
                                if not line.strip().startswith("question_mark:")))
    assert "question_mark" not in config.read_text()
    assert processed.question_mark(out) is False
    config.unlink()
    with pytest.raises(DataError, match="processed data not found"):
        processed.question_mark(out)


def test_missing_real_files_are_listed_with_their_source(tmp_path):
    with pytest.raises(MissingDataError) as e:
        prepare.run(real_cfg(tmp_path, tmp_path / "empty"))
    message = str(e.value)
    assert "v2_OpenEnded_mscoco_val2014_questions.json" in message
    assert "v2_Questions_Val_mscoco.zip" in message and "data.download=true" in message
    assert not (tmp_path / "run" / "data" / "processed").exists()


def test_cli_reports_bad_input_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.prepare", "data=vqa_v2", f"data.root={tmp_path / 'none'}",
         f"paths.root={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error:" in result.stderr and "vqahat_val" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_image_stops_or_is_skipped(tmp_path, vqa_root):
    (vqa_root / "val2014" / "COCO_val2014_000000001042.jpg").unlink()
    with pytest.raises(DataError) as e:
        prepare.run(real_cfg(tmp_path, vqa_root))
    assert "COCO_val2014_000000001042.jpg" in str(e.value) and "missing" in str(e.value)
    prepare.run(real_cfg(tmp_path, vqa_root, "data.on_error=skip"))
    out = tmp_path / "run" / "data" / "processed" / "vqa_v2"
    skipped = json.loads((out / "skipped.json").read_text())
    assert skipped["counts"] == {"hat_map": 2, "image": 1, "question": 2}
    dropped = {s["record"] for s in skipped["skipped"] if s["kind"] == "question"}
    assert dropped == {1_000_420, 1_000_421}
    assert dropped.isdisjoint(r["question_id"] for r in processed.load_question_table(out, "val"))


def test_unreadable_image(tmp_path, vqa_root):
    (vqa_root / "train2014" / "COCO_train2014_000000000007.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="unreadable image") as e:
        prepare.run(real_cfg(tmp_path, vqa_root))
    assert "COCO_train2014_000000000007.jpg" in str(e.value)


def test_hat_map_with_unknown_question(tmp_path, vqa_root):
    Image.new("L", (4, 4)).save(vqa_root / "vqahat_val" / "999_1.png")
    with pytest.raises(DataError, match="not in this split") as e:
        prepare.run(real_cfg(tmp_path, vqa_root))
    assert "999_1.png" in str(e.value)
    prepare.run(real_cfg(tmp_path, vqa_root, "data.on_error=skip"))
    skipped = json.loads((tmp_path / "run/data/processed/vqa_v2/skipped.json").read_text())
    assert skipped["skipped"] == [{"kind": "hat_map", "record": 999,
                                   "path": str(vqa_root / "vqahat_val" / "999_1.png"),
                                   "reason": "question id is not in this split"}]


def test_malformed_annotation_file(tmp_path, vqa_root):
    (vqa_root / "v2_mscoco_val2014_annotations.json").write_text("{oops")
    with pytest.raises(DataError, match="malformed JSON") as e:
        prepare.run(real_cfg(tmp_path, vqa_root))
    assert "v2_mscoco_val2014_annotations.json" in str(e.value)


def test_killed_stage_leaves_previous_outputs(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    prepare.run(cfg)
    raw = tmp_path / "data" / "raw" / "synthetic_tiny"
    out = tmp_path / "data" / "processed" / "synthetic_tiny"
    before_raw, before_out = _snapshot(raw), _snapshot(out)

    def killed_mid_write(*args, **kwargs):
        (args[1] / "half_written.json").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "generate_world", killed_mid_write)  # prepare generates through it
    with pytest.raises(KeyboardInterrupt):
        prepare.run(cfg)
    assert _snapshot(raw) == before_raw and _snapshot(out) == before_out
    assert sorted(p.name for p in raw.parent.iterdir()) == ["synthetic_tiny"]


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing"):
        prepare.run(tiny_cfg(tmp_path, f"data.root={foreign}"))
    assert (foreign / "precious.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------
# data.on_error on an unreadable (corrupt) JPEG, through the stages that read images

BAD_IMAGE = "val2014/COCO_val2014_000000001042.jpg"  # image 1042: questions 1000420 and 1000421


def extract_cfg(tmp_path, vqa_root, backbone_file, *overrides):
    """prepare + extract_features on the real-layout fixture with a tiny pretrained backbone."""
    return real_cfg(tmp_path, vqa_root, "data.image_size=64", f"backbone.weights={backbone_file}",
                    *overrides)


def truncated_jpeg(size=(40, 30)) -> bytes:
    """A JPEG cut a few bytes into its entropy-coded data: every header segment is intact (up to
    and including the start-of-scan marker), the pixels are not."""
    import io

    import numpy as np

    pixels = np.random.default_rng(3).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    data = buffer.getvalue()
    start_of_scan = data.index(b"\xff\xda")
    assert start_of_scan + 64 < len(data) // 2
    return data[:start_of_scan + 64]


def test_corrupt_jpeg_stops_naming_the_file(tmp_path, vqa_root):
    bad = vqa_root / BAD_IMAGE
    bad.write_bytes(b"\xff\xd8\xff\xe0" + bytes([7, 1, 9, 2, 8, 3]))  # a JPEG marker, then garbage
    with pytest.raises(DataError, match="unreadable image") as e:
        prepare.run(real_cfg(tmp_path, vqa_root))
    assert e.value.path == str(bad) and str(bad) in str(e.value)
    assert e.value.record == 1042 and "data.on_error=skip" in str(e.value)
    assert not (tmp_path / "run" / "data" / "processed").exists()  # nothing half-written
    # the command line: the message naming the file, exit code 2, no traceback
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.prepare", "data=vqa_v2", f"data.root={vqa_root}",
         f"paths.root={tmp_path / 'cli'}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error:" in result.stderr and str(bad) in result.stderr and "unreadable image" in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_jpeg_is_skipped_recorded_and_the_rest_processed(tmp_path, vqa_root, trained_world):
    from pipeline import extract_features
    from pipeline.data.feature_store import FeatureStore

    bad = vqa_root / BAD_IMAGE
    bad.write_bytes(b"\xff\xd8\xff\xe0" + bytes([7, 1, 9, 2, 8, 3]))
    cfg = extract_cfg(tmp_path, vqa_root, trained_world / "models/backbone/scene_resnet.pt",
                      "data.on_error=skip")
    metrics = prepare.run(cfg)
    out = tmp_path / "run" / "data" / "processed" / "vqa_v2"
    skipped = json.loads((out / "skipped.json").read_text())
    # the image, with its file and why; its two questions and their HAT maps, as dependents
    assert skipped["counts"] == {"hat_map": 2, "image": 1, "question": 2} == metrics["skipped"]
    image = [s for s in skipped["skipped"] if s["kind"] == "image"]
    assert len(image) == 1 and image[0]["record"] == 1042 and image[0]["path"] == str(bad)
    assert "unreadable image" in image[0]["reason"]
    assert {s["record"] for s in skipped["skipped"] if s["kind"] == "question"} == {1_000_420, 1_000_421}
    assert {s["record"] for s in skipped["skipped"] if s["kind"] == "hat_map"} == {1_000_420, 1_000_421}
    # the rest is processed: the other val image's questions, and all of train
    assert [r["question_id"] for r in processed.load_question_table(out, "val")] == [1_000_070, 1_000_071]
    assert [im["image_id"] for im in processed.load_images(out, "val")] == [1007]
    assert len(processed.load_question_table(out, "train")) == 4
    assert set(processed.load_hat_index(out, "val")) == {1_000_070}
    # ... and the next stage that reads images featurises exactly the kept ones
    extracted = extract_features.run(cfg)
    assert extracted["splits"]["val"]["images"] == 1 and extracted["splits"]["train"]["images"] == 2
    store = FeatureStore.open(tmp_path / "run" / "data/features/vqa_v2/scene_resnet", "val")
    assert store.image_ids == [1007]


def test_truncated_jpeg_stops_naming_the_file(tmp_path, vqa_root, trained_world):
    """A JPEG cut in the middle: its header is intact, its pixels are not. The stage that finds
    it (prepare's check or extract_features' decoding) stops and names the file."""
    from pipeline import extract_features

    bad = vqa_root / BAD_IMAGE
    bad.write_bytes(truncated_jpeg())
    cfg = extract_cfg(tmp_path, vqa_root, trained_world / "models/backbone/scene_resnet.pt")
    with pytest.raises(DataError, match="unreadable image") as e:
        prepare.run(cfg)
        extract_features.run(cfg)
    assert e.value.path == str(bad)


def test_truncated_jpeg_is_skipped_and_recorded(tmp_path, vqa_root, trained_world):
    from pipeline import extract_features

    bad = vqa_root / BAD_IMAGE
    bad.write_bytes(truncated_jpeg())
    cfg = extract_cfg(tmp_path, vqa_root, trained_world / "models/backbone/scene_resnet.pt",
                      "data.on_error=skip")
    prepare.run(cfg)
    extract_features.run(cfg)
    out = tmp_path / "run" / "data" / "processed" / "vqa_v2"
    skipped = json.loads((out / "skipped.json").read_text())
    assert [(s["record"], s["path"]) for s in skipped["skipped"] if s["kind"] == "image"] == [(1042, str(bad))]
    assert [r["question_id"] for r in processed.load_question_table(out, "val")] == [1_000_070, 1_000_071]
