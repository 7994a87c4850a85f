"""Synthetic patient identifiers for phantom reports and records.

They exist so that de-identification has something to remove. De-identification must never use
these lists: it is measured on text it was not written for.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

_FIRST_MALE = ("James", "Oliver", "Mohammed", "Wei", "Lars", "Diego", "Kwame", "Hiroshi", "Patrick", "Ivan",
               "Rajesh", "Tomasz", "Samuel", "Ahmed", "Luca", "George", "Arjun", "Mateo", "Elijah", "Nikolai")
_FIRST_FEMALE = ("Mary", "Aisha", "Mei", "Ingrid", "Lucia", "Ama", "Yuki", "Siobhan", "Olga", "Priya",
                 "Agnieszka", "Ruth", "Fatima", "Giulia", "Hannah", "Ananya", "Sofia", "Grace", "Chloe", "Zainab")
_LAST = ("Smith", "Okafor", "Nguyen", "Johansson", "Garcia", "Mensah", "Tanaka", "O'Brien", "Petrov", "Sharma",
         "Kowalski", "Cohen", "Haddad", "Rossi", "Williams", "Patel", "Fernandez", "Brown", "Ivanova", "MacLeod",
         "Van der Berg", "Kim", "Dubois", "Schneider", "Abubakar", "Lindqvist", "Costa", "Novak", "Murphy", "Chen")
_INSTITUTIONS = ("St. Aldhelm's Cancer Centre", "Northbridge University Hospital", "Riverside Oncology Institute",
                 "Royal Harbour Infirmary", "Kingsmoor General Hospital", "Eastfield Medical Center",
                 "Lakeshore Regional Hospital", "Hillcrest Radiotherapy Unit")
_STREETS = ("Station Road", "Harbour Street", "Elm Avenue", "Chapel Lane", "Kingsway", "Mill Road", "Oak Drive")
_TOWNS = ("Northbridge", "Kingsmoor", "Eastfield", "Riverside", "Lakeshore", "Hillcrest")


@dataclass
class SyntheticIdentity:
    """Everything identifying about one synthetic patient and encounter."""

    first_name: str
    last_name: str
    sex: str
    date_of_birth: dt.date
    unit_no: str
    exam_date: dt.date
    referrer_first: str
    referrer_last: str
    radiologist_first: str
    radiologist_last: str
    institution: str
    address: str
    phone: str
    email: str
    url: str
    ip_address: str
    relative_first: str


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_identity(rng: np.random.Generator) -> SyntheticIdentity:
    """Draw one synthetic identity (names, dates, numbers, institution) from ``rng``."""
    sex = "male" if rng.random() < 0.75 else "female"
    first = _pick(rng, _FIRST_MALE if sex == "male" else _FIRST_FEMALE)
    last = _pick(rng, _LAST)
    exam = dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3650)))
    birth = exam - dt.timedelta(days=int(rng.integers(38 * 365, 86 * 365)))
    unit_no = _pick(rng, ("U{:07d}", "MRN{:08d}", "{:08d}", "HN-{:06d}"))
    unit_no = unit_no.format(int(rng.integers(0, 10**6 if "HN" in unit_no else 10**7)))
    institution = _pick(rng, _INSTITUTIONS)
    town = _pick(rng, _TOWNS)
    postcode = f"{chr(65 + int(rng.integers(26)))}{chr(65 + int(rng.integers(26)))}{int(rng.integers(1, 20))} {int(rng.integers(1, 10))}{chr(65 + int(rng.integers(26)))}{chr(65 + int(rng.integers(26)))}"
    address = f"{int(rng.integers(1, 400))} {_pick(rng, _STREETS)}, {town} {postcode}"
    phone = _pick(rng, ("0{}{} {:03d} {:04d}", "({}{}0) {:03d}-{:04d}", "+44 {}{} {:03d} {:04d}"))
    phone = phone.format(int(rng.integers(1, 10)), int(rng.integers(0, 10)), int(rng.integers(100, 1000)), int(rng.integers(0, 10000)))
    ref_first, ref_last = _pick(rng, _FIRST_MALE + _FIRST_FEMALE), _pick(rng, _LAST)
    rad_first, rad_last = _pick(rng, _FIRST_MALE + _FIRST_FEMALE), _pick(rng, _LAST)
    domain = institution.lower().replace("st. ", "st").replace("'", "").split()[0] + ".nhs.example"
    email = f"{rad_first[0].lower()}.{rad_last.lower().replace(' ', '').replace(chr(39), '')}@{domain}"
    url = f"https://pacs.{domain}/viewer?study={int(rng.integers(10**8, 10**9))}"
    ip = f"10.{int(rng.integers(0, 256))}.{int(rng.integers(0, 256))}.{int(rng.integers(1, 255))}"
    return SyntheticIdentity(
        first_name=first, last_name=last, sex=sex, date_of_birth=birth, unit_no=unit_no, exam_date=exam,
        referrer_first=ref_first, referrer_last=ref_last, radiologist_first=rad_first, radiologist_last=rad_last,
        institution=institution, address=address, phone=phone, email=email, url=url, ip_address=ip,
        relative_first=_pick(rng, _FIRST_MALE + _FIRST_FEMALE),
    )
