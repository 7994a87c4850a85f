"""Report understanding, structured prompts and label vectors."""
from __future__ import annotations

import numpy as np
import pytest

from eval.deid_eval import NOTES_DIR
from eval.extraction_eval import evaluate
from medvlm.data.phantom import HNCPhantom
from medvlm.errors import InputError
from medvlm.text.annotations import parse_annotated
from medvlm.text.parse import LABEL_NAMES, FIELDS, label_vector, parse_report, parsed_from_record
from medvlm.text.prompts import class_prompts, normalise_report, structured_prompt


def test_heldout_template_family_accuracy_per_field():
    accuracy = evaluate(n_reports=300, family="heldout")
    assert set(accuracy) == set(FIELDS)
    assert min(accuracy.values()) >= 0.98, accuracy


def test_parses_a_hand_written_letter_it_was_not_written_for():
    text, _ = parse_annotated((NOTES_DIR / "01_clinic_letter.txt").read_text())
    parsed = parse_report(text)
    assert (parsed.subsite, parsed.laterality, parsed.ict, parsed.icn, parsed.icm) == ("tonsil", "left", "T2", "N1", "M0")
    assert parsed.hpv == "positive" and parsed.pathology == "squamous cell carcinoma"


def test_unstated_fields_are_none_not_guesses():
    parsed = parse_report("CT neck: no abnormality.")
    assert parsed.subsite is None and parsed.ict is None and parsed.elective_neck is None


def test_empty_report_is_an_error():
    with pytest.raises(InputError, match="empty"):
        parse_report("  ")


def test_normalised_free_text_equals_the_records_structured_prompt():
    phantom = HNCPhantom(seed=1)
    for family in ("train", "heldout"):
        for index in range(40):
            record, report = phantom.record_and_report(index, report_family=family)
            prompt = normalise_report(report.text)
            assert prompt == structured_prompt(record)
            assert record.unit_no not in prompt


def test_structured_prompts_parse_back_to_the_same_fields():
    """The pipelines parse the structured prompt (the segmentation decoder reads its fields); training parses
    the report: both must give the same label vector (an unread "elective neck: bilateral" did not)."""
    phantom = HNCPhantom(seed=0)
    for family in ("train", "heldout"):
        for index in range(40):
            record, report = phantom.record_and_report(index, report_family=family)
            parsed = parse_report(report.text)
            assert np.array_equal(label_vector(parse_report(structured_prompt(parsed))), label_vector(parsed)), index
            assert np.array_equal(label_vector(parsed), label_vector(record))


def test_structured_prompt_format():
    record, _ = HNCPhantom(seed=0).record_and_report(2)
    prompt = structured_prompt(record)
    assert prompt.startswith("head and neck cancer. primary: ")
    assert f"c{record.ict} c{record.icn} c{record.icm}" in prompt and f"elective neck: {record.elective_neck}" in prompt


def test_label_vectors_one_hot_per_group_and_shared_findings_match():
    phantom = HNCPhantom(seed=0)
    records = [phantom.record_and_report(i)[0] for i in range(30)]
    vectors = np.stack([label_vector(r) for r in records])
    assert vectors.shape == (30, len(LABEL_NAMES))
    assert np.all(vectors.sum(1) == 8)  # eight label groups, each one-hot
    same = parse_report(phantom.record_and_report(0)[1].text)
    assert np.array_equal(label_vector(same), vectors[0])
    assert label_vector(parse_report("no findings")).sum() == 0


def test_class_prompts_expand_names_and_keep_given_lists():
    prompts = class_prompts("laterality", ["left", "right"])
    assert len(prompts["left"]) > 1 and all("left" in p for p in prompts["left"])
    custom = class_prompts(None, {"bulky": ["a bulky tumour"], "small": "a small tumour"})
    assert custom == {"bulky": ["a bulky tumour"], "small": ["a small tumour"]}
    unseen = class_prompts("anything", ["perineural invasion"])
    assert "perineural invasion" in unseen["perineural invasion"][0]


def test_records_rows_parse_to_the_same_structure():
    record, _ = HNCPhantom(seed=0).record_and_report(5)
    from_row = parsed_from_record(record.to_row())
    assert all(getattr(from_row, f) == (getattr(record, f) or None) for f in FIELDS)
