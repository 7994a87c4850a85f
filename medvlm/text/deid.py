"""De-identification of free clinical text: find identifiers (PHI) and redact or replace them.

Detection combines patterns (dates, phones, e-mail, URLs, IPs, identifiers, addresses, ages over 89),
document structure (header fields, titles such as Dr./Mr., credentials, signature blocks, relatives)
and a broad multi-locale names gazetteer (Faker's person providers). Names found once are propagated
to their other mentions in the same note. Nothing here knows the phantom's own name lists.

No maintained library fits: Presidio needs a spaCy model download (not allowed at run time here) and
philter's release is unmaintained; see ``eval/deid_eval.py`` for what they do that this does not.
Removed values are never logged; only counts by type are reported.
"""
from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from medvlm.errors import InputError

logger = logging.getLogger(__name__)

PHI_TYPES = ("NAME", "DATE", "AGE", "PHONE", "EMAIL", "ID", "ADDRESS", "INSTITUTION", "URL", "IP")
MAX_TEXT_CHARS = 1_000_000
POLICIES = ("redact", "surrogate")


@dataclass(frozen=True)
class Span:
    """A detected identifier: characters ``[start, end)`` of the input and its type."""

    start: int
    end: int
    type: str
    source: str = ""  # which rule found it (for debugging; never the value)


@dataclass
class DeidResult:
    """Clean text, counts by type and the spans (positions in the *input*) that were replaced."""

    text: str
    counts: dict[str, int] = field(default_factory=dict)
    spans: list[Span] = field(default_factory=list)

    def summary(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items())) or "no identifiers found"


# --------------------------------------------------------------------------------------------- patterns
_MONTHS = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
           r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
_ORD = r"(?:st|nd|rd|th)?"
_DATE_PATTERNS = [
    r"\b\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})\b",
    r"\b\d{4}[/.-]\d{1,2}[/.-]\d{1,2}\b",
    rf"\b\d{{1,2}}{_ORD}[ -](?:of\s+)?{_MONTHS}\.?,?[ -]\d{{2,4}}\b",
    rf"\b{_MONTHS}\.?\s+\d{{1,2}}{_ORD},?\s+\d{{4}}\b",
    rf"\b\d{{1,2}}{_ORD}\s+(?:of\s+)?{_MONTHS}\b",
    rf"\b{_MONTHS}\.?\s+\d{{1,2}}{_ORD}\b(?!\s*(?:mm|cm|%))",
    rf"\b{_MONTHS}\.?,?\s+\d{{4}}\b",
    rf"\b\d{{1,2}}[/.-]{_MONTHS}[/.-]\d{{2,4}}\b",
    r"\b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b",  # DICOM-style yyyymmdd
]
_DATE_RE = re.compile("|".join(f"(?:{p})" for p in _DATE_PATTERNS), re.IGNORECASE)
_AGE_RE = re.compile(
    r"\b(?:9\d|1[0-4]\d)\s*-?\s*(?:years?|yrs?|yo|y/o|y\.o\.?)(?:[- ]old)?(?!\w)"
    r"|\b(?:aged?|age:)\s*(?:9\d|1[0-4]\d)\b"
    r"|\b(?:9\d|1[0-4]\d)(?=\s*(?:M|F|male|female|man|woman)\b)",
    re.IGNORECASE,
)
_EMAIL_RE = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_URL_RE = re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"')]+", re.IGNORECASE)
_IP_RE = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"
                    r"|\b(?:[0-9a-f]{1,4}:){7}[0-9a-f]{1,4}\b", re.IGNORECASE)
_PHONE_RE = re.compile(r"(?<![\w/.-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,5}\)\s?)?\d{2,6}(?:[\s.-]\d{2,6}){1,3}(?!\s*(?:mm|cm|Gy|%|mg|ml|x\b))"
                       r"(?:\s*(?:ext\.?|x)\s*\d{1,5})?(?![\w/-]|\.\d)")
_SHORT_PHONE_RE = re.compile(r"\b(?:bleep|pager|ext\.?|extension|x)\s*[:#]?\s*(\d{3,6})\b", re.IGNORECASE)
_PHONE_CONTEXT = re.compile(r"(?:tel|phone|telephone|ph|mobile|mob|cell|fax|pager|bleep|ext|contact|call)\b\.?[\s:#]*$", re.IGNORECASE)
_ID_LABELS = (r"MRN|M\.R\.N\.|Unit\s*(?:No\.?|Number|#)|Hosp(?:ital)?\.?\s*(?:No\.?|Number|#|ID)|NHS\s*(?:No\.?|Number|#)?|"
              r"CHI(?:\s*No\.?)?|Patient\s*(?:ID|No\.?|Number|#)|Pt\.?\s*(?:ID|#)|ID|Acc(?:ession)?\.?\s*(?:No\.?|Number|#)?|"
              r"Case\s*(?:No\.?|#)|Record\s*(?:No\.?|Number|#)|Study\s*ID|SSN|Medicare\s*(?:No\.?)?|Insurance\s*(?:No\.?|ID)|"
              r"Member\s*ID|Account\s*(?:No\.?|#)|Encounter\s*(?:No\.?|#)|URN|UR\s*No\.?|Reg(?:istration)?\.?\s*No\.?|"
              r"Ref(?:erence)?\.?\s*(?:No\.?|#)?|Hosp|Trial\s*ID|Screen(?:ing)?\s*ID|Specimen\s*(?:No\.?|#)?|Lab\s*(?:No\.?|#)")
_ID_CONTEXT_RE = re.compile(rf"\b(?:{_ID_LABELS})\s*[:#.]?\s*(?:is\s+)?([A-Z0-9][A-Z0-9/-]{{2,}}(?:\s\d{{3,4}}){{0,2}})", re.IGNORECASE)
_ID_SHAPE_RE = re.compile(r"\b(?:[A-Z]{1,4}-?\d{5,}[A-Z]?|\d{3}-\d{2}-\d{4}|\d{7,12})\b")
_STREET_WORDS = (r"Road|Rd|Street|St|Avenue|Ave|Lane|Ln|Drive|Dr|Way|Close|Court|Ct|Boulevard|Blvd|Place|Pl|Crescent|"
                 r"Terrace|Square|Gardens|Grove|Parade|Walk|Row|Mews|Highway|Hwy|Parkway|Pkwy|Circle|Cir|Kingsway")
_POSTCODE = r"(?:[A-Z]{1,2}\d[A-Z\d]?\s*\d[A-Z]{2}|[A-Z]{2}\s+\d{5}(?:-\d{4})?|\d{5}(?:-\d{4})?)"
_ADDRESS_RE = re.compile(
    rf"\b\d{{1,5}}[A-Za-z]?,?\s+(?:[A-Z][a-z]+\s+){{0,3}}(?:{_STREET_WORDS})\b\.?"
    rf"(?:,?\s+(?:Apt|Unit|Flat|Suite)\s*\w+)?(?:,?\s+[A-Z][a-z]+(?:\s[A-Z][a-z]+)?)?(?:,?\s+{_POSTCODE})?"
    rf"|\b[A-Z]{{1,2}}\d[A-Z\d]?\s+\d[A-Z]{{2}}\b"
    rf"|\bP\.?O\.?\s*Box\s+\d+\b",
)
_INSTITUTION_WORDS = (r"Hospital|Infirmary|Medical[ \t]+Cent(?:er|re)|Cancer[ \t]+Cent(?:er|re)|Health[ \t]+(?:Cent(?:er|re)|System|Trust)|"
                      r"(?:Imaging|Diagnostic|Treatment|Rehabilitation|Dental|Eye|Heart|Surgical|Oncology|Radiotherapy)[ \t]+Cent(?:er|re)|"
                      r"Clinic|Institute|Radiotherapy\s+Unit|Oncology\s+Unit|Hospice|NHS\s+(?:Foundation\s+)?Trust|"
                      r"Healthcare|Medical\s+Group|Surgery|Practice|Polyclinic|Sanatorium|Cent(?:er|re)\s+for\s+[A-Z][a-z]+")
_CAP = r"(?:St\.?|Saint|[A-Z][\w'’.&-]*)"
_INSTITUTION_RE = re.compile(
    rf"\b(?:{_CAP}[ \t]+(?:(?:of|and|the|for|&)[ \t]+)?){{0,5}}(?:{_INSTITUTION_WORDS})\b(?:[ \t]+(?:of|for)[ \t]+[A-Z][\w'-]+(?:[ \t]+[A-Z][\w'-]+){{0,2}})?"
)

# A name token: Capitalised word, ALL-CAPS word or initial; particles allowed between tokens.
_NAME_TOKEN = r"(?:[A-Z][a-z]+(?:[-'’][A-Z]?[a-z]+)*|[A-Z]{2,}(?:[-'’][A-Z]+)*|Mc[A-Z][a-z]+|Mac[A-Z][a-z]+|O['’][A-Z][a-z]+|[A-Z]\.)"
_PARTICLE = r"(?:van|von|der|den|de|da|di|du|del|la|le|bin|binti|al|el|ten|ter)"
_NAME = rf"{_NAME_TOKEN}(?:[ \t]+(?:{_PARTICLE}[ \t]+)*{_NAME_TOKEN}){{0,3}}"  # never across lines
_TITLE_RE = re.compile(rf"\b(?:Dr|Mr|Mrs|Ms|Miss|Mx|Prof|Professor|Sister|Nurse|Sr)\b\.?\s+({_NAME})")
_FIELD_RE = re.compile(
    rf"(?im)(?:^|[|;,(]\s*|\s{{2,}}|(?<=[.!?])\s+)(?:patient(?:'s)?\s*name|patient|pt|name|surname|forename|first\s*name|last\s*name|"
    rf"referr(?:ing|ed\s+by)(?:\s+(?:physician|doctor|clinician|consultant))?|referred\s+by|requested\s+by|reported\s+by|dictated\s+by|"
    rf"signed\s+by|electronically\s+signed\s+by|authori[sz]ed\s+by|verified\s+by|transcribed\s+by|attending(?:\s+physician)?|"
    rf"consultant|radiologist|physician|surgeon|oncologist|clinician|cc|copy\s+to|next\s+of\s+kin|nok|gp|"
    rf"family\s+doctor|primary\s+care(?:\s+physician)?|pcp|author|from|to|seen\s+by|interpreter|witness)\s*[:\-]\s*"
    rf"(?:(?:Dr|Mr|Mrs|Ms|Miss|Prof)\.?\s+)?({_NAME}(?:,\s*{_NAME_TOKEN}(?:\s+{_NAME_TOKEN})?)?)"
)
_INLINE_FIELD_RE = re.compile(
    rf"\b(?i:referred\s+by|requested\s+by|reported\s+by|dictated\s+by|signed\s+by|seen\s+(?:with|by)|accompanied\s+by|"
    rf"reviewed\s+by|discussed\s+with|d/w|per|attending|under\s+the\s+care\s+of|c/o|documented\s+by|written\s+by|completed\s+by|"
    rf"prepared\s+by|entered\s+by|recorded\s+by|examined\s+by|operated\s+by|performed\s+by|supervised\s+by|assisted\s+by)\s+(?:(?:Dr|Mr|Mrs|Ms|Miss|Prof)\.?\s+)?({_NAME})"
)
# Strong labels that introduce a person even without a colon ("pt Jo Bloggs", "Name BLOGGS Jo").
_BARE_LABEL_RE = re.compile(
    rf"\b(?i:pt|patient|client|resident|service\s+user|participant|name|checked|prescriber|approved|"
    rf"checked\s+by|approved\s+by|prescribed\s+by|ordered\s+by)\b:?[ \t]+"
    rf"(?:(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?[ \t]+)?({_NAME_TOKEN}(?:[ \t]+(?:{_PARTICLE}[ \t]+)*{_NAME_TOKEN}){{1,3}})"
)
# An initial and a surname ("S. Mwangi", "J.R. Tolkien") is a name wherever it stands.
_INITIAL_SURNAME_RE = re.compile(r"(?<![A-Za-z.])((?:[A-Z]\.[ ]?){1,2}[A-Z][a-z]{2,}(?:[-'’][A-Z][a-z]+)?)")
_ROLE_RE = re.compile(
    rf"\b(?i:[Cc]hair|[Cc]oordinator|[Pp]hysicist|[Pp]harmacist|[Dd]ietitian|[Dd]ietician|[Tt]herapist|[Nn]urse|[Ss]ecretary|[Ss]cribe|"
    rf"[Rr]egistrar|SpR|SHO|FY[12]|[Rr]esident|[Ff]ellow|[Ii]ntern|[Cc]haplain|[Ss]ocial\s+worker|[Pp]hysio(?:therapist)?|SLP|"
    rf"[Rr]adiographer|[Dd]osimetrist|[Cc]aller|[Aa]uthor|[Hh]ygienist|[Dd]entist|[Cc]ounsell?or|[Pp]sychologist|[Nn]avigator|[Kk]ey\s+worker|"
    rf"[Cc]onsultant|[Ss]urgeon|[Oo]ncologist|[Rr]adiologist|[Pp]hysician|[Cc]linician|[Cc]lient|[Oo]utreach\s+nurse|[Mm]idwife|[Hh]ealth\s+visitor)"
    rf"\s*[:\-]?\s+(?:(?:Dr|Mr|Mrs|Ms|Miss|Prof)\.?\s+)?({_NAME})"
)
# A capitalised name right before an identifier label: "Jo Bloggs (MRN ...", "Jo Bloggs, DOB ..."
_NAME_BEFORE_ID_RE = re.compile(
    rf"({_NAME_TOKEN}(?:\s+(?:{_PARTICLE}\s+)*{_NAME_TOKEN}){{1,3}})\s*[(,;|-]\s*(?i:(?:{_ID_LABELS})\b|DOB\b|D\.O\.B|born\b|aged?\b|date\s+of\s+birth)"
)
_CAPS_LABEL_RE = re.compile(rf"\b(?:PATIENT|NAME|PT|SURNAME|RE|Re)\b:?\s+(?:(?:Mr|Mrs|Ms|Miss|Dr)\.?\s+)?({_NAME})")
_CAPS_COMMA_RE = re.compile(r"\b([A-Z][A-Z'’-]{1,}(?:\s[A-Z][A-Z'’-]+)?,\s*[A-Z][a-z]+(?:\s[A-Z][a-z]+)?)\b")
_CREDENTIAL_RE = re.compile(
    rf"\b({_NAME}),?\s+(?:MD|M\.D\.|DO|FRCR|FRCP|FRCS|FRCPC|FRCPath|FRANZCR|MRCP|MRCS|MBBS|MBChB|MB\s?BS|PhD|RN|NP|PA-C|DMD|DDS|BDS|MFDS|FDS|MDS|MSc|BSc|CNS|RGN|SLP|CCC-SLP|PharmD|RD|RTT|DCR)\b"
)
_RELATIVE_RE = re.compile(
    rf"\b(?:son|daughter|wife|husband|partner|mother|father|brother|sister|niece|nephew|carer|caregiver|friend|"
    rf"neighbou?r|grandson|granddaughter|spouse|sibling|aunt|uncle|cousin|guardian)(?:,)?\s+(?:is\s+|called\s+|named\s+)?({_NAME})"
)
_SALUTATION_RE = re.compile(rf"\b(?:Dear|Hi|Hello|Thanks|Thank\s+you|Regards|Cheers)\s*,?\s+(?:(?:Dr|Mr|Mrs|Ms|Miss|Prof)\.?\s+)?({_NAME})")
_SIGNOFF_RE = re.compile(r"(?im)^\s*(?:kind\s+regards|best\s+regards|regards|yours\s+sincerely|sincerely|yours\s+faithfully|"
                         r"best\s+wishes|many\s+thanks|with\s+thanks|thanks)\s*,?\s*$")
_SIGNATURE_LINE_RE = re.compile(rf"^\s*(?:(?:Dr|Mr|Mrs|Ms|Prof)\.?\s+)?({_NAME})\b")

# Capitalised words that are common in clinical notes and must not count as gazetteer names.
_STOPWORDS = frozenset("""
a an and the of in on at to for with from by as or but if no not yes is are was were be been this that these those there
left right bilateral midline patient patients plan impression findings conclusion recommendation history clinical indication
ct mri pet us xr cxr scan study exam examination report radiology department oncology radiotherapy chemotherapy surgery
neck head level levels node nodes nodal stage stages tumour tumor mass lesion primary biopsy histology pathology grade
dear kind regards thanks thank best yours sincerely note notes images image contact phone tel fax email date dob age sex
male female man woman mr mrs ms dr prof hospital clinic unit ward room bed theatre service team mdt board tumour
normal abnormal positive negative unknown none nil see also please review follow up follow-up discharge admission
admitted discharged seen reviewed referred requested reported signed dictated electronically verified attending
consultant registrar radiologist physician surgeon oncologist nurse specialist doctor gp
monday tuesday wednesday thursday friday saturday sunday january february march april may june july august september
october november december jan feb mar apr jun jul aug sep sept oct nov dec
oral tongue tonsil base larynx laryngeal hypopharynx nasopharynx oropharynx piriform sinus glottic supraglottic mandible
parotid cord brainstem spinal gtv ctv ptv oar dose gy fraction fractions cisplatin cetuximab carboplatin docetaxel
squamous cell carcinoma scc hpv p16 ebv ajcc tnm uicc definitive adjuvant palliative curative radical intent induction
concurrent weekly daily systemic therapy treatment technique imrt vmat proton volumetric arc
medical history social family drug allergies medications examination assessment diagnosis problem summary
background reason presenting complaint ent maxfax max fax speech language therapy dietitian dietician dental
general practice surgery center centre institute university college royal national regional district county
north south east west northern southern eastern western new old upper lower main st saint street road
md do frcr frcp frcs frcpc frcpath franzcr mrcp mrcs mbbs mbchb phd rn np bds mfds fds mds msc bsc cns rgn slp
id dob nhs mrn urn chi ssn rt crt imrt ng peg rig fees npc opc scc bot tps tors ed ae fna pet ptv ctv rtc pod sob
records bookings office services admissions reception pharmacy outpatients inpatients emergency ed icu theatres
restorative dentistry maxillofacial plastic ent otolaryngology audiology imaging nuclear medicine
""".split())


@functools.lru_cache(maxsize=1)
def name_gazetteer() -> tuple[frozenset, frozenset]:
    """First and last names from Faker's person providers across all its locales (Latin script only).

    About 17,000 first and 16,000 last names; words that are also common clinical or English words are
    used only together with another name-like token, never alone.
    """
    import importlib
    import pkgutil

    try:
        import faker.providers.person as person
    except ImportError:  # pragma: no cover - faker is a declared dependency
        logger.warning("faker is not installed: the names gazetteer is empty, only structural name rules apply")
        return frozenset(), frozenset()
    first: set[str] = set()
    last: set[str] = set()
    for module in pkgutil.iter_modules(person.__path__):
        try:
            provider = importlib.import_module(f"{person.__name__}.{module.name}").Provider
        except Exception:  # a locale module that fails to import is skipped, not fatal
            continue
        for attribute, target in (("first_names", first), ("first_names_male", first), ("first_names_female", first),
                                  ("last_names", last)):
            values = provider.__dict__.get(attribute, getattr(provider, attribute, None))
            if isinstance(values, dict):
                values = values.keys()
            if isinstance(values, (tuple, list, set, frozenset, type({}.keys()))):
                target.update(v for v in values if isinstance(v, str) and v.isascii() and len(v) > 1)
    return frozenset(first), frozenset(last)


@functools.lru_cache(maxsize=1)
def common_words() -> frozenset:
    """Ordinary lower-case words (the embedded MiniLM's whole-word vocabulary), to tell "Will" from "Gwendolyn"."""
    try:
        from medvlm.text.encoders import embedded_minilm_path

        vocab = (embedded_minilm_path() / "vocab.txt").read_text(encoding="utf-8").split()
    except Exception:  # without the vocabulary every gazetteer first name counts as ambiguous
        return frozenset(w.lower() for pair in name_gazetteer() for w in pair)
    return frozenset(w for w in vocab if w.isalpha() and w.islower())


def _is_name_like(token: str) -> bool:
    return bool(re.fullmatch(_NAME_TOKEN, token)) and token.lower() not in _STOPWORDS


def _clean_name_span(text: str, start: int, end: int) -> tuple[int, int] | None:
    """Trim a candidate name span: drop trailing stopwords/punctuation, refuse if nothing name-like remains."""
    tokens = list(re.finditer(r"[A-Za-z][A-Za-z'’.-]*", text[start:end]))
    while tokens and (tokens[-1].group().rstrip(".").lower() in _STOPWORDS):
        tokens.pop()
    while tokens and tokens[0].group().rstrip(".").lower() in _STOPWORDS:
        tokens.pop(0)
    if not tokens:
        return None
    s, e = start + tokens[0].start(), start + tokens[-1].end()
    if text[e - 1] == "." and not re.fullmatch(r"[A-Z]\.", text[s:e].split()[-1]):
        e -= 1
    return (s, e) if e > s else None


class Deidentifier:
    """Find and remove identifiers from clinical free text.

    Args:
        policy: ``"redact"`` replaces each identifier with a typed placeholder (``[NAME]``, ``[DATE]``, ...);
            ``"surrogate"`` replaces it with a consistent fake value (same input, same surrogate).
        shift_dates: with ``policy="surrogate"``, shift dates by a per-patient offset (keyed by
            ``patient_key`` through an HMAC of ``secret``) instead of replacing them, keeping intervals.
        secret: key for surrogates and date offsets; keep it private to keep them irreversible.

    Example:
        >>> Deidentifier().deidentify("Seen by Dr. Jane Doe on 03/04/2021.").text
        'Seen by Dr. [NAME] on [DATE].'
    """

    def __init__(self, policy: str = "redact", *, shift_dates: bool = False, secret: str = "medvlm",
                 max_shift_days: int = 365):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.shift_dates = shift_dates
        self.secret = secret.encode("utf-8")
        self.max_shift_days = int(max_shift_days)

    # ------------------------------------------------------------------ detection
    def detect(self, text: str) -> list[Span]:
        """Identifier spans in ``text``, non-overlapping and sorted."""
        candidates: list[Span] = []
        add = candidates.append
        for m in _URL_RE.finditer(text):
            add(Span(m.start(), m.end() - len(m.group()) + len(m.group().rstrip(".,;:")), "URL", "url"))
        for m in _EMAIL_RE.finditer(text):
            add(Span(m.start(), m.end(), "EMAIL", "email"))
        for m in _IP_RE.finditer(text):
            add(Span(m.start(), m.end(), "IP", "ip"))
        for m in _DATE_RE.finditer(text):
            add(Span(m.start(), m.end(), "DATE", "date"))
        for m in _AGE_RE.finditer(text):
            add(Span(m.start(), m.end(), "AGE", "age"))
        for m in _ID_CONTEXT_RE.finditer(text):
            value = m.group(1)
            if re.search(r"\d", value):
                add(Span(m.start(1), m.end(1), "ID", "id-context"))
        for m in _ID_SHAPE_RE.finditer(text):
            add(Span(m.start(), m.end(), "ID", "id-shape"))
        for m in _PHONE_RE.finditer(text):
            digits = re.sub(r"\D", "", m.group())
            context = bool(_PHONE_CONTEXT.search(text[max(0, m.start() - 20):m.start()]))
            if 9 <= len(digits) <= 15 or (context and len(digits) >= 5):
                add(Span(m.start(), m.end(), "PHONE", "phone"))
        for m in _SHORT_PHONE_RE.finditer(text):
            add(Span(m.start(1), m.end(1), "PHONE", "phone-extension"))
        for m in _ADDRESS_RE.finditer(text):
            add(Span(m.start(), m.end(), "ADDRESS", "address"))
        for m in _INSTITUTION_RE.finditer(text):
            span = self._trim_institution(text, m.start(), m.end())
            if span:
                add(Span(*span, "INSTITUTION", "institution"))
        candidates.extend(self._names(text))
        return self._resolve(text, candidates)

    @staticmethod
    def _trim_institution(text: str, start: int, end: int) -> tuple[int, int] | None:
        words = text[start:end].split()
        # a name does not run across a sentence end or through a code with digits ("cT1N0M0. Surgery planned")
        cut = max((k + 1 for k, w in enumerate(words[:-1])
                   if (w.endswith((".", ":", ";")) and w.rstrip(".") not in ("St", "Mt")) or any(c.isdigit() for c in w)),
                  default=0)
        for word in words[:cut]:
            start = text.index(word, start) + len(word)
        words = words[cut:]
        # generic departments ("Department of Radiology") are not identifying; a bare keyword neither
        while words and words[0].lower() in {"the", "a", "at", "from", "to", "of", "and", "department", "dept"}:
            start = text.index(words[0], start) + len(words[0])
            words = words[1:]
        if len(words) < 2:
            return None
        keywords = {"hospital", "infirmary", "medical", "center", "centre", "cancer", "health", "clinic", "institute",
                    "unit", "hospice", "nhs", "trust", "foundation", "healthcare", "group", "surgery", "practice",
                    "polyclinic", "system", "radiotherapy", "oncology", "for"}
        if all(w.lower().strip(".,") in _STOPWORDS or w.lower().strip(".,") in keywords for w in words):
            return None  # "Head and Neck Oncology Clinic": a service, not a named institution
        start = text.index(words[0], start)
        return start, end

    def _names(self, text: str) -> list[Span]:
        found: list[Span] = []
        for regex, source in ((_TITLE_RE, "title"), (_FIELD_RE, "field"), (_INLINE_FIELD_RE, "inline-field"),
                              (_CAPS_COMMA_RE, "caps-comma"), (_CAPS_LABEL_RE, "caps-label"), (_ROLE_RE, "role"), (_BARE_LABEL_RE, "bare-label"), (_INITIAL_SURNAME_RE, "initial-surname"),
                              (_NAME_BEFORE_ID_RE, "before-id"), (_CREDENTIAL_RE, "credential"), (_RELATIVE_RE, "relative"),
                              (_SALUTATION_RE, "salutation")):
            for m in regex.finditer(text):
                span = _clean_name_span(text, m.start(1), m.end(1))
                if span and any(_is_name_like(t) for t in re.findall(r"[A-Za-z][A-Za-z'’-]*", text[span[0]:span[1]])):
                    found.append(Span(*span, "NAME", source))
        found.extend(self._signatures(text))
        found.extend(self._gazetteer_names(text))
        found.extend(self._propagate(text, found))
        return found

    @staticmethod
    def _signatures(text: str) -> Iterable[Span]:
        for m in _SIGNOFF_RE.finditer(text):
            rest = text[m.end():]
            line = re.match(r"\s*\n?([^\n]*)", rest)
            if not line:
                continue
            offset = m.end() + line.start(1)
            sig = _SIGNATURE_LINE_RE.match(line.group(1))
            if sig:
                span = _clean_name_span(text, offset + sig.start(1), offset + sig.end(1))
                if span:
                    yield Span(*span, "NAME", "signature")

    @staticmethod
    def _gazetteer_names(text: str) -> Iterable[Span]:
        first, last = name_gazetteer()
        common = common_words()
        tokens = list(re.finditer(r"\b[A-Z][a-z]+(?:[-'’][A-Z]?[a-z]+)*\b|\b[A-Z]{2,}\b", text))
        for a, b in zip(tokens, tokens[1:]):
            between = text[a.end():b.start()]
            if between not in (" ", "  "):
                continue
            wa, wb = a.group(), b.group()
            if wa.lower() in _STOPWORDS or wb.lower() in _STOPWORDS:
                continue
            wa_t, wb_t = wa.capitalize() if wa.isupper() else wa, wb.capitalize() if wb.isupper() else wb
            if (wa_t in first and (wb_t in last or wb_t in first)) or (wa_t in last and wb_t in first and "," in between):
                yield Span(a.start(), b.end(), "NAME", "gazetteer")
            elif wa_t in first and wa.lower() not in common and not wb.isupper():
                # a first name that is not also an ordinary word, followed by a capitalised word
                yield Span(a.start(), b.end(), "NAME", "gazetteer-first")

    @staticmethod
    def _propagate(text: str, names: list[Span]) -> Iterable[Span]:
        """Other mentions of tokens of names already found (e.g. 'Mr Okafor' ... 'Okafor')."""
        tokens = set()
        for span in names:
            for token in re.findall(r"[A-Za-z][A-Za-z'’-]+", text[span.start:span.end]):
                if len(token) >= 3 and token.lower() not in _STOPWORDS:
                    tokens.add(token)
        initials = set()
        for span in names:
            words = [w for w in re.findall(r"[A-Za-z][A-Za-z'’-]*", text[span.start:span.end]) if w.lower() not in _STOPWORDS]
            if len(words) >= 2:
                initial = "".join(w[0].upper() for w in words[:3])
                # "MD" is a credential, not Mei Dubois; "II" or "IV" is a neck level, not Ivan Ivanova
                if initial.lower() not in _STOPWORDS and not re.fullmatch(r"[IVX]+", initial):
                    initials.add(initial)
        for initial in initials:
            for m in re.finditer(rf"(?<![\w.]){initial}(?![\w.])", text):
                yield Span(m.start(), m.end(), "NAME", "initials")
        for token in tokens:
            for m in re.finditer(rf"(?<![\w]){re.escape(token)}(?![\w])", text, flags=re.IGNORECASE if token.isupper() else 0):
                yield Span(m.start(), m.end(), "NAME", "propagated")

    @staticmethod
    def _resolve(text: str, spans: list[Span]) -> list[Span]:
        """Keep non-overlapping spans: longer first; for equal length, the more specific type."""
        priority = {"URL": 0, "EMAIL": 1, "IP": 2, "ADDRESS": 3, "DATE": 4, "AGE": 5, "PHONE": 6, "INSTITUTION": 7,
                    "ID": 8, "NAME": 9}
        chosen: list[Span] = []
        taken = [False] * (len(text) + 1)
        for span in sorted(spans, key=lambda s: (-(s.end - s.start), priority[s.type], s.start)):
            if span.end <= span.start or any(taken[span.start:span.end]):
                continue
            chosen.append(span)
            for i in range(span.start, span.end):
                taken[i] = True
        return sorted(chosen, key=lambda s: s.start)

    # ------------------------------------------------------------------ replacement
    def deidentify(self, text: str, *, patient_key: str | None = None) -> DeidResult:
        """Return the clean text, counts by type and the replaced spans."""
        text = check_text(text)
        spans = self.detect(text)
        pieces, cursor = [], 0
        for span in spans:
            pieces.append(text[cursor:span.start])
            pieces.append(self._replacement(text[span.start:span.end], span.type, patient_key))
            cursor = span.end
        pieces.append(text[cursor:])
        counts = dict(Counter(s.type for s in spans))
        logger.debug("de-identified text: %s", counts)  # counts only, never values
        return DeidResult("".join(pieces), counts, spans)

    def _digest(self, *parts: str) -> int:
        message = "\x1f".join(parts).encode("utf-8")
        return int.from_bytes(hmac.new(self.secret, message, hashlib.sha256).digest()[:8], "big")

    def _replacement(self, value: str, kind: str, patient_key: str | None) -> str:
        if self.policy == "redact":
            return f"[{kind}]"
        if kind == "DATE":
            shifted = self._shift_date(value, patient_key) if self.shift_dates else None
            return shifted or "[DATE]"
        return _surrogate(kind, value, self._digest(kind, value.lower()))

    def _shift_date(self, value: str, patient_key: str | None) -> str | None:
        offset = self._digest("date-shift", patient_key or "") % (2 * self.max_shift_days + 1) - self.max_shift_days
        parsed = _parse_date(value)
        if parsed is None:
            return None
        date, fmt = parsed
        return (date + dt.timedelta(days=offset)).strftime(fmt)


_DATE_FORMATS = ("%d/%m/%Y", "%m/%d/%Y", "%d/%m/%y", "%m/%d/%y", "%Y-%m-%d", "%Y/%m/%d", "%d.%m.%Y", "%d-%m-%Y",
                 "%d %B %Y", "%d %b %Y", "%B %d, %Y", "%b %d, %Y", "%B %d %Y", "%d-%b-%Y", "%d-%b-%y", "%Y%m%d")


def _parse_date(value: str) -> tuple[dt.date, str] | None:
    cleaned = re.sub(r"(\d)(st|nd|rd|th)\b", r"\1", value.strip())
    for fmt in _DATE_FORMATS:
        try:
            return dt.datetime.strptime(cleaned, fmt).date(), fmt
        except ValueError:
            continue
    return None


def _surrogate(kind: str, value: str, seed: int) -> str:
    """A consistent fake value of the same kind (and roughly the same shape)."""
    from faker import Faker

    fake = Faker("en_GB")
    fake.seed_instance(seed)
    if kind == "NAME":
        parts = value.split()
        return fake.last_name() if len(parts) == 1 else f"{fake.first_name()} {fake.last_name()}"
    if kind == "ID":
        return "".join(str(fake.random_digit()) if c.isdigit() else (fake.random_uppercase_letter() if c.isalpha() else c) for c in value)
    if kind == "PHONE":
        return "".join(str(fake.random_digit()) if c.isdigit() else c for c in value)
    if kind == "EMAIL":
        return fake.email(domain="example.org")
    if kind == "URL":
        return f"https://example.org/{fake.lexify('????????')}"
    if kind == "IP":
        return f"192.0.2.{fake.random_int(1, 254)}"  # TEST-NET-1, never routable
    if kind == "ADDRESS":
        return fake.address().replace("\n", ", ")
    if kind == "INSTITUTION":
        return f"{fake.city()} General Hospital"
    if kind == "AGE":
        return "90+ years old"  # HIPAA: ages over 89 are aggregated
    return f"[{kind}]"


def check_text(text: str | bytes, *, what: str = "report") -> str:
    """Validate free text: UTF-8, not empty, not absurdly large; return it as ``str``."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{what}: not UTF-8 text (invalid byte at position {exc.start}); "
                             "re-encode it as UTF-8 first") from None
    if not isinstance(text, str):
        raise InputError(f"{what}: expected text, got {type(text).__name__}")
    if not text.strip():
        raise InputError(f"{what}: the text is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(f"{what}: {len(text)} characters exceeds the limit of {MAX_TEXT_CHARS}; "
                         "split the document or check that this is the right file")
    return text


def deidentify(text: str, *, policy: str = "redact", patient_key: str | None = None, **kwargs) -> DeidResult:
    """Convenience wrapper: ``Deidentifier(policy, **kwargs).deidentify(text, patient_key=...)``."""
    return Deidentifier(policy, **kwargs).deidentify(text, patient_key=patient_key)
