"""Multi-tensor reductions: one partial result per program, summed by torch afterwards.

Each program reduces one chunk (layout and flags in ``_common.py``) to one number and
stores it at its own index of ``out``; there are no atomics, so the result does not
depend on the order programs run in. The host finishes with a torch reduction of ``out``.
"""
import triton
import triton.language as tl

from ._common import K_CLIP, K_SCALE, block_offsets, chunk_origin, load_as, table_ptr


@triton.jit
def _clipped_dot_kernel(chunks, numels, a_tab, b_tab, e_tab, consts, out,
                        A_DT: tl.constexpr, B_DT: tl.constexpr, E_DT: tl.constexpr,
                        ACC_DT: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_CLIP: tl.constexpr,
                        CLIP_B: tl.constexpr, MASKED: tl.constexpr, ALIGN: tl.constexpr,
                        BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """out[pid] = sum over the chunk of clip(a + scale e) * clip?(b), in ``ACC_DT``."""
    t, start, n = chunk_origin(chunks, numels, MASKED, BLOCK)
    scale = tl.load(consts + K_SCALE).to(ACC_DT)
    clip = tl.load(consts + K_CLIP).to(ACC_DT)
    a_p = table_ptr(a_tab, t, A_DT, ALIGN)
    b_p = table_ptr(b_tab, t, B_DT, ALIGN)
    e_p = a_p
    if HAS_EXTRA:
        e_p = table_ptr(e_tab, t, E_DT, ALIGN)
    acc = tl.zeros([BLOCK], ACC_DT)
    for j in tl.static_range(UNROLL):
        offs, live = block_offsets(start, j, n, BLOCK, MASKED)
        x = load_as(a_p, offs, live, A_DT, ACC_DT)
        y = load_as(b_p, offs, live, B_DT, ACC_DT)
        if HAS_EXTRA:
            x = x + load_as(e_p, offs, live, E_DT, ACC_DT) * scale
        if HAS_CLIP:
            x = tl.clamp(x, -clip, clip, propagate_nan=tl.PropagateNan.ALL)
            if CLIP_B:
                y = tl.clamp(y, -clip, clip, propagate_nan=tl.PropagateNan.ALL)
        acc += x * y
    tl.store(out + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _all_finite_kernel(chunks, numels, x_tab, out, X_DT: tl.constexpr, F_DT: tl.constexpr,
                       MASKED: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr,
                       UNROLL: tl.constexpr):
    """out[pid] = 1 if the chunk holds a NaN or an infinity, else 0.

    ``F_DT`` is the dtype the test runs in (float64 for float64 data, else float32,
    which holds every half-precision value, infinities and NaN included).
    """
    t, start, n = chunk_origin(chunks, numels, MASKED, BLOCK)
    x_p = table_ptr(x_tab, t, X_DT, ALIGN)
    bad = tl.zeros([BLOCK], tl.int32)
    for j in tl.static_range(UNROLL):
        offs, live = block_offsets(start, j, n, BLOCK, MASKED)
        x = load_as(x_p, offs, live, X_DT, F_DT)
        finite = (tl.abs(x) < float("inf")).to(tl.int32)
        bad = tl.maximum(bad, 1 - finite)
    tl.store(out + tl.program_id(0), tl.max(bad, axis=0))
