"""Course assignments made from the library itself: the library is the reference solution.

Holes are marked in minilora's own readable source with ``# BEGIN SOLUTION aN: hint`` and
``# END SOLUTION`` (the nbgrader / otter convention). ``minilora assignment release aN`` writes a
student copy of the files of assignment aN, where each of its holes raises NotImplementedError
with the hint and every other line is the reference, plus a notebook; ``minilora assignment grade``
runs the assignment's pytest grader on a submission and scores it, points per part; ``minilora
assignment export aN --gradescope`` packs the same grader as a Gradescope autograder (gradescope.py).
Each release carries its handout (handouts/aN.md, handout.py). See docs/instructors.md.
"""
