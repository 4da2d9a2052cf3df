"""POS tagging, the most-important-word rules and the pos_histogram stage (Goyal et al. Fig. 3)."""
import json
import random
import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from pipeline import pos_histogram
from pipeline.common.config import abspath
from pipeline.data import processed, synthetic
from pipeline.common.errors import DataError
from pipeline.data.vocab import tokenize
from pipeline.evaluation import inputs, pos
from tests.conftest import evaluation_config


# ---------------------------------------------------------------------------------------------
# Tagger and groups


def test_textblob_tagger_gives_penn_treebank_tags_one_per_token():
    tagger = pos.make_tagger("textblob")
    assert tagger.name.startswith("textblob ") and "PatternTagger" in tagger.name
    tags = tagger.tag(["what", "color", "is", "the", "circle"])
    assert tags == ("WP", "NN", "VBZ", "DT", "NN")
    tags = tagger.tag(["how", "many", "squares", "are", "there"])
    assert tags[0] == "WRB" and tags[2] == "NNS" and tags[4] == "EX"
    # Contractions stay one token (our tokenizer keeps them whole): still one tag per token.
    assert len(tagger.tag(["what's", "on", "the", "man's", "shirt"])) == 5
    assert tagger.tag(["which", "objects", "are", "tiny"])[0] == "WDT"


def test_tagger_caches_per_question_and_checks_the_tag_count():
    tagger = pos.make_tagger("textblob")
    calls = []
    original = tagger._tag
    tagger._tag = lambda tokens: calls.append(tokens) or original(tokens)
    first = tagger.tag(["is", "there", "a", "red", "cube"])
    assert tagger.tag(("is", "there", "a", "red", "cube")) == first and len(calls) == 1
    tagger._tag = lambda tokens: ["NN"]
    with pytest.raises(ValueError, match="1 tags for the 2 tokens"):
        tagger.tag(["two", "words"])


@pytest.mark.parametrize("tag, group", [
    ("WDT", "wh-words"), ("WP", "wh-words"), ("WP$", "wh-words"), ("WRB", "wh-words"),
    ("NN", "nouns"), ("NNS", "nouns"), ("NNP", "nouns"), ("NNPS", "nouns"),
    ("VB", "verbs"), ("VBZ", "verbs"), ("VBG", "verbs"), ("JJ", "adjectives"), ("JJR", "adjectives"),
    ("DT", "determiners"), ("PDT", "determiners"), ("IN", "prepositions"), ("CD", "numbers"),
    ("PRP", "pronouns"), ("PRP$", "pronouns"), ("RB", "adverbs"), ("RBS", "adverbs"),
    ("CC", "other"), ("EX", "other"), ("MD", "other"), ("UH", "other"),
    (".", "punctuation"), (",", "punctuation"), (":", "punctuation"),
])
def test_tag_groups(tag, group):
    assert pos.tag_group(tag) == group
    assert pos.is_noun(tag) == (group == "nouns")


def test_question_mark_is_tagged_full_stop_by_the_fallback_tagger():
    tagger = pos.make_tagger("textblob")
    tokens = tokenize("What color is the circle?")
    assert tokens[-1] == "?"
    assert tagger.tag(tokens) == ("WP", "NN", "VBZ", "DT", "NN", ".")
    # Pattern's own tag, before the fix-up: the fallback tagger says "." by itself.
    assert tagger._tag(("is", "there", "a", "cube", "?"))[-1] == "."
    tokens = tokenize("Why?? Is it?")
    assert tokens == ["why", "?", "?", "is", "it", "?"]
    assert [tag for token, tag in zip(tokens, tagger.tag(tokens)) if token == "?"] == [".", ".", "."]
    assert pos.tag_group(tagger.tag(["?"])[0]) == "punctuation"
    assert pos_histogram.category(".") == "punctuation"


def test_question_mark_tag_is_fixed_whatever_the_tagger_model_says():
    tagger = pos.make_tagger("textblob")
    tagger._tag = lambda tokens: ["NN"] * len(tokens)  # a tagger model that gets "?" wrong
    assert tagger.tag(["what", "is", "it", "?"]) == ("NN", "NN", "NN", ".")
    assert tagger.tag(["what", "is", "it"]) == ("NN", "NN", "NN")  # only "?" is touched


def test_nltk_without_its_data_says_how_to_install(monkeypatch, caplog):
    import nltk

    def missing(resource, *args, **kwargs):
        raise LookupError(f"Resource {resource} not found")

    monkeypatch.setattr(nltk.data, "find", missing)
    with pytest.raises(DataError, match="nltk.downloader averaged_perceptron_tagger_eng"):
        pos.make_tagger("nltk")
    with caplog.at_level("WARNING"):
        tagger = pos.make_tagger("auto")
    assert tagger.kind == "textblob"
    assert "textblob" in caplog.text and "nltk.downloader" in caplog.text
    with pytest.raises(ValueError, match="unknown tagger"):
        pos.make_tagger("spacy")


# ---------------------------------------------------------------------------------------------
# The NLTK path, on a tiny averaged perceptron model trained here (NLTK's real data is not
# installed on the test machines and is never downloaded).

# Questions in the synthetic world's vocabulary (pipeline.data.synthetic templates), with their
# Penn Treebank tags. "left"/"right" in "the object left of the cross" are tagged RB (adverbial
# use, "left of" ~ "to the left of"); "many" in "how many" is JJ, as in the Penn Treebank; the
# question-mark token "?" (tokenize keeps it by default) is ".", as in the Penn Treebank.
NLTK_TRAINING = [
    ("What color is the circle?", "WP NN VBZ DT NN ."),
    ("What color is the square?", "WP NN VBZ DT NN ."),
    ("What color is the small triangle?", "WP NN VBZ DT JJ NN ."),
    ("What color is the large diamond?", "WP NN VBZ DT JJ NN ."),
    ("What color is the object left of the cross?", "WP NN VBZ DT NN RB IN DT NN ."),
    ("What color is the object right of the square?", "WP NN VBZ DT NN RB IN DT NN ."),
    ("What shape is the blue object?", "WP NN VBZ DT JJ NN ."),
    ("What shape is the yellow object?", "WP NN VBZ DT JJ NN ."),
    ("How many red objects are there?", "WRB JJ JJ NNS VBP EX ."),
    ("How many green objects are there?", "WRB JJ JJ NNS VBP EX ."),
    ("How many squares are there?", "WRB JJ NNS VBP EX ."),
    ("How many crosses are there?", "WRB JJ NNS VBP EX ."),
    ("How many circles are there?", "WRB JJ NNS VBP EX ."),
    ("Is there a blue triangle?", "VBZ EX DT JJ NN ."),
    ("Is there an orange cross?", "VBZ EX DT JJ NN ."),
    ("Is there a purple circle?", "VBZ EX DT JJ NN ."),
]


@pytest.fixture
def fake_nltk_data(tmp_path, monkeypatch):
    """NLTK's averaged perceptron tagger data, in NLTK's own on-disk layout and JSON format
    (``<root>/taggers/averaged_perceptron_tagger_eng/averaged_perceptron_tagger_eng.
    {weights,tagdict,classes}.json``), trained on :data:`NLTK_TRAINING`; ``nltk.data.path``
    starts with its root for the test. Returns the root."""
    import nltk
    from nltk.tag.perceptron import PerceptronTagger

    sentences = []
    for question, tags in NLTK_TRAINING:
        tokens, tags = tokenize(question), tags.split()
        assert len(tokens) == len(tags), question
        sentences.append(list(zip(tokens, tags)))
    state = random.getstate()
    random.seed(0)  # train() shuffles the sentences with the global random module
    try:
        trainer = PerceptronTagger(load=False)
        trainer.train(sentences, nr_iter=10)
    finally:
        random.setstate(state)

    root = tmp_path / "nltk_data"
    model_dir = root / "taggers" / "averaged_perceptron_tagger_eng"
    model_dir.parent.mkdir(parents=True)
    # nltk.data.path is both where find() looks and (nltk 3.10's pathsec) the sandbox of roots
    # save_to_json may write into and load_from_json may read from: add the root first.
    monkeypatch.setattr(nltk.data, "path", [str(root)] + list(nltk.data.path))
    trainer.save_to_json(lang="eng", loc=str(model_dir))
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(trainer.param_files("eng"))
    # find() resolves the resource to our copy (not to a real install elsewhere on the path).
    assert str(nltk.data.find(pos.NLTK_RESOURCE)).rstrip("/") == str(model_dir)
    return root


def test_nltk_tagger_on_fake_nltk_data(fake_nltk_data):
    assert pos.nltk_available()
    tagger = pos.make_tagger("auto")
    assert tagger.kind == "nltk"
    assert tagger.name.startswith("nltk ") and "averaged_perceptron_tagger_eng" in tagger.name
    assert pos.make_tagger("nltk").name == tagger.name
    # The averaged perceptron fits its 16 training questions exactly (checked for this seed and
    # nr_iter; every word is tagged by the model, none by the tag dictionary, which needs >= 20
    # occurrences of a word).
    for question, tags in NLTK_TRAINING:
        assert tagger.tag(tokenize(question)) == tuple(tags.split()), question
    # Every synthetic template, with words the model never saw in that place: one tag per token.
    colors, sizes = list(synthetic.COLORS), list(synthetic.SIZES)
    slots = [{"color": colors[k], "shape": synthetic.SHAPES[k % len(synthetic.SHAPES)],
              "size": sizes[k % len(sizes)], "side": synthetic.SIDES[k % len(synthetic.SIDES)]}
             for k in range(len(colors))]
    for template in synthetic.TEMPLATES:
        for slot in slots:
            tokens = tokenize(synthetic.question_text(template, slot)[0])
            tags = tagger.tag(tokens)
            assert len(tags) == len(tokens) and all(isinstance(t, str) and t for t in tags)
    # Tokens outside the synthetic vocabulary (contractions, digits) still get one tag each.
    for question in ("What's on the man's shirt?", "Are there 2 dogs?", "Is it raining?"):
        assert len(tagger.tag(tokenize(question))) == len(tokenize(question))
        assert tagger.tag(tokenize(question))[-1] == "."  # the "?" token
    assert tagger.tag([]) == ()
    # "?" is "." on the NLTK path too, even where a model would say otherwise.
    tagger._tag = lambda tokens: ["NN"] * len(tokens)
    assert tagger.tag(["is", "it", "?", "?"]) == ("NN", "NN", ".", ".")


# ---------------------------------------------------------------------------------------------
# Most important word


def test_most_important_word_rules_on_hand_made_arrays():
    # Occlusion is signed: the word whose removal lowers p(answer) most (largest drop) wins, not
    # the largest |drop| (removing word 1 raises the probability a lot).
    occlusion = np.array([[0.1, -0.9, 0.3, 0.0, 0.0]])
    assert pos.most_important_word(pos.question_importance("occlusion", {"question_map": occlusion})[0], 3) == 2
    # Ties: the first of the tied tokens.
    assert pos.most_important_word(np.array([0.2, 0.7, 0.7, 0.1]), 4) == 1
    # All equal over the real tokens (padding differs): no most important word.
    assert pos.most_important_word(np.array([0.5, 0.5, 0.5, 0.0]), 3) is None
    assert pos.most_important_word(np.array([np.nan, 1.0, 0.0]), 3) is None
    assert pos.most_important_word(np.array([1.0]), 0) is None
    # Padding beyond the real length never wins.
    assert pos.most_important_word(np.array([0.1, 0.2, 9.0]), 2) == 1
    # IG: sum |IG| when stored, otherwise |question_map| (a large negative attribution matters).
    ig = {"question_map": np.array([[0.2, -0.8, 0.5]])}
    assert pos.most_important_word(pos.question_importance("integrated_gradients", ig)[0], 3) == 1
    ig["extra/question_attr_abs"] = np.array([[0.9, 0.1, 0.2]])
    assert pos.most_important_word(pos.question_importance("integrated_gradients", ig)[0], 3) == 0
    with pytest.raises(ValueError, match="no most-important-word convention"):
        pos.question_importance("gradcam", {"question_map": occlusion})
    assert pos.top_words(np.array([0.3, 0.9, 0.3, 0.9, 5.0]), 4, 3) == [1, 3, 0]


def test_most_important_words_counts_invalid_and_constant_questions():
    questions = [{"tokens": ["a", "b", "c"]}, {"tokens": ["a", "b"]}, {"tokens": ["a", "b", "c"]},
                 {"tokens": ["a", "b", "c", "d", "e"]}]
    importance = np.array([[0.1, 0.3, 0.2], [0.4, 0.4, 0.9], [5.0, 0.0, 0.0], [0.0, 0.1, 0.2]])
    found = pos_histogram.most_important_words(questions, importance, np.array([True, True, False, True]))
    # question 1 is constant over its 2 real tokens; question 3 is cut at the store's width (3).
    assert found == {"winners": {0: 1, 3: 2}, "invalid": 1, "constant": 1}


# ---------------------------------------------------------------------------------------------
# The stage on the explained world


PAPER_GROUPS = {"wh-words": {"WDT", "WP", "WP$", "WRB"}, "nouns": {"NN", "NNS", "NNP", "NNPS"},
                "determiners": {"DT", "PDT"}, "prepositions": {"IN"}, "numbers": {"CD"},
                "pronouns": {"PRP", "PRP$"}, "verbs": {"VB*"}, "adjectives": {"JJ*"},
                "adverbs": {"RB*"}, "punctuation": {".", ",", ":", "``", "''", "-LRB-", "-RRB-"}}


def _plain_recount(index, arrays, method, tagger, tags):
    """P(most important | tag) by a plain loop, independent of the stage's helpers."""
    importance = arrays["question_map"].astype(np.float64)
    if method == "integrated_gradients":
        importance = arrays["extra/question_attr_abs"].astype(np.float64)
    tokens_with_tag, winners_with_tag = Counter(), Counter()
    for row, q in enumerate(index["questions"]):
        if not arrays["valid"][row]:
            continue
        n = min(len(q["tokens"]), importance.shape[1])
        scores = list(importance[row, :n])
        if len(set(scores)) <= 1:
            continue
        best = 0
        for i in range(n):
            if scores[i] > scores[best]:
                best = i
        question_tags = tagger.tag(q["tokens"][:n])
        for t in question_tags:
            tokens_with_tag[t] += 1
        winners_with_tag[question_tags[best]] += 1
    return {t: (tokens_with_tag[t], winners_with_tag[t]) for t in tags}


def split_with_unexplained_questions(cfg, tmp_path):
    """A copy of the processed data whose validation split also holds questions that were not
    explained (number-heavy ones), so the split's tag order differs from the explained subset's."""
    source = abspath(cfg.paths.processed_dir)
    target = tmp_path / "processed"
    shutil.copytree(source, target)
    path = processed.questions_file(target, "val")
    payload = json.loads(path.read_text())
    extra = [{**r, "question_id": r["question_id"] + 10_000_000,
              "tokens": ["how", "many", "two", "three", "four", "five", "six", "seven"]}
             for r in payload["records"]]
    payload["records"] = payload["records"] + extra
    path.write_text(json.dumps(payload))
    return target


def test_stage_matches_a_plain_recount(explained_world, tmp_path):
    reports = tmp_path / "reports"
    base = evaluation_config(explained_world)
    cfg = evaluation_config(explained_world, "evaluation.pos_histogram.tagger=textblob",
                            "evaluation.bootstrap.samples=200", f"paths.reports_dir={reports}",
                            f"paths.processed_dir={split_with_unexplained_questions(base, tmp_path)}")
    result = pos_histogram.run(cfg)
    table = pd.read_csv(reports / "tables" / "pos_histogram_by_tag.csv")
    grouped = pd.read_csv(reports / "tables" / "pos_histogram.csv")
    # the columns the report and readers use, written out: renaming or dropping one fails here
    assert list(table.columns) == ["model", "method", "tagger", "tag", "group", "tag_count",
                                   "most_important", "p_most_important"]
    assert list(grouped.columns) == ["model", "method", "tagger", "category", "tags", "tag_count",
                                     "most_important", "p_most_important"]
    assert set(table.method) == {"guided_backprop", "occlusion", "hadamard", "integrated_gradients"}
    tagger = pos.make_tagger("textblob")
    assert (table.tagger == tagger.name).all() and (grouped.tagger == tagger.name).all()
    # Fig. 3: the 15 most frequent tags of the whole validation split, not of the explained subset
    split = processed.load_question_table(abspath(cfg.paths.processed_dir), "val")
    for model in ("lstm_cnn", "mlb"):
        index = inputs.load_store(cfg, model)
        assert len(split) == 2 * len(index["questions"])
        width = inputs.read_method(cfg, model, "occlusion")["question_map"].shape[1]
        frequency = Counter(t for q in split for t in tagger.tag(q["tokens"][:width]))
        expected_order = sorted(frequency, key=lambda t: (-frequency[t], t))[:15]
        assert "." in expected_order  # the "?" that ends every question (data.question_mark)
        explained = Counter(t for q in index["questions"] for t in tagger.tag(q["tokens"][:width]))
        assert expected_order != sorted(explained, key=lambda t: (-explained[t], t))[:15]
        # Goyal et al.'s grouping (WDT, WP, WRB -> wh-words, ...), written out; a tag of no
        # group is its own category.
        def category(tag):
            for name, members in PAPER_GROUPS.items():
                if tag in members or any(m.endswith("*") and tag.startswith(m[:-1]) for m in members):
                    return name
            return tag
        for method in ("guided_backprop", "occlusion", "hadamard", "integrated_gradients"):
            rows = table[(table.model == model) & (table.method == method)]
            assert rows.tag.tolist() == expected_order
            recount = _plain_recount(index, inputs.read_method(cfg, model, method), method, tagger,
                                     expected_order)
            for row in rows.itertuples():
                count, winners = recount[row.tag]
                assert (row.tag_count, row.most_important) == (count, winners)
                expected = winners / count if count else np.nan
                assert row.p_most_important == pytest.approx(expected, rel=1e-5, nan_ok=True)  # CSV: 6 digits
                assert row.group == pos.tag_group(row.tag)
            assert rows.most_important.sum() <= len(index["questions"])
            # Categories: sums over their tags, ordered by the tags' frequency on the split.
            members = {}
            for tag in expected_order:
                members.setdefault(category(tag), []).append(tag)
            order = sorted(members, key=lambda c: (-sum(frequency[t] for t in members[c]), c))
            cats = grouped[(grouped.model == model) & (grouped.method == method)]
            assert cats.category.tolist() == order
            assert "punctuation" in order and members["punctuation"] == ["."]
            for row in cats.itertuples():
                assert row.tags.split() == members[row.category]
                count = sum(recount[t][0] for t in members[row.category])
                winners = sum(recount[t][1] for t in members[row.category])
                assert (row.tag_count, row.most_important) == (count, winners)
                assert row.p_most_important == pytest.approx(
                    winners / count if count else np.nan, rel=1e-5, nan_ok=True)

    truth = pd.read_csv(reports / "tables" / "pos_ground_truth.csv")
    assert len(truth) == 8
    gt = inputs.ground_truth_questions(cfg, "val")["questions"]
    index = inputs.load_store(cfg, "mlb")
    arrays = inputs.read_method(cfg, "mlb", "occlusion")
    hits, chances = [], []
    for row, q in enumerate(index["questions"]):
        scores = arrays["question_map"][row, :len(q["tokens"])].astype(np.float64)
        if not arrays["valid"][row] or (scores == scores[0]).all():
            continue
        important = gt[q["question_id"]]["word_indices"]
        hits.append(int(np.argmax(scores)) in important)
        chances.append(len(important) / len(q["tokens"]))
    row = truth[(truth.model == "mlb") & (truth.method == "occlusion")].iloc[0]
    assert row.n == len(hits)
    assert row.share_ground_truth == pytest.approx(np.mean(hits), abs=1e-6)
    assert row.chance == pytest.approx(np.mean(chances), abs=1e-6)
    assert row.ci_low <= row.share_ground_truth <= row.ci_high

    metrics = json.loads((reports / "metrics" / "pos_histogram.json").read_text())
    assert metrics["tagger"] == tagger.name
    assert metrics["ground_truth_share"]["mlb"]["occlusion"]["share_ground_truth"] == pytest.approx(np.mean(hits))
    assert result["questions"]["mlb"] == len(index["questions"])
    png = reports / "figures" / "pos_histogram.png"
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 600 and im.size[1] > 400


def test_two_runs_give_byte_identical_tables(explained_world, tmp_path):
    outputs = []
    for k in range(2):
        cfg = evaluation_config(explained_world, f"paths.reports_dir={tmp_path / str(k)}",
                                "evaluation.bootstrap.samples=100")
        pos_histogram.run(cfg)
        outputs.append([(tmp_path / str(k) / "tables" / name).read_bytes()
                        for name in ("pos_histogram.csv", "pos_ground_truth.csv")])
    assert outputs[0] == outputs[1]
    assert outputs[0][0].count(b"\n") > 10


def test_skipped_and_missing_methods(explained_world, tmp_path):
    # Work on a copy: the fixture store is shared.
    store = tmp_path / "attributions"
    shutil.copytree(explained_world / "attributions" / "synthetic_tiny", store)
    overrides = [f"paths.attributions_dir={store}", f"paths.reports_dir={tmp_path / 'reports'}",
                 "evaluation.bootstrap.samples=50"]
    index_file = store / "lstm_cnn" / "index.json"
    index = json.loads(index_file.read_text())
    index["methods"]["hadamard"] = {"skipped": "the model has no fusion", "arrays": []}
    index_file.write_text(json.dumps(index))
    result = pos_histogram.run(evaluation_config(explained_world, *overrides))
    assert result["skipped"] == {"lstm_cnn": {"hadamard": "the model has no fusion"}}
    table = result["tables"]["pos_histogram"]
    assert not ((table.model == "lstm_cnn") & (table.method == "hadamard")).any()
    assert ((table.model == "mlb") & (table.method == "hadamard")).any()

    del index["methods"]["occlusion"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(DataError, match="pipeline.attribute model=lstm_cnn"):
        pos_histogram.run(evaluation_config(explained_world, *overrides))


def test_stage_uses_nltk_when_its_data_is_there(explained_world, fake_nltk_data, tmp_path):
    # tagger=auto (the default) with the fake NLTK data on nltk.data.path. make_tagger builds a
    # fresh Tagger on every run (no module-level tagger), and the fixture's monkeypatch of
    # nltk.data.path is undone after the test, so the other stage tests still get TextBlob.
    reports = tmp_path / "reports"
    cfg = evaluation_config(explained_world, "evaluation.pos_histogram.tagger=auto",
                            "evaluation.bootstrap.samples=50", f"paths.reports_dir={reports}")
    result = pos_histogram.run(cfg)
    nltk_tagger = pos.make_tagger("nltk")
    for name in ("pos_histogram.csv", "pos_ground_truth.csv"):
        table = pd.read_csv(reports / "tables" / name)
        assert len(table) and (table.tagger == nltk_tagger.name).all(), name
        assert not table.tagger.str.contains("textblob").any()
    metrics = json.loads((reports / "metrics" / "pos_histogram.json").read_text())
    assert metrics["tagger"] == nltk_tagger.name
    # The tags in the table are the NLTK model's: a subset of the classes it was trained on,
    # in frequency order over the model's questions as tagged by NLTK.
    table = pd.read_csv(reports / "tables" / "pos_histogram_by_tag.csv")
    classes = {t for _, tags in NLTK_TRAINING for t in tags.split()}
    assert set(table.tag) <= classes
    split = processed.load_question_table(abspath(cfg.paths.processed_dir), "val")
    for model in ("lstm_cnn", "mlb"):
        width = inputs.read_method(cfg, model, "occlusion")["question_map"].shape[1]
        frequency = Counter(t for q in split for t in nltk_tagger.tag(q["tokens"][:width]))
        expected_order = sorted(frequency, key=lambda t: (-frequency[t], t))[:15]
        rows = table[(table.model == model) & (table.method == "occlusion")]
        assert rows.tag.tolist() == expected_order
    assert set(result["tables"]["pos_histogram"].tagger) == {nltk_tagger.name}
