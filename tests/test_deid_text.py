"""Free-text de-identification: what is removed, what is kept, policies, and the measured recall targets."""
from __future__ import annotations

import logging
import re

import pytest

from eval.deid_eval import NOTES_DIR, evaluate_notes, evaluate_phantom
from medvlm.errors import InputError
from medvlm.text.deid import Deidentifier, deidentify

NOTE = """Patient: Oriel Quennevaux    DOB: 03/07/1948    MRN: ZX7720019
Seen on 12 March 2024 by Dr. Tamsin Okonkwo-Reyes at Fairhaven Cancer Centre, 9 Quarry Lane, Dunmore DN4 7QT.
He is a 95-year-old man; his daughter Philippa attended. Call 01632 960 455 or t.okonkwo@fairhaven.example.
Left tonsil SCC, cT2 N1 M0, 70 Gy in 35 fractions, bilateral elective neck levels II-IV. A 65-year-old brother.
"""


def test_redaction_replaces_each_identifier_with_a_typed_placeholder():
    result = deidentify(NOTE)
    for secret in ("Quennevaux", "Oriel", "03/07/1948", "ZX7720019", "12 March 2024", "Okonkwo-Reyes", "Tamsin",
                   "Fairhaven Cancer Centre", "9 Quarry Lane", "95-year-old", "Philippa", "01632 960 455",
                   "t.okonkwo@fairhaven.example"):
        assert secret not in result.text, secret
    for placeholder in ("[NAME]", "[DATE]", "[ID]", "[ADDRESS]", "[INSTITUTION]", "[AGE]", "[PHONE]", "[EMAIL]"):
        assert placeholder in result.text
    assert result.counts["NAME"] >= 3 and result.counts["DATE"] == 2


def test_clinical_content_and_ages_up_to_89_are_kept():
    clean = deidentify(NOTE).text
    for kept in ("Left tonsil SCC", "cT2 N1 M0", "70 Gy in 35 fractions", "levels II-IV", "65-year-old"):
        assert kept in clean


def test_spans_point_into_the_original_text():
    result = deidentify(NOTE)
    assert any(NOTE[s.start:s.end] == "ZX7720019" and s.type == "ID" for s in result.spans)


def test_surrogates_are_consistent_and_differ_from_the_original():
    deid = Deidentifier("surrogate")
    a = deid.deidentify("Seen by Dr. Tamsin Okonkwo today.").text
    b = deid.deidentify("Letter from Dr. Tamsin Okonkwo.").text
    name_a = re.search(r"Dr\. (.+?) today", a).group(1)
    assert "Okonkwo" not in a and name_a in b


def test_date_shift_keeps_intervals_within_a_patient():
    deid = Deidentifier("surrogate", shift_dates=True)
    out = deid.deidentify("Planning CT 01/03/2022, start 15/03/2022.", patient_key="p1").text
    dates = re.findall(r"\d{2}/\d{2}/\d{4}", out)
    assert len(dates) == 2 and dates != ["01/03/2022", "15/03/2022"]
    import datetime as dt

    d0, d1 = (dt.datetime.strptime(d, "%d/%m/%Y") for d in dates)
    assert (d1 - d0).days == 14
    other = deid.deidentify("Planning CT 01/03/2022.", patient_key="p2").text
    assert deid.deidentify("Planning CT 01/03/2022.", patient_key="p1").text != other


def test_names_without_any_gazetteer_entry_are_found_from_structure():
    text = "Reported by: Xyloqua Brntwhistle\nKind regards,\nZephyrine Vantablack\n"
    clean = deidentify(text).text
    assert "Xyloqua" not in clean and "Brntwhistle" not in clean and "Vantablack" not in clean


def test_removed_values_never_reach_the_logs(caplog):
    with caplog.at_level(logging.DEBUG, logger="medvlm"):
        deidentify(NOTE)
    assert "Quennevaux" not in caplog.text and "ZX7720019" not in caplog.text


@pytest.mark.parametrize("bad,message", [(b"\xff\xfe\x00bad", "not UTF-8"), ("   \n", "empty"), ("x" * 1_000_001, "exceeds")])
def test_bad_text_is_a_clear_error(bad, message):
    with pytest.raises(InputError, match=message):
        deidentify(bad)


def test_phantom_recall_meets_target():
    scores = evaluate_phantom(n_reports=100)
    assert scores.recall() >= 0.99
    assert scores.precision() >= 0.95


def test_hand_written_notes_recall_meets_target():
    scores = evaluate_notes(NOTES_DIR)
    assert sum(scores.gold.values()) > 100
    assert scores.recall() >= 0.95
    assert scores.precision() >= 0.9
