"""Fused AdamW: the torch and Triton backends (interpreter on CPU) against an fp64 AdamW written
here, parity with torch.optim.AdamW, the FusedAdamW optimizer (groups, masters, state_dict), and
input validation. With a GPU (interpreter off) the same tests run on CUDA, and on the "cuda"
backend when the csrc extension is built.

Tolerances: fp32 results (moments, master weights, fp32 params) follow _tolerance.py's rule: at
most 2x the torch backend's error against the fp64 reference. Low-precision params are the master
rounded to nearest even, checked bit for bit; without a master they are compared to the torch
backend within one ulp of their dtype (an fp32 difference of one ulp can flip a rounding).
"""
import copy
import math

import pytest
import torch

from _tolerance import assert_within_torch_error, kernel_devices
from kernels._cuda import cuda_ops_available
from kernels.adamw import FusedAdamW, apex_available, fused_adamw_step

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
STEPS = 3
# odd sizes (masked tails, several chunks of the interpreter's 1024-element chunk), a single
# element, an empty tensor, and a 2-D param
SIZES = [4097, 37, 1, 0, (3, 41)]
if "cuda" in kernel_devices():  # GPU runs: a tensor spanning several 16K-element GPU chunks
    SIZES.append(2 * 16384 + 5)


def _kernel_cases():
    cases = [(device, "triton") for device in kernel_devices()]
    if torch.cuda.is_available() and cuda_ops_available():
        cases.append(("cuda", "cuda"))
    return cases


KERNEL_CASES = _kernel_cases()
KERNEL_IDS = [f"{d}-{b}" for d, b in KERNEL_CASES]


def adamw_fp64(w, grads, m, v, *, lr, beta1, beta2, eps, weight_decay, first_step=1, grad_scale=1.0,
               round_to=None):
    """Textbook AdamW in fp64 over len(grads) steps; returns (w, m, v). round_to: a dtype the
    weights are rounded to after every step (a low-precision param without master weights)."""
    w, m, v = w.double(), m.double(), v.double()
    for k, g in enumerate(grads):
        t = first_step + k
        g = g.double() / grad_scale
        w = w * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        w = w - lr / (1 - beta1 ** t) * m / (v.sqrt() / math.sqrt(1 - beta2 ** t) + eps)
        if round_to is not None:
            w = w.to(round_to).double()
    return w, m, v


def _make_state(sizes, param_dtype, grad_dtype, master, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(s,) if isinstance(s, int) else s for s in sizes]
    params = [torch.randn(s, generator=g).to(device=device, dtype=param_dtype) for s in shapes]
    masters = [p.float() for p in params] if master else None
    # moments as after some training: m of either sign, v > 0
    exp_avgs = [0.1 * torch.randn(s, generator=g).to(device) for s in shapes]
    exp_avg_sqs = [0.01 * torch.rand(s, generator=g).to(device) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(device=device, dtype=grad_dtype) for s in shapes]
             for _ in range(STEPS)]
    return params, masters, exp_avgs, exp_avg_sqs, grads


def _clone(ts):
    return None if ts is None else [t.clone() for t in ts]


def _run(backend, params, masters, exp_avgs, exp_avg_sqs, grads, first_step=1, grad_scale=None, **hyper):
    p, w, m, v = _clone(params), _clone(masters), _clone(exp_avgs), _clone(exp_avg_sqs)
    for k, gs in enumerate(grads):
        fused_adamw_step(p, gs, m, v, w, step=first_step + k, grad_scale=grad_scale, backend=backend,
                         **(hyper or HYPER))
    return p, w, m, v


# (param dtype, grad dtype, fp32 master weights)
DTYPE_CASES = [
    (torch.float32, torch.float32, False),
    (torch.bfloat16, torch.float32, True),
    (torch.bfloat16, torch.bfloat16, True),
    (torch.float16, torch.float32, True),
    (torch.bfloat16, torch.bfloat16, False),
]


@pytest.mark.parametrize("device,backend", KERNEL_CASES, ids=KERNEL_IDS)
@pytest.mark.parametrize("param_dtype,grad_dtype,master", DTYPE_CASES,
                         ids=[f"p{str(p)[6:]}-g{str(g)[6:]}-{'master' if m else 'nomaster'}"
                              for p, g, m in DTYPE_CASES])
def test_matches_fp64_reference_within_2x_torch_error(device, backend, param_dtype, grad_dtype, master):
    params, masters, exp_avgs, exp_avg_sqs, grads = _make_state(SIZES, param_dtype, grad_dtype, master, device)
    first_step = 4  # bias corrections of a run in progress, not only step 1
    out_p, out_w, out_m, out_v = _run(backend, params, masters, exp_avgs, exp_avg_sqs, grads, first_step)
    ref_p, ref_w, ref_m, ref_v = _run("torch", params, masters, exp_avgs, exp_avg_sqs, grads, first_step)
    for i in range(len(SIZES)):
        w0 = masters[i] if master else params[i]
        round_to = None if (master or param_dtype == torch.float32) else param_dtype
        tw, tm, tv = adamw_fp64(w0, [gs[i] for gs in grads], exp_avgs[i], exp_avg_sqs[i], first_step=first_step,
                                round_to=round_to, **HYPER)
        name = f"adamw[{i}] size {SIZES[i]} {backend}"
        assert_within_torch_error(f"{name} exp_avg", out_m[i], ref_m[i], tm)
        assert_within_torch_error(f"{name} exp_avg_sq", out_v[i], ref_v[i], tv)
        if master:
            assert_within_torch_error(f"{name} master", out_w[i], ref_w[i], tw)
            assert torch.equal(out_p[i], out_w[i].to(param_dtype)), f"{name}: param is not round(master)"
        elif param_dtype == torch.float32:
            assert_within_torch_error(f"{name} param", out_p[i], ref_p[i], tw)
        else:
            assert out_p[i].dtype == param_dtype
            ulp = torch.finfo(param_dtype).eps * ref_p[i].float().abs().clamp_min(torch.finfo(param_dtype).tiny)
            diff = (out_p[i].float() - ref_p[i].float()).abs()
            assert (diff <= ulp).all(), f"{name}: params differ from the torch backend by more than one ulp"
            # and the update moved the weights as the reference says, to bf16/fp16 precision
            torch.testing.assert_close(out_p[i].double(), tw.to(param_dtype).double(),
                                       atol=0, rtol=2 * torch.finfo(param_dtype).eps)


def test_torch_backend_matches_fp64_reference_fp32():
    """The reference backend itself: fp32 rounding only (rtol 1e-5 ~ 80 fp32 ulps over 3 steps of
    an update whose divide amplifies the error of sqrt(v) + eps)."""
    params, _, exp_avgs, exp_avg_sqs, grads = _make_state([513, (4, 9)], torch.float32, torch.float32, False, "cpu")
    out_p, _, out_m, out_v = _run("torch", params, None, exp_avgs, exp_avg_sqs, grads)
    for i in range(2):
        tw, tm, tv = adamw_fp64(params[i], [gs[i] for gs in grads], exp_avgs[i], exp_avg_sqs[i], **HYPER)
        torch.testing.assert_close(out_p[i].double(), tw, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out_m[i].double(), tm, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(out_v[i].double(), tv, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("device,backend", KERNEL_CASES + [("cpu", "torch")], ids=KERNEL_IDS + ["cpu-torch"])
def test_shard_views_of_flat_buffers(device, backend):
    """Like the distributed optimizer: fp32 shards given as views at odd offsets of flat buffers
    (unaligned addresses), beside an aligned case (sizes multiples of 8). Elements outside the
    views must not change."""
    g = torch.Generator().manual_seed(1)
    total = 5000
    master_buf = torch.randn(total, generator=g).to(device)
    grad_buf = torch.randn(total, generator=g).to(device)
    m_buf = torch.zeros(total, device=device)
    v_buf = torch.zeros(total, device=device)
    cuts = [(3, 4100), (4101, 4138), (4160, 4224), (4224, 4992)]  # odd offsets, then 16-byte aligned
    views = lambda buf: [buf[a:b] for a, b in cuts]  # noqa: E731
    before = master_buf.clone()
    fused_adamw_step(views(master_buf), views(grad_buf), views(m_buf), views(v_buf), step=1, backend=backend, **HYPER)
    inside = torch.zeros(total, dtype=torch.bool)
    for a, b in cuts:
        inside[a:b] = True
    assert torch.equal(master_buf.cpu()[~inside], before.cpu()[~inside]), "elements outside the shards changed"
    for (a, b), w in zip(cuts, views(master_buf)):
        tw, _, _ = adamw_fp64(before[a:b], [grad_buf[a:b]], torch.zeros(b - a), torch.zeros(b - a), **HYPER)
        torch.testing.assert_close(w.cpu().double(), tw, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device,backend", KERNEL_CASES + [("cpu", "torch")], ids=KERNEL_IDS + ["cpu-torch"])
def test_grad_scale_number_and_tensor(device, backend):
    """Loss-scaled grads with grad_scale=S give the unscaled update exactly (S a power of two)."""
    params, masters, exp_avgs, exp_avg_sqs, grads = _make_state([4097, 37], torch.bfloat16, torch.float32, True,
                                                                device)
    scale = 1024.0
    plain = _run(backend, params, masters, exp_avgs, exp_avg_sqs, grads)
    scaled_grads = [[g * scale for g in gs] for gs in grads]
    for grad_scale in (scale, torch.tensor([scale], device=device)):
        scaled = _run(backend, params, masters, exp_avgs, exp_avg_sqs, scaled_grads, grad_scale=grad_scale)
        for a, b in zip(plain, scaled):
            for x, y in zip(a, b):
                assert torch.equal(x, y), f"grad_scale={grad_scale!r} changed the result"


@pytest.mark.parametrize("device,backend", KERNEL_CASES + [("cpu", "torch")], ids=KERNEL_IDS + ["cpu-torch"])
def test_weight_decay_and_bias_correction_terms(device, backend):
    """Zero gradient isolates weight decay (m stays 0: w *= 1 - lr*wd exactly); at step 1 with
    zero moments the bias-corrected update is lr * g / (|g| + eps) = lr * sign(g)."""
    w = torch.full((100,), 2.0, device=device)
    zeros = lambda: torch.zeros(100, device=device)  # noqa: E731
    fused_adamw_step([w], [zeros()], [zeros()], [zeros()], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.5, step=7, backend=backend)
    assert torch.allclose(w.cpu(), torch.full((100,), 2.0 * (1 - 0.1 * 0.5)), rtol=0, atol=1e-7)
    w = torch.zeros(100, device=device)
    g = torch.linspace(-3, 3, 100, device=device)
    fused_adamw_step([w], [g], [zeros()], [zeros()], lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.0, step=1, backend=backend)
    expected = -0.01 * g.cpu().double() / (g.cpu().double().abs() + 1e-8)
    torch.testing.assert_close(w.cpu().double(), expected, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Optimizer class
# ------------------------------------------------------------------------------------------------

def _param_groups(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.nn.Parameter(torch.randn(33, 17, generator=g).to(device=device, dtype=dtype)),
            torch.nn.Parameter(torch.randn(129, generator=g).to(device=device, dtype=dtype))]
    vecs = [torch.nn.Parameter(torch.randn(17, generator=g).to(device=device, dtype=dtype))]
    return mats, vecs


def _set_grads(params, step, skip=()):
    for i, p in enumerate(params):
        g = torch.Generator().manual_seed(1000 * step + i)
        p.grad = None if i in skip else torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)


@pytest.mark.parametrize("device,backend", KERNEL_CASES + [("cpu", "torch")], ids=KERNEL_IDS + ["cpu-torch"])
def test_optimizer_matches_torch_adamw_fp32(device, backend):
    """Two groups (decay / no decay, different lr), 5 steps, one param of the first group without
    a grad on step 2 (its step count lags, so the group is updated in two calls). Tolerance: 1e-6
    absolute ~ 8 fp32 ulps of weights ~1, the accumulated difference of two fp32 evaluation orders."""
    mats, vecs = _param_groups(torch.float32, device)
    ref_mats, ref_vecs = [copy.deepcopy(p) for p in mats], [copy.deepcopy(p) for p in vecs]

    def groups(a, b):
        return [{"params": a, "weight_decay": 0.1}, {"params": b, "weight_decay": 0.0, "lr": 3e-3}]
    ours = FusedAdamW(groups(mats, vecs), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, backend=backend)
    ref = torch.optim.AdamW(groups(ref_mats, ref_vecs), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step in range(1, 6):
        skip = {1} if step == 2 else set()
        _set_grads(mats + vecs, step, skip)
        _set_grads(ref_mats + ref_vecs, step, skip)
        ours.step()
        ref.step()
    for p, r in zip(mats + vecs, ref_mats + ref_vecs):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.state[p]["exp_avg"], ref.state[r]["exp_avg"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours.state[p]["exp_avg_sq"], ref.state[r]["exp_avg_sq"], rtol=1e-6, atol=1e-9)
        assert ours.state[p]["step"] == int(ref.state[r]["step"])
    assert ours.state[mats[1]]["step"] == 4 and ours.state[mats[0]]["step"] == 5


@pytest.mark.parametrize("device,backend", KERNEL_CASES + [("cpu", "torch")], ids=KERNEL_IDS + ["cpu-torch"])
def test_optimizer_bf16_master_weights_and_state_dict_round_trip(device, backend):
    mats, vecs = _param_groups(torch.bfloat16, device)
    params = mats + vecs
    opt = FusedAdamW([{"params": mats}, {"params": vecs, "weight_decay": 0.0}], lr=1e-2, backend=backend)
    for step in (1, 2):
        _set_grads(params, step)
        opt.step()
    for p in params:
        st = opt.state[p]
        assert st["master_param"].dtype == st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(p.detach(), st["master_param"].to(torch.bfloat16))
    # the master keeps updates smaller than a bf16 ulp: it is not just the bf16 param widened
    assert any(not torch.equal(opt.state[p]["master_param"], p.detach().float()) for p in params)

    saved = copy.deepcopy(opt.state_dict())
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = FusedAdamW([{"params": clones[:2]}, {"params": clones[2:], "weight_decay": 0.0}], lr=1e-2,
                          backend=backend)
    restored.load_state_dict(saved)
    for p, c in zip(params, clones):
        for key in ("master_param", "exp_avg", "exp_avg_sq"):
            got = restored.state[c][key]
            assert got.dtype == torch.float32, f"{key} loaded as {got.dtype}; fp32 state must stay fp32"
            assert torch.equal(got, opt.state[p][key])
        assert restored.state[c]["step"] == 2
    saved["state"][0]["exp_avg"].add_(1.0)  # the loaded state is a copy, not an alias
    assert not torch.equal(restored.state[clones[0]]["exp_avg"], saved["state"][0]["exp_avg"])
    for step in (3, 4):
        _set_grads(params, step)
        _set_grads(clones, step)
        opt.step()
        restored.step()
    for p, c in zip(params, clones):
        assert torch.equal(p.detach(), c.detach())
        assert torch.equal(opt.state[p]["master_param"], restored.state[c]["master_param"])


def test_optimizer_without_master_weights_updates_bf16_in_place():
    mats, vecs = _param_groups(torch.bfloat16, "cpu")
    opt = FusedAdamW(mats + vecs, lr=1e-2, master_weights=False, backend="torch")
    before = [p.detach().clone() for p in mats + vecs]
    _set_grads(mats + vecs, 1)
    opt.step()
    for p, b in zip(mats + vecs, before):
        assert "master_param" not in opt.state[p]
        assert p.dtype == torch.bfloat16 and not torch.equal(p.detach(), b)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

def _valid(n=8, param_dtype=torch.float32):
    return ([torch.zeros(n, dtype=param_dtype)], [torch.ones(n)], [torch.zeros(n)], [torch.zeros(n)])


# Validation runs before any kernel: CPU tensors, so Triton only where it takes CPU tensors (interpreter).
@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if "cpu" in kernel_devices() else []))
def test_bad_inputs_raise_clear_errors(backend):
    p, g, m, v = _valid()
    with pytest.raises(ValueError, match="same length"):
        fused_adamw_step(p + p, g, m, v, step=1, backend=backend, **HYPER)
    with pytest.raises(ValueError, match=r"grads\[0\] has 9 elements but params\[0\] has 8"):
        fused_adamw_step(p, [torch.ones(9)], m, v, step=1, backend=backend, **HYPER)
    with pytest.raises(TypeError, match=r"params\[0\] must be floating point.*int32"):
        fused_adamw_step([torch.zeros(8, dtype=torch.int32)], g, m, v, step=1, backend=backend, **HYPER)
    with pytest.raises(TypeError, match=r"grads\[0\] must be floating point.*int64"):
        fused_adamw_step(p, [torch.ones(8, dtype=torch.int64)], m, v, step=1, backend=backend, **HYPER)
    with pytest.raises(TypeError, match=r"exp_avgs\[0\] must be float32.*bfloat16"):
        fused_adamw_step(p, g, [torch.zeros(8, dtype=torch.bfloat16)], v, step=1, backend=backend, **HYPER)
    with pytest.raises(TypeError, match=r"exp_avg_sqs\[0\] must be float32.*float16"):
        fused_adamw_step(p, g, m, [torch.zeros(8, dtype=torch.float16)], step=1, backend=backend, **HYPER)
    with pytest.raises(TypeError, match=r"master_params\[0\] must be float32"):
        fused_adamw_step(*_valid(param_dtype=torch.bfloat16), [torch.zeros(8, dtype=torch.bfloat16)], step=1,
                         backend=backend, **HYPER)
    with pytest.raises(TypeError, match=r"params\[0\] must be float32, float16 or bfloat16.*float64"):
        fused_adamw_step([torch.zeros(8, dtype=torch.float64)], g, m, v, step=1, backend=backend, **HYPER)
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        fused_adamw_step(p, g, m, v, step=0, backend=backend, **HYPER)
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\)"):
        fused_adamw_step(p, g, m, v, step=1, backend=backend, **{**HYPER, "beta2": 1.0})
    with pytest.raises(ValueError, match="grad_scale must be a finite number > 0"):
        fused_adamw_step(p, g, m, v, step=1, grad_scale=0.0, backend=backend, **HYPER)
    with pytest.raises(ValueError, match="same memory"):
        fused_adamw_step(p, g, m, v, p, step=1, backend=backend, **HYPER)
    p2d = [torch.zeros(8, 4).t()]  # non-contiguous
    bad = dict(grads=[torch.ones(4, 8)], exp_avgs=[torch.zeros(32)], exp_avg_sqs=[torch.zeros(32)])
    if backend == "triton":
        with pytest.raises(ValueError, match=r"params\[0\] must be contiguous"):
            fused_adamw_step(p2d, step=1, backend=backend, **bad, **HYPER)
    else:  # the torch reference takes any layout
        fused_adamw_step(p2d, step=1, backend=backend, **bad, **HYPER)


def test_unknown_backend_and_missing_apex():
    p, g, m, v = _valid()
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fused_adamw_step(p, g, m, v, step=1, backend="fast", **HYPER)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fused_adamw_step([], [], [], [], step=1, backend="fast", **HYPER)
    with pytest.raises(ValueError, match="unknown backend"):
        FusedAdamW([torch.nn.Parameter(torch.zeros(2))], backend="fast")
    if not apex_available():
        with pytest.raises(RuntimeError, match="apex"):
            fused_adamw_step(p, g, m, v, step=1, backend="apex", **HYPER)


def test_accepts_single_flat_buffers():
    """One flat 1-D buffer per argument instead of lists."""
    p, g, m, v = (t[0] for t in _valid(n=100))
    fused_adamw_step(p, g, m, v, step=1, backend="torch", **HYPER)
    assert torch.allclose(p, torch.full((100,), -HYPER["lr"]), rtol=1e-5)
