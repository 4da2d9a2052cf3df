"""The synthetic VQA world: real file formats, exact ground truth, simulated annotators, determinism.

Uses the real ``data=synthetic_tiny`` config (composed from conf/), generated once per module.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from scipy.stats import spearmanr

from pipeline.data.synthetic import (
    COLORS,
    SHAPES,
    SIDES,
    SIZES,
    TEMPLATES,
    Scene,
    SceneObject,
    answer_question,
    generate_world,
    instance_map,
    load_ground_truth,
    question_mask,
    question_text,
    render_scene,
)
from pipeline.data.vocab import tokenize

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SPLITS = ("train2014", "val2014")
ANSWER_TYPES = {"yes/no", "number", "other"}


def _tiny_config(**overrides) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["data=synthetic_tiny"])
    synthetic = OmegaConf.to_container(cfg.data.synthetic, resolve=True)
    synthetic.update(overrides)
    return synthetic


def _generate(tmp_path_factory, name: str, **overrides) -> Path:
    root = tmp_path_factory.mktemp(name)
    generate_world(_tiny_config(**overrides), root, progress=False)
    return root


def _load(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def cfg() -> dict:
    return _tiny_config()


@pytest.fixture(scope="module")
def world(tmp_path_factory, cfg) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("world")
    summary = generate_world(OmegaConf.create(cfg), root, progress=False)
    return root, summary


@pytest.fixture(scope="module")
def records(world) -> dict:
    """Per split: questions, annotations (by question id) and ground truth."""
    root, _ = world
    out = {}
    for split in SPLITS:
        questions = _load(root / f"v2_OpenEnded_mscoco_{split}_questions.json")
        annotations = _load(root / f"v2_mscoco_{split}_annotations.json")
        out[split] = {
            "questions": questions,
            "annotations": {a["question_id"]: a for a in annotations["annotations"]},
            "annotation_file": annotations,
            "gt": load_ground_truth(root, split),
        }
    return out


def test_files_follow_vqa_v2_layout(world, records, cfg):
    root, summary = world
    assert (root / "README.md").read_text().count("simulated annotator") >= 1
    all_image_ids, all_question_ids = [], []
    for split in SPLITS:
        q = records[split]["questions"]
        a = records[split]["annotation_file"]
        assert q["task_type"] == "Open-Ended" and q["data_type"] == "mscoco" and q["data_subtype"] == split
        assert {"info", "license", "questions"} <= set(q)
        assert {"info", "license", "data_subtype", "annotations"} <= set(a) and a["data_subtype"] == split
        image_ids = sorted({r["image_id"] for r in q["questions"]})
        assert len(image_ids) == cfg["num_images"][split] == summary[split]["images"]
        assert len(q["questions"]) == len(image_ids) * cfg["questions_per_image"] == summary[split]["questions"]
        for rec in q["questions"]:
            assert set(rec) == {"image_id", "question", "question_id"}
            assert rec["question_id"] // 1000 == rec["image_id"]
            ann = records[split]["annotations"][rec["question_id"]]
            assert ann["image_id"] == rec["image_id"]
            assert set(ann) == {"question_id", "image_id", "question_type", "answer_type", "answers",
                                "multiple_choice_answer"}
            assert ann["answer_type"] in ANSWER_TYPES
            assert len(ann["answers"]) == 10
            assert [x["answer_id"] for x in ann["answers"]] == list(range(1, 11))
            assert {x["answer_confidence"] for x in ann["answers"]} <= {"yes", "maybe"}
        assert len(records[split]["annotations"]) == len(q["questions"])
        files = sorted(p.name for p in (root / split).iterdir())
        assert files == [f"COCO_{split}_{i:012d}.jpg" for i in image_ids]
        for image_id in image_ids:
            with Image.open(root / split / f"COCO_{split}_{image_id:012d}.jpg") as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert im.size == (cfg["image_size"], cfg["image_size"])
            assert (root / "ground_truth" / f"{split}_instances" / f"{image_id}.png").is_file()
        all_image_ids += image_ids
        all_question_ids += [r["question_id"] for r in q["questions"]]
    assert len(set(all_image_ids)) == len(all_image_ids)
    assert len(set(all_question_ids)) == len(all_question_ids)


def test_masks_are_exactly_the_drawn_objects(world, records, cfg):
    root, _ = world
    palette = np.array(list(COLORS.values()), dtype=np.int32)
    for split in SPLITS:
        for image_id, scene in records[split]["gt"]["images"].items():
            assert 2 <= len(scene.objects) <= 5 and [o.index for o in scene.objects] == list(range(len(scene.objects)))
            image = render_scene(scene)
            inst = instance_map(scene)
            assert image.shape == (cfg["image_size"], cfg["image_size"], 3) and image.dtype == np.uint8
            saved = _read_image(root / "ground_truth" / f"{split}_instances" / f"{image_id}.png")
            np.testing.assert_array_equal(saved, inst)
            for obj in scene.objects:
                region = inst == obj.index + 1
                assert region.sum() >= 20, f"object {obj} barely visible"
                assert (image[region] == COLORS[obj.color]).all()
                # Masks never touch: a one-pixel dilation of an object meets no other object.
                grown = region.copy()
                grown[1:] |= region[:-1]
                grown[:-1] |= region[1:]
                grown[:, 1:] |= grown[:, :-1].copy()
                grown[:, :-1] |= grown[:, 1:].copy()
                assert set(np.unique(inst[grown])) <= {0, obj.index + 1}
            background = image[inst == 0].astype(np.int32)
            distance = np.abs(background[:, None, :] - palette[None, :, :]).max(axis=2)
            assert distance.min() > 40, "a background pixel looks like an object colour"
            # The JPEG on disk is this scene (up to compression).
            jpeg = _read_image(root / split / f"COCO_{split}_{image_id:012d}.jpg").astype(np.int32)
            assert np.abs(jpeg - image.astype(np.int32)).mean() < 6


def test_scene_json_round_trip(records):
    scene = next(iter(records["val2014"]["gt"]["images"].values()))
    again = Scene.from_json(json.loads(json.dumps(scene.to_json())))
    assert again == scene
    np.testing.assert_array_equal(render_scene(again), render_scene(scene))


def test_every_answer_recomputes_from_the_scene(records):
    wrong_of_type = {"yes/no": {"yes", "no"}, "number": {str(n) for n in range(1, 6)},
                     "other": set(COLORS) | set(SHAPES)}
    for split in SPLITS:
        gt = records[split]["gt"]
        texts = Counter()
        for rec in records[split]["questions"]["questions"]:
            spec = gt["questions"][rec["question_id"]]
            scene = gt["images"][rec["image_id"]]
            ann = records[split]["annotations"][rec["question_id"]]
            answer = answer_question(scene, spec)
            assert answer == spec["answer"] == ann["multiple_choice_answer"]
            assert question_text(spec["template"], spec["slots"])[0] == rec["question"]
            texts[(rec["image_id"], rec["question"])] += 1
            objects = spec["object_indices"]
            assert objects and set(objects) <= set(range(len(scene.objects)))
            if ann["answer_type"] == "number":
                assert len(objects) == int(answer)
            humans = Counter(x["answer"] for x in ann["answers"])
            assert humans[answer] > 5, "the true answer keeps a clear majority"
            assert set(humans) <= wrong_of_type[ann["answer_type"]]
            # The ground-truth objects are the ones the question is about.
            slots, objs = spec["slots"], [scene.objects[i] for i in objects]
            if spec["template"] == "exists":
                assert all(o.shape == slots["shape"] for o in objs)
                assert all(o.color == slots["color"] for o in objs) == (answer == "yes")
            if spec["template"] in ("color_of_shape", "color_of_size_shape"):
                assert len(objs) == 1 and objs[0].shape == slots["shape"] and objs[0].color == answer
        assert max(texts.values()) == 1, "duplicate question within an image"


def test_answer_question_on_hand_built_scenes():
    def obj(index, shape, color, x, y, size="small"):
        return SceneObject(index, shape, color, size, (x, y), SIZES[size] * 64)

    background = {"seed": 0, "level": 120.0, "gradient": [0.0, 0.0], "stripe_angle": 0.0,
                  "stripe_period": 10.0, "stripe_amplitude": 0.0, "noise": 0.0}
    scene = Scene(1, 64, 64, [obj(0, "circle", "red", 32, 32), obj(1, "square", "blue", 10, 30),
                              obj(2, "cross", "green", 54, 10), obj(3, "cross", "green", 54, 50, "large")],
                  background)

    def ask(template, **slots):
        return answer_question(scene, {"template": template, "slots": slots})

    assert ask("color_of_relative", side="left", shape="circle") == "blue"
    assert ask("color_of_relative", side="right", shape="square") == "red"
    assert ask("exists", color="green", shape="cross") == "yes"
    assert ask("exists", color="red", shape="cross") == "no"
    assert ask("count_shape", shape="cross") == "2"
    assert ask("count_color", color="green") == "2"
    assert ask("shape_of_color", color="blue") == "square"
    assert ask("color_of_size_shape", size="large", shape="cross") == "green"
    with pytest.raises(ValueError):
        ask("color_of_shape", shape="cross")  # two crosses: ill-posed
    with pytest.raises(ValueError):
        # The two crosses right of the circle are equally near: no unambiguous target.
        ask("color_of_relative", side="right", shape="circle")


# Expected important words per template, written out independently of the generator.
EXPECTED_WORDS = {
    "exists": lambda s: [s["color"], s["shape"]],
    "count_color": lambda s: ["many", s["color"]],
    "count_shape": lambda s: ["many", {"cross": "crosses"}.get(s["shape"], s["shape"] + "s")],
    "color_of_shape": lambda s: ["color", s["shape"]],
    "shape_of_color": lambda s: ["shape", s["color"]],
    "color_of_size_shape": lambda s: ["color", s["size"], s["shape"]],
    "color_of_relative": lambda s: ["color", s["side"], s["shape"]],
}


def test_word_indices_point_at_the_naming_words(records):
    seen = set()
    for split in SPLITS:
        gt = records[split]["gt"]
        for rec in records[split]["questions"]["questions"]:
            spec = gt["questions"][rec["question_id"]]
            tokens = tokenize(rec["question"])
            idx = spec["word_indices"]
            assert idx == sorted(set(idx)) and all(0 <= i < len(tokens) for i in idx)
            assert [tokens[i] for i in idx] == EXPECTED_WORDS[spec["template"]](spec["slots"])
            seen.add(spec["template"])
    assert {"exists", "count_color", "count_shape", "color_of_shape", "shape_of_color"} <= seen


def test_word_indices_hold_with_and_without_the_question_mark(records):
    # tokenize keeps "?" by default (data.question_mark); the world's questions end with their
    # only "?", so the ground-truth positions name the same words either way and never the "?".
    for split in SPLITS:
        gt = records[split]["gt"]
        for rec in records[split]["questions"]["questions"]:
            spec = gt["questions"][rec["question_id"]]
            kept, dropped = tokenize(rec["question"]), tokenize(rec["question"], question_mark=False)
            assert kept == dropped + ["?"]
            expected = EXPECTED_WORDS[spec["template"]](spec["slots"])
            assert [kept[i] for i in spec["word_indices"]] == expected
            assert [dropped[i] for i in spec["word_indices"]] == expected
            assert len(kept) - 1 not in spec["word_indices"]


def test_every_question_fits_max_question_length_with_its_question_mark():
    # Every template with every slot value (not only the ones a small world happens to draw):
    # the longest question, "?" included, must not be cut by data.max_question_length.
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        data = compose("config", overrides=["data=synthetic"]).data
    assert data.question_mark is True
    lengths = [len(tokenize(question_text(template, {"color": color, "shape": shape, "size": size,
                                                       "side": side})[0]))
               for template in TEMPLATES for color in COLORS for shape in SHAPES
               for size in SIZES for side in SIDES]
    assert max(lengths) == 10  # "what color is the object left of the circle ?"
    assert max(lengths) <= data.max_question_length


def test_deliberate_pairs_same_answer_different_objects(records, cfg):
    for split in SPLITS:
        gt = records[split]["gt"]
        pairs = gt["pairs"]
        n_images = cfg["num_images"][split]
        assert 0.2 * n_images <= len(pairs) <= 0.8 * n_images
        for qa, qb in pairs:
            a, b = gt["questions"][qa], gt["questions"][qb]
            assert a["image_id"] == b["image_id"]
            assert a["answer"] == b["answer"] and a["answer"] in COLORS
            assert a["template"] == b["template"] == "color_of_shape"
            assert a["slots"]["shape"] != b["slots"]["shape"]
            assert not set(a["object_indices"]) & set(b["object_indices"])


def test_answer_types_present_and_balanced(records, world):
    _, summary = world
    for split in SPLITS:
        types = Counter(a["answer_type"] for a in records[split]["annotations"].values())
        assert set(types) == ANSWER_TYPES and types == summary[split]["answer_types"]
        total = sum(types.values())
        assert all(n / total > 0.2 for n in types.values()), types
        yes_no = Counter(a["multiple_choice_answer"] for a in records[split]["annotations"].values()
                         if a["answer_type"] == "yes/no")
        assert set(yes_no) == {"yes", "no"}
        assert 0.4 <= yes_no["yes"] / sum(yes_no.values()) <= 0.6, yes_no


def test_hat_maps_simulate_annotators_looking_at_the_objects(world, records, cfg):
    root, summary = world
    hat = cfg["hat"]
    val_qids = sorted(records["val2014"]["annotations"])
    expected = sorted(f"{q}_{k}.png" for q in val_qids for k in range(1, hat["annotators"]["val2014"] + 1))
    assert sorted(p.name for p in (root / "vqahat_val").iterdir()) == expected
    train_maps = sorted(p.name for p in (root / "vqahat_train").iterdir())
    train_qids = set(records["train2014"]["annotations"])
    assert len(train_maps) == round(hat["train_fraction"] * len(train_qids)) == summary["train2014"]["hat_maps"]
    assert all(n.endswith("_1.png") and int(n.split("_")[0]) in train_qids for n in train_maps)

    # Spearman of a map against a binary mask that covers a few % of the cells is capped well
    # below 1 by the ties (a noise-free blurred copy of the mask scores about 0.44), so the check
    # is: clearly positive, and far above the same maps scored against another question's mask.
    matched, mismatched = [], []
    targets = {}
    for qid in val_qids:
        mask = question_mask(root, "val2014", qid)
        spec = records["val2014"]["gt"]["questions"][qid]
        inst = instance_map(records["val2014"]["gt"]["images"][spec["image_id"]])
        np.testing.assert_array_equal(mask, np.isin(inst, np.array(spec["object_indices"]) + 1))
        targets[qid] = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((hat["size"],) * 2, Image.BOX))
    for j, qid in enumerate(val_qids):
        other = val_qids[(j + len(val_qids) // 2) % len(val_qids)]
        for k in range(1, hat["annotators"]["val2014"] + 1):
            with Image.open(root / "vqahat_val" / f"{qid}_{k}.png") as im:
                assert im.mode == "L" and im.size == (hat["size"], hat["size"])
                hat_map = np.asarray(im).ravel()
            assert hat_map.max() == 255
            matched.append(spearmanr(hat_map, targets[qid].ravel())[0])
            mismatched.append(spearmanr(hat_map, targets[other].ravel())[0])
    assert np.mean(matched) > 0.25, np.mean(matched)
    assert np.mean(matched) - np.mean(mismatched) > 0.2, (np.mean(matched), np.mean(mismatched))
    # Annotators of one question disagree (jitter, blur, noise): maps are not copies.
    first = val_qids[0]
    maps = [_read_image(root / "vqahat_val" / f"{first}_{k}.png") for k in (1, 2)]
    assert not np.array_equal(*maps)


def _tree(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_world(world, tmp_path_factory, cfg):
    root, _ = world
    again = _generate(tmp_path_factory, "again")
    first, second = _tree(root), _tree(again)
    assert list(first) == list(second)
    for name, path in first.items():
        if name.endswith((".json", ".md")):
            assert path.read_bytes() == second[name].read_bytes(), name
        else:
            np.testing.assert_array_equal(_read_image(path), _read_image(second[name]), err_msg=name)

    other = _generate(tmp_path_factory, "other_seed", seed=cfg["seed"] + 1)
    for split in SPLITS:
        scenes_a = load_ground_truth(root, split)["images"]
        scenes_b = load_ground_truth(other, split)["images"]
        differing = sum(scenes_a[i] != scenes_b[i] for i in scenes_a)
        assert differing > 0.9 * len(scenes_a)


def test_val_world_does_not_depend_on_train_size(world, tmp_path_factory, cfg):
    root, _ = world
    fewer = _generate(tmp_path_factory, "fewer_train", num_images={**cfg["num_images"], "train2014": 5})
    for name in ("ground_truth/val2014.json", "v2_OpenEnded_mscoco_val2014_questions.json",
                 "v2_mscoco_val2014_annotations.json"):
        assert (root / name).read_bytes() == (fewer / name).read_bytes(), name


def test_answer_types_choose_the_question_mix(world, tmp_path_factory, cfg):
    root, _ = world
    # The order they are listed in does not matter: all three in another order, same world.
    shuffled = _generate(tmp_path_factory, "types_shuffled", answer_types=["other", "number", "yes/no"])
    for name in ("ground_truth/val2014.json", "v2_mscoco_train2014_annotations.json", "README.md"):
        assert (root / name).read_bytes() == (shuffled / name).read_bytes(), name
    # Without counting: no number question, the other two balanced, the pairs still asked, and
    # the world's README says which types it asks.
    no_counts = _generate(tmp_path_factory, "no_counts", answer_types=["yes/no", "other"])
    for split in SPLITS:
        annotations = _load(no_counts / f"v2_mscoco_{split}_annotations.json")["annotations"]
        types = Counter(a["answer_type"] for a in annotations)
        assert set(types) == {"yes/no", "other"}, types
        assert 0.35 <= types["yes/no"] / sum(types.values()) <= 0.65, types
        assert load_ground_truth(no_counts, split)["pairs"] == load_ground_truth(root, split)["pairs"]
    assert "Asked answer types: yes/no, other only" in (no_counts / "README.md").read_text()
    assert "Asked answer types" not in (root / "README.md").read_text()


@pytest.mark.parametrize("answer_types, message", [
    ([], "non-empty list"),
    (["yes/no", "counting"], "unknown: \\['counting'\\]"),
    (["number", "number"], "at most once"),
    (["yes/no", "number"], "pair_fraction=0"),
])
def test_bad_answer_types_are_rejected_with_the_fix(tmp_path, answer_types, message):
    with pytest.raises(ValueError, match=message):
        generate_world(_tiny_config(answer_types=answer_types), tmp_path, progress=False)
