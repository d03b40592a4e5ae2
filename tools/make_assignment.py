"""tools/make_assignment.py -- a student's copy of the project with some functions left to write.

    python tools/make_assignment.py --exercise 7 --out ~/ex7          # the functions of ASSIGNMENTS.md's exercise 7
    python tools/make_assignment.py gnsp.null_space_projector keeplora.KeepLoRALinear.forward --out ~/hw
    python tools/make_assignment.py --list                            # the exercises and their functions

The project is copied to --out (the files git tracks when the project is a git checkout; otherwise
every file but .git, .venv, runs, caches and __pycache__). In each named function (`module.function`,
or `module.Class.method` for a method) the signature, the decorators and the docstring stay, and the
body becomes one line:

    raise NotImplementedError("exercise N: implement module.function (see ASSIGNMENTS.md)")

Everything else in the file stays byte for byte as it was: the function is found with `ast` and
only its body's lines are replaced (with the comments between the docstring and the body, which
often give the answer away). The method files carry no markers for this. The copy prints how the
exercise is graded (ASSIGNMENTS.md's "Graded by" command); in the original project that command
passes, in the copy it fails until the functions are written (tests/test_make_assignment.py).

A mistake (an unknown module or function, a --out folder that is not empty) is one line on stderr
and exit code 2.
"""
from __future__ import annotations

import argparse
import ast
import io
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSIGNMENTS = "ASSIGNMENTS.md"
# folders never copied when the project is not a git checkout
SKIP_DIRS = {".git", ".venv", ".venv-ci", "runs", "__pycache__", ".pytest_cache", ".hypothesis", "data"}


class UsageError(Exception):
    """A mistake of the caller: printed as one line, exit code 2."""


# ---- ASSIGNMENTS.md -----------------------------------------------------------------------------

@dataclass
class Exercise:
    number: int
    title: str
    functions: list[str]          # module.function or module.Class.method
    grading: str                  # the exact pytest command of "Graded by"


EXERCISE_RE = re.compile(r"^## Exercise (\d+)[.:]\s*(.*)$", re.M)
IMPLEMENT_RE = re.compile(r"^\*\*Implement:\*\*(.*)$", re.M)
GRADED_RE = re.compile(r"^\*\*Graded by:\*\*\s*`([^`]+)`", re.M)


def read_exercises(root: Path = ROOT) -> dict[int, Exercise]:
    """Every exercise of ASSIGNMENTS.md: `## Exercise N: title`, then a line `**Implement:**` with
    the functions in backticks and a line `**Graded by:**` with the pytest command in backticks."""
    path = root / ASSIGNMENTS
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror or type(e).__name__})") from None
    heads = list(EXERCISE_RE.finditer(text))
    out = {}
    for i, h in enumerate(heads):
        body = text[h.end():heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        impl, graded = IMPLEMENT_RE.search(body), GRADED_RE.search(body)
        if impl is None or graded is None:
            raise UsageError(f"{ASSIGNMENTS}: exercise {h.group(1)} lacks its **Implement:** or **Graded by:** line")
        out[int(h.group(1))] = Exercise(int(h.group(1)), h.group(2).strip(), re.findall(r"`([^`]+)`", impl.group(1)),
                                        graded.group(1).strip())
    return out


# ---- finding a function and blanking its body -------------------------------------------------

def module_file(root: Path, dotted: str) -> tuple[Path, list[str]]:
    """`a.b.C.f` -> (root/a/b.py, [C, f]): the longest leading part that names a .py file."""
    parts = dotted.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise UsageError(f"'{dotted}' is not module.function or module.Class.method")
    for n in range(len(parts) - 1, 0, -1):
        path = root.joinpath(*parts[:n - 1], parts[n - 1] + ".py")
        if path.is_file():
            return path, parts[n:]
    raise UsageError(f"unknown module in '{dotted}': no {parts[0]}.py in {root}")


def find_function(tree: ast.Module, names: list[str], dotted: str, filename: str):
    """The FunctionDef at the path `names` (classes, then the function), searched in the bodies of
    the module and of the classes named on the way."""
    scope, node = tree.body, None
    for i, name in enumerate(names):
        hits = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and n.name == name]
        where = filename if i == 0 else f"{filename}: {'.'.join(names[:i])}"
        if not hits:
            raise UsageError(f"unknown function '{dotted}': {where} defines no '{name}'")
        if len(hits) > 1:
            raise UsageError(f"'{dotted}': {where} defines '{name}' {len(hits)} times")
        node = hits[0]
        if i < len(names) - 1:
            if not isinstance(node, ast.ClassDef):
                raise UsageError(f"'{dotted}': '{name}' in {where} is not a class")
            scope = node.body
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise UsageError(f"'{dotted}' is a class, not a function: name its methods (e.g. {dotted}.__init__)")
    return node


def _blank_only(line: str) -> bool:
    s = line.strip()
    return not s or s.startswith("#")


def _is_docstring(stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def body_span(lines: list[str], node) -> tuple[int, int, str]:
    """The lines to replace: 0-based [start, end) from the first statement after the docstring (the
    comment and blank lines just above it included) to the function's last line, and the body's
    indentation. An empty range after the docstring when the body is the docstring alone. A body that
    shares a line with the signature or the docstring cannot be replaced line by line: an error."""
    doc = node.body[0] if _is_docstring(node.body[0]) else None
    stmts = node.body[1:] if doc is not None else node.body
    if not stmts:
        return doc.end_lineno, doc.end_lineno, indent_of(lines[doc.lineno - 1])
    first = stmts[0]
    before = lines[first.lineno - 1].encode()[:first.col_offset].decode(errors="ignore")
    if before.strip() or (doc is not None and first.lineno <= doc.end_lineno):
        raise UsageError(f"{node.name} (line {node.lineno}): its body shares a line with its signature or docstring; "
                         "put the body on lines of its own first")
    # the signature ends on a line with code (its colon): never a blank or comment-only line
    floor = doc.end_lineno if doc is not None else node.lineno     # 0-based index of the first body line
    start = first.lineno - 1
    while start - 1 >= floor and _blank_only(lines[start - 1]):
        start -= 1
    return start, node.end_lineno, indent_of(lines[first.lineno - 1])


def indent_of(line: str) -> str:
    return line[:len(line) - len(line.lstrip())]


def blank_functions(path: Path, targets: list[tuple[list[str], str, str]]) -> list[str]:
    """Blank the functions of one file in place. targets: (path in the module, dotted name, the
    NotImplementedError message). Returns one line per function for the printout."""
    raw = path.read_bytes()
    text = raw.decode("utf-8")
    lines = io.StringIO(text, newline="").readlines()             # split as Python counts lines: \n, \r\n, \r
    tree = ast.parse(raw, filename=str(path))
    spans = []
    for names, dotted, message in targets:
        start, end, indent = body_span(lines, find_function(tree, names, dotted, path.name))
        spans.append((start, end, indent, message, dotted))
    spans.sort(key=lambda s: (s[0], -s[1]))
    kept = []
    for s in spans:                                                 # a method of a blanked function goes with it
        if not any(k[0] <= s[0] and s[1] <= k[1] and k[0] < k[1] for k in kept):
            kept.append(s)
    done = []
    for start, end, indent, message, dotted in reversed(kept):     # bottom up: earlier line numbers stay valid
        last = lines[end - 1] if end > 0 else "\n"
        newline = last[len(last.rstrip("\r\n")):] or "\n"
        if start == end and not lines[start - 1].endswith(("\n", "\r")):
            lines[start - 1] += newline                              # a docstring on the file's last line
        quoted = '"' + message.replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines[start:end] = [f"{indent}raise NotImplementedError({quoted}){newline}"]
        done.append(f"{dotted} ({path.name}, {end - start} lines replaced)")
    new = "".join(lines)
    ast.parse(new, filename=str(path))                               # still valid Python
    path.write_text(new, encoding="utf-8", newline="")
    return done[::-1]


# ---- copying the project -------------------------------------------------------------------------

def project_files(root: Path, out: Path) -> list[Path]:
    """Relative paths to copy: the files git tracks (those still on disk) inside a git checkout,
    otherwise every file outside SKIP_DIRS and --out."""
    try:
        r = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached"], capture_output=True, check=True)
        files = [Path(p) for p in r.stdout.decode().split("\0") if p and (root / p).is_file()]
        if files:
            return files
    except (OSError, subprocess.CalledProcessError):
        pass
    out_real = os.path.realpath(out)
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and os.path.realpath(Path(d) / x) != out_real)
        files += [(Path(d) / n).relative_to(root) for n in sorted(names) if not n.endswith(".pyc")]
    return files


def copy_project(root: Path, out: Path) -> int:
    files = project_files(root, out)
    for rel in files:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dst)
    return len(files)


# ---- the command line ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make_assignment.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("functions", nargs="*", help="module.function or module.Class.method to blank")
    p.add_argument("--exercise", type=int, action="append", default=[],
                   help="blank every function of ASSIGNMENTS.md's exercise N (may be repeated)")
    p.add_argument("--out", help="the folder of the copy (created; must be empty if it exists)")
    p.add_argument("--list", action="store_true", help="list the exercises of ASSIGNMENTS.md and stop")
    a = p.parse_args(argv)
    root = ROOT
    try:
        if a.list:
            for ex in read_exercises(root).values():
                print(f"{ex.number:>2}. {ex.title}\n    implement: {', '.join(ex.functions)}\n    graded by: {ex.grading}")
            return 0
        if not a.out:
            raise UsageError("pass --out DIR, the folder of the student's copy")
        if not a.functions and not a.exercise:
            raise UsageError("name the functions to blank (module.function) or pass --exercise N")
        exercises = read_exercises(root) if (a.exercise or (root / ASSIGNMENTS).is_file()) else {}
        for n in a.exercise:
            if n not in exercises:
                raise UsageError(f"no exercise {n} in {ASSIGNMENTS} (it has {', '.join(map(str, sorted(exercises)))})")
        wanted = [f for n in a.exercise for f in exercises[n].functions] + list(a.functions)
        wanted = list(dict.fromkeys(wanted))
        owner = {f: ex.number for ex in exercises.values() for f in ex.functions}
        # check every name before anything is written
        by_file: dict[Path, list] = {}
        for dotted in wanted:
            path, names = module_file(root, dotted)
            tree = ast.parse(path.read_bytes(), filename=str(path))
            find_function(tree, names, dotted, path.name)
            n = owner.get(dotted)
            message = (f"exercise {n}: " if n else "") + f"implement {dotted} (see {ASSIGNMENTS})"
            by_file.setdefault(path.relative_to(root), []).append((names, dotted, message))
        out = Path(a.out).expanduser()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"--out {out} exists and is not an empty folder: pass a new or empty folder")
        if os.path.realpath(out) == os.path.realpath(root):
            raise UsageError("--out is the project itself: pass another folder")
        out.mkdir(parents=True, exist_ok=True)
        n_files = copy_project(root, out)
        done = []
        for rel, targets in by_file.items():
            done += blank_functions(out / rel, targets)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.strerror or type(e).__name__}: {e.filename or ''}", file=sys.stderr)
        return 2
    print(f"copied {n_files} files to {out}; blanked:")
    for line in done:
        print(f"  {line}")
    for n in sorted(set(owner.get(f) for f in wanted) - {None}):
        print(f"exercise {n} is graded by (in {out}): {exercises[n].grading}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
