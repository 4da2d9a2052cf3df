"""The papers' published numbers that the report puts next to ours, one entry per number, each
with its citation (paper, table or section), the data and the model it was computed on, and the
number exactly as the paper prints it.

Rule: a number goes in only once it has been read in the paper's text; ``source`` says where.
An entry whose number could not be read keeps ``value=None`` and the report prints "published
value not verified" instead of a number: a wrong published number in a reproduction report is
worse than none, since readers would take a mismatch as a finding about the method.

Some entries are *counted from* a published table rather than printed in it (the overlap of two
top-10 index columns of Ummettuguli's Tables 1-4): ``source`` says so, and ``printed`` gives the
count the value was computed from.

The papers' numbers come from other data (VQA v1 / VQA-HAT on COCO images) and other models
(VGG-based Deeper LSTM Q + norm I, SAN): side by side they say whether a pattern holds, not
whether the values match (docs/evaluation.md, "Published numbers").

Not entered, and why:
- Kim et al. print per-token z-scores (Eq. 11) under each example of Figs. 2-5; they describe
  single questions, not a statistic any table of ours aggregates, and the printed token rows do
  not align one-to-one with the questions' words (six values under "is the man happy ?").
- Ummettuguli's Table 6 has a first row whose label is illegible in the paper's text
  (value 0.006204): which questions it compares cannot be read, so it is left out.
- The Grad-CAM paper reports no number on VQA that our tables reproduce.

``ours`` says where our counterpart lives: a table under ``reports/tables/``, the row (every
``match`` column equal to its value; a tuple of column names means "the first of these that
the table has") and the column (first of ``column`` that exists).
"""
from __future__ import annotations

from dataclasses import dataclass, field

GOYAL = ("Goyal, Mohapatra, Parikh, Batra. Towards Transparent AI Systems: Interpreting Visual "
         "Question Answering Models. arXiv:1608.08974, 2016")
UMMETTUGULI = ("Ummettuguli. Towards visual explanations that ground multiple modalities. "
               "Georgia Institute of Technology")

VQA_HAT = "VQA v1 val: the 1,374 question-image pairs with VQA-HAT human attention maps"
VQA_VAL = "VQA v1 val questions and answers"
VQA_IMAGES = "VQA val images and questions (COCO)"
LSTM_CNN = "Deeper LSTM Q + norm I (Lu et al. 2015; VGG fc7 image feature)"
SAN = "SAN, stacked attention networks (Yang et al. 2015)"


@dataclass(frozen=True)
class OurValue:
    table: str                       # reports/tables/<table>.csv
    match: dict = field(default_factory=dict)   # column (or tuple of alternatives) -> value
    column: tuple[str, ...] = ("mean",)          # first existing column holds the value
    label: str = ""                  # e.g. "lstm_cnn, occlusion"


@dataclass(frozen=True)
class PublishedValue:
    key: str
    section: str                     # report section the number belongs to
    quantity: str                    # what was measured, in words
    paper: str                       # full citation
    where: str                       # table / section / figure in the paper
    data: str                        # what the paper computed it on
    ours: OurValue
    value: float | None = None       # None: not verified (see module docstring); fractions, not %
    source: str | None = None        # where the value was read in the paper
    model: str = ""                  # the paper's model
    printed: str = ""                # the number as the paper prints it ("0.00007", "72%")

    @property
    def verified(self) -> bool:
        return self.value is not None and bool(self.source)

    @property
    def shown(self) -> str:
        """The published number for the report: as printed, else rounded."""
        return self.printed or f"{self.value:.3f}"


def _rank(method: str, model: str = "lstm_cnn", reference: str = "human") -> OurValue:
    # Goyal et al. average over all pairs: the all-questions mean (constant maps score 0).
    return OurValue("rank_correlation", {"model": model, "method": method, "reference": reference},
                    ("mean_all_questions", "mean"), f"{model}, {method} vs {reference}")


def _goyal_table1(key: str, quantity: str, ours: OurValue, value: float, printed: str) -> PublishedValue:
    return PublishedValue(key, "rank_correlation", quantity, GOYAL, "Table 1, section 4.1", VQA_HAT,
                          ours, value=value, source="Table 1", model=LSTM_CNN, printed=printed)


HUMAN = OurValue("rank_correlation", {"model": "human", "method": "human", "reference": "human"},
                 ("mean_all_questions", "mean"), "simulated annotators vs each other")


def _gating(key: str, quantity: str, where: str, case: str, measure: str, value: float,
            printed: str, source: str) -> PublishedValue:
    return PublishedValue(
        key, "gating", quantity, UMMETTUGULI, where, VQA_IMAGES,
        OurValue("gating_score_correlation", {"model": "lstm_cnn", "case": case, "measure": measure},
                 ("mean",), f"lstm_cnn, {case.replace('_', ' ')}, mean {measure}"),
        value=value, source=source, model="Deeper LSTM Q + norm I, combine layer of 1024 neurons",
        printed=printed)


PUBLISHED: tuple[PublishedValue, ...] = (
    # Goyal et al. Table 1: mean Spearman rank correlation of |importance map| with the VQA-HAT
    # human attention maps at 16 x 16 (section 4.1). Our counterpart is lstm_cnn.
    _goyal_table1("goyal_table1_random", "rank correlation with human attention: random map",
                  _rank("random"), 0.00007, "0.00007"),
    _goyal_table1("goyal_table1_occlusion", "rank correlation with human attention: occlusion",
                  _rank("occlusion"), 0.07164, "0.07164"),
    _goyal_table1("goyal_table1_guided_backprop",
                  "rank correlation with human attention: guided backpropagation",
                  _rank("guided_backprop"), 0.12277, "0.12277"),
    _goyal_table1("goyal_table1_human", "rank correlation between humans (inter-annotator agreement)",
                  HUMAN, 0.62289, "0.62289"),
    # Section 4.1's text: an explicit attention model on the same data; our attention model is MLB.
    PublishedValue("goyal_san_attention", "rank_correlation",
                   "rank correlation of a learned attention model's map with human attention",
                   GOYAL, "section 4.1 (text)", VQA_HAT, _rank("attention", "mlb"),
                   value=-0.08836, source="section 4.1, paragraph after Table 1", model=SAN,
                   printed="-0.08836"),
    # Section 4.2: predicting the model's success or failure from answer flips under occlusion.
    PublishedValue("goyal_failure_prediction", "failure_prediction",
                   "accuracy of predicting whether the answer is wrong from occlusion answer flips",
                   GOYAL, "section 4.2", VQA_VAL,
                   OurValue("failure_prediction",
                            {"model": "lstm_cnn", ("feature_set", "features"): "flip_count"},
                            ("accuracy", "cv_accuracy"), "lstm_cnn, flip count alone"),
                   value=0.72, source="section 4.2, last paragraph (\"accurately 72% of the times\")",
                   model=LSTM_CNN, printed="72%"),
    # Ummettuguli Tables 5-6: Spearman between the dA/dq vectors of two questions about one image
    # that have the same answer ("white", "green"). Ours: the same-answer question pairs.
    *(_gating(f"ummettuguli_table{t}_{pair}", f"Spearman of the neuron scores of two same-answer "
              f"questions: {label}", f"Table {t}", "same_answer_pairs", "spearman", value, printed,
              f"Table {t}, row '{label}'")
      for t, pair, label, value, printed in (
          (5, "sink_towels", "sink / towels (Fig. 27)", 0.860921, "0.860921"),
          (5, "trees_grass", "trees / grass (Fig. 78)", 0.932396, "0.932396"),
          (5, "toilets_wall", "toilets / wall (Fig. 84)", 0.812344, "0.812344"),
          (6, "cake_balloons", "cake / balloons (Fig. 10)", 0.896294, "0.896294"),
          (6, "phone_top", "phone / top (Fig. 93)", 0.872120, "0.872120"))),
    # Tables 1-4 print the top-10 neuron indices; the overlap of two columns is counted from them
    # and given as a Jaccard index (shared / union), the measure of our table.
    _gating("ummettuguli_table1_same_question", "top-10 neuron overlap (Jaccard), same question on "
            "two images: 'What is the man doing?', Figs. 20 and 25", "Table 1",
            "same_question_different_images", "top10_jaccard", 10 / 10, "10 of 10 indices shared",
            "counted from Table 1's two index columns"),
    _gating("ummettuguli_table2_same_question", "top-10 neuron overlap (Jaccard), same question on "
            "two images: 'What is the man doing?', Figs. 23 and 24", "Table 2",
            "same_question_different_images", "top10_jaccard", 8 / 12, "8 of 10 indices shared",
            "counted from Table 2's two index columns"),
    _gating("ummettuguli_table3_different_questions", "top-10 neuron overlap (Jaccard), two questions "
            "on one image: 'Where are they looking?' / 'What is the woman doing?', Fig. 20", "Table 3",
            "different_questions_same_image", "top10_jaccard", 2 / 18, "2 of 10 indices shared",
            "counted from Table 3's two index columns"),
    _gating("ummettuguli_table4_different_questions", "top-10 neuron overlap (Jaccard), two questions "
            "on one image: 'What color is the cake?' / 'What color are the balloons?', Fig. 10",
            "Table 4", "different_questions_same_image", "top10_jaccard", 2 / 18,
            "2 of 10 indices shared", "counted from Table 4's two index columns"),
)


def for_section(section: str, entries=None) -> list[PublishedValue]:
    return [p for p in (PUBLISHED if entries is None else entries) if p.section == section]
