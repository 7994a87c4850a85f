"""Structured prompts: one standard wording of a case, so every model sees the same context layout.

Format (fields in this order, ``unknown`` where not stated)::

    head and neck cancer. primary: <left|right|midline> <subsite>. histology: <pathology>, hpv <status>.
    stage: c<T> c<N> c<M>, ajcc8 <group>. treatment: <aim> radiotherapy, <chemotherapy>.
    elective neck: <ipsilateral|bilateral> levels <first>-<last>.

A record gives it directly; free text goes through :func:`process_report`, the one path by which every model
of medvlm (training, the pipelines, evaluation) reads a report: de-identified and parsed once, and the
structured prompt, the text a text tower encodes and the parsed-field vector all come from that one parse.
Zero-shot class prompts use the same vocabulary (see :func:`class_prompts`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import numpy as np

from medvlm.vocabulary import ClinicalRecord
from medvlm.text.deid import Deidentifier
from medvlm.text.parse import FIELDS, ParsedReport, label_vector, parse_report, parsed_from_record

UNKNOWN = "unknown"


def _levels(parsed: ParsedReport) -> str:
    """Neck levels as the report states them; none are filled in for a report that does not."""
    levels = parsed.elective_levels
    return f" levels {levels[0]}-{levels[-1]}" if levels else ""


def structured_prompt(source: ClinicalRecord | ParsedReport | Mapping) -> str:
    """The standard prompt string of a record, parsed report or CSV-style row (lower case, no identifiers)."""
    parsed = source if isinstance(source, ParsedReport) else parsed_from_record(source)
    value = lambda x: x if x else UNKNOWN  # noqa: E731
    side = parsed.laterality if parsed.laterality in ("left", "right", "midline") else ""
    primary = f"{side} {parsed.subsite}".strip() if parsed.subsite else UNKNOWN
    elective = f"{parsed.elective_neck}{_levels(parsed)}" if parsed.elective_neck else UNKNOWN
    aim = f"{parsed.rt_aim} radiotherapy" if parsed.rt_aim else f"{UNKNOWN} radiotherapy"
    stage_tnm = " ".join(f"c{v}" if v else UNKNOWN for v in (parsed.ict, parsed.icn, parsed.icm))
    return (f"head and neck cancer. primary: {primary}. histology: {value(parsed.pathology)}, hpv {value(parsed.hpv)}. "
            f"stage: {stage_tnm}, ajcc8 {value(parsed.stage)}. treatment: {aim}, {value(parsed.chemotherapy)}. "
            f"elective neck: {elective}.")


REPORT_FORMATS = ("structured", "raw")


@dataclass(frozen=True)
class ProcessedReport:
    """A report as the models read it, parsed once: ``text`` de-identified, ``parsed`` its fields.

    ``prompt`` (the structured prompt), ``model_text(report_format)`` (what a text tower encodes) and ``fields``
    (:func:`medvlm.text.parse.label_vector`, the parsed-field input of the UNet and the segmentation decoder) are
    all derived from ``parsed``; no caller parses the text again.
    """

    text: str
    parsed: ParsedReport

    @property
    def prompt(self) -> str:
        return structured_prompt(self.parsed)

    def model_text(self, report_format: str = "structured") -> str:
        """The text a text tower encodes: the structured prompt, or (``"raw"``) the de-identified report."""
        if report_format not in REPORT_FORMATS:
            raise ValueError(f"report_format must be one of {REPORT_FORMATS}, got {report_format!r}")
        return self.prompt if report_format == "structured" else self.text

    @property
    def fields(self) -> np.ndarray:
        return label_vector(self.parsed)

    @property
    def reads_any_field(self) -> bool:
        """Whether any clinical field could be read (not so for another language, or identifiers only)."""
        return any(getattr(self.parsed, name) for name in FIELDS)


@lru_cache(maxsize=1)
def _default_deidentifier() -> Deidentifier:
    return Deidentifier()


def process_report(text: str, *, deidentifier: Deidentifier | bool | None = True) -> ProcessedReport:
    """De-identify (``deidentifier``: ``True`` the default redaction, an instance, or ``None``/``False`` for text
    that is already de-identified) and parse a report, once. De-identification comes first, so no identifier can
    reach a field or a prompt."""
    if deidentifier is True:
        deidentifier = _default_deidentifier()
    clean = deidentifier.deidentify(text).text if deidentifier else text
    return ProcessedReport(text=clean, parsed=parse_report(clean))


def process_record(record: ClinicalRecord | Mapping) -> ProcessedReport:
    """A case known only from its clinical record (a ``ClinicalRecord`` or a partial mapping of the records table's
    columns, e.g. imported with ``medvlm data import-dicom --records``) read as a report: its fields as parsed
    fields, its structured prompt as the text. Identifier columns (``Unit No``) never reach the prompt."""
    parsed = parsed_from_record(record)
    return ProcessedReport(text=structured_prompt(parsed), parsed=parsed)


def normalise_report(text: str, *, deidentify: bool = True) -> str:
    """Free-text report -> standard prompt (:func:`process_report`'s ``prompt``)."""
    return process_report(text, deidentifier=deidentify).prompt


CLASS_PROMPT_TEMPLATES: tuple[str, ...] = (
    "{}",
    "ct of the neck showing {}",
    "head and neck cancer, {}",
    "a report describing {}",
)
LABEL_SET_PHRASES: dict[str, dict[str, str]] = {
    "laterality": {"left": "a left-sided primary tumour", "right": "a right-sided primary tumour",
                   "midline": "a midline primary tumour"},
    "subsite": {s: f"a primary tumour of the {s}" for s in
                ("oral tongue", "tonsil", "base of tongue", "larynx", "hypopharynx", "nasopharynx")},
    "t_stage": {t: f"stage {t} primary tumour" for t in ("T1", "T2", "T3", "T4")},
    "n_stage": {n: f"nodal stage {n}" for n in ("N0", "N1", "N2", "N3")},
    "elective_neck": {"ipsilateral": "elective irradiation of one side of the neck",
                      "bilateral": "elective irradiation of both sides of the neck"},
}


def class_prompts(label_set: str | None, labels: list[str] | Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Prompt ensembles per class: given prompt lists are kept; bare names are expanded with templates."""
    if isinstance(labels, Mapping):
        return {name: list(prompts) if not isinstance(prompts, str) else [prompts] for name, prompts in labels.items()}
    phrases = LABEL_SET_PHRASES.get(label_set or "", {})
    return {name: [t.format(phrases.get(name, name)) for t in CLASS_PROMPT_TEMPLATES] for name in labels}


# Short label phrases for MedCLIP's text-label pairs in contrastive training (a phrase matches every CT
# and report carrying its label). Worded apart from the evaluation's class prompts above
# (LABEL_SET_PHRASES x CLASS_PROMPT_TEMPLATES), so zero-shot results use prompts never trained on.
TRAINING_LABEL_PHRASES: dict[str, tuple[str, ...]] = {
    "laterality": ("{} primary", "primary on the {} side", "{} sided cancer", "tumour of the {}"),
    "subsite": ("{} primary", "carcinoma of the {}", "{} cancer", "tumour arising in the {}"),
    "ict": ("{} tumour", "primary category {}", "{} disease at the primary"),
    "icn": ("{} neck", "neck category {}", "{} nodal disease"),
    "elective_neck": ("{} elective neck", "{} neck treatment", "elective nodes treated {}"),
}


def label_phrases(labels: np.ndarray, rng: np.random.Generator, count: int = 1) -> list[tuple[str, np.ndarray]]:
    """``count`` random (phrase, label vector) pairs for one case's label vector (:func:`label_vector`).

    Each phrase states one known field of the case (laterality, subsite, T, N or elective neck) and its
    label vector holds that field alone, so semantic matching treats it as partial agreement.
    """
    from medvlm.text.parse import LABEL_SPACE

    offsets, start = {}, 0
    for field_name, values in LABEL_SPACE.items():
        offsets[field_name] = (start, values)
        start += len(values)
    known = []
    for field_name in TRAINING_LABEL_PHRASES:
        begin, values = offsets[field_name]
        hits = np.flatnonzero(labels[begin:begin + len(values)] > 0)
        if hits.size:
            known.append((field_name, begin + int(hits[0]), values[int(hits[0])]))
    pairs = []
    for _ in range(count if known else 0):
        field_name, index, value = known[int(rng.integers(len(known)))]
        templates = TRAINING_LABEL_PHRASES[field_name]
        vector = np.zeros_like(labels, dtype=np.float32)
        vector[index] = 1.0
        pairs.append((templates[int(rng.integers(len(templates)))].format(value), vector))
    return pairs
