"""The per-element maths of SPEC section 2 step 4: one ``@triton.jit`` helper per dynamics.

These are the only copies of the update rules in Triton; the fused kernels
(``fused_update.py``) only load, call them and store. Every helper works on blocks in
the compute dtype and mirrors the torch reference (``backends/torch_ref.py``) operation
by operation, so that the two agree to float32 rounding. ``hz`` is ignored when
``HAS_HZ`` is false (hz = 0 exactly, no Hessian-vector product).
"""
import triton
import triton.language as tl

from ._common import div_rn, sqrt_rn


@triton.jit
def decay_and_clip(w, g, hz, zw, wd, clip, HAS_HZ: tl.constexpr, HAS_WD: tl.constexpr,
                   HAS_CLIP: tl.constexpr):
    """Coupled L2 (g += wd w, hz += wd Zw), then the elementwise clip and keep mask
    (``tl.clamp`` keeps NaN, as torch.clamp does).

    Returns (gc, hz) with hz masked by ``|g| <= c`` and clipped.
    """
    if HAS_WD:
        g = g + w * wd
        if HAS_HZ:
            hz = hz + zw * wd
    if HAS_CLIP:
        if HAS_HZ:
            hz = tl.where(tl.abs(g) <= clip, hz, 0.0)
            hz = tl.clamp(hz, -clip, clip, propagate_nan=tl.PropagateNan.ALL)
        g = tl.clamp(g, -clip, clip, propagate_nan=tl.PropagateNan.ALL)
    return g, hz


@triton.jit
def sgd_math(w, gc, hz, zw, eta, mu, s, HAS_HZ: tl.constexpr):
    """w' = w - eta gc;  Zw' = mu (Zw - eta hz) - s gc."""
    w_new = w - gc * eta
    inner = zw
    if HAS_HZ:
        inner = zw - hz * eta
    zw_new = inner * mu - gc * s
    return w_new, zw_new


@triton.jit
def sgdm_math(w, gc, hz, zw, v, zv, eta, mu, s, m, HAS_HZ: tl.constexpr,
              NESTEROV: tl.constexpr):
    """Heavy ball (dampening 0) and its tangent; Nesterov's look-ahead by flag.

    v' = m v + gc;  Zv' = mu (m Zv + hz);
    plain:    w' = w - eta v';             Zw' = mu Zw - eta Zv' - s v'
    nesterov: d = gc + m v'; w' = w - eta d;  Zw' = mu (Zw - eta (hz + m (m Zv + hz))) - s d
    """
    v_new = gc + v * m
    mzv_hz = zv * m
    if HAS_HZ:
        mzv_hz = mzv_hz + hz
    zv_new = mzv_hz * mu
    if NESTEROV:
        step_dir = gc + v_new * m
        d_tan = mzv_hz * m
        if HAS_HZ:
            d_tan = d_tan + hz
        zw_new = (zw - d_tan * eta) * mu - step_dir * s
    else:
        step_dir = v_new
        zw_new = (zw * mu - zv_new * eta) - v_new * s
    w_new = w - step_dir * eta
    return w_new, v_new, zw_new, zv_new


@triton.jit
def adam_math(w, gc, hz, zw, m, v, zm, zv, eta, mu, s, bc1, sbc2, wd, b1, one_m_b1, b2,
              one_m_b2, two_one_m_b2, eps, HAS_HZ: tl.constexpr, DECOUPLED: tl.constexpr):
    """Adam (torch.optim.Adam semantics) or, with ``DECOUPLED``, AdamW; and the tangent.

    ``sbc2`` is sqrt(bc2). With den = sqrt(v')/sbc2 + eps and u = (m'/bc1)/den:
    dm = b1 Zm + (1-b1) hz;  dv = b2 Zv + 2 (1-b2) gc hz;
    du = dm/(bc1 den) - (m'/bc1)/den^2 * dv/(2 sbc2 sqrt(v'))  (last term 0 where v' = 0);
    Zm' = mu dm;  Zv' = mu dv;
    adam:  w' = w - eta u;                Zw' = mu (Zw - eta du) - s u
    adamw: w' = w (1 - eta wd) - eta u;   Zw' = mu ((1 - eta wd) Zw - eta du) - s (wd w + u)
    """
    m_new = m * b1 + gc * one_m_b1
    v_new = v * b2 + (gc * gc) * one_m_b2
    sqrt_v = sqrt_rn(v_new)
    den = div_rn(sqrt_v, sbc2) + eps
    m_hat = div_rn(m_new, bc1)
    u = div_rn(m_hat, den)
    dm = zm * b1
    dv = zv * b2
    if HAS_HZ:
        dm = dm + hz * one_m_b1
        dv = dv + (gc * hz) * two_one_m_b2
    du_m = div_rn(dm, den * bc1)
    # The safe denominator only keeps 0/0 out of lanes the where discards.
    pos = sqrt_v > 0
    dsq = tl.where(pos, div_rn(dv, tl.where(pos, (2.0 * sbc2) * sqrt_v, 1.0)), 0.0)
    du = du_m - div_rn(m_hat, den * den) * dsq
    if DECOUPLED:
        decay = 1.0 - eta * wd
        w_new = w * decay - u * eta
        zw_new = (zw * decay - du * eta) * mu - (u + w * wd) * s
    else:
        w_new = w - u * eta
        zw_new = (zw - du * eta) * mu - u * s
    return w_new, m_new, v_new, zw_new, dm * mu, dv * mu
