"""The vocabulary every layer of medvlm shares: radiotherapy structure names, the clinical fields of a
head-and-neck case (subsites, sides, TNM, HPV, treatment, elective neck) and the records table's schema.

The lowest layer of the package: it imports nothing from medvlm but :mod:`medvlm.errors`, so the text
(:mod:`medvlm.text`), data (:mod:`medvlm.data`) and model (:mod:`medvlm.models`) layers all build on it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from medvlm.errors import DatalistError

# ----------------------------------------------------------------------------- structures
# Order is the channel order of every label volume and every segmentation output.
STRUCTURE_NAMES: tuple[str, ...] = (
    "GTVp", "GTVn", "CTVn", "SpinalCord", "Brainstem", "Parotid_L", "Parotid_R", "Bone_Mandible", "Larynx",
)
TARGET_NAMES: tuple[str, ...] = ("GTVp", "GTVn", "CTVn")
OAR_NAMES: tuple[str, ...] = ("SpinalCord", "Brainstem", "Parotid_L", "Parotid_R", "Bone_Mandible", "Larynx")

# RGB in 0..255, as RTSTRUCT ROIDisplayColor and preview overlays use them.
STRUCTURE_COLOURS: dict[str, tuple[int, int, int]] = {
    "GTVp": (255, 0, 0),
    "GTVn": (255, 128, 0),
    "CTVn": (255, 255, 0),
    "SpinalCord": (0, 255, 255),
    "Brainstem": (0, 128, 255),
    "Parotid_L": (0, 255, 0),
    "Parotid_R": (128, 255, 128),
    "Bone_Mandible": (255, 0, 255),
    "Larynx": (160, 32, 240),
}


# ----------------------------------------------------------------------------- clinical fields
SUBSITES = ("oral tongue", "tonsil", "base of tongue", "larynx", "hypopharynx", "nasopharynx")
LATERAL_SUBSITES = ("oral tongue", "tonsil", "hypopharynx")
OROPHARYNX_SUBSITES = ("tonsil", "base of tongue")
ORAL_CAVITY_SUBSITES = ("oral tongue",)

LATERALITIES = ("left", "right", "midline")
T_STAGES = ("T1", "T2", "T3", "T4")
N_STAGES = ("N0", "N1", "N2", "N3")
M_STAGES = ("M0", "M1")
HPV_STATUSES = ("positive", "negative", "unknown")
RT_AIMS = ("definitive", "adjuvant", "palliative")
CHEMOTHERAPIES = ("none", "concurrent cisplatin", "concurrent cetuximab", "induction + concurrent cisplatin")
ELECTIVE_NECK = ("ipsilateral", "bilateral")
PATHOLOGIES = ("squamous cell carcinoma", "basaloid squamous cell carcinoma", "non-keratinizing carcinoma")
STAGE_GROUPS = ("I", "II", "III", "IV", "IVA", "IVB", "IVC")
NECK_LEVELS = ("Ib", "II", "III", "IV")
# an elective nodal target (CTVn) holds the involved nodes (GTVn) with this margin, in soft tissue
NODE_MARGIN_MM = 5.0

CSV_COLUMNS = (
    "Number", "Unit No", "Subsite", "Pathology", "icT", "icN", "icM", "pT", "pN", "pM", "Stage",
    "Chemotherapy", "RT aim", "Remark", "Laterality", "HPV", "Elective neck",
)
COLUMN_ATTRIBUTES = {
    "Number": "number", "Unit No": "unit_no", "Subsite": "subsite", "Pathology": "pathology",
    "icT": "ict", "icN": "icn", "icM": "icm", "pT": "pt", "pN": "pn", "pM": "pm", "Stage": "stage",
    "Chemotherapy": "chemotherapy", "RT aim": "rt_aim", "Remark": "remark", "Laterality": "laterality",
    "HPV": "hpv", "Elective neck": "elective_neck",
}
# Allowed values per column; empty means free text. Postoperative columns may also be blank.
COLUMN_VOCABULARY = {
    "Subsite": SUBSITES, "icT": T_STAGES, "icN": N_STAGES, "icM": M_STAGES, "pT": T_STAGES + ("",),
    "pN": N_STAGES + ("",), "pM": M_STAGES + ("",), "Stage": STAGE_GROUPS, "RT aim": RT_AIMS,
    "Laterality": LATERALITIES, "HPV": HPV_STATUSES, "Elective neck": ELECTIVE_NECK,
}


@dataclass
class ClinicalRecord:
    """One case of the clinical table. ``unit_no`` is a (synthetic) identifier and must be de-identified
    before any text derived from the record reaches a model."""

    number: int
    unit_no: str
    subsite: str
    pathology: str
    ict: str
    icn: str
    icm: str
    pt: str = ""
    pn: str = ""
    pm: str = ""
    stage: str = ""
    chemotherapy: str = "none"
    rt_aim: str = "definitive"
    remark: str = ""
    laterality: str = "midline"
    hpv: str = "unknown"
    elective_neck: str = "bilateral"

    @property
    def postoperative(self) -> bool:
        return self.rt_aim == "adjuvant"

    def to_row(self) -> dict[str, str]:
        values = asdict(self)
        return {column: str(values[COLUMN_ATTRIBUTES[column]]) for column in CSV_COLUMNS}

    @classmethod
    def from_row(cls, row: dict[str, str], *, source: str = "<record>", row_number: int = 0) -> "ClinicalRecord":
        """Build a record from a CSV row, raising :class:`DatalistError` naming source, row and field."""
        where = f"{source}, row {row_number}"
        missing = [column for column in CSV_COLUMNS if column not in row]
        if missing:
            raise DatalistError(f"{where}: missing column(s) {missing}; expected columns {list(CSV_COLUMNS)}")
        clean = {column: (row[column] or "").strip() for column in CSV_COLUMNS}
        for column, allowed in COLUMN_VOCABULARY.items():
            if clean[column] not in allowed:
                raise DatalistError(
                    f"{where}, field {column!r}: unknown value {clean[column]!r}; allowed: {[a for a in allowed if a]}"
                )
        try:
            number = int(clean["Number"])
        except ValueError:
            raise DatalistError(f"{where}, field 'Number': {clean['Number']!r} is not an integer") from None
        kwargs = {COLUMN_ATTRIBUTES[c]: clean[c] for c in CSV_COLUMNS if c != "Number"}
        record = cls(number=number, **kwargs)
        if record.subsite in LATERAL_SUBSITES and record.laterality == "midline":
            raise DatalistError(f"{where}, field 'Laterality': a {record.subsite} case must be left or right")
        return record


def validate_record_fields(values: dict, *, where: str) -> None:
    """Check the fields present in a (possibly partial) record against the vocabulary."""
    for column, value in values.items():
        allowed = COLUMN_VOCABULARY.get(column)
        if allowed is not None and str(value).strip() not in allowed:
            raise DatalistError(f"{where}, field {column!r}: unknown value {value!r}; allowed: {[a for a in allowed if a]}")
