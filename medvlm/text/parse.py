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

from medvlm.vocabulary import (
    CHEMOTHERAPIES,
    COLUMN_ATTRIBUTES,
    ELECTIVE_NECK,
    HPV_STATUSES,
    LATERALITIES,
    M_STAGES,
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
    "oral tongue": ("oral tongue", "mobile tongue", "lateral border of the tongue", "lateral tongue border",
                    "lateral tongue", "anterior two-thirds of the tongue", "anterior tongue", "ventral tongue",
                    "hemiglossectomy", "partial glossectomy"),
    "tonsil": ("tonsillar fossa", "tonsillar pillar", "palatine tonsil", "tonsil", "tonsillar"),
    "larynx": ("supraglottic larynx", "glottic larynx", "supraglottis", "supraglottic", "transglottic", "glottis",
               "glottic", "subglottic", "true vocal cord", "vocal cord", "vocal fold", "false vocal cord", "epiglottis",
               "epiglottic", "laryngectomy", "larynx", "laryngeal"),
    "hypopharynx": ("piriform sinus", "piriform fossa", "pyriform sinus", "pyriform fossa", "postcricoid", "post-cricoid",
                    "post cricoid", "posterior hypopharyngeal wall", "hypopharynx", "hypopharyngeal"),
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


_SENTENCE_END_RE = re.compile(r"\.(?!\d)|\n")  # a full stop that is not a decimal point ("3.1 cm"), or a line end


def _sentence_around(text: str, start: int, end: int) -> tuple[str, int]:
    ends_before = [m.end() for m in _SENTENCE_END_RE.finditer(text, 0, start)]
    left = ends_before[-1] if ends_before else 0
    after = _SENTENCE_END_RE.search(text, end)
    right = after.start() if after else len(text)
    return text[left:right], left


# a side as reports write it: "left", "right-sided", "on the left", "predominantly right", the abbreviations "Lt",
# "rt.", and a capital "L" / "R" standing alone ("L tonsil", "(R) hemiglossectomy"; not "R0", "L4"); "midline"
# only as the tumour's position, not in "crossing the midline" / "not crossing midline" / "to the midline"
_SIDE_WORD_RE = re.compile(r"\b(left|right|lt|rt)(?:-sided)?\b\.?|(?-i:\b([LR])\b)(?!\.\w)|(?<!cross )(?<!crosses )(?<!crossing )(?<!crossing the )"
                           r"(?<!crosses the )(?<!cross the )(?<!beyond the )(?<!to the )(?<!past the )(?<!of the )"
                           r"(?<!beyond )(?<!across the )(?<!across )(?<!over the )\b(midline)\b", re.IGNORECASE)
# the neck, its nodes and levels carry sides that are not the primary's
_SIDE_OF = {"lt": "left", "l": "left", "rt": "right", "r": "right"}
# a primary without a side that spans both: "crossing the midline", "symmetric", "without lateral predominance"
_MIDLINE_EXTENT_RE = re.compile(r"\b(?:cross(?:es|ing)?|across)\s+(?:the\s+)?midline\b|\bsymmetric(?:al|ally)?\b"
                                r"(?!\s+(?:bilateral\s+)?(?:cervical\s+)?(?:level|node|nodes|nodal|adenopathy|lymph))|"
                                r"\b(?:without|no)\s+(?:any\s+)?lateral\s+predominance\b", re.IGNORECASE)
_NODAL_RE = re.compile(r"\b(?:node|nodes|nodal|adenopathy|lymphadenopathy|level|levels|neck|dissection)\b", re.IGNORECASE)
_PRIMARY_WORDS = r"(?:mass|lesion|tumou?r|primary|carcinoma|cancer|ulcer|thickening)"


def _sides_in(sentence: str) -> list[tuple[int, str]]:
    """(position, side) of every primary-side word in ``sentence`` that does not describe a node or the neck."""
    found = []
    for m in _SIDE_WORD_RE.finditer(sentence):
        after = sentence[m.end():m.end() + 25]
        if _NODAL_RE.match(after.strip()) or re.match(r"\s*(?:level|neck|node|retropharyngeal|cervical)", after, re.IGNORECASE):
            continue
        word = next(g for g in m.groups() if g).lower()
        found.append((m.start(), _SIDE_OF.get(word, word)))
    return found


def _laterality(text: str, subsite: str | None, start: int, end: int) -> str | None:
    """The primary's side as the text gives it, for any subsite (a "right base of tongue" is right); None when
    the text gives none. Looked for next to the first mention of the primary site, then next to any other
    mention of the primary."""
    if subsite is not None:
        sentence, offset = _sentence_around(text, start, end)
        sides = [(abs(position + offset - start), side) for position, side in _sides_in(sentence)]
        if sides:
            return min(sides)[1]
        for word in SUBSITE_SYNONYMS[subsite]:  # later mentions of the same site
            for m in re.finditer(rf"\b{re.escape(word)}\b", text, re.IGNORECASE):
                sentence, offset = _sentence_around(text, m.start(), m.end())
                sides = [(abs(position + offset - m.start()), side) for position, side in _sides_in(sentence)]
                if sides:
                    return min(sides)[1]
    # otherwise a side given next to a word for the primary tumour
    for m in re.finditer(rf"\b{_PRIMARY_WORDS}\b", text, re.IGNORECASE):
        sentence, offset = _sentence_around(text, m.start(), m.end())
        sides = [(abs(position + offset - m.start()), side) for position, side in _sides_in(sentence)
                 if abs(position + offset - m.start()) <= 60]
        if sides:
            return min(sides)[1]
    # no side anywhere: a primary described as symmetric or crossing the midline is a midline primary
    mentions = [(start, end)] if subsite is not None else []
    mentions += [m.span() for m in re.finditer(rf"\b{_PRIMARY_WORDS}\b", text, re.IGNORECASE)]
    for a, b in mentions:
        if _MIDLINE_EXTENT_RE.search(_sentence_around(text, a, b)[0]):
            return "midline"
    return None


# one TNM chain as reports write it: "T2N1M0", "cT2N2bM0", "pT3 N2a", "T4a N2c M0", "ypT2 ypN1", "rT2"
_PREFIX = r"(c|p|yp|r|y)?"
_TNM_CHAIN_RE = re.compile(
    rf"(?<![A-Za-z0-9]){_PREFIX}T([0-4])[a-d]?(?![0-9]|-weighted)"
    rf"(?:\s*,?\s*{_PREFIX}N([0-3])[a-c]?(?![0-9]))?(?:\s*,?\s*{_PREFIX}M([01])[a-c]?(?![0-9]))?")
_SINGLE_RE = {prefix: re.compile(rf"(?<![A-Za-z0-9]){_PREFIX}{prefix}([{limit}])[a-d]?(?![0-9]|-weighted|w\b)")
              for prefix, limit in (("T", "0-4"), ("N", "0-3"), ("M", "01"))}


def _tnm(text: str) -> dict[str, str | None]:
    """Clinical (c, or no prefix) and pathological (p, yp) T, N and M categories, sub-letters dropped; the
    first of each wins. A chain ("cT2N1M0", "pT3 N2a") gives its prefix to the letters that have none."""
    out: dict[str, str | None] = {"ict": None, "icn": None, "icm": None, "pt": None, "pn": None}

    def put(kind: str | None, key: str, value: str | None) -> None:
        kind = (kind or "c").lower()
        target = f"ic{key}" if kind in ("c", "r") else (f"p{key}" if kind in ("p", "yp", "y") and key != "m" else None)
        if value is not None and target and out.get(target) is None:
            out[target] = value

    covered = []
    for m in _TNM_CHAIN_RE.finditer(text):
        chain = m.group(1)
        put(chain, "t", f"T{m.group(2)}")
        put(m.group(3) or chain, "n", f"N{m.group(4)}" if m.group(4) else None)
        put(m.group(5) or chain, "m", f"M{m.group(6)}" if m.group(6) else None)
        covered.append(m.span())
    for prefix, pattern in _SINGLE_RE.items():  # categories outside a chain ("N2, M0" after a T elsewhere)
        for m in pattern.finditer(text):
            if not any(a <= m.start() < b for a, b in covered):
                put(m.group(1), prefix.lower(), f"{prefix}{m.group(2)}")
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


# "p16 immunohistochemistry negative", "HPV ISH positive", "p16 strongly and diffusely positive": the result
# within a few words of the test
_HPV_NEGATIVE = re.compile(r"hpv[- ]unrelated|hpv[- ]negative|p16[- ]negative|p16/hpv negative|p16\s*-(?![a-z0-9])|"
                           r"hpv\s*-(?![a-z0-9])|p16\s*\(-\)|hpv\s*\(-\)|(?:p16|hpv)\b[^.\n;,]{0,30}\bnegative\b")
_HPV_POSITIVE = re.compile(r"hpv[- ](?:associated|related|mediated|driven|positive)|p16[- ]positive|p16/hpv positive|"
                           r"p16\s*\+|hpv\s*\+|p16\s*\(\+\)|(?:p16|hpv)\b[^.\n;,]{0,30}\bpositiv(?:e|ity)\b")
_HPV_UNKNOWN = re.compile(r"(?:hpv|p16)[^.\n]{0,20}(?:not tested|unknown|not known|pending|not available|not performed|"
                          r"not done|awaited)")


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
        values = {(COLUMN_ATTRIBUTES.get(k, k)): (v or None) for k, v in record.items()}
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
