"""The graders' fingerprints: the recorded sums match the files, and a changed file stops grading."""

import hashlib

import pytest

from minilora.assignments import integrity
from minilora.assignments.isolation import RefusedToGrade


def test_the_recorded_sums_are_those_of_the_files_as_committed():
    stale = {
        name
        for name, digest in integrity.current_sums().items()
        if integrity.recorded_sums().get(name) != digest
    }
    assert not stale, f"run `python -m minilora.assignments.integrity --write` after changing {sorted(stale)}"
    assert "assignments/graders/conftest.py" in integrity.recorded_sums()


def test_a_changed_grader_file_is_refused_by_name(tmp_path, monkeypatch):
    sums = tmp_path / "SHA256SUMS"
    recorded = integrity.recorded_sums()
    recorded["assignments/graders/grade_a3.py"] = hashlib.sha256(b"an edited grader").hexdigest()
    sums.write_text("".join(f"{digest}  {name}\n" for name, digest in recorded.items()))
    monkeypatch.setattr(integrity, "SUMS", sums)
    with pytest.raises(RefusedToGrade, match="grader file assignments/graders/grade_a3.py changed"):
        integrity.check_graders()
    sums.unlink()
    with pytest.raises(RefusedToGrade, match="SHA256SUMS is missing"):
        integrity.check_graders()
