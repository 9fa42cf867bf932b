"""Fused multi-tensor update kernels, one per dynamics family (sgd, sgdm, adam/adamw).

Per element and in place: coupled weight decay, clip and keep mask, then the weight,
state and tangent updates of ``dynamics.py``; every input is read once and every
output written once. When ``coeffs[COEFF_OK] == 0`` every store is masked off, so all
buffers stay bit-identical. Tables and flags are described in ``_common.py``
(``h_tab`` is not read without ``HAS_HZ``). Params, grads and hvps are converted to and
from the compute dtype ``C_DT``; state and tangents are stored in it.
"""
import triton
import triton.language as tl

from ._common import (
    C_BC1, C_BC2, C_ETA, C_MU, C_OK, C_SCALE, H_1M_BETA1, H_1M_BETA2, H_2_1M_BETA2,
    H_BETA1, H_BETA2, H_CLIP, H_EPS, H_MOMENTUM, H_WD, block_offsets, chunk_origin,
    load_as, load_flag, sqrt_rn, store_as, table_ptr,
)
from .dynamics import adam_math, decay_and_clip, sgd_math, sgdm_math


@triton.jit
def _shared_scalars(coeffs, hyper, C_DT: tl.constexpr):
    """The step's device scalars every dynamics reads: eta_G, mu, s_G, ok, wd, clip."""
    eta = tl.load(coeffs + C_ETA).to(C_DT)
    mu = tl.load(coeffs + C_MU).to(C_DT)
    s = tl.load(coeffs + C_SCALE).to(C_DT)
    ok = load_flag(coeffs + C_OK)
    wd = tl.load(hyper + H_WD).to(C_DT)
    clip = tl.load(hyper + H_CLIP).to(C_DT)
    return eta, mu, s, ok, wd, clip


@triton.jit
def _shared_ptrs(t, w_tab, g_tab, h_tab, zw_tab, W_DT: tl.constexpr, G_DT: tl.constexpr,
                 H_DT: tl.constexpr, C_DT: tl.constexpr, HAS_HZ: tl.constexpr,
                 ALIGN: tl.constexpr):
    """Tensor t's pointers to w, g, hz (g's when there is no hz) and Zw."""
    g_p = table_ptr(g_tab, t, G_DT, ALIGN)
    h_p = g_p
    if HAS_HZ:
        h_p = table_ptr(h_tab, t, H_DT, ALIGN)
    return table_ptr(w_tab, t, W_DT, ALIGN), g_p, h_p, table_ptr(zw_tab, t, C_DT, ALIGN)


@triton.jit
def _load_grads(w_p, g_p, h_p, zw_p, offs, live, wd, clip, W_DT: tl.constexpr,
                G_DT: tl.constexpr, H_DT: tl.constexpr, C_DT: tl.constexpr,
                HAS_HZ: tl.constexpr, HAS_WD: tl.constexpr, HAS_CLIP: tl.constexpr):
    """The inputs every dynamics shares: w, Zw and the decayed, clipped (gc, hz)."""
    w = load_as(w_p, offs, live, W_DT, C_DT)
    g = load_as(g_p, offs, live, G_DT, C_DT)
    zw = tl.load(zw_p + offs, mask=live, other=0.0)
    if HAS_HZ:
        hz = load_as(h_p, offs, live, H_DT, C_DT)
    else:
        hz = 0.0
    gc, hz = decay_and_clip(w, g, hz, zw, wd, clip, HAS_HZ, HAS_WD, HAS_CLIP)
    return w, zw, gc, hz


@triton.jit
def _sgd_update_kernel(chunks, numels, w_tab, g_tab, h_tab, zw_tab, coeffs, hyper,
                       W_DT: tl.constexpr, G_DT: tl.constexpr, H_DT: tl.constexpr,
                       C_DT: tl.constexpr, HAS_HZ: tl.constexpr, HAS_WD: tl.constexpr,
                       HAS_CLIP: tl.constexpr, MASKED: tl.constexpr, ALIGN: tl.constexpr,
                       BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    t, start, n = chunk_origin(chunks, numels, MASKED, BLOCK)
    eta, mu, s, ok, wd, clip = _shared_scalars(coeffs, hyper, C_DT)
    w_p, g_p, h_p, zw_p = _shared_ptrs(t, w_tab, g_tab, h_tab, zw_tab, W_DT, G_DT, H_DT, C_DT,
                                       HAS_HZ, ALIGN)
    for j in tl.static_range(UNROLL):
        offs, live = block_offsets(start, j, n, BLOCK, MASKED)
        w, zw, gc, hz = _load_grads(w_p, g_p, h_p, zw_p, offs, live, wd, clip, W_DT, G_DT,
                                    H_DT, C_DT, HAS_HZ, HAS_WD, HAS_CLIP)
        w_new, zw_new = sgd_math(w, gc, hz, zw, eta, mu, s, HAS_HZ)
        keep = live & ok
        store_as(w_p, offs, w_new, keep, W_DT)
        tl.store(zw_p + offs, zw_new, mask=keep)


@triton.jit
def _sgdm_update_kernel(chunks, numels, w_tab, g_tab, h_tab, zw_tab, v_tab, zv_tab, coeffs,
                        hyper, W_DT: tl.constexpr, G_DT: tl.constexpr, H_DT: tl.constexpr,
                        C_DT: tl.constexpr, HAS_HZ: tl.constexpr, HAS_WD: tl.constexpr,
                        HAS_CLIP: tl.constexpr, NESTEROV: tl.constexpr, MASKED: tl.constexpr,
                        ALIGN: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    t, start, n = chunk_origin(chunks, numels, MASKED, BLOCK)
    eta, mu, s, ok, wd, clip = _shared_scalars(coeffs, hyper, C_DT)
    m = tl.load(hyper + H_MOMENTUM).to(C_DT)
    w_p, g_p, h_p, zw_p = _shared_ptrs(t, w_tab, g_tab, h_tab, zw_tab, W_DT, G_DT, H_DT, C_DT,
                                       HAS_HZ, ALIGN)
    v_p = table_ptr(v_tab, t, C_DT, ALIGN)
    zv_p = table_ptr(zv_tab, t, C_DT, ALIGN)
    for j in tl.static_range(UNROLL):
        offs, live = block_offsets(start, j, n, BLOCK, MASKED)
        w, zw, gc, hz = _load_grads(w_p, g_p, h_p, zw_p, offs, live, wd, clip, W_DT, G_DT,
                                    H_DT, C_DT, HAS_HZ, HAS_WD, HAS_CLIP)
        v = tl.load(v_p + offs, mask=live, other=0.0)
        zv = tl.load(zv_p + offs, mask=live, other=0.0)
        w_new, v_new, zw_new, zv_new = sgdm_math(w, gc, hz, zw, v, zv, eta, mu, s, m, HAS_HZ,
                                                 NESTEROV)
        keep = live & ok
        store_as(w_p, offs, w_new, keep, W_DT)
        tl.store(v_p + offs, v_new, mask=keep)
        tl.store(zw_p + offs, zw_new, mask=keep)
        tl.store(zv_p + offs, zv_new, mask=keep)


@triton.jit
def _adam_update_kernel(chunks, numels, w_tab, g_tab, h_tab, zw_tab, m_tab, v_tab, zm_tab,
                        zv_tab, coeffs, hyper, W_DT: tl.constexpr, G_DT: tl.constexpr,
                        H_DT: tl.constexpr, C_DT: tl.constexpr, HAS_HZ: tl.constexpr,
                        HAS_WD: tl.constexpr, HAS_CLIP: tl.constexpr, DECOUPLED: tl.constexpr,
                        MASKED: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr,
                        UNROLL: tl.constexpr):
    t, start, n = chunk_origin(chunks, numels, MASKED, BLOCK)
    eta, mu, s, ok, wd, clip = _shared_scalars(coeffs, hyper, C_DT)
    bc1 = tl.load(coeffs + C_BC1).to(C_DT)
    sbc2 = sqrt_rn(tl.load(coeffs + C_BC2).to(C_DT))
    b1 = tl.load(hyper + H_BETA1).to(C_DT)
    one_m_b1 = tl.load(hyper + H_1M_BETA1).to(C_DT)
    b2 = tl.load(hyper + H_BETA2).to(C_DT)
    one_m_b2 = tl.load(hyper + H_1M_BETA2).to(C_DT)
    two_one_m_b2 = tl.load(hyper + H_2_1M_BETA2).to(C_DT)
    eps = tl.load(hyper + H_EPS).to(C_DT)
    w_p, g_p, h_p, zw_p = _shared_ptrs(t, w_tab, g_tab, h_tab, zw_tab, W_DT, G_DT, H_DT, C_DT,
                                       HAS_HZ, ALIGN)
    m_p = table_ptr(m_tab, t, C_DT, ALIGN)
    v_p = table_ptr(v_tab, t, C_DT, ALIGN)
    zm_p = table_ptr(zm_tab, t, C_DT, ALIGN)
    zv_p = table_ptr(zv_tab, t, C_DT, ALIGN)
    for j in tl.static_range(UNROLL):
        offs, live = block_offsets(start, j, n, BLOCK, MASKED)
        w, zw, gc, hz = _load_grads(w_p, g_p, h_p, zw_p, offs, live, wd, clip, W_DT, G_DT,
                                    H_DT, C_DT, HAS_HZ, HAS_WD, HAS_CLIP)
        m = tl.load(m_p + offs, mask=live, other=0.0)
        v = tl.load(v_p + offs, mask=live, other=0.0)
        zm = tl.load(zm_p + offs, mask=live, other=0.0)
        zv = tl.load(zv_p + offs, mask=live, other=0.0)
        w_new, m_new, v_new, zw_new, zm_new, zv_new = adam_math(
            w, gc, hz, zw, m, v, zm, zv, eta, mu, s, bc1, sbc2, wd, b1, one_m_b1, b2,
            one_m_b2, two_one_m_b2, eps, HAS_HZ, DECOUPLED)
        keep = live & ok
        store_as(w_p, offs, w_new, keep, W_DT)
        tl.store(m_p + offs, m_new, mask=keep)
        tl.store(v_p + offs, v_new, mask=keep)
        tl.store(zw_p + offs, zw_new, mask=keep)
        tl.store(zm_p + offs, zm_new, mask=keep)
        tl.store(zv_p + offs, zv_new, mask=keep)
