"""The five scripts share one skeleton: the same hooks with the same signatures and the same
`main`, so that `diff finetune.py <method>.py` shows the method and its flags only. Every
default sits in one DEFAULTS table per script (MTIL | toy), and `hparams` resolves each task's
iterations, batch size and lr from it, the flags winning."""
import importlib
import inspect

import pytest

import common
import data

SCRIPTS = ["finetune", "gnsp", "keeplora", "rank1_pool", "igsp"]
HOOKS = {  # name -> parameters, in every script
    "parse_args": ["argv"],
    "hparams": ["args", "task", "t"],
    "setup": ["args", "device"],
    "train_task": ["model", "method", "task", "t", "args", "device"],
    "after_task": ["model", "method", "task", "t", "args", "device"],
    "evaluate": ["model", "method", "tasks", "t", "args", "device"],
    "checkpoint": ["model", "method"],
    "restore": ["model", "method", "state", "args", "device"],
    "main": ["argv"],
}


def modules():
    return {name: importlib.import_module(name) for name in SCRIPTS}


def test_main_is_the_same_in_all_five_scripts():
    src = {name: inspect.getsource(m.main) for name, m in modules().items()}
    ref = src["finetune"]
    for name, s in src.items():
        assert s == ref, f"{name}.main differs from finetune.main: the loop belongs in the hooks"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_hook_has_the_same_signature(script):
    m = importlib.import_module(script)
    for hook, params in HOOKS.items():
        assert callable(getattr(m, hook, None)), f"{script}.py has no {hook}()"
        got = list(inspect.signature(getattr(m, hook)).parameters)
        assert got == params, f"{script}.{hook}{tuple(got)} should take {tuple(params)}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_hooks_appear_in_skeleton_order(script):
    """parse_args -> hparams -> (method) -> setup -> train_task -> after_task -> evaluate ->
    checkpoint -> restore -> main, as in finetune.py."""
    m = importlib.import_module(script)
    lines = [inspect.getsourcelines(getattr(m, h))[1] for h in
             ("parse_args", "hparams", "setup", "train_task", "after_task", "evaluate", "checkpoint", "restore",
              "main")]
    assert lines == sorted(lines), f"{script}.py: hooks out of the skeleton's order"


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("benchmark", ["mtil", "toy"])
def test_defaults_come_from_the_table_and_flags_win(script, benchmark):
    """With no flags, every DEFAULTS entry that is a flag lands in args (MTIL or toy column);
    `hparams` returns the table's iterations / batch size / lr unless flags are given."""
    m = importlib.import_module(script)
    col = 0 if benchmark == "mtil" else 1
    args = m.parse_args(["--benchmark", benchmark, "--out", "/nonexistent"])
    for name, values in m.DEFAULTS.items():
        if hasattr(args, name) and name not in common.PER_TASK_FLAGS:
            assert getattr(args, name) == values[col], f"{script} --{name}: {getattr(args, name)} != DEFAULTS {values[col]}"
    names = data.MTIL_ORDERS["I"] if benchmark == "mtil" else data.TOY_ORDERS["I"]
    task = data.Task(names[0], ["a", "b"], ["{}"], list(range(640)), [])
    hp = m.hparams(args, task, 0)
    assert isinstance(hp, common.HParams)
    assert hp.iterations >= 1 and hp.batch_size >= 1 and hp.lr > 0
    flagged = m.parse_args(["--benchmark", benchmark, "--out", "/nonexistent",
                            "--iterations", "7", "--batch-size", "5", "--lr", "0.0123"])
    hp = m.hparams(flagged, task, 0)
    assert (hp.iterations, hp.batch_size, hp.lr) == (7, 5, 0.0123), f"{script}: flags must win over DEFAULTS"
