"""Free-text CT neck reports rendered from a clinical record, with every identifier's span labelled.

Two template families: ``"train"`` phrasings for training and ``"heldout"`` phrasings, never seen in
training, so extraction and zero-shot classification are measured on unseen wording. Each rendered
identifier is recorded as a :class:`PhiSpan`, which makes phantom reports a labelled de-identification set.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from medvlm.data.clinical import DiseasePlan, elective_levels
from medvlm.vocabulary import ClinicalRecord
from medvlm.data.identifiers import SyntheticIdentity

REPORT_FAMILIES = ("train", "heldout")
from medvlm.text.deid import PHI_TYPES  # noqa: E402 - one definition of identifier types


@dataclass(frozen=True)
class PhiSpan:
    """Character span ``[start, end)`` of one identifier in a report, with its type."""

    start: int
    end: int
    type: str


@dataclass
class Report:
    """A rendered report: its text, the identifier spans in it, and the template family used."""

    text: str
    phi_spans: list[PhiSpan] = field(default_factory=list)
    family: str = "train"

    def phi_values(self) -> list[tuple[str, str]]:
        return [(s.type, self.text[s.start:s.end]) for s in self.phi_spans]


class _Builder:
    """Concatenates text while remembering where each identifier went."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.spans: list[PhiSpan] = []

    def __call__(self, text: str) -> "_Builder":
        self.parts.append(text)
        self.length += len(text)
        return self

    def phi(self, text: str, kind: str) -> "_Builder":
        assert kind in PHI_TYPES, kind
        self.spans.append(PhiSpan(self.length, self.length + len(text), kind))
        return self(text)

    def build(self, family: str) -> Report:
        return Report("".join(self.parts), self.spans, family)


# ----------------------------------------------------------------------------- clinical wording
_SUBSITE_WORDS = {
    "train": {"oral tongue": "oral tongue", "tonsil": "tonsil", "base of tongue": "base of tongue",
              "larynx": "larynx", "hypopharynx": "hypopharynx", "nasopharynx": "nasopharynx"},
    "heldout": {"oral tongue": "lateral border of the oral tongue", "tonsil": "tonsillar fossa",
                "base of tongue": "tongue base", "larynx": "glottic larynx", "hypopharynx": "piriform sinus of the hypopharynx",
                "nasopharynx": "nasopharyngeal wall (fossa of Rosenmuller)"},
}
_CHEMO_WORDS = {
    "train": {"none": "radiotherapy alone", "concurrent cisplatin": "concurrent cisplatin",
              "concurrent cetuximab": "concurrent cetuximab", "induction + concurrent cisplatin": "induction chemotherapy followed by concurrent cisplatin"},
    "heldout": {"none": "no systemic therapy", "concurrent cisplatin": "weekly cisplatin given concurrently",
                "concurrent cetuximab": "cetuximab alongside radiotherapy", "induction + concurrent cisplatin": "induction gemcitabine-cisplatin, then cisplatin with radiotherapy"},
}
_AIM_WORDS = {
    "train": {"definitive": "definitive", "adjuvant": "adjuvant (postoperative)", "palliative": "palliative"},
    "heldout": {"definitive": "radical, curative-intent", "adjuvant": "postoperative adjuvant", "palliative": "palliative, symptom-directed"},
}
_HPV_WORDS = {
    "train": {"positive": "p16/HPV positive", "negative": "p16/HPV negative", "unknown": "HPV status not tested"},
    "heldout": {"positive": "HPV-associated (p16+)", "negative": "HPV-unrelated (p16-)", "unknown": "HPV status unknown"},
}


def _date(d: dt.date, style: int) -> str:
    return (d.strftime("%d/%m/%Y"), d.strftime("%Y-%m-%d"), d.strftime("%d %B %Y"), d.strftime("%B %d, %Y").replace(" 0", " "),
            d.strftime("%d-%b-%Y"), d.strftime("%m/%d/%y"))[style]


def _age(identity: SyntheticIdentity) -> int:
    d, b = identity.exam_date, identity.date_of_birth
    return d.year - b.year - ((d.month, d.day) < (b.month, b.day))


def _levels_text(levels: tuple[str, ...], family: str) -> str:
    if family == "train":
        return f"levels {levels[0]}-{levels[-1]}"
    return f"levels {levels[0]} to {levels[-1]}"


def _side_phrase(record: ClinicalRecord) -> str:
    return f"{record.laterality} " if record.laterality in ("left", "right", "midline") else ""


# ----------------------------------------------------------------------------- headers and footers
def _header_train_a(b: _Builder, i: SyntheticIdentity, rng) -> None:
    b.phi(i.institution, "INSTITUTION")("\nDepartment of Radiology\n")
    b("Patient: ").phi(f"{i.first_name} {i.last_name}", "NAME")("    DOB: ").phi(_date(i.date_of_birth, 0), "DATE")
    b("    Unit No: ").phi(i.unit_no, "ID")("\n")
    b("Exam: CT neck with IV contrast    Date: ").phi(_date(i.exam_date, 0), "DATE")("\n")
    b("Referring physician: Dr. ").phi(f"{i.referrer_first} {i.referrer_last}", "NAME")("    Phone: ").phi(i.phone, "PHONE")("\n\n")


def _header_train_b(b: _Builder, i: SyntheticIdentity, rng) -> None:
    b("RADIOLOGY REPORT - ").phi(i.institution, "INSTITUTION")("\n")
    b("Name: ").phi(f"{i.last_name.upper()}, {i.first_name}", "NAME")(" | MRN: ").phi(i.unit_no, "ID")
    b(" | D.O.B. ").phi(_date(i.date_of_birth, 1), "DATE")("\n")
    b("Study date: ").phi(_date(i.exam_date, 1), "DATE")(" | Requested by: Dr ").phi(i.referrer_last, "NAME")("\n\n")


def _header_heldout_a(b: _Builder, i: SyntheticIdentity, rng) -> None:
    b.phi(i.institution, "INSTITUTION")(" - Head & Neck Imaging, ").phi(i.address, "ADDRESS")("\n")
    b("PATIENT ").phi(f"{i.first_name} {i.last_name}", "NAME")(" (hospital no. ").phi(i.unit_no, "ID")("), born ")
    b.phi(_date(i.date_of_birth, 2), "DATE")("\n")
    b("Examination performed on ").phi(_date(i.exam_date, 3), "DATE")(". Referred by ")
    b.phi(f"{i.referrer_first} {i.referrer_last}", "NAME")(", MD; tel ").phi(i.phone, "PHONE")(".\n\n")


def _header_heldout_b(b: _Builder, i: SyntheticIdentity, rng) -> None:
    title = "Mr" if i.sex == "male" else "Mrs"
    b(f"Re: {title} ").phi(f"{i.first_name} {i.last_name}", "NAME")("; DOB ").phi(_date(i.date_of_birth, 4), "DATE")
    b("; ID ").phi(i.unit_no, "ID")("\n")
    b("Dear Dr. ").phi(i.referrer_last, "NAME")(",\nThank you for referring this patient, seen with ")
    b("his" if i.sex == "male" else "her")(" ")
    b("son" if rng.random() < 0.5 else "daughter")(" ").phi(i.relative_first, "NAME")(", for staging CT of the neck on ")
    b.phi(_date(i.exam_date, 5), "DATE")(".\n\n")


def _footer_train(b: _Builder, i: SyntheticIdentity, rng) -> None:
    b("\nReported by: Dr. ").phi(f"{i.radiologist_first} {i.radiologist_last}", "NAME")(", Consultant Radiologist, ")
    b.phi(_date(i.exam_date, 0), "DATE")("\n")
    if rng.random() < 0.5:
        b("Contact: ").phi(i.email, "EMAIL")("\n")


def _footer_heldout(b: _Builder, i: SyntheticIdentity, rng) -> None:
    b("\nKind regards,\n").phi(f"{i.radiologist_first[0]}. {i.radiologist_last}", "NAME")(" MD FRCR\n")
    b.phi(i.institution, "INSTITUTION")(", ").phi(i.address, "ADDRESS")("\n")
    b("Images: ").phi(i.url, "URL")(" (workstation ").phi(i.ip_address, "IP")(")\n")


_HEADERS: dict[str, tuple[Callable, ...]] = {"train": (_header_train_a, _header_train_b), "heldout": (_header_heldout_a, _header_heldout_b)}
_FOOTERS: dict[str, tuple[Callable, ...]] = {"train": (_footer_train,), "heldout": (_footer_heldout,)}


# ----------------------------------------------------------------------------- body
def _history(b: _Builder, r: ClinicalRecord, i: SyntheticIdentity, family: str, rng) -> None:
    age = _age(i)
    person = "man" if i.sex == "male" else "woman"
    subsite = _SUBSITE_WORDS[family][r.subsite]

    def age_text():
        if age > 89:
            b.phi(f"{age}-year-old", "AGE")
        else:
            b(f"{age}-year-old")

    if family == "train":
        b("CLINICAL HISTORY: ")
        age_text()
        b(f" {person} with biopsy-proven {r.pathology} of the {_side_phrase(r)}{subsite}.")
    else:
        b("Indication: staging. ")
        age_text()
        b(f" {person}; histology shows {r.pathology} arising in the {subsite}")
        b(f", {r.laterality} side." if r.laterality != "midline" else " (midline).")
    if r.postoperative:
        neck = f"{r.laterality} neck dissection" if r.laterality != "midline" else "bilateral neck dissection"
        b(f" Status post resection of the primary and {neck}; pathological stage p{r.pt} p{r.pn}.")
    b("\n\n")


def _findings(b: _Builder, r: ClinicalRecord, p: DiseasePlan, family: str, rng, measurements: dict) -> None:
    subsite = _SUBSITE_WORDS[family][r.subsite]
    side = _side_phrase(r)
    size_mm = measurements.get("primary_greatest_dimension_mm", p.tumour_size_mm) or p.tumour_size_mm
    b("FINDINGS:\n" if family == "train" else "Findings\n")
    if r.postoperative:
        b("Postoperative changes at the primary site with flap reconstruction; no residual enhancing mass. " if family == "train"
          else "The resection bed is clean, without nodular enhancement to suggest residual tumour. ")
    elif family == "train":
        b(f"There is an enhancing mass centred on the {side}{subsite}, measuring {size_mm:.0f} mm in greatest dimension. ")
    else:
        b(f"A {size_mm / 10:.1f} cm avidly enhancing lesion involves the {subsite}"
          + (f" on the {r.laterality}. " if r.laterality != "midline" else ". "))
    if p.t4_invasion and not r.postoperative:
        invasion = {"mandible": "erodes the adjacent mandible", "cartilage": "invades the laryngeal cartilage",
                    "skull base": "extends into the skull base (clivus)", "midline": "crosses the midline"}[p.t4_invasion]
        b(f"The tumour {invasion}. " if family == "train" else f"Note that the mass {invasion}. ")

    sizes = measurements.get("node_sizes_mm", [n.size_mm for n in p.nodes])
    if r.postoperative:
        b("The dissected neck shows no recurrent adenopathy. " if family == "train" else "No nodal recurrence in the operated neck. ")
    elif not p.nodes:
        b("No pathologically enlarged cervical lymph nodes. " if family == "train" else "Cervical nodes are within normal limits in size and morphology. ")
    else:
        for k, (node, size) in enumerate(zip(p.nodes, sizes)):
            necrosis = " with central necrosis" if node.necrotic else ""
            if family == "train":
                b(f"{'An' if k == 0 else 'A further'} enlarged {node.side} level {node.level} lymph node measures {size:.0f} mm{necrosis}. ")
            else:
                b(f"Level {node.level} on the {node.side}: {size / 10:.1f} cm abnormal node{necrosis}. ")
    if r.icm == "M1":
        b("Multiple pulmonary nodules in the lung apices are consistent with metastases." if family == "train"
          else "Distant spread: lung apical nodules, in keeping with metastatic disease.")
    else:
        b("No distant metastases in the imaged field." if family == "train" else "Nothing to suggest distant spread within the field of view.")
    b("\n\n")


def _impression(b: _Builder, r: ClinicalRecord, family: str, rng) -> None:
    hpv = _HPV_WORDS[family][r.hpv]
    if family == "train":
        b(f"IMPRESSION:\n{_side_phrase(r).capitalize()}{_SUBSITE_WORDS[family][r.subsite]} {r.pathology}, "
          f"c{r.ict} c{r.icn} c{r.icm}, stage {r.stage} (AJCC 8th edition), {hpv}.\n\n")
    else:
        b(f"Conclusion\nClinical stage: T{r.ict[1:]}, N{r.icn[1:]}, M{r.icm[1:]} - stage group {r.stage}. {hpv}.\n\n")


def _plan(b: _Builder, r: ClinicalRecord, p: DiseasePlan, family: str, rng) -> None:
    aim = _AIM_WORDS[family][r.rt_aim]
    chemo = _CHEMO_WORDS[family][r.chemotherapy]
    levels = elective_levels(r)
    level_tuple = next(iter(levels.values()))
    if family == "train":
        b(f"PLAN:\n{aim.capitalize()} radiotherapy with {chemo}. ")
        if r.elective_neck == "bilateral":
            b(f"Elective nodal irradiation of the bilateral neck, {_levels_text(level_tuple, family)}.")
        else:
            b(f"Elective nodal irradiation of the ipsilateral ({r.laterality}) neck only, {_levels_text(level_tuple, family)}.")
        if p.physician_bilateral:
            b(" Bilateral neck treatment agreed at the MDT.")
    else:
        b(f"Recommendation\nIntent: {aim}. Systemic therapy: {chemo}. ")
        if r.elective_neck == "bilateral":
            b(f"Both sides of the neck will be treated electively ({_levels_text(level_tuple, family)}).")
        else:
            other = "right" if r.laterality == "left" else "left"
            b(f"Only the {r.laterality} neck is to be covered electively ({_levels_text(level_tuple, family)}); the {other} neck is spared.")
        if p.physician_bilateral:
            b(" Contralateral coverage reflects the tumour board's decision.")
    b("\n")


def render_report(record: ClinicalRecord, plan: DiseasePlan, identity: SyntheticIdentity, rng: np.random.Generator,
                  *, family: str = "train", measurements: dict | None = None) -> Report:
    """Render a free-text report (header with identifiers, history, findings, impression, plan, footer)."""
    if family not in REPORT_FAMILIES:
        raise ValueError(f"family must be one of {REPORT_FAMILIES}, got {family!r}")
    measurements = measurements or {}
    b = _Builder()
    headers = _HEADERS[family]
    headers[int(rng.integers(len(headers)))](b, identity, rng)
    _history(b, record, identity, family, rng)
    _findings(b, record, plan, family, rng, measurements)
    _impression(b, record, family, rng)
    _plan(b, record, plan, family, rng)
    footers = _FOOTERS[family]
    footers[int(rng.integers(len(footers)))](b, identity, rng)
    return b.build(family)
