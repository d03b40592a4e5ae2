"""finetune.py end to end through its command line: toy and fake MTIL trees, errors, resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


def run(*argv, timeout=600):
    return subprocess.run([sys.executable, "finetune.py", *map(str, argv)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def summary(path):
    s = json.loads((Path(path) / "summary.json").read_text())
    s.pop("seconds")
    return s


def test_missing_data_exits_2_listing_every_dataset(tmp_path):
    r = run("--order", "I", "--data-root", tmp_path / "nonexistent", "--out", tmp_path / "o")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    for name in ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST",
                 "OxfordPet", "StanfordCars", "SUN397"]:
        assert name in r.stderr
    assert str(tmp_path / "nonexistent") in r.stderr


@pytest.mark.parametrize("pretrained", ["no-such-folder/weights.pt", "no-such-tag"])
def test_bad_pretrained_exits_2(tmp_path, pretrained, cache_env):
    r = run("--benchmark", "toy", "--pretrained", pretrained, "--out", tmp_path / "o")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "--pretrained" in r.stderr or "weights" in r.stderr


def test_bad_flag_value_exits_2(tmp_path):
    r = run("--benchmark", "toy", "--iterations", "0", "--out", tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--iterations" in r.stderr


def test_toy_end_to_end_run_folder(tmp_path, toy_weights, alignment_recorded):
    out = tmp_path / "run"
    align, check_alignment = alignment_recorded
    r = run("--benchmark", "toy", "--pretrained", toy_weights, "--iterations", "3", "--max-tasks", "2",
            "--out", out, "--no-progress", *align)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    for key in ["method", "benchmark", "order", "datasets", "zero_shot", "acc_matrix", "transfer",
                "average", "last", "trainable_params", "seconds"]:
        assert key in s
    assert s["method"] == "finetune" and s["benchmark"] == "toy"
    assert len(s["acc_matrix"]) == 2 and len(s["acc_matrix"][0]) == len(s["datasets"]) == len(s["zero_shot"])
    assert s["trainable_params"] > 0
    check_alignment(s)                   # modality gap / Recall@1 after every task and at zero-shot
    assert "held-out pairs: modality gap" in r.stdout
    assert (out / "acc_matrix.png").is_file() and (out / "config.json").is_file()
    assert len((out / "acc_matrix.csv").read_text().splitlines()) == 3
    assert "Transfer" in r.stdout
    # the same run again (same seed, same machine) -> identical summary (but wall-clock seconds)
    r2 = run("--benchmark", "toy", "--pretrained", toy_weights, "--iterations", "3", "--max-tasks", "2",
             "--out", tmp_path / "run2", "--no-progress", *align)
    assert r2.returncode == 0 and summary(out) == summary(tmp_path / "run2")
    # a second run into the same folder without --resume is refused
    r3 = run("--benchmark", "toy", "--pretrained", toy_weights, "--out", out)
    assert r3.returncode == 2 and "already holds a run" in r3.stderr


def test_zero_shot_mode(tmp_path, toy_weights):
    r = run("--benchmark", "toy", "--pretrained", toy_weights, "--mode", "zero-shot", "--max-tasks", "2",
            "--out", tmp_path / "z", "--no-progress")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "z" / "summary.json").read_text())
    assert s["acc_matrix"] == [s["zero_shot"]] * 2 and s["trainable_params"] == 0


def test_sigkill_mid_task_then_resume_equals_uninterrupted(tmp_path, toy_weights):
    common_args = ["--benchmark", "toy", "--pretrained", str(toy_weights), "--iterations", "8",
                   "--max-tasks", "2", "--align-n", "0", "--no-progress"]   # alignment's resume: each method's CLI test
    a = run(*common_args, "--out", tmp_path / "a")
    assert a.returncode == 0, a.stderr
    out = tmp_path / "b"
    p = subprocess.Popen([sys.executable, "finetune.py", *common_args, "--out", str(out)], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # task 1 finished: its checkpoint and its summary (two atomic writes, one after the other)
    while not ((out / "checkpoint.pt").exists() and (out / "summary.json").exists()) \
            and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)                      # now inside task 2
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = json.loads((out / "summary.json").read_text())["acc_matrix"]
    assert len(done) == 1                # killed mid-run: task 1 done, task 2 not
    b = run(*common_args, "--out", out, "--resume")
    assert b.returncode == 0, b.stderr
    assert summary(out) == summary(tmp_path / "a")


def test_fake_mtil_end_to_end(tmp_path, toy_weights):
    """The real MTIL path (torchvision loaders, splits, transforms, 11 columns) on fake trees."""
    sys.path.insert(0, str(ROOT / "tests"))
    import fake_mtil
    fake_mtil.write_fake_mtil(tmp_path / "data")
    code = ("import sys; sys.path[:0] = ['tests', '.']; import fake_mtil, common, finetune\n"
            "with fake_mtil.skip_md5_checks(): common.cli_main(finetune.main, sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", code, "--order", "II", "--data-root", str(tmp_path / "data"),
                        "--model", "toy-tiny", "--pretrained", str(toy_weights), "--iterations", "2",
                        "--batch-size", "4", "--max-tasks", "2", "--workers", "0", "--out", str(tmp_path / "m"),
                        "--no-progress"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert s["datasets"][:3] == ["StanfordCars", "Food", "MNIST"] and len(s["datasets"]) == 11
    assert len(s["acc_matrix"]) == 2 and all(0 <= v <= 100 for v in s["acc_matrix"][1])
