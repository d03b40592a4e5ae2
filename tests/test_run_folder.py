"""A new user's mistakes, two terminals and interruptions: a run folder belongs to one live
process, every mistake is one line on stderr with exit code 2 and a next step that works as
printed (the tests follow it), weights files are read safely, partial runs say so, interrupted
writes leave nothing behind, long waits print lines, a task that learnt nothing is flagged, and
the scripts make OpenMP threads sleep rather than spin. Most runs here go through
`common.cli_main` in this process; the two-runs case uses two real processes."""
import contextlib
import fcntl
import io
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import common
import data
import finetune

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["finetune", "gnsp", "keeplora", "rank1_pool", "igsp"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TOY = ["--benchmark", "toy", "--no-progress"]
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0     # file permissions do not stop root
TINY_RECIPE = {"steps": 20, "batch_size": 16, "lr": 1e-3, "warmup": 2, "weight_decay": 0.1}


@pytest.fixture(autouse=True)
def _in_process(monkeypatch):
    """cli_main marks the process as a command-line run; undo that, and let go of every folder."""
    monkeypatch.setattr(common, "_CLI", False, raising=False)
    yield
    getattr(common, "_release_claims", lambda: None)()


def cli(capsys, *argv, script=finetune):
    """A script's command line, in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        common.cli_main(script.main, [str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def model_must_not_load(monkeypatch):
    """From here on, loading a CLIP fails the test: the checks under test come before it. Getting
    this error also shows that a command got past every check of its run folder."""
    def load_clip(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(common, "load_clip", load_clip)


def passes_the_folder_checks(monkeypatch, capsys, *argv):
    model_must_not_load(monkeypatch)
    with pytest.raises(AssertionError, match="the model was loaded"):
        cli(capsys, *argv)
    capsys.readouterr()
    common._release_claims()


@pytest.fixture(scope="module")
def base_run(toy_weights, tmp_path_factory):
    """One finished task of a toy run (--max-tasks 1), with umask 022: folder, argv (without
    --out), stdout, stderr, the plot's titles. Tests work on copies (`copy_of`)."""
    out = tmp_path_factory.mktemp("base") / "run"
    argv = [*TOY, "--pretrained", str(toy_weights), "--iterations", "2", "--max-tasks", "1"]
    titles, real_plot = [], common.plot_matrix
    stdout, stderr = io.StringIO(), io.StringIO()
    mask = os.umask(0o022)
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            mp.setattr(common, "plot_matrix", lambda n, a, p, title: titles.append(title) or real_plot(n, a, p, title))
            finetune.main([*argv, "--out", str(out)])
    finally:
        os.umask(mask)
    return SimpleNamespace(out=out, argv=argv, stdout=stdout.getvalue(), stderr=stderr.getvalue(), titles=titles,
                           two_tasks=[*argv[:-1], "2"])


def copy_of(base_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base_run.out, out)
    return out


# ---- two runs, one folder -------------------------------------------------------------------

def test_a_second_run_into_a_folder_in_use_fails_at_once_and_a_killed_runs_folder_is_taken_over(tmp_path, toy_weights):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "finetune.py", *TOY, "--pretrained", str(toy_weights),
                              "--iterations", "100000", "--max-tasks", "1", "--out", str(out)],
                             cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "config.json").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended early"
        config = (out / "config.json").read_text()
        second = subprocess.run([sys.executable, "finetune.py", *TOY, "--pretrained", str(toy_weights), "--lr", "1e-4",
                                 "--iterations", "2", "--max-tasks", "1", "--out", str(out)],
                                cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        line = one_line_error(second.returncode, second.stderr)
        assert "in use by another run" in line and f"pid {first.pid}" in line, line
        assert (out / "config.json").read_text() == config, "the refused run wrote into the folder"
        with pytest.raises(common.UserError, match="in use by another run"):   # --resume: refused as well
            common.claim_run_folder(SimpleNamespace(out=str(out), resume=True))
    finally:
        first.kill()
        first.wait()
    # the killed run's lock file is left behind; its lock died with it: the folder is taken over
    lock = common.claim_run_folder(SimpleNamespace(out=str(out), resume=False))
    assert f"pid {os.getpid()} " in (out / "run.lock").read_text()
    lock.release()


# ---- one line, exit code 2, before the model loads -------------------------------------------

@pytest.mark.parametrize("case", ["out-is-a-file", "out-under-a-file", "out-read-only", "resume-nothing",
                                  "unknown-model", "unknown-model-on-toy", "toy-weights-for-another-model",
                                  "weights-file-missing"])
def test_mistakes_are_one_line_and_found_before_the_model_loads(case, tmp_path, monkeypatch, capsys):
    if case == "out-read-only" and AS_ROOT:
        pytest.skip("root writes into read-only folders")
    model_must_not_load(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    out = tmp_path / "run"
    argv, expect = {
        "out-is-a-file": (["--out", a_file], "is a file"),
        "out-under-a-file": (["--out", a_file / "run"], "cannot create the run folder"),
        "out-read-only": (["--out", read_only / "run"], "cannot create the run folder"),
        "resume-nothing": (["--out", out, "--resume"], "start without --resume"),
        "unknown-model": (["--out", out, "--model", "NoSuchModel", "--pretrained", "none"], "unknown --model"),
        "unknown-model-on-toy": (["--out", out, "--model", "NoSuchModel"], "unknown --model"),
        "toy-weights-for-another-model": (["--out", out, "--model", "ViT-B-32"], "--pretrained toy"),
        "weights-file-missing": (["--out", out, "--pretrained", tmp_path / "nope.pt"], "weights file not found"),
    }[case]
    line = one_line_error(*cli(capsys, *TOY, *argv)[::2])
    assert expect in line and len(line) < 400, line
    if case == "toy-weights-for-another-model":
        assert "openai" in line, "the message names what the model does take"


def test_missing_mtil_data_points_to_the_toy_benchmark(tmp_path, monkeypatch, capsys):
    model_must_not_load(monkeypatch)
    code, _, err = cli(capsys, "--data-root", tmp_path / "none", "--out", tmp_path / "run")
    assert code == 2 and "Traceback" not in err and "--benchmark toy" in err


@pytest.mark.parametrize("content", ["empty", "random", "truncated-zip"])
def test_a_corrupt_weights_file_is_one_line_that_never_advises_unsafe_loading(content, tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    rng = random.Random(0)
    weights.write_bytes({"empty": b"", "random": bytes(rng.randrange(256) for _ in range(4096)),
                         "truncated-zip": b"PK\x03\x04" + bytes(100)}[content])
    line = one_line_error(*cli(capsys, *TOY, "--pretrained", weights, "--out", tmp_path / "run")[::2])
    assert str(weights) in line and "weights_only" not in line, line


@pytest.mark.parametrize("with_constants", [False, True])
def test_a_pickle_dressed_as_torchscript_never_runs(with_constants, tmp_path):
    """OpenAI's TorchScript archive is the one format read with more than tensor unpickling; it is
    recognised by its structure, and a zip that only looks like it by a name is never unpickled."""
    marker = tmp_path / "the_payload_ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "ViT-S-32-alt.pt"
    torch.save({"visual.proj": Payload()}, path)
    with zipfile.ZipFile(path) as z:
        root = z.namelist()[0].split("/")[0]
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(f"{root}/code/__torch__/model.py", "")
        if with_constants:
            z.writestr(f"{root}/constants.pkl", b"")
    with pytest.raises(common.UserError, match="could not load"):
        common.load_clip("ViT-S-32-alt", str(path), "cpu")
    assert not marker.exists(), "loading a weights file ran code from it"


def test_a_torchscript_archive_loads(tmp_path):
    torch.manual_seed(0)
    plain = common.open_clip.create_model("ViT-B-32", pretrained=None, **data.TOY_CLIP_CFG).eval()
    torch.jit.save(torch.jit.script(plain), tmp_path / "toy.pt")
    view = common.load_clip(common.TOY_MODEL, str(tmp_path / "toy.pt"), "cpu")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(view.encode_image(x), plain.encode_image(x), atol=1e-5)


@pytest.mark.parametrize("how", ["a-file", "read-only"])
def test_an_unwritable_cache_is_one_line_naming_the_fix(how, tmp_path, monkeypatch, capsys):
    if how == "read-only" and AS_ROOT:
        pytest.skip("root writes into read-only folders")
    cache = tmp_path / "cache"
    if how == "a-file":
        cache.write_text("x")
    else:
        cache.mkdir(mode=0o555)
    monkeypatch.setenv("CLCLIP_CACHE", str(cache))
    line = one_line_error(*cli(capsys, *TOY, "--out", tmp_path / "run")[::2])
    assert "CLCLIP_CACHE" in line, line


# ---- advice that works as printed -------------------------------------------------------------

def test_a_corrupt_checkpoint_says_how_to_start_over_and_that_works(base_run, tmp_path, monkeypatch, capsys):
    out = copy_of(base_run, tmp_path)
    (out / "checkpoint.pt").write_bytes(b"garbage")
    line = one_line_error(*cli(capsys, *base_run.argv, "--out", out, "--resume")[::2])
    assert f"delete {out}" in line, line
    shutil.rmtree(out)                                          # as printed, then the same command anew
    passes_the_folder_checks(monkeypatch, capsys, *base_run.argv, "--out", out)


def test_resume_without_a_checkpoint_does_not_send_the_user_in_a_loop(base_run, tmp_path, monkeypatch, capsys):
    out = copy_of(base_run, tmp_path)
    (out / "checkpoint.pt").unlink()                            # summary.json stays
    line = one_line_error(*cli(capsys, *base_run.argv, "--out", out, "--resume")[::2])
    assert "start without --resume" not in line and f"delete {out}" in line, line
    shutil.rmtree(out)
    passes_the_folder_checks(monkeypatch, capsys, *base_run.argv, "--out", out)


def nan_in(monkeypatch, task_name):
    real = common.LossLog.add
    monkeypatch.setattr(common.LossLog, "add",
                        lambda self, loss, step: real(self, loss * float("nan") if self.task == task_name else loss, step))


def test_a_diverged_first_task_says_run_again_with_a_lower_lr_and_that_works(tmp_path, toy_weights, monkeypatch, capsys):
    nan_in(monkeypatch, "Colours")
    argv = [*TOY, "--pretrained", toy_weights, "--iterations", "2", "--max-tasks", "1", "--out", tmp_path / "run"]
    line = one_line_error(*cli(capsys, *argv)[::2])
    assert "lower --lr" in line and "--resume" not in line, line
    passes_the_folder_checks(monkeypatch, capsys, *argv, "--lr", "1e-4")


def test_a_diverged_later_task_does_not_advise_resume_with_another_lr(base_run, tmp_path, monkeypatch, capsys):
    out = copy_of(base_run, tmp_path)
    nan_in(monkeypatch, "Counts")
    argv = base_run.two_tasks
    line = one_line_error(*cli(capsys, *argv, "--out", out, "--resume")[::2])
    assert "another --out" in line and "tasks 1-1 are saved" in line, line
    passes_the_folder_checks(monkeypatch, capsys, *argv, "--lr", "1e-4", "--out", tmp_path / "another")


def test_ctrl_c_during_pretraining_does_not_advise_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLCLIP_CACHE", str(tmp_path / "cache"))

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(common, "pretrain_contrastive", interrupted)
    argv = [*TOY, "--out", tmp_path / "run"]
    code, _, err = cli(capsys, *argv)
    assert code == 130 and "pretraining" in err and "--resume" not in err, err
    passes_the_folder_checks(monkeypatch, capsys, *argv)         # "run the same command again"


def test_ctrl_c_after_a_task_says_continue(base_run, tmp_path, monkeypatch, capsys):
    out = copy_of(base_run, tmp_path)

    def interrupted(self, loss, step):
        raise KeyboardInterrupt
    monkeypatch.setattr(common.LossLog, "add", interrupted)
    argv = base_run.two_tasks
    code, _, err = cli(capsys, *argv, "--out", out, "--resume")
    assert code == 130 and "tasks 1-1 are saved" in err and "continue with the same command" in err, err
    passes_the_folder_checks(monkeypatch, capsys, *argv, "--out", out, "--resume")


# ---- partial runs say so ----------------------------------------------------------------------

def test_a_partial_run_says_so_in_the_summary_the_console_and_the_plot(base_run):
    s = json.loads((base_run.out / "summary.json").read_text())
    assert s["complete"] is False and s["tasks_done"] == 1
    assert "partial: 1 of 6 tasks trained" in base_run.stdout
    assert base_run.titles and all("partial" in t for t in base_run.titles)


def test_a_run_of_every_task_is_complete(tmp_path):
    args = common.finalize_args(common.common_parser("x").parse_args(["--benchmark", "toy", "--out", str(tmp_path / "r")]),
                                "x", {})
    tasks = [data.Task(n, ["p", "q"], ["{}"], [], []) for n in ("a", "b")]
    run = common.Run(args, tasks, [common.HParams(1, 1, 1e-3)] * 2)
    run.set_zero_shot([50.0, 50.0])
    for t in range(2):
        run.begin_task(t)
        run.finish_task(t, [90.0, 90.0], {}, {"trainable_params": 1})
        s = json.loads((tmp_path / "r" / "summary.json").read_text())
        assert (s["complete"], s["tasks_done"]) == (t == 1, t + 1)
    assert "partial" not in common.format_table(run.datasets, run.acc, run.zero_shot)


# ---- leftovers ----------------------------------------------------------------------------------

def test_a_failed_atomic_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        common.atomic_write_text(tmp_path / "summary.json", 123)
    with pytest.raises(Exception):
        common.atomic_torch_save(lambda: 0, tmp_path / "checkpoint.pt")    # not picklable
    assert list(tmp_path.iterdir()) == []


def test_the_next_run_in_a_folder_removes_the_leftovers_of_interrupted_writes(base_run, tmp_path, capsys):
    out = copy_of(base_run, tmp_path)
    leftovers = [out / "checkpoint.pt.k3j2_x1.tmp", out / "summary.json.abc.tmp", out / "acc_matrix.png.q.tmp",
                 out / "acc_matrix.tmp.png"]
    for f in leftovers:
        f.write_bytes(bytes(1000))
    (out / "mine.tmp").write_text("not a leftover of a run")
    code, _, err = cli(capsys, *base_run.argv, "--out", out, "--resume")
    assert code == 0, err
    assert not any(f.exists() for f in leftovers) and (out / "mine.tmp").exists()


def test_pretraining_removes_the_leftover_of_an_interrupted_cache_write(tmp_path, monkeypatch):
    monkeypatch.setenv("CLCLIP_CACHE", str(tmp_path))
    recipe = {**TINY_RECIPE, "steps": 2}
    leftover = tmp_path / (common.toy_cache_path(0, recipe).name + ".x1y2.tmp")
    leftover.write_bytes(bytes(1000))
    common.load_clip(common.TOY_MODEL, "toy", "cpu", toy_pretrain=recipe, progress_bar=False)
    assert not leftover.exists() and common.toy_cache_path(0, recipe).is_file()


# ---- lines in a log ---------------------------------------------------------------------------

def test_pretraining_prints_lines_without_a_bar_and_its_seconds_are_counted_apart(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "TOY_CLIP_PRETRAIN", TINY_RECIPE)
    code, _, err = cli(capsys, *TOY, "--mode", "zero-shot", "--max-tasks", "1", "--out", tmp_path / "run")
    assert code == 0, err
    assert sum("toy CLIP pretraining: step" in line for line in err.splitlines()) >= 10, err
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["seconds_pretraining"] > 0 and s["seconds"] >= 0


def test_waiting_for_another_processs_pretraining_prints_a_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLCLIP_CACHE", str(tmp_path))
    recipe = {**TINY_RECIPE, "steps": 2}
    with open(common.toy_cache_path(0, recipe).with_suffix(".lock"), "a") as held:   # "another process"
        fcntl.flock(held, fcntl.LOCK_EX)
        threading.Timer(2.0, fcntl.flock, (held, fcntl.LOCK_UN)).start()
        common.load_clip(common.TOY_MODEL, "toy", "cpu", toy_pretrain=recipe, progress_bar=False)
    assert "waiting for another process that is pretraining the toy CLIP" in capsys.readouterr().err


def test_a_resumed_run_says_where_it_resumes(base_run, tmp_path, capsys):
    out = copy_of(base_run, tmp_path)
    code, stdout, err = cli(capsys, *base_run.argv, "--out", out, "--resume")
    assert code == 0, err
    assert f"resuming {out} after task 1 of 6 (Colours)" in stdout


# ---- a task that learnt nothing ---------------------------------------------------------------

@pytest.mark.parametrize("lr", ["1e-3", "1"])
def test_a_task_trained_to_chance_gets_one_warning_line(lr, tmp_path, toy_weights, capsys):
    """Order II starts with Tones (3 classes), which the test's tiny CLIP already knows: --lr 1
    destroys it (chance, and the loss does not fall), the toy default 1e-3 keeps it."""
    code, _, err = cli(capsys, *TOY, "--order", "II", "--pretrained", toy_weights, "--lr", lr, "--iterations", "20",
                       "--max-tasks", "1", "--out", tmp_path / "run")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    if lr == "1":
        assert len(warnings) == 1 and "Tones" in warnings[0] and "chance" in warnings[0], err
    else:
        assert warnings == [], err


def test_the_warning_rules(tmp_path):
    args = common.finalize_args(common.common_parser("x").parse_args(["--benchmark", "toy", "--out", str(tmp_path / "r")]),
                                "x", {})
    run = common.Run(args, [data.Task("a", list("abcd"), ["{}"], [], [])], [common.HParams(30, 1, 1e-3)])
    falling = [2.0 - i / 30 for i in range(30)]
    assert run.learnt_nothing(0, [80.0], falling) == ""
    assert "chance" in run.learnt_nothing(0, [26.0], falling)                  # 4 classes: chance 25%
    assert "did not fall" in run.learnt_nothing(0, [80.0], [1.0] * 30)
    assert run.learnt_nothing(0, [25.0], []) == "", "nothing trained (zero-shot mode): no warning"


# ---- small things ---------------------------------------------------------------------------------

def test_result_files_get_the_users_normal_permissions(base_run):
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in base_run.out.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_resume_ignores_data_root_on_toy(base_run, tmp_path, capsys):
    out = copy_of(base_run, tmp_path)
    code, stdout, err = cli(capsys, *base_run.argv, "--out", out, "--resume", "--data-root", tmp_path / "elsewhere")
    assert code == 0, err


# ---- a first run on a busy machine --------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_makes_openmp_threads_sleep_before_torch_loads(script):
    src = (ROOT / f"{script}.py").read_text()
    line = 'os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")'
    assert line in src and src.index(line) < src.index("\nimport torch"), f"{script}.py"


def test_a_script_sets_the_openmp_wait_policy_unless_the_user_did():
    code = "import finetune, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in ENV.items() if k != "OMP_WAIT_POLICY"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "PASSIVE", r.stderr
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                       capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "ACTIVE", r.stderr
