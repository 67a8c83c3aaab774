"""Cross entropy / token log-probs (+ entropy), Triton backend vs an fp64 reference, forward and backward.

Errors are judged by the rule in _tolerance.py: at most 2x the torch backend's error at the same
precision (+ a floor of 8 fp32 ulps of the largest |reference|). On CPU the kernels run under the
Triton interpreter (tests/conftest.py), where the kernels use a 256-wide vocab chunk, so vocab
1000 and 997 walk four chunks with a masked tail and vocab 50 one partial chunk.
"""
import pytest
import torch

from _tolerance import assert_within_torch_error, kernel_devices, poisoned_allocations
from kernels import cross_entropy, token_logprobs
from kernels.cross_entropy import _log_softmax_at_label

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100
# (token shape, vocab, strided): 3 x 37 tokens over 1000 (logits a column slice of a wider buffer, so
# the row stride is not the vocab), a prime vocab, and a vocab smaller than one chunk
CASES = [((3, 37), 1000, True), ((2, 5), 997, False), ((7,), 50, False)]
if "cuda" in kernel_devices():  # GPU runs: rows of several 4096-wide GPU chunks and a masked tail
    CASES.append(((4, 9), 10007, True))


def _case_id(c):
    return f"{'x'.join(map(str, c[0]))}-V{c[1]}{'-strided' if c[2] else ''}"


def _inputs(tokens, vocab, dtype, device, strided=False, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    width = vocab + 24 if strided else vocab
    # scale 3 and an offset: peaked distributions, and an lse far from 0
    logits = (3 * torch.randn(*tokens, width, generator=g) + 4)[..., :vocab].to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, tokens, generator=g)
    if ignore_every:
        labels.view(-1)[::ignore_every] = IGNORE
    upstream = torch.randn(tokens, generator=g).to(device)
    upstream_h = torch.randn(tokens, generator=g).to(device)
    return logits, labels.to(device), upstream, upstream_h


def _log_softmax_fp64(z):
    return torch.log_softmax(z.double(), dim=-1)


def _entropy_fp64(logp):
    return -(logp.exp() * logp.masked_fill(torch.isneginf(logp), 0.0)).sum(-1)


def _ce(logits, labels, reduction, upstream, backend):
    """Loss and dlogits; backend "fp64" is the reference (autograd through log_softmax in fp64)."""
    z = (logits.double() if backend == "fp64" else logits).detach().clone().requires_grad_()
    if backend == "fp64":
        logp = _log_softmax_fp64(z)
        valid = labels != IGNORE
        nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid
        loss = {"none": nll, "sum": nll.sum(), "mean": nll.sum() / valid.sum()}[reduction]
    else:
        loss = cross_entropy(z, labels, ignore_index=IGNORE, reduction=reduction, backend=backend)
    weight = upstream.to(loss.dtype) if reduction == "none" else torch.ones((), dtype=loss.dtype)
    (dz,) = torch.autograd.grad(loss, z, weight)
    return loss.detach(), dz


def _logprobs(logits, labels, upstream, upstream_h, backend, entropy=True):
    z = (logits.double() if backend == "fp64" else logits).detach().clone().requires_grad_()
    if backend == "fp64":
        logp = _log_softmax_fp64(z)
        outs = [logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)] + ([_entropy_fp64(logp)] if entropy else [])
    else:
        res = token_logprobs(z, labels, return_entropy=entropy, backend=backend)
        outs = list(res) if entropy else [res]
    weights = [upstream, upstream_h][: len(outs)]
    (dz,) = torch.autograd.grad(outs, z, [w.to(o.dtype) for w, o in zip(weights, outs)])
    return [o.detach() for o in outs] + [dz]


def _check_all(names, out, ref, truth, what):
    for name, o, r, t in zip(names, out, ref, truth):
        if name.startswith("d"):
            assert o.dtype == r.dtype, f"{what} {name}: dtype {o.dtype}, logits' dtype is {r.dtype}"
        else:
            assert o.dtype == torch.float32, f"{what} {name}: dtype {o.dtype}, expected fp32"
        assert_within_torch_error(f"{what} {name}", o, r, t)


# "none" with random upstream gradients exercises the per-token path on every shape; mean and sum
# are torch reductions on top of it, checked on one shape
CE_PARAMS = [pytest.param(c, "none", id=f"{_case_id(c)}-none") for c in CASES] + \
    [pytest.param(CASES[0], r, id=f"{_case_id(CASES[0])}-{r}") for r in ("mean", "sum")]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,reduction", CE_PARAMS)
def test_cross_entropy_within_2x_torch_error(device, dtype, case, reduction):
    tokens, vocab, strided = case
    logits, labels, upstream, _ = _inputs(tokens, vocab, dtype, device, strided)
    truth = _ce(logits, labels, reduction, upstream, "fp64")
    ref = _ce(logits, labels, reduction, upstream, "torch")
    with poisoned_allocations() as poison:  # an unwritten dlogits / stats element would show up as NaN
        out = _ce(logits, labels, reduction, upstream, "triton")
    assert poison.calls > 0
    _check_all(["loss", "dlogits"], out, ref, truth, f"cross_entropy {reduction} {dtype} {_case_id(case)}")
    ignored = labels == IGNORE
    assert ignored.any() and (out[1][ignored] == 0).all(), "ignored tokens must get exactly zero gradient"
    if reduction == "none":
        assert (out[0][ignored] == 0).all()


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES[:2], ids=_case_id)
def test_token_logprobs_and_entropy_within_2x_torch_error(device, dtype, case):
    tokens, vocab, strided = case
    logits, labels, up, up_h = _inputs(tokens, vocab, dtype, device, strided, seed=1, ignore_every=0)
    truth = _logprobs(logits, labels, up, up_h, "fp64")
    ref = _logprobs(logits, labels, up, up_h, "torch")
    with poisoned_allocations():
        out = _logprobs(logits, labels, up, up_h, "triton")
    _check_all(["logprob", "entropy", "dlogits"], out, ref, truth, f"token_logprobs {dtype} {_case_id(case)}")


@pytest.mark.parametrize("device", kernel_devices())
def test_token_logprobs_without_entropy(device):
    logits, labels, up, up_h = _inputs((4, 9), 300, torch.bfloat16, device, seed=2, ignore_every=0)
    args = (logits, labels, up, up_h)
    truth, ref, out = (_logprobs(*args, backend=b, entropy=False) for b in ("fp64", "torch", "triton"))
    assert len(out) == 2
    _check_all(["logprob", "dlogits"], out, ref, truth, "token_logprobs bf16 no entropy")


@pytest.mark.parametrize("device", kernel_devices())
def test_entropy_only_gradient(device):
    # the logprob output unused: its gradient arrives as None, only -p (z - zbar) h remains
    logits, labels, _, up_h = _inputs((3, 11), 400, torch.float32, device, seed=3, ignore_every=0)
    grads = {}
    for backend in ("fp64", "torch", "triton"):
        z = (logits.double() if backend == "fp64" else logits).clone().requires_grad_()
        ent = _entropy_fp64(_log_softmax_fp64(z)) if backend == "fp64" else \
            token_logprobs(z, labels, return_entropy=True, backend=backend)[1]
        (grads[backend],) = torch.autograd.grad(ent, z, up_h.to(ent.dtype))
    assert_within_torch_error("d entropy / d logits", grads["triton"], grads["torch"], grads["fp64"])


# Triton on CPU tensors needs the interpreter; with it off (GPU runs) these cases run on CUDA where noted.
CPU_BACKENDS = ["torch"] + (["triton"] if "cpu" in kernel_devices() else [])
BACKEND_DEVICES = [("torch", "cpu")] + [("triton", d) for d in kernel_devices()]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_entropy_gradient_formula_gradcheck(backend):
    """The derivation d entropy/dz_j = -p_j (z_j - zbar) (and d logprob/dz = onehot - p), checked by finite
    differences in fp64 on the vocab-parallel code path with group=None (torch math), and the Triton
    backward against the analytic fp64 autograd gradient of the same outputs."""
    g = torch.Generator().manual_seed(4)
    z = (2 * torch.randn(5, 7, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, 7, (5,), generator=g)
    if backend == "torch":
        assert torch.autograd.gradcheck(lambda t: _log_softmax_at_label(t, labels, None, None, True, "torch"), (z,))
        return
    zf = z.detach().float().requires_grad_()
    lp, ent = _log_softmax_at_label(zf, labels, None, None, True, "triton")
    w_lp, w_ent = torch.randn(5, generator=g), torch.randn(5, generator=g)
    (got,) = torch.autograd.grad((lp * w_lp + ent * w_ent).sum(), zf)
    p = torch.softmax(z.detach(), -1)
    zbar = (p * z.detach()).sum(-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(labels, 7).double()
    want = w_lp.double()[:, None] * (onehot - p) - w_ent.double()[:, None] * p * (z.detach() - zbar)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)  # fp32 kernel, |dz| <= ~5


@pytest.mark.parametrize("device", kernel_devices())
def test_negative_infinite_logits(device):
    # masked vocab entries (-inf): a first 256-chunk that is entirely -inf (the running max stays -inf),
    # and a row with only three finite entries; p = 0 there, and no 0 * inf may turn into NaN
    logits, labels, up, up_h = _inputs((2, 3), 600, torch.float32, device, seed=5, ignore_every=0)
    logits[0, :, :300] = float("-inf")
    labels[0] = torch.tensor([300, 450, 599])
    logits[1, 1, :] = float("-inf")
    logits[1, 1, [5, 260, 590]] = torch.tensor([1.0, 2.0, 3.0])
    labels[1, 1] = 260
    truth, ref, out = (_logprobs(logits, labels, up, up_h, b) for b in ("fp64", "torch", "triton"))
    _check_all(["logprob", "entropy", "dlogits"], out, ref, truth, "token_logprobs -inf logits")
    assert (out[2][torch.isneginf(logits)] == 0).all()
    loss_truth, loss_ref, loss_out = (_ce(logits, labels, "none", up, b) for b in ("fp64", "torch", "triton"))
    _check_all(["loss", "dlogits"], loss_out, loss_ref, loss_truth, "cross_entropy -inf logits")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_tokens_ignored_and_empty(device, backend):
    z = torch.randn(2, 3, 40, device=device, requires_grad=True)
    labels = torch.full((2, 3), IGNORE, device=device)
    assert torch.isnan(cross_entropy(z, labels, backend=backend)), "mean over zero tokens is 0/0, as in torch"
    loss = cross_entropy(z, labels, reduction="sum", backend=backend)
    (dz,) = torch.autograd.grad(loss, z)
    assert loss.item() == 0 and (dz == 0).all()
    empty = torch.randn(0, 40, device=device, requires_grad=True)
    none = cross_entropy(empty, torch.zeros(0, dtype=torch.long, device=device), reduction="none", backend=backend)
    assert none.shape == (0,)
    lp = token_logprobs(empty, torch.zeros(0, dtype=torch.long, device=device), backend=backend)
    (dz,) = torch.autograd.grad(lp.sum(), empty)
    assert dz.shape == (0, 40)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_out_of_vocab_label_is_nan_without_the_host_check(backend, device):
    # on CUDA the public functions skip the label-range check (a device sync); the kernels then
    # give NaN for such tokens rather than reading out of bounds. Exercised on the internal path.
    z = torch.randn(4, 30, device=device)
    labels = torch.tensor([3, 30, -7, IGNORE], device=device)
    lp = _log_softmax_at_label(z, labels, None, IGNORE, False, backend)
    assert torch.isfinite(lp[0]) and torch.isnan(lp[1]) and torch.isnan(lp[2]) and lp[3] == 0


def test_bad_inputs_raise_with_names_and_shapes():
    z = torch.randn(3, 5, 10)
    labels = torch.randint(0, 10, (3, 5))
    with pytest.raises(TypeError, match=r"labels must be an integer tensor.*float32.*\(3, 5\)"):
        cross_entropy(z, labels.float())
    with pytest.raises(TypeError, match=r"logits must be a floating-point.*\(3, 5, 10\)"):
        token_logprobs(z.long(), labels)
    with pytest.raises(ValueError, match=r"logits shape \(3, 5, 10\) must be labels shape \(3, 4\)"):
        cross_entropy(z, labels[:, :4])
    bad = labels.clone()
    bad[1, 2] = 10
    with pytest.raises(ValueError, match=r"labels \(shape \(3, 5\)\) must lie in \[0, 10\).*got 10 at \(1, 2\)"):
        cross_entropy(z, bad)
    bad[1, 2] = IGNORE  # fine for cross_entropy, but token_logprobs has no ignore_index
    cross_entropy(z, bad)
    with pytest.raises(ValueError, match=r"got -100 at \(1, 2\)"):
        token_logprobs(z, bad)
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_entropy(z, labels, reduction="avg")
    with pytest.raises(ValueError, match="unknown backend"):
        cross_entropy(z, labels, backend="cuda")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_output_shapes_and_dtypes(backend, device):
    z = torch.randn(2, 3, 17, dtype=torch.bfloat16, device=device)
    labels = torch.randint(0, 17, (2, 3), device=device)
    assert cross_entropy(z, labels, reduction="none", backend=backend).shape == (2, 3)
    assert cross_entropy(z, labels, backend=backend).shape == ()
    lp, ent = token_logprobs(z, labels, return_entropy=True, backend=backend)
    assert lp.shape == ent.shape == (2, 3) and lp.dtype == ent.dtype == torch.float32
    # int32 labels (any integer dtype) give the same results as int64
    torch.testing.assert_close(token_logprobs(z, labels.int(), backend=backend), lp, rtol=0, atol=0)
    torch.testing.assert_close(cross_entropy(z, labels.int(), backend=backend), cross_entropy(z, labels, backend=backend),
                               rtol=0, atol=0)
