"""The results page: sweeps appended when run, their commands named when not."""
from __future__ import annotations


def test_results_page_appends_finished_sweeps_and_names_the_command_of_missing_ones(tmp_path):
    from eval.report import sweep_sections

    (tmp_path / "robustness").mkdir()
    (tmp_path / "robustness" / "robustness.md").write_text("| perturbation | level |\n|---|---|\n| noise | 50 HU |\n")
    (tmp_path / "robustness" / "robustness.png").write_bytes(b"png")
    text = sweep_sections(tmp_path)
    assert "| noise | 50 HU |" in text and "![robustness](robustness/robustness.png)" in text
    assert "## Data efficiency" in text and "Not run yet: `medvlm eval data-efficiency" in text
