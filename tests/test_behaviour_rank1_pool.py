"""Behaviour tests of rank1_pool.py (DAC: one LoRA read as a pool of rank-1 experts).

Each test states one invariant of the method and checks it against an independent
recomputation, so that a wrong token, a wrong expert set, a wrong scale or a wrong loss term
shows up as a failed assertion that names the invariant and the input:

  * the pool's output is W0 x + b + (alpha/r) * sum over the batch's expert set M of B_i A_i x~,
    with x~ = Dropout(x) on the LoRA path only and M the top-k of this batch's votes, where each
    sample votes for the top-k experts of softmax(router(x~[:, 0]));
  * the router sees token 0 of x~ and nothing else; votes are counted in training only, over
    every batch of the task;
  * merging adds (alpha/r) B[:, K] A[K, :] for the top --merge-k experts K by the task's counts,
    and leaves plain nn.Linear layers behind; merges of later tasks add up;
  * one training step's loss is the multi-positive symmetric CLIP loss over one prompt template
    per task, plus ago_lambda * L_AGO when earlier tasks exist and AGO is on;
  * AdamW (weight decay from the flag) updates only A and B, with a cosine lr from --lr down to
    --eta-min, without warm-up, set before every step.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import rank1_pool as R

FAST = settings(max_examples=25, deadline=None)
CPU = torch.device("cpu")


def toy_args(*extra):
    return R.parse_args(["--benchmark", "toy", "--no-progress", *extra])


# ---- independent references ------------------------------------------------------------------

def stable_top(values, k):
    """Indices of the k largest values; ties go to the lower index (the documented rule)."""
    vals = [float(v) for v in values]
    return sorted(range(len(vals)), key=lambda i: (-vals[i], i))[:k]


def ref_votes_and_set(router: nn.Linear, z: torch.Tensor, k: int):
    """Two-stage selection by hand: per-sample top-k of the router's softmax, then the top-k
    of the summed votes. z: (N, d_in) -> votes (r,), M (list of k indices)."""
    with torch.no_grad():
        p = torch.softmax(z @ router.weight.T + router.bias, dim=-1)         # (N, r)
    votes = torch.zeros(p.shape[1], dtype=torch.long)
    for row in p:
        votes[stable_top(row, k)] += 1
    return votes, stable_top(votes, k)


def ref_pool_output(base, A, B, x, xd, M, alpha, r):
    """W0 x + b + (alpha/r) sum_{i in M} B[:, i] (A[i, :] . x~), experts with equal weight."""
    with torch.no_grad():
        return base(x) + (alpha / r) * (xd @ A[M].T) @ B[:, M].T


def ref_clip_loss(logits, labels):
    """Multi-positive symmetric loss: every text is pulled to all images of its class and vice
    versa (uniform target over the positives), averaged over the two directions."""
    same = labels[:, None] == labels[None, :]

    def one_way(lg):
        logp = lg.log_softmax(-1)
        return torch.stack([-logp[n][same[n]].mean() for n in range(len(lg))]).mean()
    return 0.5 * (one_way(logits) + one_way(logits.T))


def ref_ago(pools, experts, mode, merge_k):
    """L_AGO by hand: mean over modules of sum |<B_t[:, i], b>| over the current top --merge-k
    columns i (by counts so far) and the earlier columns b (code: all columns of every earlier B;
    paper: each earlier task's top --merge-k columns, divided by the number of pairs)."""
    terms = []
    for name, pool in pools.items():
        if mode == "code":
            P = torch.cat([E[name]["B"] for E in experts], 1)
        else:
            P = torch.cat([E[name]["B"][:, stable_top(E[name]["counts"], merge_k)] for E in experts], 1)
        G = pool.B.detach()[:, stable_top(pool.counts, merge_k)].T @ P
        terms.append(G.abs().sum() / (G.numel() if mode == "paper" else 1))
    return torch.stack(terms).mean().item()


# ---- recording helpers -----------------------------------------------------------------------

class RecordingRouter(nn.Module):
    """Wraps a router and keeps a copy of every input it reads."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.inputs = []

    @property
    def weight(self):
        return self.inner.weight

    @property
    def bias(self):
        return self.inner.bias

    def forward(self, z):
        self.inputs.append(z.detach().clone())
        return self.inner(z)


def what_was_read(z, x):
    """Name the token (or the mean) of x (N, L, d) that the router input z (N, d) equals."""
    if z.shape != x[:, 0].shape:
        return f"an input of shape {tuple(z.shape)}"
    for j in range(x.shape[1]):
        if torch.allclose(z, x[:, j]):
            return f"token {j}"
    if torch.allclose(z, x.mean(1), atol=1e-6):
        return "the mean over tokens"
    return "none of the tokens"


def record_routes(pool):
    """Wrap pool.route; returns the list of (votes, gates, pool.training) of every call."""
    calls, route = [], pool.route

    def wrapped(z):
        v, m = route(z)
        calls.append((v.detach().clone(), m.detach().clone(), pool.training))
        return v, m
    pool.route = wrapped
    return calls


def make_pool(d_in, d_out, r, k, alpha=1.0, dropout=0.0, seed=0):
    """A pool with random B and a random (fixed) router, so every expert matters."""
    torch.manual_seed(seed)
    pool = R.RankOnePool(nn.Linear(d_in, d_out), r=r, k=k, alpha=alpha, dropout=dropout)
    with torch.no_grad():
        pool.B.normal_()
        pool.router.weight.normal_()
        pool.router.bias.normal_()
    return pool


def fake_task(labels, n_classes, templates=("a photo of a {}.",), seed=0):
    """A task of random 3x32x32 images whose pixel [0, 0, 0] holds the label (to read it back)."""
    g = torch.Generator().manual_seed(seed)
    ds = []
    for y in labels:
        img = torch.randn(3, 32, 32, generator=g)
        img[0, 0, 0] = float(y)
        ds.append((img, int(y)))
    names = ["red circle", "green star", "blue square", "yellow moon", "black cross"][:n_classes]
    return SimpleNamespace(name="T", classnames=names, templates=list(templates), train=ds, test=ds)


def fill_pools(pools, seed, b_scale=1.0, counts=True):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pools.values():
            p.B.copy_(torch.randn(p.B.shape, generator=g) * b_scale)
            if counts:
                p.counts.copy_(torch.randperm(p.r, generator=g) * 1000)      # distinct, far apart


# ---- the pool's forward: routing, expert sum, dropout ------------------------------------------

@pytest.mark.ex5
@FAST
@given(d_in=st.integers(2, 10), d_out=st.integers(1, 8), r=st.integers(2, 8), n=st.integers(1, 6),
       length=st.integers(1, 4), alpha=st.sampled_from([0.5, 1.0, 3.0]), p=st.sampled_from([0.0, 0.2, 0.5]),
       data_=st.data())
def test_forward_is_base_plus_equal_weight_sum_of_this_batch_top_experts(d_in, d_out, r, n, length, alpha, p, data_):
    k = data_.draw(st.integers(1, r), label="k")
    seed = data_.draw(st.integers(0, 10_000), label="seed")
    pool = make_pool(d_in, d_out, r, k, alpha, p, seed)
    x = torch.randn(n, length, d_in)
    # training: replay the dropout draw to know x~ (the only random op of the forward)
    pool.train()
    torch.manual_seed(seed + 1)
    out = pool(x)
    torch.manual_seed(seed + 1)
    xd = F.dropout(x, p, training=True)
    votes, M = ref_votes_and_set(pool.router, xd[:, 0], k)
    expect = ref_pool_output(pool.base, pool.A, pool.B, x, xd, M, alpha, r)
    torch.testing.assert_close(out.detach(), expect, rtol=1e-5, atol=1e-5, msg=lambda m: (
        f"train forward != W0 x + b + (alpha/r) sum_(i in M) B_i A_i x~ with M = top-{k} of this batch's "
        f"votes {votes.tolist()} = {M} (r={r}, alpha={alpha}, dropout={p}, N={n}, L={length})\n{m}"))
    assert torch.equal(pool.counts, votes), \
        f"one training batch must add exactly its votes {votes.tolist()} to counts, got {pool.counts.tolist()}"
    # evaluation: no dropout, same routing rule, no counting
    pool.eval()
    out = pool(x)
    votes, M = ref_votes_and_set(pool.router, x[:, 0], k)
    torch.testing.assert_close(out.detach(), ref_pool_output(pool.base, pool.A, pool.B, x, x, M, alpha, r),
                               rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"eval forward (no dropout), M={M}, r={r}, k={k}\n{m}")
    assert int(pool.counts.sum()) == n * k, "an eval forward must not add votes to counts"


@pytest.mark.ex5
def test_router_reads_exactly_token0_of_the_lora_input():
    pool = make_pool(8, 5, r=6, k=3, dropout=0.0, seed=1)
    pool.router = RecordingRouter(pool.router)
    calls = record_routes(pool)
    pool.train()
    torch.manual_seed(0)
    # token 0 differs between samples, tokens 1: are identical across samples
    x = torch.randn(1, 5, 8).repeat(4, 1, 1)
    x[:, 0] = torch.randn(4, 8)

    def router_inputs_of(inp):
        pool.router.inputs.clear()
        pool(inp)
        assert pool.router.inputs, "the router module was not called in the forward"
        for z in pool.router.inputs:
            assert z.shape == inp[:, 0].shape and torch.equal(z, inp[:, 0]), \
                f"the router must read token 0 of the (N, L, d_in) layer input; it read {what_was_read(z, inp)}"
        return pool.router.inputs[0]

    router_inputs_of(x)
    # tokens 1: changed (token 0 kept): same router input, same votes, same expert set
    x2 = x.clone()
    x2[:, 1:] = torch.randn(4, 4, 8) * 5
    router_inputs_of(x2)
    assert torch.equal(calls[1][0], calls[0][0]) and torch.equal(calls[1][1], calls[0][1]), \
        "changing tokens 1: (token 0 kept) changed the votes or the expert set"
    # token 0 identical across samples, other tokens differ: every sample votes alike
    x3 = torch.randn(4, 5, 8)
    x3[:, 0] = torch.randn(8)
    router_inputs_of(x3)
    v = calls[2][0]
    assert sorted(v.nonzero().flatten().tolist()) == sorted(calls[2][1].nonzero().flatten().tolist()) \
        and set(v.tolist()) <= {0, 4}, f"identical token 0 -> all 4 samples vote alike, got votes {v.tolist()}"


@pytest.mark.ex5
def test_router_reads_token0_after_dropout_and_dropout_spares_the_base_path():
    p = 0.5
    pool = make_pool(8, 5, r=6, k=3, dropout=p, seed=2)
    pool.router = RecordingRouter(pool.router)
    pool.train()
    x = torch.randn(3, 4, 8)
    torch.manual_seed(7)
    out = pool(x)
    torch.manual_seed(7)
    xd = F.dropout(x, p, training=True)
    assert not torch.equal(xd, x)
    z = pool.router.inputs[0]
    assert torch.equal(z, xd[:, 0]), \
        "the router must read token 0 of the dropout-applied input x~ (the same draw the experts see); " \
        f"it read {what_was_read(z, xd)} of x~, {what_was_read(z, x)} of the clean x"
    _, M = ref_votes_and_set(pool.router.inner, xd[:, 0], 3)
    lora = (1 / 6) * (xd @ pool.A[M].T) @ pool.B[:, M].T
    torch.testing.assert_close((out - lora).detach(), pool.base(x).detach(), rtol=1e-5, atol=1e-5, msg=lambda m: (
        f"output minus the LoRA part on x~ must be the frozen base W0 x + b on the clean x (dropout={p})\n{m}"))
    # B = 0 (a fresh pool): a training forward with dropout is exactly the base layer
    with torch.no_grad():
        pool.B.zero_()
    for seed in range(3):
        torch.manual_seed(seed)
        assert torch.equal(pool(x), pool.base(x)), \
            f"with B = 0 a train-mode forward (dropout {p}) must equal base(x) exactly (seed {seed})"


@pytest.mark.ex5
def test_expert_set_follows_this_batch_votes_not_the_task_counts():
    r, k, n = 6, 3, 5
    pool = make_pool(7, 4, r=r, k=k, dropout=0.0, seed=3)
    with torch.no_grad():
        pool.router.weight.zero_()
        pool.router.bias.copy_(torch.tensor([0., 0., 0., 3., 2., 1.]))     # every sample votes {3, 4, 5}
        pool.counts.copy_(torch.tensor([1000, 900, 800, 0, 0, 0]))           # the task so far favours {0, 1, 2}
    calls = record_routes(pool)
    pool.train()
    x = torch.randn(n, 3, 7)
    out = pool(x)
    used = calls[0][1].nonzero().flatten().tolist()
    assert used == [3, 4, 5], f"the batch's top-{k} by its own votes is [3, 4, 5]; the step used {used}"
    out.square().sum().backward()
    b_cols = (pool.B.grad.abs().sum(0) > 0).nonzero().flatten().tolist()
    a_rows = (pool.A.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    assert b_cols == [3, 4, 5] and a_rows == [3, 4, 5], \
        f"only the batch's experts [3, 4, 5] may get gradient, got B columns {b_cols}, A rows {a_rows} " \
        f"(counts before the batch favoured [0, 1, 2])"
    torch.testing.assert_close(out.detach(), ref_pool_output(pool.base, pool.A, pool.B, x, x, [3, 4, 5], 1.0, r))
    assert pool.counts.tolist() == [1000, 900, 800, n, n, n], \
        f"counts must be the old counts plus this batch's votes, got {pool.counts.tolist()}"


@pytest.mark.ex5
def test_fixed_router_output_does_not_depend_on_router_confidence():
    # experts are summed with weight 1: a sharper router with the same rankings changes nothing
    pool = make_pool(6, 4, r=5, k=2, dropout=0.0, seed=4)
    pool.train()
    x = torch.randn(3, 2, 6)
    out1 = pool(x).detach()
    with torch.no_grad():
        pool.router.weight.mul_(10)                                          # logits x10: same rankings
        pool.router.bias.mul_(10)
    out2 = pool(x).detach()
    torch.testing.assert_close(out2, out1, rtol=1e-5, atol=1e-6, msg=lambda m: (
        "fixed router: scaling the router logits (same votes, same expert set) changed the output; "
        f"the selected experts must be summed with weight 1, not weighted by router probabilities\n{m}"))


# ---- votes over a task -----------------------------------------------------------------------

@pytest.mark.ex5
def test_counts_are_the_sum_of_every_training_batch_votes_and_eval_adds_none(tiny_clip):
    iters = 3
    args = toy_args("--iterations", str(iters), "--batch-size", "4")
    pools = R.attach_pools(tiny_clip, args)
    tiny_clip.eval()                                                         # as after an evaluation
    calls = {name: record_routes(p) for name, p in pools.items()}
    task = fake_task([0, 1, 2, 0, 1, 2, 0, 1], 3)
    R.train_pools(tiny_clip, pools, {}, task, 0, args, CPU)
    for name, p in pools.items():
        assert len(calls[name]) == iters, f"{name}: routed {len(calls[name])} times in {iters} steps"
        assert all(c[2] for c in calls[name]), \
            f"{name}: train_pools must run its steps in training mode (the model entered in eval mode)"
        total = torch.stack([c[0] for c in calls[name]]).sum(0)
        assert torch.equal(p.counts, total), \
            f"{name}: counts {p.counts.tolist()} != sum of the {iters} batches' votes {total.tolist()}"
        assert int(total.sum()) == iters * 4 * args.top_k
    assert not tiny_clip.training, "train_pools must leave the model in eval mode"
    before = {n: p.counts.clone() for n, p in pools.items()}
    with torch.no_grad():
        tiny_clip.encode_image(torch.randn(2, 3, 32, 32))
        tiny_clip.encode_texts(["a red circle"], CPU)
    for n, p in pools.items():
        assert torch.equal(p.counts, before[n]), f"{n}: an eval forward changed the counts"


# ---- merging ---------------------------------------------------------------------------------

class StubModel:
    def __init__(self, layers):
        self.layers_ = layers

    def get_layer(self, name):
        return self.layers_[name]


@pytest.mark.ex6
@FAST
@given(r=st.integers(2, 8), alpha=st.sampled_from([0.5, 1.0, 2.0, 3.0]), n_layers=st.integers(1, 3), data_=st.data())
def test_merge_adds_alpha_over_r_times_the_top_merge_k_experts_by_counts(r, alpha, n_layers, data_):
    merge_k = data_.draw(st.integers(1, r), label="merge_k")
    top_k = data_.draw(st.integers(1, r), label="top_k")
    seed = data_.draw(st.integers(0, 10_000), label="seed")
    args = toy_args("--rank", str(r), "--top-k", str(top_k), "--merge-k", str(merge_k), "--alpha", str(alpha))
    g = torch.Generator().manual_seed(seed)
    layers, E, before, K = {}, {}, {}, {}
    for i in range(n_layers):
        d_in, d_out = 3 + i, 2 + 2 * i
        name = f"l{i}"
        layers[name] = nn.Linear(d_in, d_out).requires_grad_(False)
        before[name] = layers[name].weight.clone()
        counts = torch.randint(0, 4, (r,), generator=g)                     # small range: ties happen
        E[name] = {"A": torch.randn(r, d_in, generator=g), "B": torch.randn(d_out, r, generator=g), "counts": counts}
        K[name] = stable_top(counts, merge_k)
    R.merge_experts(StubModel(layers), E, args)
    for name, lin in layers.items():
        e = E[name]
        delta = (alpha / r) * e["B"][:, K[name]] @ e["A"][K[name]]
        torch.testing.assert_close(lin.weight, before[name] + delta, rtol=1e-5, atol=1e-6, msg=lambda m: (
            f"{name}: W must become W + (alpha/r) B[:, K] A[K, :] with K = top-{merge_k} by counts "
            f"{e['counts'].tolist()} (ties -> lower index) = {K[name]}, alpha={alpha}, r={r}\n{m}"))
        assert not torch.equal(lin.weight, before[name]), f"{name}: the merge did not change W"


@pytest.mark.ex6
def test_after_task_unwraps_to_plain_linear_and_merges_add_up_over_tasks(tiny_clip):
    args = toy_args("--rank", "6", "--top-k", "4", "--merge-k", "3", "--alpha", "2")
    W0 = {n: l.weight.detach().clone() for n, l in tiny_clip.layers(proj=False).items()}
    expect = {n: w.clone() for n, w in W0.items()}
    method = {"experts": []}                                                 # as setup builds it
    for t in range(2):
        merged = tiny_clip.layers(proj=False)
        pools = R.attach_pools(tiny_clip, args)
        method["pools"] = pools                                              # as train_task leaves it
        for n, p in pools.items():
            assert p.B.abs().sum() == 0 and p.counts.sum() == 0, f"task {t}: {n} must start a fresh pool"
            assert p.base is merged[n], f"task {t}: {n}'s pool must wrap the merged layer"
        fill_pools(pools, seed=t)
        for p in pools.values():
            p.counts[torch.tensor([4, 1])] = 10**6                          # 2 set apart, then the rest by rank
        info = R.after_task(tiny_clip, method, None, t, args, CPU)
        assert "pools" not in method, f"task {t}: after_task must drop the live pools"
        assert len(method["experts"]) == t + 1, f"task {t}: after_task must append this task's experts"
        assert set(info) == {"merge_seconds"}, f"task {t}: after_task info {sorted(info)}"
        E = method["experts"][-1]
        for n, p in pools.items():
            K = stable_top(p.counts, 3)
            expect[n] = expect[n] + (2 / 6) * p.B.detach()[:, K] @ p.A.detach()[K]
            assert torch.equal(E[n]["counts"], p.counts) and torch.equal(E[n]["B"], p.B.detach())
        for n, lin in tiny_clip.layers(proj=False).items():
            assert type(lin) is nn.Linear, f"after task {t}: {n} is {type(lin).__name__}, not a plain nn.Linear"
            torch.testing.assert_close(lin.weight, expect[n], rtol=1e-5, atol=1e-6, msg=lambda m: (
                f"after task {t}: {n} must be W0 + sum over tasks of (alpha/r) B[:, K] A[K, :]\n{m}"))
            assert not torch.equal(lin.weight, W0[n])
        assert not any(isinstance(m, R.RankOnePool) for m in tiny_clip.modules()), "a pool survived the merge"


# ---- one training step: the loss --------------------------------------------------------------

@FAST
@given(n=st.integers(1, 8), n_classes=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_clip_loss_pulls_each_sample_to_all_of_its_class_in_both_directions(n, n_classes, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, n, generator=g) * 3                              # distinct texts and images
    labels = torch.randint(0, n_classes, (n,), generator=g)
    got, want = R.multi_positive_clip_loss(logits, labels).item(), ref_clip_loss(logits, labels).item()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6), \
        f"multi-positive symmetric loss {got} != {want} for labels {labels.tolist()}"


@pytest.mark.ex6
@pytest.mark.parametrize("case", ["code", "paper", "off", "first-task"])
def test_one_step_loss_is_clip_loss_plus_lambda_ago_from_the_second_task_on(tiny_clip, case):
    mode = "code" if case == "first-task" else case
    lam = 0.37
    args = toy_args("--iterations", "1", "--batch-size", "6", "--dropout", "0", "--ago", mode,
                    "--ago-lambda", str(lam), "--lr", "1e-3", "--rank", "6", "--top-k", "4", "--merge-k", "2")
    experts = []
    if case != "first-task":                                                 # one earlier task, merged
        pools = R.attach_pools(tiny_clip, args)
        fill_pools(pools, seed=10, b_scale=0.5)
        experts.append(R.merge_pools(tiny_clip, pools, args))
    P = R.ago_reference(experts, args, CPU)
    pools = R.attach_pools(tiny_clip, args)
    fill_pools(pools, seed=11, b_scale=0.05)                                 # a pool mid-task: B != 0
    counts0 = {n: p.counts.clone() for n, p in pools.items()}
    # repeated classes: multi-positive. (With one template per task, same-class texts are identical
    # and the one-hot CLIP loss equals this one, so only scale, direction and terms are tested here.)
    labels = [0, 1, 2, 0, 1, 0]
    task = fake_task(labels, 3)                                              # one batch = the whole set
    # the expected loss, recomputed on the same (unshuffled) batch in train mode
    tiny_clip.train()
    with torch.no_grad():
        y = torch.tensor(labels)
        images = torch.stack([img for img, _ in task.train])
        txt = tiny_clip.encode_texts([task.templates[0].format(task.classnames[c]) for c in labels], CPU)
        img = F.normalize(tiny_clip.encode_image(images), dim=-1)
        l_clip = ref_clip_loss(tiny_clip.logit_scale.exp() * txt @ img.T, y).item()
        l_ago = ref_ago(pools, experts, mode, 2) if experts else 0.0
    for n, p in pools.items():
        p.counts.copy_(counts0[n])
    loss, ago = R.train_pools(tiny_clip, pools, P, task, len(experts), args, CPU)
    if case in ("code", "paper"):
        assert l_ago > 0
        assert ago == pytest.approx(l_ago, rel=1e-4), f"--ago {mode}: returned L_AGO {ago} != recomputed {l_ago}"
        assert loss == pytest.approx(l_clip + lam * l_ago, rel=1e-4), \
            f"--ago {mode}: loss {loss} != L_clip {l_clip} + {lam} * L_AGO {l_ago} = {l_clip + lam * l_ago}"
    else:
        assert ago == 0, f"{case}: no AGO term expected, returned L_AGO {ago}"
        assert loss == pytest.approx(l_clip, rel=1e-4), \
            f"{case}: loss {loss} must be the multi-positive CLIP loss alone ({l_clip})"


def test_each_step_prompts_every_sample_with_its_class_and_one_template_per_task(tiny_clip):
    args = toy_args("--iterations", "3", "--batch-size", "4")
    templates = ("a photo of a {}.", "art of the {}.", "{}, seen from far away", "itap of a {}")
    task = fake_task([0, 1, 2, 3, 0, 1, 2, 3], 4, templates)
    pools = R.attach_pools(tiny_clip, args)
    texts, images = [], []
    enc_t, enc_i = tiny_clip.encode_text, tiny_clip.encode_image

    def rec_text(tokens, normalize=False):
        texts.append(tokens.clone())
        return enc_t(tokens, normalize=normalize)

    def rec_images(x, normalize=False):
        images.append(x.detach().clone())
        return enc_i(x, normalize=normalize)
    tiny_clip.encode_text, tiny_clip.encode_image = rec_text, rec_images
    R.train_pools(tiny_clip, pools, {}, task, 0, args, CPU)
    assert len(texts) == len(images) == 3, \
        f"expected one text and one image batch per step, got {len(texts)}, {len(images)}"
    used = set()
    for step, (t, x) in enumerate(zip(texts, images)):
        y = x[:, 0, 0, 0].round().long().tolist()                           # labels read back from the pixels
        fits = [T for T in templates                                        # the tokens of these prompts
                if torch.equal(t, tiny_clip.tokenize([T.format(task.classnames[c]) for c in y]))]
        assert fits, f"step {step}: prompts {t} are not one task template filled with each sample's class {y}"
        used.update(fits)
    assert len(used) == 1, f"one template per task expected, the steps used {sorted(used)}"


# ---- the optimiser and the schedule ------------------------------------------------------------

def test_adamw_on_a_and_b_only_with_cosine_lr_to_eta_min_set_every_step(tiny_clip, monkeypatch):
    iters, lr = 5, 3e-3
    args = toy_args("--iterations", str(iters), "--batch-size", "4", "--lr", str(lr))
    made = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.lrs, self.wds = [], []
            made.append(self)

        def step(self, closure=None):
            self.lrs.append([g["lr"] for g in self.param_groups])
            self.wds.append([g["weight_decay"] for g in self.param_groups])
            return super().step(closure)
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    pools = R.attach_pools(tiny_clip, args)
    trainable = {id(p) for n, p in tiny_clip.named_parameters() if p.requires_grad}
    ab = {id(t) for p in pools.values() for t in (p.A, p.B)}
    assert trainable == ab, "only the pools' A and B may require grad (routers, CLIP weights, logit_scale frozen)"
    scale0 = tiny_clip.logit_scale.detach().clone()
    R.train_pools(tiny_clip, pools, {}, fake_task([0, 1, 2, 0, 1, 2, 0, 1], 3), 0, args, CPU)
    assert len(made) == 1, f"expected one AdamW per task, got {len(made)}"
    opt = made[0]
    optimised = {id(q) for g in opt.param_groups for q in g["params"]}
    assert optimised == ab, f"AdamW must hold exactly the {len(ab)} A/B tensors, holds {len(optimised)}"
    assert all(g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    assert opt.wds == [[0.01] * len(opt.param_groups)] * iters, \
        f"weight decay must be 0.01 at every step, got {opt.wds}"
    want = [1e-6 + (lr - 1e-6) * (1 + math.cos(math.pi * s / iters)) / 2 for s in range(iters)]
    got = [l[0] for l in opt.lrs]
    assert all(len(set(l)) == 1 for l in opt.lrs)
    assert got == pytest.approx(want, rel=1e-9, abs=0), \
        f"lr per step must be cosine from {lr} to eta_min 1e-6 over {iters} steps, no warm-up: want {want}, got {got}"
    assert torch.equal(tiny_clip.logit_scale, scale0), "logit_scale changed"
    assert all(p.B.abs().sum() > 0 for p in pools.values()), "B was not updated"
