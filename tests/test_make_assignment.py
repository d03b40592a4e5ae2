"""tools/make_assignment.py and ASSIGNMENTS.md: every exercise names functions that exist and a grading
command that selects tests carrying its marker; blanking replaces exactly a function's body and
nothing else; mistakes are one line and exit code 2. The slow test runs every exercise's grading
command: a copy with the exercise's functions blanked fails it (with the exercise's own
NotImplementedError), the original project passes it."""
import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_assignment", ROOT / "tools" / "make_assignment.py")
ma = importlib.util.module_from_spec(_spec)
sys.modules["make_assignment"] = ma                     # dataclasses look their module up there
_spec.loader.exec_module(ma)

EXERCISES = ma.read_exercises(ROOT)
GRADING_RE = re.compile(r"^python -m pytest -n 0 -m ex(\d+)((?: tests/[\w/]+\.py)+)$")


def grading_args(command: str) -> list[str]:
    """The grading command's pytest arguments. Not -x: every selected test must fail in a blanked copy
    (a test that passes there grades nothing), and a test fails at once when it reaches the
    NotImplementedError (a few seconds in all)."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "pytest"], command
    return argv[3:]


# ---- ASSIGNMENTS.md --------------------------------------------------------------------------------

def test_every_exercise_names_real_functions_and_a_grading_command_of_its_own_marker():
    assert 8 <= len(EXERCISES) <= 12 and sorted(EXERCISES) == list(range(1, len(EXERCISES) + 1)), \
        f"ASSIGNMENTS.md must number 8 to 12 exercises 1..N, found {sorted(EXERCISES)}"
    ini = (ROOT / "pytest.ini").read_text()
    modules = set()
    for n, ex in EXERCISES.items():
        assert ex.functions, f"exercise {n}: no function in its **Implement:** line"
        for dotted in ex.functions:
            path, names = ma.module_file(ROOT, dotted)
            ma.find_function(ast.parse(path.read_bytes()), names, dotted, path.name)   # raises if missing
            modules.add(path.stem)
        m = GRADING_RE.match(ex.grading)
        assert m and int(m.group(1)) == n, \
            f"exercise {n}: grading command must be `python -m pytest -n 0 -m ex{n} tests/...py`, got `{ex.grading}`"
        assert re.search(rf"^\s+ex{n}:", ini, re.M), f"marker ex{n} is not registered in pytest.ini"
        files = m.group(2).split()
        for f in files:
            assert (ROOT / f).is_file(), f"exercise {n}: {f} does not exist"
        assert any(f"@pytest.mark.ex{n}\n" in (ROOT / f).read_text() for f in files), \
            f"exercise {n}: no test in {files} is marked ex{n}"
    assert {"common", "gnsp", "keeplora", "rank1_pool", "igsp"} <= modules, \
        f"the exercises must cover the core and all four methods, they cover {sorted(modules)}"


def test_every_exercise_has_reading_expected_results_and_questions_with_real_flags():
    text = (ROOT / "ASSIGNMENTS.md").read_text()
    parts = re.split(r"^## Exercise \d+", text, flags=re.M)[1:]
    sources = "".join((ROOT / f).read_text() for f in ("common.py", "finetune.py", "gnsp.py", "keeplora.py",
                                                       "rank1_pool.py", "igsp.py", "tools/report.py",
                                                       "tools/sweep.py", "tools/make_assignment.py"))
    assert "TBD" not in text, "a placeholder left in ASSIGNMENTS.md"
    for n, part in enumerate(parts, 1):
        for key in ("**Read:**", "**Implement:**", "**Graded by:**", "**On the toy benchmark:**", "**Questions**"):
            assert key in part, f"exercise {n} lacks {key}"
        ranges = re.findall(r"Transfer (\d+\.\d)(?:-(\d+\.\d))? / Average \d+\.\d(?:-\d+\.\d)? / Last \d+\.\d", part)
        assert ranges and "--benchmark toy" in part, f"exercise {n}: the toy command and its measured range"
        assert all(not hi or float(lo) < float(hi) for lo, hi in ranges), f"exercise {n}: an empty range {ranges}"
        questions = re.findall(r"^\d+\. ", part.split("**Questions**")[1], re.M)
        assert 2 <= len(questions) <= 3, f"exercise {n} has {len(questions)} questions, want 2 or 3"
        for flag in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", part)):
            assert f'"{flag}"' in sources, f"exercise {n} names {flag}, which no script defines"


# ---- blanking a body -------------------------------------------------------------------------------

SAMPLE = '''import functools


@functools.lru_cache()
def decorated(x,
              y=2):  # a comment on the signature
    """Docstring
    on two lines."""
    # a hint that gives the answer away
    z = x + y

    return z * 2
# a comment after the function


class Outer:
    """A class."""

    def method(self, a):
        """Method doc."""
        def inner(b):
            return b + 1
        return inner(a)

    def no_doc(self):
        # comment above the first statement
        return 3


def only_doc():
    """Nothing else."""


def one_line(x): return x
'''


def _blank(tmp_path, text, *names, newline="\n"):
    f = tmp_path / "m.py"
    f.write_bytes(text.replace("\n", newline).encode())
    ma.blank_functions(f, [(n.split("."), f"m.{n}", f"exercise 1: implement m.{n} (see ASSIGNMENTS.md)") for n in names])
    return f.read_bytes().decode()


def test_blanking_replaces_exactly_the_body_and_keeps_everything_else(tmp_path):
    out = _blank(tmp_path, SAMPLE, "decorated", "Outer.method", "Outer.no_doc", "only_doc")
    want = SAMPLE.replace('''    # a hint that gives the answer away
    z = x + y

    return z * 2
''', '''    raise NotImplementedError("exercise 1: implement m.decorated (see ASSIGNMENTS.md)")
''').replace('''        def inner(b):
            return b + 1
        return inner(a)
''', '''        raise NotImplementedError("exercise 1: implement m.Outer.method (see ASSIGNMENTS.md)")
''').replace('''        # comment above the first statement
        return 3
''', '''        raise NotImplementedError("exercise 1: implement m.Outer.no_doc (see ASSIGNMENTS.md)")
''').replace('''    """Nothing else."""
''', '''    """Nothing else."""
    raise NotImplementedError("exercise 1: implement m.only_doc (see ASSIGNMENTS.md)")
''')
    assert out == want, "only the bodies may change: signature, decorators, docstrings and the rest stay"
    ns = {}
    exec(compile(out, "m.py", "exec"), ns)
    with pytest.raises(NotImplementedError, match=r"exercise 1: implement m\.Outer\.method \(see ASSIGNMENTS\.md\)"):
        ns["Outer"]().method(1)


def test_blanking_keeps_crlf_files_crlf(tmp_path):
    out = _blank(tmp_path, SAMPLE, "Outer.method", newline="\r\n")
    assert "\n" not in out.replace("\r\n", ""), "a CRLF file stays CRLF"
    assert 'raise NotImplementedError("exercise 1: implement m.Outer.method (see ASSIGNMENTS.md)")\r\n' in out


def test_blanking_refuses_a_body_on_the_signature_line(tmp_path):
    with pytest.raises(ma.UsageError, match="shares a line"):
        _blank(tmp_path, SAMPLE, "one_line")


# ---- the command line ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["nosuchmodule.f"], "unknown module in 'nosuchmodule.f'"),
    (["gnsp.no_such_function"], "unknown function 'gnsp.no_such_function': gnsp.py defines no 'no_such_function'"),
    (["keeplora.KeepLoRALinear.no_method"], "keeplora.py: KeepLoRALinear defines no 'no_method'"),
    (["keeplora.KeepLoRALinear"], "is a class, not a function"),
    (["gnsp"], "is not module.function"),
    (["--exercise", "99"], "no exercise 99 in ASSIGNMENTS.md"),
    ([], "name the functions to blank"),
])
def test_mistakes_are_one_line_and_exit_code_2(tmp_path, capsys, argv, message):
    out = tmp_path / "copy"
    assert ma.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists(), "nothing is written after a mistake"


def test_a_non_empty_out_folder_is_refused(tmp_path, capsys):
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "mine.txt").write_text("keep me")
    assert ma.main(["gnsp.project_gradients", "--out", str(tmp_path / "copy")]) == 2
    err = capsys.readouterr().err
    assert "is not an empty folder" in err and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["mine.txt"]


def test_exercise_copy_is_the_project_with_only_the_bodies_replaced(tmp_path, capsys):
    n = 7
    ex = EXERCISES[n]
    out = tmp_path / "copy"
    assert ma.main(["--exercise", str(n), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ex.grading in printed, "the copy's printout says how the exercise is graded"
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True).stdout.split()
    tracked = {f for f in listed if (ROOT / f).is_file()}
    copied = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    if tracked:                                            # a git checkout: exactly its tracked files
        assert copied == tracked
    blanked = {}
    for dotted in ex.functions:
        path, names = ma.module_file(ROOT, dotted)
        blanked.setdefault(path.relative_to(ROOT), []).append((names, dotted))
    for rel in copied:
        if Path(rel) not in blanked:
            assert (out / rel).read_bytes() == (ROOT / rel).read_bytes(), f"{rel} changed"
    for rel, targets in blanked.items():
        old, new = (ROOT / rel).read_text().splitlines(), (out / rel).read_text().splitlines()
        tree_old, tree_new = ast.parse("\n".join(old)), ast.parse("\n".join(new))
        removed = 0
        for names, dotted in targets:
            f_old = ma.find_function(tree_old, names, dotted, rel.name)
            f_new = ma.find_function(tree_new, names, dotted, rel.name)
            assert ast.get_docstring(f_new) == ast.get_docstring(f_old) and ast.dump(f_new.args) == ast.dump(f_old.args)
            raise_ = f_new.body[-1]
            assert len(f_new.body) == 2 and isinstance(raise_, ast.Raise), f"{dotted}: the body is one raise"
            assert ast.literal_eval(raise_.exc.args[0]) == f"exercise {n}: implement {dotted} (see ASSIGNMENTS.md)"
            removed += (f_old.end_lineno - f_old.lineno) - (f_new.end_lineno - f_new.lineno)
        assert len(old) - len(new) == removed, f"{rel}: lines outside the functions changed"


# ---- the grading commands (slow: every grading run in one extra process) ----------------------------

# One Python process runs pytest on each copy in turn (torch and open_clip are imported once; every
# module of the project and its tests is dropped from sys.modules between runs, so each run imports
# its own copy's code). It prints {label: [exit code, log]} as JSON.
DRIVER = r"""
import contextlib, io, json, os, sys
import pytest
jobs, results = json.loads(sys.argv[1]), {}
for label, cwd, argv in jobs:
    for name, mod in list(sys.modules.items()):               # the project's own modules and its tests
        f = os.path.dirname(getattr(mod, "__file__", None) or "")
        if name in ("conftest", "tests") or name.startswith("tests.") or any(
                f in (c, os.path.join(c, "tests"), os.path.join(c, "tools")) for _, c, _ in jobs):
            del sys.modules[name]
    os.chdir(cwd)
    sys.path[0] = cwd
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        code = int(pytest.main(argv))
    results[label] = [code, buf.getvalue()]
print("RESULTS" + json.dumps(results))
"""


def run_gradings(jobs: list[tuple[str, Path, list[str]]]) -> dict[str, tuple[int, str]]:
    """Run each (label, folder, pytest argv) in one extra process; {label: (exit code, log)}."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}   # not this run's xdist worker
    payload = json.dumps([(label, str(cwd), [*argv, "-p", "no:cacheprovider", "-q"]) for label, cwd, argv in jobs])
    r = subprocess.run([sys.executable, "-c", DRIVER, payload], cwd=ROOT, env={**env, "HF_HUB_OFFLINE": "1"},
                       capture_output=True, text=True, timeout=1200)
    assert "RESULTS" in r.stdout, f"the grading driver failed:\n{(r.stdout + r.stderr)[-3000:]}"
    return {k: tuple(v) for k, v in json.loads(r.stdout.split("RESULTS", 1)[1]).items()}


@pytest.mark.slow
def test_every_blanked_copy_fails_its_grading_and_the_original_passes(tmp_path):
    """For every exercise: the copy with its functions blanked fails its grading command (exit 1),
    every selected test fails, and the failure is the exercise's own NotImplementedError. On the
    original project (whose gradings pass: the suite runs these tests), the union of the grading
    files with `-m "ex1 or ex2 ..."` selects as many tests as the commands one by one."""
    jobs = []
    for n in sorted(EXERCISES):
        out = tmp_path / f"ex{n}"
        assert ma.main(["--exercise", str(n), "--out", str(out)]) == 0
        jobs.append((f"ex{n}", out, grading_args(EXERCISES[n].grading)))
    files = sorted({f for ex in EXERCISES.values() for f in GRADING_RE.match(ex.grading).group(2).split()})
    markers = " or ".join(f"ex{n}" for n in sorted(EXERCISES))
    # the original project's gradings pass: the suite itself runs these tests; here their union's
    # selection is collected and compared with the exercises' own counts below
    jobs.append(("original", ROOT, ["-n", "0", "--collect-only", "-m", markers, *files]))
    results = run_gradings(jobs)
    code, log = results["original"]
    assert code == 0, f"the grading tests must collect on the original project:\n{log[-3000:]}"
    collected = int(re.search(r"(\d+)(?:/\d+)? tests? collected", log).group(1))
    failed = 0
    for n in sorted(EXERCISES):
        code, log = results[f"ex{n}"]
        assert code == 1, f"exercise {n}: the blanked copy must fail its grading (exit 1), got {code}:\n{log[-3000:]}"
        assert f"NotImplementedError: exercise {n}: implement" in log, \
            f"exercise {n}: the failure must be the blanked function's NotImplementedError:\n{log[-3000:]}"
        last = log.strip().splitlines()[-1]
        assert re.match(r"\d+ failed, \d+ deselected in ", last), \
            f"exercise {n}: every test of the grading must fail in the blanked copy, got: {last}"
        failed += int(last.split()[0])
    assert failed == collected, f"the exercises' gradings select {failed} tests, their union {collected}"
