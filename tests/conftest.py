"""Shared fixtures: a tiny random CLIP, the fast toy pretraining (once per session), offline env."""
import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads make
# tiny-model steps many times slower. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import Phase, settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))
# A failing property test reports its shrunk example without hypothesis' "explain" phase, which
# re-runs the test many more times (tens of seconds on a busy 2-core machine): the grading runs of
# ASSIGNMENTS.md are meant to fail until the student's function is right.
settings.register_profile("suite", phases=[p for p in Phase if p is not Phase.explain])
settings.load_profile("suite")

# A fast pretraining variant of the toy CLIP, used by every end-to-end test (cached per session).
FAST_TOY_PRETRAIN = {"steps": 60, "batch_size": 128, "lr": 2e-3, "warmup": 10, "weight_decay": 0.1}


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory, worker_id):
    """The session's toy CLIP cache. Under pytest-xdist the workers share one folder (this
    session's, beside their own temporary folders), so the fast pretraining runs once: the other
    workers wait on its lock and then read it."""
    base = tmp_path_factory.getbasetemp()
    d = (base if worker_id == "master" else base.parent) / "clip-cache"
    d.mkdir(exist_ok=True)
    os.environ["CLCLIP_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def toy_weights(cache_env, tmp_path_factory) -> Path:
    """A state-dict file of the toy CLIP after the fast pretraining; pass it as --pretrained FILE."""
    import shutil

    import common
    common.load_clip(common.TOY_MODEL, "toy", "cpu", toy_pretrain=FAST_TOY_PRETRAIN, progress_bar=False)
    cached = common.toy_cache_path(0, FAST_TOY_PRETRAIN)   # the plain open_clip state dict of the pretraining
    path = tmp_path_factory.mktemp("toyw") / "toy_fast.pt"
    shutil.copy(cached, path)
    return path


@pytest.fixture(scope="session")
def alignment_recorded(toy_weights):
    """For end-to-end toy runs: (the flags to add, a check of their summary.json). The check: the
    alignment metrics (modality_gap, i2t_r1, t2i_r1) after every finished task, and in
    "zero_shot_info" those of the untouched toy CLIP on the same held-out pairs, computed here
    independently of the script (the same pairs and the same model in every script)."""
    import common
    import data
    n = 100
    model = common.load_clip(common.TOY_MODEL, str(toy_weights), "cpu")
    args = SimpleNamespace(eval_batch_size=128, workers=0, amp="off")
    zero_shot = common.alignment_metrics(model, data.toy_reference(seed=0, n=n, split="heldout"), args,
                                         torch.device("cpu"))

    def check(s: dict) -> None:
        for key in ("modality_gap", "i2t_r1", "t2i_r1"):
            assert len(s[key]) == len(s["acc_matrix"]), f"{key}: one value per finished task"
            assert all(0 <= v <= (2 if key == "modality_gap" else 100) for v in s[key]), key
            assert s["zero_shot_info"][key] == pytest.approx(zero_shot[key], abs=1e-3), f"zero-shot {key}"

    return ["--align-n", str(n)], check


@pytest.fixture()
def adamw_spy(monkeypatch):
    """Replace torch.optim.AdamW by a subclass that records, at every step(), each group's lr and
    the gradients of the parameters in `rec.watch` (ids), then steps as AdamW."""
    rec = SimpleNamespace(lrs=[], grads=[], watch=set(), opts=[])
    Real = torch.optim.AdamW

    class Spy(Real):
        def __init__(self, params, *a, **kw):
            super().__init__(params, *a, **kw)
            rec.opts.append(self)

        def step(self, closure=None):
            rec.lrs.append([g["lr"] for g in self.param_groups])
            rec.grads.append({id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                              if id(p) in rec.watch and p.grad is not None})
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    return rec


@pytest.fixture()
def tiny_clip():
    import common
    torch.manual_seed(0)
    return common.load_clip(common.TOY_MODEL, "none", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end script runs on the toy benchmark and real-size "
                                       "(ViT-B/16) architecture checks; `-m 'not slow'` runs the fast unit tests")


def pytest_collection_modifyitems(config, items):
    for item in items:   # every test that runs a script end to end needs the pretrained toy CLIP
        if "toy_weights" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
