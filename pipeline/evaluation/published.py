"""The papers' published numbers that the report puts next to ours, one entry per number, each
with its citation (paper, table or section) and the data it was computed on.

Rule: a number goes in only once it has been checked against a copy of the paper, and
``source`` says where it was checked. An entry whose number could not be checked keeps
``value=None``; the report then prints "published value not verified" instead of a number.
A wrong published number in a reproduction report is worse than none: readers would take a
mismatch as a finding about the method.

One exception, labelled as such: a number the project's own design quotes from the paper
(``quoted_in``, e.g. DESIGN.md section 1) is shown as "quoted in ..., not checked against the
paper", so that a reader sees the target the project was built against and knows how far to
trust it. Checking it against the paper turns it into a verified entry (set ``source``).

Verification log (the stored copies of the papers available to this project when the entries
were written): the searchable copies of Goyal et al. (arXiv 1608.08974: arxiv-vanity, groundai)
and Das et al. (arXiv 1606.03556 / 1606.05589: arxiv-vanity, deepai) hold the title, abstract
and introduction only, not Table 1 nor the results sections, so none of the numbers below
could be checked yet. To add one: read it in the paper, fill ``value`` and ``source`` (the
exact location you read it at), and the report shows it.

``ours`` says where our counterpart lives: a table under ``reports/tables/``, the row (every
``match`` column equal to its value; a tuple of column names means "the first of these that
the table has") and the column (first of ``column`` that exists).
"""
from __future__ import annotations

from dataclasses import dataclass, field

GOYAL = ("Goyal, Mohapatra, Parikh, Batra. Towards Transparent AI Systems: Interpreting Visual "
         "Question Answering Models. arXiv:1608.08974, 2016")
DAS = ("Das, Agrawal, Zitnick, Parikh, Batra. Human Attention in Visual Question Answering: Do "
       "Humans and Deep Networks Look at the Same Regions? EMNLP 2016 (arXiv:1606.03556)")
VQA_HAT = "VQA v1 val questions with VQA-HAT human attention maps"
VQA = "VQA v1 val questions and answers"


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
    source: str | None = None        # where the value was checked against the paper
    quoted_in: str | None = None     # or: the project document quoting it (not checked)

    @property
    def verified(self) -> bool:
        return self.value is not None and bool(self.source)

    @property
    def quoted(self) -> bool:
        """Shown, but only as the project's design quotes it: not checked against the paper."""
        return self.value is not None and not self.source and bool(self.quoted_in)


def _rank(method: str, model: str = "lstm_cnn", reference: str = "human") -> OurValue:
    return OurValue("rank_correlation", {"model": model, "method": method, "reference": reference},
                    ("mean",), f"{model}, {method} vs {reference}")


PUBLISHED: tuple[PublishedValue, ...] = (
    # Goyal et al. Table 1: mean Spearman rank correlation of |importance map| with the VQA-HAT
    # human attention maps (section 4.1), for the Deeper LSTM + norm I model (our lstm_cnn).
    PublishedValue("goyal_table1_random", "rank_correlation",
                   "rank correlation with human attention: random map", GOYAL, "Table 1, section 4.1",
                   VQA_HAT, _rank("random")),
    PublishedValue("goyal_table1_occlusion", "rank_correlation",
                   "rank correlation with human attention: occlusion", GOYAL, "Table 1, section 4.1",
                   VQA_HAT, _rank("occlusion")),
    PublishedValue("goyal_table1_guided_backprop", "rank_correlation",
                   "rank correlation with human attention: guided backpropagation", GOYAL,
                   "Table 1, section 4.1", VQA_HAT, _rank("guided_backprop")),
    PublishedValue("goyal_table1_human", "rank_correlation",
                   "rank correlation between humans (inter-annotator agreement)", GOYAL,
                   "Table 1, section 4.1 (quoted from Das et al.)", VQA_HAT,
                   OurValue("rank_correlation", {"model": "human", "method": "human", "reference": "human"},
                            ("mean",), "simulated annotators vs each other")),
    # Das et al. (VQA-HAT), the rank-correlation table of section 5: human agreement, a random
    # baseline and attention models (SAN-2, HieCoAtt); our attention model is MLB.
    PublishedValue("das_hat_human", "rank_correlation",
                   "inter-human rank correlation of VQA-HAT maps", DAS,
                   "rank-correlation table, section 5", VQA_HAT,
                   OurValue("rank_correlation", {"model": "human", "method": "human", "reference": "human"},
                            ("mean",), "simulated annotators vs each other")),
    PublishedValue("das_hat_random", "rank_correlation",
                   "rank correlation of a random map with human attention", DAS,
                   "rank-correlation table, section 5", VQA_HAT, _rank("random", "mlb")),
    PublishedValue("das_hat_attention", "rank_correlation",
                   "rank correlation of learned attention (SAN-2, HieCoAtt) with human attention",
                   DAS, "rank-correlation table, section 5", VQA_HAT,
                   _rank("attention", "mlb")),
    # Goyal et al. section 4.2: predicting the model's failures from answer flips under occlusion.
    PublishedValue("goyal_failure_prediction", "failure_prediction",
                   "accuracy of predicting whether the answer is wrong from occlusion answer flips",
                   GOYAL, "section 4.2", VQA,
                   OurValue("failure_prediction",
                            {"model": "lstm_cnn", ("feature_set", "features"): "flips"},
                            ("accuracy", "cv_accuracy"), "lstm_cnn, flip features"),
                   value=0.72, quoted_in="DESIGN.md section 1 and issue 5 (\"72% in the paper\")"),
)


def for_section(section: str, entries=None) -> list[PublishedValue]:
    return [p for p in (PUBLISHED if entries is None else entries) if p.section == section]
