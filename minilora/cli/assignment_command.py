"""``minilora assignment``: release an assignment, grade a submission, verify the pipeline."""

from __future__ import annotations

import importlib

# What each action imports beyond minilora's own dependencies, and the extra that installs it.
EXTRAS_NEEDED = {
    "release": (("nbformat", "notebooks"),),  # the student notebook
    "grade": (("pytest", "dev"),),  # the graders are pytest files
    "verify": (("nbformat", "notebooks"), ("pytest", "dev")),  # releases, then grades
}


def require_extras(action: str) -> None:
    """Refuse, in one line naming the extra to install, an action whose modules are missing."""
    for module, extra in EXTRAS_NEEDED.get(action, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            raise RuntimeError(
                f"'assignment {action}' needs {module}, from minilora's {extra} extra: "
                f"pip install 'minilora[{extra}]' (from a checkout: pip install -e '.[{extra}]')"
            ) from None


def add_assignment_parser(subparsers) -> None:
    from ..assignments.catalog import ASSIGNMENTS

    parser = subparsers.add_parser(
        "assignment",
        help="course assignments: release, grade, verify, export (see docs/instructors.md)",
        description="Assignments are holes in minilora's own source. 'release' writes a student copy and a "
        "notebook, 'grade' scores a submission with the assignment's pytest grader, 'verify' "
        "checks that the reference gets full marks, a blank release zero, and planted bugs lose points, "
        "'export --gradescope' writes a Gradescope autograder zip.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="action")
    for action, help_text in (
        ("release", "write a student release"),
        ("grade", "grade a submission"),
        ("verify", "check the whole pipeline"),
        ("export", "write an autograder for a course platform (Gradescope)"),
    ):
        sub = actions.add_parser(action, help=help_text)
        sub.add_argument(
            "assignment", choices=[*sorted(ASSIGNMENTS), *(["all"] if action == "verify" else [])]
        )
        if action == "release":
            sub.add_argument("--out", required=True, help="the folder to write")
            sub.add_argument("--solved", action="store_true", help="keep the reference code in the holes")
            sub.add_argument(
                "--overwrite", "--force", dest="overwrite", action="store_true",
                help="overwrite a student/ folder that holds files (--force is its old name)",
            )  # fmt: skip
            sub.add_argument(
                "--policy", default=None, help="the course's honour code and AI-tool policy, written as "
                "policy.md (default: minilora's, assignments/templates/policy.md)",
            )  # fmt: skip
        if action == "export":
            sub.add_argument(
                "--gradescope", action="store_true", required=True,
                help="a Gradescope autograder zip (setup.sh, run_autograder, a wheel of this minilora)",
            )  # fmt: skip
            sub.add_argument(
                "--out", default=None, help="the zip to write (default: <assignment>-autograder.zip)"
            )
        if action in ("grade", "verify"):
            sub.add_argument(
                "--seed", type=int, default=None,
                help="draw the inputs from this seed (default: a fresh one, printed with the score)",
            )  # fmt: skip
        if action == "grade":
            source = sub.add_mutually_exclusive_group(required=True)
            source.add_argument("--submission", help="a release folder (holding student/)")
            source.add_argument("--roster", help="a folder holding one release folder per student")
            sub.add_argument(
                "--csv", default=None, help="with --roster: write the class's scores to this file"
            )
            sub.add_argument(
                "--sandbox-user", default=None, help="when grading as root: the unprivileged user the "
                "student's code runs as (default: minilora-sandbox, created if missing)",
            )  # fmt: skip
    wheel = actions.add_parser(
        "student-wheel", help="build minilora for student machines: every hole open, no graders or answers"
    )
    wheel.add_argument("--out", required=True, help="the folder to write the wheel into")
    wheel.add_argument(
        "--first", choices=sorted(ASSIGNMENTS), default=None,
        help="open this assignment's holes and the later ones' (default: all); earlier ones stay the reference",
    )  # fmt: skip
    parser.set_defaults(run=run_assignment_command)


def run_assignment_command(args) -> None:
    from ..assignments.catalog import ASSIGNMENTS
    from ..assignments.grading import Score, grade, grade_roster, write_scores_csv
    from ..assignments.isolation import choose_isolation
    from ..assignments.pipeline import problems, verify
    from ..assignments.release import release, solutions_elsewhere

    require_extras(args.action)
    if args.action == "student-wheel":
        from ..assignments.student_wheel import build_student_wheel

        print(f"wrote {build_student_wheel(args.out, first=args.first)}: pip install it on student machines")
    elif args.action == "export":
        from ..assignments.gradescope import export_gradescope

        out = export_gradescope(args.assignment, args.out or f"{args.assignment}-autograder.zip")
        print(f"wrote {out}: upload it as the assignment's autograder on Gradescope (docs/instructors.md)")
    elif args.action == "release":
        from ..io.run_folder import refuse_output_over_inputs

        refuse_output_over_inputs(args.out, [("--policy", args.policy)])
        out = release(args.assignment, args.out, solved=args.solved, force=args.overwrite, policy=args.policy)
        print(f"wrote {out}/student/ and {out}/{args.assignment}.ipynb")
        if args.solved and (elsewhere := solutions_elsewhere(args.assignment)):
            print(elsewhere)
    elif args.action == "grade" and args.submission is not None:
        isolation = choose_isolation(args.sandbox_user)
        print(grade(args.assignment, args.submission, seed=args.seed, isolation=isolation).table())
    elif args.action == "grade":
        results = grade_roster(args.assignment, args.roster, seed=args.seed, sandbox_user=args.sandbox_user)
        for student, score in results.items():
            print(
                f"{student:<30} "
                + (f"{score.earned}/{score.total}" if isinstance(score, Score) else f"not graded: {score}")
            )
        if args.csv:
            print(f"wrote {write_scores_csv(results, args.csv)}")
    else:
        ids = sorted(ASSIGNMENTS) if args.assignment == "all" else [args.assignment]
        failed = []
        for assignment_id in ids:
            scores = verify(assignment_id, seeds=None if args.seed is None else [args.seed])
            print(f"{assignment_id}: inputs drawn with seeds {[score.seed for score in scores['reference']]}")
            for name, runs in scores.items():
                print(
                    f"{assignment_id} {name}: " + ", ".join(f"{score.earned}/{score.total}" for score in runs)
                )
            failed += problems(assignment_id, scores)
        if failed:
            raise RuntimeError("; ".join(failed))
        print("the pipeline holds")


def register(subparsers) -> None:
    add_assignment_parser(subparsers)
