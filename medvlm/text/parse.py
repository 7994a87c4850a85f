"""Report understanding: free-text CT neck report (or a records row) -> structured clinical fields.

Rule-based on purpose: every decision is inspectable and it needs no training data. Synonym lists
cover common wordings (e.g. "tongue base", "piriform sinus", "p16+", "both sides of the neck"); fields
that are not stated come back as ``None``. Also builds the label vectors used by MedCLIP-style
semantic matching and by evaluation.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Mapping

import numpy as np

from medvlm.data.clinical import (
    CHEMOTHERAPIES,
    ELECTIVE_NECK,
    HPV_STATUSES,
    LATERALITIES,
    M_STAGES,
    MIDLINE_SUBSITES,
    N_STAGES,
    PATHOLOGIES,
    RT_AIMS,
    STAGE_GROUPS,
    SUBSITES,
    T_STAGES,
    ClinicalRecord,
)
from medvlm.text.deid import check_text

# Longest, most specific wording first within each subsite; the earliest mention in the text wins.
SUBSITE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "base of tongue": ("base of tongue", "base of the tongue", "tongue base", "bot"),
    "oral tongue": ("oral tongue", "mobile tongue", "lateral border of the tongue", "lateral tongue",
                    "anterior two-thirds of the tongue", "ventral tongue"),
    "tonsil": ("tonsillar fossa", "tonsillar pillar", "palatine tonsil", "tonsil", "tonsillar"),
    "larynx": ("supraglottic larynx", "glottic larynx", "supraglottis", "supraglottic", "glottis", "glottic",
               "vocal cord", "larynx", "laryngeal"),
    "hypopharynx": ("piriform sinus", "piriform fossa", "pyriform sinus", "postcricoid", "hypopharynx", "hypopharyngeal"),
    "nasopharynx": ("fossa of rosenmuller", "fossa of rosenmüller", "nasopharyngeal", "nasopharynx"),
}
_SIDE_RE = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_SECTION_PLAN_RE = re.compile(r"(?im)^\s*(?:plan|recommendation|recommendations|management|treatment plan|rt plan)\b\s*:?")


@dataclass
class ParsedReport:
    """Structured fields read from one report; ``None`` where the report does not say."""

    subsite: str | None = None
    laterality: str | None = None
    ict: str | None = None
    icn: str | None = None
    icm: str | None = None
    pt: str | None = None
    pn: str | None = None
    stage: str | None = None
    pathology: str | None = None
    hpv: str | None = None
    chemotherapy: str | None = None
    rt_aim: str | None = None
    elective_neck: str | None = None
    elective_levels: tuple[str, ...] | None = None

    def as_dict(self) -> dict:
        return asdict(self)


FIELDS = ("subsite", "laterality", "ict", "icn", "icm", "pt", "pn", "stage", "pathology", "hpv", "chemotherapy",
          "rt_aim", "elective_neck")


def _first_subsite(text: str) -> tuple[str | None, int, int]:
    lowered = text.lower()
    best: tuple[int, int, str] | None = None
    for subsite, words in SUBSITE_SYNONYMS.items():
        for word in words:
            for m in re.finditer(rf"\b{re.escape(word)}\b", lowered):
                candidate = (m.start(), -len(word), subsite)
                if best is None or candidate < best:
                    best = candidate
                break
    if best is None:
        return None, -1, -1
    return best[2], best[0], best[0] - best[1]


def _sentence_around(text: str, start: int, end: int) -> tuple[str, int]:
    left = max(text.rfind(".", 0, start), text.rfind("\n", 0, start)) + 1
    stops = [i for i in (text.find(".", end), text.find("\n", end)) if i != -1]
    right = min(stops) if stops else len(text)
    return text[left:right], left


def _laterality(text: str, subsite: str | None, start: int, end: int) -> str | None:
    if subsite in MIDLINE_SUBSITES:
        return "midline"
    if subsite is None:
        return None
    sentence, offset = _sentence_around(text, start, end)
    sides = [(abs(m.start() + offset - start), m.group(1).lower()) for m in _SIDE_RE.finditer(sentence)]
    if sides:
        return min(sides)[1]
    # otherwise the side given closest to any later mention of the primary
    for m in re.finditer(r"\b(?:mass|lesion|tumou?r|primary)\b[^.\n]{0,60}?\b(left|right)\b|\b(left|right)\b[^.\n]{0,30}?\b(?:mass|lesion|tumou?r|primary)\b",
                         text, re.IGNORECASE):
        return (m.group(1) or m.group(2)).lower()
    return None


def _tnm(text: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {"ict": None, "icn": None, "icm": None, "pt": None, "pn": None}
    for prefix, key in (("T", "t"), ("N", "n"), ("M", "m")):
        limit = {"T": "0-4", "N": "0-3", "M": "01"}[prefix]
        pattern = re.compile(rf"(?<![A-Za-z0-9])(c|p|yp|r)?{prefix}([{limit}])[a-d]?(?![0-9]|-weighted|w\b)")
        for m in pattern.finditer(text):
            kind = (m.group(1) or "c").lower()
            value = f"{prefix}{m.group(2)}"
            target = f"i{'c'}{key}" if kind == "c" else (f"p{key}" if kind in ("p", "yp") and key != "m" else None)
            if target and out.get(target) is None:
                out[target] = value
    return out


def _stage(text: str) -> str | None:
    m = re.search(r"\bstage(?:\s+group)?\s*:?\s*(IV[ABC]?|III|II|I)(?![A-Za-z])", text, re.IGNORECASE)
    return m.group(1).upper() if m else None


def _pathology(lowered: str) -> str | None:
    if "basaloid" in lowered:
        return "basaloid squamous cell carcinoma"
    if re.search(r"non-?keratini[sz]ing|undifferentiated carcinoma|nasopharyngeal carcinoma", lowered):
        return "non-keratinizing carcinoma"
    if re.search(r"squamous cell carcinoma|\bscc\b", lowered):
        return "squamous cell carcinoma"
    return None


_HPV_NEGATIVE = re.compile(r"hpv[- ]unrelated|hpv[- ]negative|p16[- ]negative|p16/hpv negative|p16\s*-(?![a-z0-9])|"
                           r"hpv\s*-(?![a-z0-9])|p16\s*\(-\)|hpv\s*\(-\)")
_HPV_POSITIVE = re.compile(r"hpv[- ](?:associated|related|mediated|driven|positive)|p16[- ]positive|p16/hpv positive|"
                           r"p16\s*\+|hpv\s*\+|p16\s*\(\+\)")
_HPV_UNKNOWN = re.compile(r"hpv[^.\n]{0,20}(?:not tested|unknown|not known|pending|not available)")


def _hpv(lowered: str) -> str | None:
    if _HPV_NEGATIVE.search(lowered):
        return "negative"
    if _HPV_POSITIVE.search(lowered):
        return "positive"
    if _HPV_UNKNOWN.search(lowered):
        return "unknown"
    return None


def _plan_section(text: str) -> str:
    m = None
    for m in _SECTION_PLAN_RE.finditer(text):
        pass
    return text[m.start():] if m else text


def _chemotherapy(lowered_plan: str) -> str | None:
    if "induction" in lowered_plan and "cisplatin" in lowered_plan:
        return "induction + concurrent cisplatin"
    if "cetuximab" in lowered_plan:
        return "concurrent cetuximab"
    if "cisplatin" in lowered_plan or "carboplatin" in lowered_plan:
        return "concurrent cisplatin"
    if re.search(r"radiotherapy alone|no systemic therapy|no chemotherapy|without chemotherapy|rt alone|systemic therapy:\s*none", lowered_plan):
        return "none"
    return None


def _rt_aim(lowered: str, lowered_plan: str) -> str | None:
    if re.search(r"\bpalliative\b", lowered_plan):
        return "palliative"
    if re.search(r"\badjuvant\b|\bpost-?operative\b", lowered_plan) or re.search(r"status post resection|\bresected\b", lowered):
        return "adjuvant"
    if re.search(r"\bdefinitive\b|\bradical\b|\bcurative\b", lowered_plan):
        return "definitive"
    return None


def _elective_neck(lowered_plan: str) -> str | None:
    # "elective neck: bilateral levels II-IV" is the structured prompt's own wording (it must parse back)
    if re.search(r"bilateral neck|both sides of the neck|both necks|both sides|contralateral (?:neck|coverage)|bilateral elective|"
                 r"bilaterally|elective neck:? bilateral|bilateral levels?\b", lowered_plan):
        return "bilateral"
    if re.search(r"ipsilateral|unilateral|only the (?:left|right) neck|(?:left|right) neck only|neck is spared|spare the (?:left|right)", lowered_plan):
        return "ipsilateral"
    return None


def _levels(plan: str) -> tuple[str, ...] | None:
    m = re.search(r"levels?\s+(Ib|Ia|I|II|III|IV|V)\s*(?:-|–|to)\s*(Ib|Ia|I|II|III|IV|V)\b", plan)
    if not m:
        return None
    order = ["Ia", "Ib", "II", "III", "IV", "V"]
    a = m.group(1) if m.group(1) != "I" else "Ia"
    b = m.group(2)
    return tuple(order[order.index(a):order.index(b) + 1])


def parse_report(text: str) -> ParsedReport:
    """Read the structured fields of a report. Unknown fields are ``None``; nothing is guessed."""
    text = check_text(text)
    lowered = text.lower()
    subsite, start, end = _first_subsite(text)
    plan = _plan_section(text)
    lowered_plan = plan.lower()
    tnm = _tnm(text)
    return ParsedReport(
        subsite=subsite, laterality=_laterality(text, subsite, start, end), stage=_stage(text),
        pathology=_pathology(lowered), hpv=_hpv(lowered), chemotherapy=_chemotherapy(lowered_plan),
        rt_aim=_rt_aim(lowered, lowered_plan), elective_neck=_elective_neck(lowered_plan), elective_levels=_levels(plan),
        **tnm,
    )


def parsed_from_record(record: ClinicalRecord | Mapping) -> ParsedReport:
    """The same structure from a records row (``ClinicalRecord`` or a CSV-style mapping)."""
    if isinstance(record, Mapping):
        from medvlm.data.clinical import _ATTR_OF_COLUMN

        values = {(_ATTR_OF_COLUMN.get(k, k)): (v or None) for k, v in record.items()}
    else:
        values = {f.name: (getattr(record, f.name) or None) for f in fields(record)}
    return ParsedReport(**{name: values.get(name) for name in FIELDS})


# ----------------------------------------------------------------------------- label vectors
LABEL_SPACE: dict[str, tuple[str, ...]] = {
    "subsite": SUBSITES, "laterality": LATERALITIES, "ict": T_STAGES, "icn": N_STAGES, "icm": M_STAGES,
    "hpv": HPV_STATUSES, "elective_neck": ELECTIVE_NECK, "rt_aim": RT_AIMS,
}
LABEL_NAMES: tuple[str, ...] = tuple(f"{field}={value}" for field, values in LABEL_SPACE.items() for value in values)


def label_vector(parsed: ParsedReport | ClinicalRecord) -> np.ndarray:
    """Multi-hot vector over :data:`LABEL_NAMES` (one group per field; a group is all-zero if unknown).

    MedCLIP's semantic-matching loss uses the cosine similarity of these vectors as soft targets.
    """
    if isinstance(parsed, ClinicalRecord):
        parsed = parsed_from_record(parsed)
    vector = np.zeros(len(LABEL_NAMES), dtype=np.float32)
    offset = 0
    for field_name, values in LABEL_SPACE.items():
        value = getattr(parsed, field_name)
        if value in values:
            vector[offset + values.index(value)] = 1.0
        offset += len(values)
    return vector


def field_accuracy(truth: list[ParsedReport], predicted: list[ParsedReport]) -> dict[str, float]:
    """Per-field exact-match accuracy (``None`` counts as a miss unless the truth is also empty)."""
    scores = {}
    for name in FIELDS:
        pairs = [(getattr(t, name), getattr(p, name)) for t, p in zip(truth, predicted)]
        scores[name] = float(np.mean([(t or None) == (p or None) for t, p in pairs])) if pairs else float("nan")
    return scores


__all__ = ["ParsedReport", "parse_report", "parsed_from_record", "label_vector", "LABEL_NAMES", "LABEL_SPACE",
           "field_accuracy", "FIELDS", "SUBSITE_SYNONYMS", "CHEMOTHERAPIES", "PATHOLOGIES", "STAGE_GROUPS"]
