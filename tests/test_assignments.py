"""Grading tests of ASSIGNMENTS.md that no behaviour test already covers: each states one invariant of
the function a student writes, computed here from its definition, and says in its message which
input broke it. The other grading tests are the behaviour tests marked `exN` in their own files."""
import math

import numpy as np
import pytest

import common


# ---- exercise 1: common.mtil_metrics (ZSCL's Transfer / Average / Last) ------------------------------

def _matrix(seed, rows, cols):
    return np.random.default_rng(seed).uniform(0, 100, (rows, cols)).round(1)


@pytest.mark.ex1
@pytest.mark.parametrize("seed", range(3))
def test_transfer_reads_only_the_entries_above_the_diagonal(seed):
    A = _matrix(seed, 5, 5)
    m = common.mtil_metrics(A)
    want = np.mean([A[:d, d].mean() for d in range(1, 5)])            # dataset d before its task: t < d
    assert m["transfer"] == pytest.approx(want), \
        f"Transfer {m['transfer']} != mean over d >= 2 of mean_(t < d) A[t, d] = {want} for A =\n{A}"
    B = A.copy()
    B[np.tril_indices(5)] = 0.0                                       # the diagonal and below: after training d
    got = common.mtil_metrics(B)["transfer"]
    assert got == pytest.approx(m["transfer"]), \
        f"Transfer changed from {m['transfer']} to {got} when only entries A[t, d] with t >= d changed"
    assert m["transfer_per_dataset"] == pytest.approx([A[:d, d].mean() for d in range(1, 5)]), \
        "transfer_per_dataset: one value per dataset d = 2..T, mean_(t < d) A[t, d]"


@pytest.mark.ex1
@pytest.mark.parametrize("seed", range(3))
def test_average_is_every_entry_and_last_the_final_row(seed):
    A = _matrix(seed + 10, 4, 4)
    m = common.mtil_metrics(A.tolist())                               # a list of rows works too
    assert m["average"] == pytest.approx(A.mean()), f"Average {m['average']} != mean of all entries {A.mean()}"
    assert m["last"] == pytest.approx(A[-1].mean()), f"Last {m['last']} != mean of the last row {A[-1].mean()}"
    assert m["average_per_dataset"] == pytest.approx(A.mean(0)), "average_per_dataset: the mean of each column"
    assert m["last_per_dataset"] == pytest.approx(A[-1]), "last_per_dataset: the last row"
    B = A.copy()
    B[:-1] += 7.0                                                     # every row but the last
    assert common.mtil_metrics(B)["last"] == pytest.approx(m["last"]), "Last must read the last row only"


@pytest.mark.ex1
def test_a_run_stopped_after_one_task():
    A = [[50.0, 20.0, 30.0]]                                          # 1 of 3 tasks trained
    m = common.mtil_metrics(A)
    assert m["transfer"] == pytest.approx(25.0), \
        f"one row of 3 columns: Transfer = mean(A[0, 1], A[0, 2]) = 25, got {m['transfer']}"
    assert m["average"] == pytest.approx(100 / 3) and m["last"] == pytest.approx(100 / 3), \
        f"one row: Average = Last = the row's mean 33.33, got {m['average']}, {m['last']}"


# ---- exercise 2: common.cosine_lr (linear warm-up, then cosine to 0) -----------------------------

# base lr 1, 2 warm-up steps, 6 steps: (s + 1) / 2 for s < 2, then (1 + cos(pi (s - 2) / 4)) / 2
SCHEDULE_1_2_6 = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]


@pytest.mark.ex2
def test_cosine_lr_by_hand():
    got = [common.cosine_lr(s, 1.0, 2, 6) for s in range(6)]
    for s, (a, b) in enumerate(zip(got, SCHEDULE_1_2_6)):
        assert a == pytest.approx(b, abs=1e-12), f"cosine_lr(step={s}, base_lr=1, warmup=2, total=6) = {a}, want {b}"
    assert common.cosine_lr(3, 0.25, 2, 6) == pytest.approx(0.25 * SCHEDULE_1_2_6[3]), "the lr scales with base_lr"


@pytest.mark.ex2
@pytest.mark.parametrize("base,warmup,total", [(1e-3, 10, 100), (5e-5, 100, 1000), (0.3, 0, 20), (2.0, 3, 4)])
def test_cosine_lr_shape(base, warmup, total):
    lr = [common.cosine_lr(s, base, warmup, total) for s in range(total)]
    where = f"(base_lr={base}, warmup={warmup}, total={total})"
    for s in range(warmup):
        assert lr[s] == pytest.approx(base * (s + 1) / warmup), \
            f"warm-up step {s}: lr {lr[s]} != base_lr (step + 1) / warmup {where}: the first step is not 0"
    assert lr[warmup] == pytest.approx(base), f"the first step after the warm-up must use the full base_lr {where}"
    assert all(a >= b for a, b in zip(lr[warmup:], lr[warmup + 1:])), f"the lr must not rise after the warm-up {where}"
    assert lr[-1] > 0, f"the last step's lr must still be > 0 (cosine reaches 0 one step after the end) {where}"
    if (total - warmup) % 2 == 0:
        mid = warmup + (total - warmup) // 2
        assert lr[mid] == pytest.approx(base / 2), f"halfway through the cosine the lr is base_lr / 2 {where}"
