import pytest
import torch

from pipeline.data.vocab import PAD, UNK, AnswerVocab, QuestionVocab, pad_token_ids, tokenize


@pytest.mark.parametrize("question, tokens", [
    ("What color is the dog?", ["what", "color", "is", "the", "dog", "?"]),
    ("What's left-most?", ["what's", "left", "most", "?"]),
    ("Is this a 'cat' or a dog/wolf?", ["is", "this", "a", "cat", "or", "a", "dog", "wolf", "?"]),
    ("How many (red) cubes, roughly?", ["how", "many", "red", "cubes", "roughly", "?"]),
    ("What colour is the red-ish cube?", ["what", "colour", "is", "the", "red", "ish", "cube", "?"]),
    ("", []),
    ("???", ["?", "?", "?"]),
    ("Why?? Is it?", ["why", "?", "?", "is", "it", "?"]),   # every "?" is one token, anywhere
    ("Is it 'cat?'", ["is", "it", "cat", "?"]),           # quotes around it are still dropped
    ("Is it a cat", ["is", "it", "a", "cat"]),
])
def test_tokenize_keeps_the_question_mark_by_default(question, tokens):
    assert tokenize(question) == tokens
    assert tokenize(question, question_mark=True) == tokens


@pytest.mark.parametrize("question, tokens", [
    ("What color is the dog?", ["what", "color", "is", "the", "dog"]),
    ("What's left-most?", ["what's", "left", "most"]),
    ("Is this a 'cat' or a dog/wolf?", ["is", "this", "a", "cat", "or", "a", "dog", "wolf"]),
    ("How many (red) cubes, roughly?", ["how", "many", "red", "cubes", "roughly"]),
    ("", []),
    ("???", []),
    ("Why?? Is it?", ["why", "is", "it"]),
])
def test_tokenize_without_the_question_mark(question, tokens):
    assert tokenize(question, question_mark=False) == tokens
    # The same tokens as the default, minus every "?".
    assert [t for t in tokenize(question) if t != "?"] == tokens


def test_question_vocab_is_deterministic_and_maps_unknown_words():
    questions = [["is", "there", "a", "dog"], ["is", "there", "a", "cat"], ["what", "is", "it"]]
    vocab = QuestionVocab.build(questions)
    assert vocab.tokens[:2] == [PAD, UNK]
    assert vocab.tokens[2] == "is"                     # most frequent first
    assert vocab.tokens[3:6] == ["a", "there", "cat"]  # ties alphabetical
    assert vocab.encode(["is", "zebra"]) == [vocab.index["is"], vocab.unk_id]
    assert vocab.encode(["is", "there", "a"], max_length=2) == [2, vocab.index["there"]]
    assert QuestionVocab.build(list(reversed(questions))).tokens == vocab.tokens
    rare = QuestionVocab.build(questions, min_count=2)
    assert "cat" not in rare.index and "there" in rare.index


def test_vocab_roundtrip(tmp_path):
    vocab = QuestionVocab.build([["a", "b", "b"]])
    vocab.save(tmp_path / "q.json")
    assert QuestionVocab.load(tmp_path / "q.json").tokens == vocab.tokens
    answers = AnswerVocab.build(["yes", "no", "yes", "2", "red", "no", "yes"], top_k=3)
    assert answers.answers == ["yes", "no", "2"]
    answers.save(tmp_path / "a.json")
    assert AnswerVocab.load(tmp_path / "a.json").answers == answers.answers
    assert answers.top(2).answers == ["yes", "no"]


def test_vocab_rejects_bad_layout():
    with pytest.raises(ValueError):
        QuestionVocab(["a", "b"])
    with pytest.raises(ValueError):
        AnswerVocab(["yes", "yes"])


def test_pad_token_ids_cuts_and_pads_at_the_end():
    tokens = pad_token_ids([[5, 6, 7], [8], []], width=2)
    assert tokens.dtype == torch.long and tokens.tolist() == [[5, 6], [8, 0], [0, 0]]
    assert pad_token_ids([[5, 6, 7], [8]]).tolist() == [[5, 6, 7], [8, 0, 0]]  # the longest
    assert pad_token_ids([[], []]).tolist() == [[0], [0]]  # at least one column
