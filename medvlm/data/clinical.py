"""The phantom's clinical rules (AJCC staging, the elective-neck rule, record sampling) and records CSV I/O.

A record (:class:`medvlm.vocabulary.ClinicalRecord`) is one row of the records table (``Number, Unit No,
Subsite, ... Remark, Laterality, HPV, Elective neck``). The rules here make the phantom's cases and its
evaluation's expectations; reports are never read with them (:mod:`medvlm.text.parse` reads what the text says).
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from medvlm.errors import DatalistError
from medvlm.vocabulary import (
    CSV_COLUMNS,
    LATERAL_SUBSITES,
    N_STAGES,
    ORAL_CAVITY_SUBSITES,
    OROPHARYNX_SUBSITES,
    SUBSITES,
    T_STAGES,
    ClinicalRecord,
)

MIDLINE_SUBSITES = ("base of tongue", "larynx", "nasopharynx")  # the phantom draws these primaries midline
SURGICAL_SUBSITES = ("oral tongue", "larynx", "hypopharynx")  # sites where adjuvant (postoperative) RT occurs

# Greatest tumour dimension (mm) drawn per T stage. AJCC uses 2 and 4 cm cut-offs; T4 is defined by
# invasion of a neighbour, not by size, so its range overlaps T3.
T_SIZE_RANGE_MM = {"T1": (10.0, 19.0), "T2": (22.0, 38.0), "T3": (42.0, 54.0), "T4": (36.0, 58.0)}
# Greatest node dimension (mm). N1 <= 3 cm, N2 nodes <= 6 cm, N3 > 6 cm.
N_NODE_SIZE_RANGE_MM = {"N1": (12.0, 28.0), "N2": (12.0, 34.0), "N3": (62.0, 70.0)}

def ajcc8_stage(subsite: str, t: str, n: str, m: str, hpv: str) -> str:
    """AJCC 8th edition clinical stage group, simplified.

    Simplifications (documented in docs/data.md): T4a/T4b and N2a-c are not distinguished; p16-positive
    oropharynx uses the HPV-mediated table (I-IV); nasopharynx its own table; other sites the common
    oral cavity/larynx/hypopharynx table (N3 -> IVB, M1 -> IVC).
    """
    if subsite in OROPHARYNX_SUBSITES and hpv == "positive":
        if m == "M1":
            return "IV"
        if t == "T4" or n == "N3":
            return "III"
        if t == "T3" or n == "N2":
            return "II"
        return "I"
    if subsite == "nasopharynx":
        if m == "M1":
            return "IVB"
        if t == "T4" or n == "N3":
            return "IVA"
        if t == "T3" or n == "N2":
            return "III"
        if t == "T2" or n == "N1":
            return "II"
        return "I"
    if m == "M1":
        return "IVC"
    if n == "N3":
        return "IVB"
    if t == "T4" or n == "N2":
        return "IVA"
    if t == "T3" or n == "N1":
        return "III"
    if t == "T2":
        return "II"
    return "I"


def elective_levels(record: ClinicalRecord) -> dict[str, tuple[str, ...]]:
    """Neck levels of the elective nodal target per side (``{"left": (...), "right": (...)}``).

    Levels II-III for N0, II-IV when node-positive, plus Ib for the oral cavity. The side comes from the
    record's ``Elective neck`` field, which carries the physician's decision (not visible on CT).
    """
    levels: tuple[str, ...] = ("II", "III") if record.icn == "N0" else ("II", "III", "IV")
    if record.subsite in ORAL_CAVITY_SUBSITES:
        levels = ("Ib",) + levels
    if record.elective_neck == "bilateral" or record.laterality == "midline":
        return {"left": levels, "right": levels}
    return {record.laterality: levels}


@dataclass
class NodePlan:
    """One involved lymph node: side, level, greatest dimension and whether it has a necrotic centre."""

    side: str
    level: str
    size_mm: float
    necrotic: bool


@dataclass
class DiseasePlan:
    """What the image must show for a record: hidden details the record does not spell out."""

    tumour_size_mm: float
    t4_invasion: str = ""  # "mandible", "cartilage", "skull base", "midline" or ""
    nodes: list[NodePlan] = field(default_factory=list)
    physician_bilateral: bool = False  # elective neck made bilateral by decision, not by a rule
    age_years: int = 60
    sex: str = "male"


def required_elective_side(subsite: str, laterality: str, nodes: Sequence[NodePlan], n_stage: str) -> str:
    """The side the rules force: bilateral for midline sites, contralateral nodes or N3."""
    if subsite in MIDLINE_SUBSITES or laterality == "midline" or n_stage == "N3":
        return "bilateral"
    if any(node.side != laterality for node in nodes):
        return "bilateral"
    return "ipsilateral"


def _choice(rng: np.random.Generator, options: Sequence, p: Sequence[float] | None = None):
    return options[int(rng.choice(len(options), p=p))]


def sample_record(rng: np.random.Generator, number: int, unit_no: str) -> tuple[ClinicalRecord, DiseasePlan]:
    """Draw one clinically consistent record and the disease plan the phantom draws from it."""
    subsite = _choice(rng, SUBSITES, p=(0.2, 0.24, 0.14, 0.18, 0.1, 0.14))
    laterality = _choice(rng, ("left", "right")) if subsite in LATERAL_SUBSITES else "midline"
    t = _choice(rng, T_STAGES, p=(0.24, 0.34, 0.24, 0.18))
    n = _choice(rng, N_STAGES, p=(0.34, 0.26, 0.3, 0.1))
    m = "M1" if rng.random() < 0.05 else "M0"
    if subsite in OROPHARYNX_SUBSITES:
        hpv = "positive" if rng.random() < 0.7 else "negative"
    else:
        hpv = "unknown" if rng.random() < 0.8 else "negative"
    if subsite == "nasopharynx":
        pathology = "non-keratinizing carcinoma"
    else:
        pathology = "basaloid squamous cell carcinoma" if rng.random() < 0.08 else "squamous cell carcinoma"

    if m == "M1":
        rt_aim = "palliative"
    elif subsite in SURGICAL_SUBSITES and t != "T4" and rng.random() < 0.3:
        rt_aim = "adjuvant"
    else:
        rt_aim = "definitive"

    lo, hi = T_SIZE_RANGE_MM[t]
    plan = DiseasePlan(tumour_size_mm=float(rng.uniform(lo, hi)))
    if t == "T4":
        plan.t4_invasion = {
            "oral tongue": "mandible", "tonsil": "midline", "hypopharynx": "cartilage", "base of tongue": "midline",
            "larynx": "cartilage", "nasopharynx": "skull base",
        }[subsite]
    plan.age_years = int(rng.integers(91, 96)) if rng.random() < 0.03 else int(rng.integers(38, 86))
    plan.sex = "male" if rng.random() < 0.75 else "female"

    ipsi = laterality if laterality != "midline" else _choice(rng, ("left", "right"))
    contra = "left" if ipsi == "right" else "right"
    if n == "N1":
        lo, hi = N_NODE_SIZE_RANGE_MM["N1"]
        plan.nodes.append(NodePlan(ipsi, "II", float(rng.uniform(lo, hi)), bool(rng.random() < 0.2)))
    elif n == "N2":
        lo, hi = N_NODE_SIZE_RANGE_MM["N2"]
        count = int(rng.integers(2, 4))
        with_contralateral = rng.random() < 0.4
        levels = ("II", "III", "II")
        for k in range(count):
            side = contra if (with_contralateral and k == count - 1) else ipsi
            plan.nodes.append(NodePlan(side, levels[k], float(rng.uniform(lo, hi)), bool(rng.random() < 0.3)))
    elif n == "N3":
        lo, hi = N_NODE_SIZE_RANGE_MM["N3"]
        plan.nodes.append(NodePlan(ipsi, "II", float(rng.uniform(lo, hi)), bool(rng.random() < 0.6)))

    elective = required_elective_side(subsite, laterality, plan.nodes, n)
    if elective == "ipsilateral" and rng.random() < 0.25:
        elective, plan.physician_bilateral = "bilateral", True

    if rt_aim == "palliative":
        chemo = "none"
    elif subsite == "nasopharynx" and t in ("T3", "T4") or (subsite == "nasopharynx" and n in ("N2", "N3")):
        chemo = "induction + concurrent cisplatin"
    else:
        stage_for_chemo = ajcc8_stage(subsite, t, n, m, hpv)
        advanced = stage_for_chemo in ("III", "IVA", "IVB") or n in ("N2", "N3")
        chemo = ("concurrent cetuximab" if rng.random() < 0.15 else "concurrent cisplatin") if advanced else "none"

    remarks = []
    if plan.t4_invasion:
        remarks.append(f"T4: invades {plan.t4_invasion}" if plan.t4_invasion != "midline" else "T4: crosses midline")
    if plan.physician_bilateral:
        remarks.append("MDT decision: bilateral elective neck")
    if any(node.necrotic for node in plan.nodes):
        remarks.append("necrotic node")
    if rt_aim == "adjuvant":
        remarks.append("postoperative, resected primary and neck dissection")
    record = ClinicalRecord(
        number=number, unit_no=unit_no, subsite=subsite, pathology=pathology, ict=t, icn=n, icm=m,
        pt=t if rt_aim == "adjuvant" else "", pn=n if rt_aim == "adjuvant" else "",
        pm=m if rt_aim == "adjuvant" else "", stage=ajcc8_stage(subsite, t, n, m, hpv), chemotherapy=chemo,
        rt_aim=rt_aim, remark="; ".join(remarks), laterality=laterality, hpv=hpv, elective_neck=elective,
    )
    return record, plan


def write_records_csv(records: Iterable[ClinicalRecord], path: str | os.PathLike) -> None:
    """Write records atomically (temporary file, then rename) with the reference study's column order."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS))
    writer.writeheader()
    for record in records:
        writer.writerow(record.to_row())
    from medvlm.data.io import atomic_write_bytes

    atomic_write_bytes(Path(path), buffer.getvalue().encode("utf-8"))


def read_records_csv(path: str | os.PathLike) -> list[ClinicalRecord]:
    """Read and validate a records CSV; errors name the file, the row and the field."""
    path = Path(path)
    if not path.is_file():
        raise DatalistError(f"records CSV not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatalistError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [column for column in CSV_COLUMNS if column not in header]
    if missing:
        raise DatalistError(f"{path}: missing column(s) {missing}; found {header}")
    records = []
    for row_number, row in enumerate(reader, start=2):  # row 1 is the header, as a spreadsheet shows it
        records.append(ClinicalRecord.from_row(row, source=str(path), row_number=row_number))
    numbers = [r.number for r in records]
    if len(set(numbers)) != len(numbers):
        raise DatalistError(f"{path}: duplicate values in column 'Number'")
    return records

