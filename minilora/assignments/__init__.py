"""Course assignments made from the library itself: the library is the reference solution.

Holes are marked in minilora's own readable source with ``# BEGIN SOLUTION aN: hint`` and
``# END SOLUTION`` (the nbgrader / otter convention). ``minilora assignment release aN`` writes a
student copy of the files of assignment aN, where each of its holes raises NotImplementedError
with the hint and every other line is the reference, plus a notebook; ``minilora assignment grade``
runs the assignment's pytest grader on a submission and scores it, points per part; ``minilora
assignment export aN --gradescope`` packs the same grader as a Gradescope autograder (gradescope.py).
Each release carries its handout (handouts/aN.md, handout.py). See docs/instructors.md.

Reading order:

    catalog.py        the seven assignments: what each teaches and which of the library's files it opens
    release.py        a student copy with the assignment's holes opened, and its notebook
    handout.py        the handouts, as markdown and as the release's notebook; their points tables
    student_build.py  minilora with some assignments' holes open and the instructor-only files left out
    grading.py        a submission read, then graded: the pytest grader run, points added up per part
    isolation.py      how far the student's code is kept from the grader: namespaces, user or process
    integrity.py      the trusted files' hashes, checked before and after every submission
    sandbox.py        the student's code run in a child process that the grader talks to
    sandbox_child.py  that child: it confines itself, imports the student's modules, answers the calls
    train_tiny.py     a6's workbench: the student's optimiser on plain data, and a tiny GPT trained with it
    gradescope.py     an assignment packed as a Gradescope autograder
    planted_bugs.py   the planted bugs, written out as the patch files in bugs/
    pipeline.py       the check that keeps it honest: the reference scores full marks, a blank release
                      zero, and each planted bug loses points on a numeric check
    graders/          package data: the pytest graders, grade_a1.py to grade_a7.py, and their conftest.py
    bugs/             package data: the planted bugs, as patches against the reference release
    handouts/         package data: each assignment's handout, in markdown (the worked solutions are
                      no package data: docs/assignments/solutions/ of the source tree)
    templates/        package data: policy.md, the default honour code and AI-tool policy of a release
    student_wheel.py  the wheel a course installs on student machines: every hole open
"""
