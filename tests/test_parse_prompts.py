"""Report understanding, structured prompts and label vectors."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from eval.deid_eval import NOTES_DIR
from eval.extraction_eval import evaluate
from medvlm.data.clinical import elective_levels
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
            # a record has no neck levels: the phantom's reports state the levels its rules chose
            levels = tuple(next(iter(elective_levels(record).values()))) if record.elective_neck else None
            assert prompt == structured_prompt(replace(parsed_from_record(record), elective_levels=levels))
            assert record.unit_no not in prompt


def test_a_side_given_for_any_subsite_is_kept_and_no_side_is_invented():
    cases = {
        "Enhancing mass in the right base of tongue, 3 cm.": ("base of tongue", "right"),
        "Exophytic lesion of the left true vocal cord, mobile cord.": ("larynx", "left"),
        "Nasopharyngeal carcinoma centred on the right lateral recess.": ("nasopharynx", "right"),
        "Midline tongue base tumour extending into both valleculae.": ("base of tongue", "midline"),
        "Right tonsillar carcinoma crossing the midline into the soft palate.": ("tonsil", "right"),
        "Base of tongue carcinoma with a left level II node.": ("base of tongue", None),
        "Supraglottic carcinoma. Bilateral level III nodes.": ("larynx", None),
    }
    for text, expected in cases.items():
        parsed = parse_report(text)
        assert (parsed.subsite, parsed.laterality) == expected, text


def test_sides_in_clinicians_shorthand_across_decimal_points_and_midline_extent():
    cases = {
        "Hx: Rt BOT SCC, p16+.": ("base of tongue", "right"),
        "FDG-avid lesion in the lt. palatine tonsil, 3.0 cm.": ("tonsil", "left"),
        "(R) hemiglossectomy for SCC, pT3 pN2b.": ("oral tongue", "right"),
        "Ulcerated lesion, L side of the oral tongue, 2.5 x 1.9 cm.": ("oral tongue", "left"),
        "A 4.2 cm enhancing tonsillar mass on the left, extending into the soft palate.": ("tonsil", "left"),
        "Glottic carcinoma, R0 resection planned. L4 vertebra normal.": ("larynx", None),  # not sides
        "Tonsillar carcinoma. Parotid_L spared.": ("tonsil", None),
        "Supraglottic carcinoma centred on the epiglottis, crossing the midline.": ("larynx", "midline"),
        "Nasopharyngeal tumour of the posterior wall, symmetric, without lateral predominance.": ("nasopharynx", "midline"),
        "Tonsillar carcinoma with symmetric bilateral level II nodes.": ("tonsil", None),  # the nodes are symmetric
    }
    for text, expected in cases.items():
        parsed = parse_report(text)
        assert (parsed.subsite, parsed.laterality) == expected, text


def test_tnm_in_compact_prefixed_and_edition_specific_forms():
    cases = {
        "Staging T2N1M0.": ("T2", "N1", "M0", None, None),
        "cT2N2bM0 (AJCC 7)": ("T2", "N2", "M0", None, None),
        "Pathology pT3 N2a, margins clear": (None, None, None, "T3", "N2"),
        "glottic carcinoma cT1a N0": ("T1", "N0", None, None, None),
        "after induction: ypT2 ypN1": (None, None, None, "T2", "N1"),
        "T4a N3b M0 (AJCC 8)": ("T4", "N3", "M0", None, None),
        "MR: T2-weighted hyperintensity of the left tonsil": (None, None, None, None, None),
    }
    for text, expected in cases.items():
        parsed = parse_report(text)
        assert (parsed.ict, parsed.icn, parsed.icm, parsed.pt, parsed.pn) == expected, text


def test_unstated_neck_levels_stay_out_of_the_prompt():
    parsed = parse_report("Left tonsil SCC cT2 cN1 cM0. Plan: radiotherapy to the ipsilateral neck.")
    prompt = structured_prompt(parsed)
    assert parsed.elective_neck == "ipsilateral" and parsed.elective_levels is None
    assert "elective neck: ipsilateral." in prompt and "levels" not in prompt
    stated = structured_prompt(parse_report("Left tonsil SCC. Plan: ipsilateral neck, levels II-IV."))
    assert "elective neck: ipsilateral levels II-IV." in stated


def test_real_wording_set_is_split_before_tuning_and_labelled_per_field():
    from eval.extraction_eval import REAL_FIELDS, load_real_reports, real_accuracy

    tune, heldout = load_real_reports(split="tune"), load_real_reports(split="heldout")
    assert len(tune) >= 20 and len(heldout) >= 20 and not {i["id"] for i in tune} & {i["id"] for i in heldout}
    scores, mistakes = real_accuracy(tune[:3])
    assert set(scores) == set(REAL_FIELDS) and all(0.0 <= v[0] <= 1.0 for v in scores.values() if v[1])


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
