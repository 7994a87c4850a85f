"""Structured prompts: one standard wording of a case, so every model sees the same context layout.

Format (fields in this order, ``unknown`` where not stated)::

    head and neck cancer. primary: <side> <subsite>. histology: <pathology>, hpv <status>.
    stage: c<T> c<N> c<M>, ajcc8 <group>. treatment: <aim> radiotherapy, <chemotherapy>.
    elective neck: <ipsilateral|bilateral> levels <first>-<last>.

A record gives it directly; free text is normalised into it through :func:`medvlm.text.parse.parse_report`.
Zero-shot class prompts use the same vocabulary (see :func:`class_prompts`).
"""
from __future__ import annotations

from typing import Mapping

from medvlm.data.clinical import ClinicalRecord, elective_levels
from medvlm.text.deid import Deidentifier
from medvlm.text.parse import ParsedReport, parse_report, parsed_from_record

UNKNOWN = "unknown"


def _levels(parsed: ParsedReport) -> str:
    levels = parsed.elective_levels
    if not levels and parsed.icn and parsed.subsite and parsed.elective_neck and parsed.laterality:
        record = ClinicalRecord(number=0, unit_no="", subsite=parsed.subsite, pathology="", ict=parsed.ict or "T1",
                                icn=parsed.icn, icm=parsed.icm or "M0", laterality=parsed.laterality,
                                elective_neck=parsed.elective_neck)
        levels = next(iter(elective_levels(record).values()))
    return f" levels {levels[0]}-{levels[-1]}" if levels else ""


def structured_prompt(source: ClinicalRecord | ParsedReport | Mapping) -> str:
    """The standard prompt string of a record, parsed report or CSV-style row (lower case, no identifiers)."""
    parsed = source if isinstance(source, ParsedReport) else parsed_from_record(source)
    value = lambda x: x if x else UNKNOWN  # noqa: E731
    side = parsed.laterality if parsed.laterality in ("left", "right") else ""
    primary = f"{side} {parsed.subsite}".strip() if parsed.subsite else UNKNOWN
    elective = f"{parsed.elective_neck}{_levels(parsed)}" if parsed.elective_neck else UNKNOWN
    aim = f"{parsed.rt_aim} radiotherapy" if parsed.rt_aim else f"{UNKNOWN} radiotherapy"
    stage_tnm = " ".join(f"c{v}" if v else UNKNOWN for v in (parsed.ict, parsed.icn, parsed.icm))
    return (f"head and neck cancer. primary: {primary}. histology: {value(parsed.pathology)}, hpv {value(parsed.hpv)}. "
            f"stage: {stage_tnm}, ajcc8 {value(parsed.stage)}. treatment: {aim}, {value(parsed.chemotherapy)}. "
            f"elective neck: {elective}.")


def normalise_report(text: str, *, deidentify: bool = True) -> str:
    """Free-text report -> standard prompt. De-identifies first, so no identifier can leak into a field."""
    clean = Deidentifier().deidentify(text).text if deidentify else text
    return structured_prompt(parse_report(clean))


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
