"""The phantom follows its specification (docs/data.md): determinism, anatomy, disease from the record, the elective-neck rule."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medvlm.data.clinical import MIDLINE_SUBSITES, ajcc8_stage, elective_levels, required_elective_side, sample_record
from medvlm.vocabulary import LATERAL_SUBSITES
from medvlm.data.phantom import HNCPhantom, PhantomConfig, greatest_dimension_mm
from medvlm.vocabulary import STRUCTURE_NAMES


@pytest.fixture(scope="module")
def cases(phantom):
    """A few hundred cases on the demo grid, generated once for the rule checks."""
    return [phantom.case(i) for i in range(240)]


def _world_x(case, mask):
    """Patient-frame left/right coordinate (mm, + = patient's right) of each voxel in ``mask``."""
    idx = np.argwhere(mask)
    world = idx @ case.affine[:3, :3].T + case.affine[:3, 3]
    return world[:, 0] - case.meta["shift_mm"][0]


def test_same_seed_and_index_give_identical_bytes():
    a = HNCPhantom(PhantomConfig(), seed=11).case(5)
    b = HNCPhantom(PhantomConfig(), seed=11).case(5)
    assert a.image_hu.tobytes() == b.image_hu.tobytes()
    assert a.labels.tobytes() == b.labels.tobytes()
    assert a.report.text == b.report.text
    assert a.record == b.record


def test_different_seeds_or_indices_give_different_cases():
    base = HNCPhantom(PhantomConfig(), seed=11)
    assert base.case(5).image_hu.tobytes() != base.case(6).image_hu.tobytes()
    assert base.case(5).image_hu.tobytes() != HNCPhantom(PhantomConfig(), seed=12).case(5).image_hu.tobytes()


def test_case_does_not_depend_on_generation_order():
    phantom = HNCPhantom(PhantomConfig(), seed=2)
    later = phantom.case(9).image_hu.copy()
    for i in range(3):
        phantom.case(i)
    assert np.array_equal(phantom.case(9).image_hu, later)


def test_intensities_are_hounsfield_units_of_the_right_tissues(phantom):
    case = phantom.case(0)
    image = case.image_hu
    assert image.dtype == np.float32 and image.shape == (64, 64, 64)
    assert image.min() >= -1024 and image.max() <= 3071
    assert np.median(image[0, 0, :]) < -900  # air in the corner
    mandible = case.mask("Bone_Mandible")
    assert np.median(image[mandible]) > 300  # bone
    cord = case.mask("SpinalCord")
    assert 0 < np.median(image[cord]) < 80  # soft tissue
    for name in ("Parotid_L", "Parotid_R"):
        assert -40 < np.median(image[case.mask(name)]) < 60


def test_labels_are_multilabel_with_tg263_names_and_all_organs_present(cases):
    for case in cases[:20]:
        assert case.label_names == STRUCTURE_NAMES
        assert case.labels.dtype == np.uint8 and case.labels.shape == (9, 64, 64, 64)
        for name in ("SpinalCord", "Brainstem", "Parotid_L", "Parotid_R", "Bone_Mandible", "Larynx", "CTVn"):
            assert case.mask(name).sum() > 20, (case.case_id, name)


def test_parotids_lie_on_their_named_side(cases):
    for case in cases[:20]:
        assert np.median(_world_x(case, case.mask("Parotid_R"))) > 20
        assert np.median(_world_x(case, case.mask("Parotid_L"))) < -20


def test_primary_tumour_is_inside_the_body_and_on_the_recorded_side(cases):
    checked = 0
    for case in cases:
        gtvp = case.mask("GTVp")
        if case.record.postoperative:
            assert not gtvp.any(), "a resected primary has no GTVp"
            continue
        assert gtvp.any(), case.case_id
        assert np.mean(case.image_hu[gtvp] > -300) > 0.97, "tumour voxels are tissue, not air"
        if case.record.subsite in LATERAL_SUBSITES:
            side = 1.0 if case.record.laterality == "right" else -1.0
            assert np.mean(_world_x(case, gtvp)) * side > 3.0, (case.case_id, case.record.laterality)
            checked += 1
    assert checked > 40


def test_tumour_size_follows_t_stage(cases):
    spacing = 3.0  # one voxel of measurement tolerance
    seen = set()
    for case in cases:
        if case.record.postoperative:
            continue
        size = greatest_dimension_mm(case.mask("GTVp"), case.spacing_mm)
        t = case.record.ict
        seen.add(t)
        if t == "T1":
            assert size <= 20 + spacing, (case.case_id, size)
        elif t == "T2":
            assert 20 - spacing <= size <= 40 + spacing, (case.case_id, size)
        elif t == "T3":
            assert size > 40 - spacing, (case.case_id, size)
        else:  # T4 invades a neighbour: bone/cartilage or across the midline
            crosses = (_world_x(case, case.mask("GTVp")) * (1 if case.record.laterality == "right" else -1) < -3).any()
            assert case.meta["primary_invades_bone"] or crosses, case.case_id
    assert seen == {"T1", "T2", "T3", "T4"}


def test_nodes_follow_n_stage(cases):
    for case in cases:
        gtvn = case.mask("GTVn")
        n = case.record.icn
        if case.record.postoperative or n == "N0":
            assert not gtvn.any(), case.case_id
            continue
        components = ndimage.label(gtvn)[1]
        planned = case.plan.nodes
        if n == "N1":
            assert len(planned) == 1 and components == 1 and planned[0].side in ("left", "right")
            assert greatest_dimension_mm(gtvn, case.spacing_mm) <= 30 + 3
            if case.record.laterality != "midline":
                assert planned[0].side == case.record.laterality
        elif n == "N2":
            assert len(planned) >= 2 and 1 <= components <= len(planned)
        else:
            assert greatest_dimension_mm(gtvn, case.spacing_mm) > 60 - 3, case.case_id


def test_ctvn_contains_gtvn_and_covers_exactly_the_elective_sides(cases):
    for case in cases:
        ctv, gtvn = case.mask("CTVn"), case.mask("GTVn")
        assert not (gtvn & ~ctv).any(), case.case_id
        x = _world_x(case, ctv & ~ndimage.binary_dilation(gtvn, iterations=3))
        right_ml, left_ml = (x > 5).sum() * 27e-3, (x < -5).sum() * 27e-3
        if case.record.elective_neck == "bilateral":
            assert right_ml > 5 and left_ml > 5, (case.case_id, right_ml, left_ml)
        else:
            ipsi, contra = (right_ml, left_ml) if case.record.laterality == "right" else (left_ml, right_ml)
            assert ipsi > 5 and contra == 0, (case.case_id, ipsi, contra)


def test_elective_neck_rule_on_many_records():
    physician, eligible = 0, 0
    for i in range(3000):
        rng = np.random.default_rng([5, i])
        record, plan = sample_record(rng, i + 1, "X")
        forced = required_elective_side(record.subsite, record.laterality, plan.nodes, record.icn)
        if record.subsite in MIDLINE_SUBSITES or record.icn == "N3" or any(n.side != record.laterality for n in plan.nodes):
            assert record.elective_neck == "bilateral"
            assert forced == "bilateral"
        else:
            eligible += 1
            physician += plan.physician_bilateral
            assert record.elective_neck == ("bilateral" if plan.physician_bilateral else "ipsilateral")
        levels = elective_levels(record)
        side_levels = next(iter(levels.values()))
        assert ("IV" in side_levels) == (record.icn != "N0")
        assert ("Ib" in side_levels) == (record.subsite == "oral tongue")
        assert record.stage == ajcc8_stage(record.subsite, record.ict, record.icn, record.icm, record.hpv)
        assert bool(record.pt) == (record.rt_aim == "adjuvant")
        assert (record.icm == "M1") == (record.rt_aim == "palliative")
    assert 0.18 < physician / eligible < 0.32  # "about a quarter of lateralised cases"


@pytest.mark.parametrize(
    "subsite,t,n,m,hpv,expected",
    [
        ("oral tongue", "T1", "N0", "M0", "unknown", "I"),
        ("larynx", "T3", "N0", "M0", "negative", "III"),
        ("hypopharynx", "T2", "N2", "M0", "negative", "IVA"),
        ("oral tongue", "T2", "N3", "M0", "negative", "IVB"),
        ("larynx", "T1", "N0", "M1", "negative", "IVC"),
        ("tonsil", "T2", "N1", "M0", "positive", "I"),
        ("tonsil", "T2", "N2", "M0", "positive", "II"),
        ("base of tongue", "T4", "N0", "M0", "positive", "III"),
        ("tonsil", "T2", "N1", "M0", "negative", "III"),
        ("nasopharynx", "T2", "N0", "M0", "unknown", "II"),
        ("nasopharynx", "T1", "N3", "M0", "unknown", "IVA"),
    ],
)
def test_ajcc8_stage_groups(subsite, t, n, m, hpv, expected):
    assert ajcc8_stage(subsite, t, n, m, hpv) == expected


def test_anisotropic_grids_work_and_keep_anatomy_in_millimetres():
    iso = HNCPhantom(PhantomConfig(), seed=4).case(1)
    aniso = HNCPhantom(PhantomConfig(shape=(96, 96, 32), spacing_mm=(2.0, 2.0, 6.0)), seed=4).case(1)
    assert aniso.image_hu.shape == (96, 96, 32) and aniso.spacing_mm == (2.0, 2.0, 6.0)
    for name in ("Bone_Mandible", "Larynx", "Parotid_R"):
        v_iso = iso.mask(name).sum() * 27.0
        v_aniso = aniso.mask(name).sum() * 24.0
        assert abs(v_iso - v_aniso) / v_iso < 0.2, name
    assert aniso.record == iso.record


def test_report_identifier_spans_point_at_identifiers(cases):
    for case in cases[:30]:
        text, identity = case.report.text, case.identity
        values = [text[s.start:s.end] for s in case.report.phi_spans]
        assert any(identity.last_name in v or identity.last_name.upper() in v for v in values)
        assert identity.unit_no in values
        masked = list(text)
        for span in case.report.phi_spans:
            masked[span.start:span.end] = ["#"] * (span.end - span.start)
        masked = "".join(masked)
        for secret in (identity.unit_no, identity.last_name, identity.phone, identity.email):
            assert secret not in masked, (case.case_id, secret)


def test_report_states_the_record(cases):
    for case in cases[:60]:
        text, record = case.report.text, case.record
        assert f"{record.ict}" in text and record.stage in text
        assert record.elective_neck in text.lower() or ("Both sides" in text) or ("Only the" in text)
        if record.laterality != "midline":
            assert record.laterality in text


def test_heldout_reports_use_phrasings_never_seen_in_training(phantom):
    train_phrases = ["There is an enhancing mass centred on", "Elective nodal irradiation", "IMPRESSION:",
                     "CLINICAL HISTORY:", "No pathologically enlarged", "lymph node measures"]
    heldout_phrases = ["avidly enhancing lesion", "treated electively", "Conclusion", "Indication: staging",
                       "Cervical nodes are within normal limits", "abnormal node"]
    for i in range(40):
        train = phantom.case(i, report_family="train").report.text
        heldout = phantom.case(i, report_family="heldout").report.text
        assert not any(p in heldout for p in train_phrases)
        assert not any(p in train for p in heldout_phrases)


def test_preview_views_put_each_structure_under_its_orientation_letter(cases):
    """The letters drawn on the PNG previews (``VIEW_EDGES``) name the side each structure really lies on."""
    from medvlm.data.preview import VIEW_EDGES, _views

    case = cases[0]
    assert np.all(np.diag(case.affine)[:3] > 0), "the phantom's arrays are RAS-ordered"

    def centroid(name):  # (column, row) of the structure's centroid in each view, as fractions of the view
        mask = case.mask(name)
        views = _views(mask.astype(np.float32), [int(v) for v in np.argwhere(mask).mean(axis=0)])
        return [(np.argwhere(v)[:, 1].mean() / v.shape[1], np.argwhere(v)[:, 0].mean() / v.shape[0]) for v in views]

    def edge(view, name, axis):  # the letter of the edge the structure is nearer along ``axis`` (0 columns, 1 rows)
        fraction = centroid(name)[("axial", "coronal", "sagittal").index(view)][axis]
        letters = VIEW_EDGES[view][2 * axis: 2 * axis + 2]
        return letters[0] if fraction < 0.5 else letters[1]

    assert edge("axial", "Parotid_R", 0) == "R" and edge("axial", "Parotid_L", 0) == "L"
    assert edge("coronal", "Parotid_R", 0) == "R" and edge("coronal", "Parotid_L", 0) == "L"
    assert edge("axial", "Bone_Mandible", 1) == "A" and edge("axial", "SpinalCord", 1) == "P"
    assert edge("sagittal", "Bone_Mandible", 0) == "A" and edge("sagittal", "SpinalCord", 0) == "P"
    assert edge("coronal", "Brainstem", 1) == "S" and edge("sagittal", "Brainstem", 1) == "S"
