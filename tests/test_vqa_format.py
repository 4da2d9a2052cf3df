"""The real-format readers on small fixtures in the official layouts, and their bad-input errors."""
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.data import vqa_format
from pipeline.common.errors import DataError, RecordPolicy
from tests.conftest import QUESTIONS, write_vqa_split


def test_official_names():
    assert vqa_format.coco_image_name("val2014", 42) == "COCO_val2014_000000000042.jpg"
    assert vqa_format.coco_image_path("train2014", 7) == "train2014/COCO_train2014_000000000007.jpg"
    assert vqa_format.question_file("r", "v1", "val2014").name == "OpenEnded_mscoco_val2014_questions.json"
    assert vqa_format.annotation_file("r", "v2", "train2014").name == "v2_mscoco_train2014_annotations.json"
    with pytest.raises(ValueError, match="v3"):
        vqa_format.question_file("r", "v3", "val2014")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_load_split_joins_questions_and_annotations(tmp_path, version):
    write_vqa_split(tmp_path, version, "val2014")
    records = vqa_format.load_split(tmp_path, version, "val2014", RecordPolicy())
    assert [r.question_id for r in records] == sorted(q[0] for q in QUESTIONS)
    dog = next(r for r in records if r.question_id == 420)
    assert dog.image_id == 42 and dog.image == "val2014/COCO_val2014_000000000042.jpg"
    assert dog.answers[-1] == "Brown" and len(dog.answers) == 10
    assert dog.answer_type == "other" and dog.multiple_choice_answer == "brown"
    assert (tmp_path / dog.image).is_file()


def test_malformed_json_names_file_and_line(tmp_path):
    qfile, _ = write_vqa_split(tmp_path, "v2", "val2014")
    qfile.write_text('{"questions": [\n {"question_id": 1,,}]}')
    with pytest.raises(DataError) as e:
        vqa_format.load_split(tmp_path, "v2", "val2014", RecordPolicy())
    assert qfile.name in str(e.value) and "line 2" in str(e.value)


def test_wrong_top_level_structure(tmp_path):
    _, afile = write_vqa_split(tmp_path, "v2", "val2014")
    afile.write_text(json.dumps({"questions": []}))
    with pytest.raises(DataError, match="annotations"):
        vqa_format.load_split(tmp_path, "v2", "val2014", RecordPolicy())


def test_bad_record_raises_or_is_skipped(tmp_path):
    qfile, _ = write_vqa_split(tmp_path, "v2", "val2014")
    data = json.loads(qfile.read_text())
    data["questions"][1]["image_id"] = "forty-two"
    qfile.write_text(json.dumps(data))
    bad_qid = data["questions"][1]["question_id"]
    with pytest.raises(DataError) as e:
        vqa_format.load_split(tmp_path, "v2", "val2014", RecordPolicy("raise"))
    assert qfile.name in str(e.value) and f"record {bad_qid}" in str(e.value)
    policy = RecordPolicy("skip")
    records = vqa_format.load_split(tmp_path, "v2", "val2014", policy)
    assert bad_qid not in {r.question_id for r in records} and len(records) == len(QUESTIONS) - 1
    assert policy.counts() == {"question": 1}
    policy.write_skipped(tmp_path / "skipped.json")
    skipped = json.loads((tmp_path / "skipped.json").read_text())
    assert skipped["skipped"][0]["record"] == bad_qid and skipped["counts"] == {"question": 1}


def test_question_without_annotation(tmp_path):
    _, afile = write_vqa_split(tmp_path, "v2", "val2014")
    data = json.loads(afile.read_text())
    dropped = data["annotations"].pop(0)["question_id"]
    afile.write_text(json.dumps(data))
    with pytest.raises(DataError, match="no annotation"):
        vqa_format.load_split(tmp_path, "v2", "val2014", RecordPolicy())
    policy = RecordPolicy("skip")
    records = vqa_format.load_split(tmp_path, "v2", "val2014", policy)
    assert dropped not in {r.question_id for r in records}


def test_duplicate_question_id_is_bad(tmp_path):
    qfile, _ = write_vqa_split(tmp_path, "v2", "val2014")
    data = json.loads(qfile.read_text())
    data["questions"].append(dict(data["questions"][0]))
    qfile.write_text(json.dumps(data))
    with pytest.raises(DataError, match="duplicate"):
        vqa_format.load_split(tmp_path, "v2", "val2014", RecordPolicy())


def test_test_split_without_annotations(tmp_path):
    qfile, afile = write_vqa_split(tmp_path, "v2", "val2014")
    afile.unlink()
    records = vqa_format.load_split(tmp_path, "v2", "val2014", RecordPolicy(), with_annotations=False)
    assert len(records) == len(QUESTIONS) and records[0].answers == []


def test_check_image_reports_missing_and_corrupt(tmp_path):
    good = tmp_path / "a.jpg"
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(good)
    assert vqa_format.check_image(good) == (7, 5)
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(DataError, match="unreadable") as e:
        vqa_format.check_image(bad)
    assert "b.jpg" in str(e.value)
    with pytest.raises(DataError, match="missing"):
        vqa_format.check_image(tmp_path / "c.jpg")
    gray = tmp_path / "g.png"
    Image.fromarray(np.full((3, 3), 9, np.uint8)).save(gray)
    assert vqa_format.load_image(gray).mode == "RGB"


def test_hat_maps(tmp_path):
    d = tmp_path / "vqahat_val"
    d.mkdir()
    Image.fromarray(np.array([[0, 255], [51, 102]], np.uint8)).save(d / "5_2.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(d / "5_1.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(d / "6_1.png")
    files = vqa_format.hat_map_files(d, RecordPolicy())
    assert list(files) == [5, 6] and [p.name for p in files[5]] == ["5_1.png", "5_2.png"]
    m = vqa_format.load_hat_map(files[5][1])
    assert m.dtype == np.float32 and m.shape == (2, 2)
    np.testing.assert_allclose(m, [[0, 1], [0.2, 0.4]], atol=1e-6)
    assert vqa_format.load_hat_map(files[5][0]).shape == (4, 4)  # colour file -> luminance
    (d / "notes.png").write_bytes(b"")
    with pytest.raises(DataError, match="notes.png"):
        vqa_format.hat_map_files(d, RecordPolicy())
    policy = RecordPolicy("skip")
    assert list(vqa_format.hat_map_files(d, policy)) == [5, 6] and policy.counts() == {"hat_map": 1}
    (d / "7_1.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable HAT map"):
        vqa_format.load_hat_map(d / "7_1.png")


def test_record_policy_rejects_unknown_mode():
    with pytest.raises(ValueError, match="on_error"):
        RecordPolicy("ignore")
