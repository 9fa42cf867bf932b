"""Device-side plumbing shared by every marthe_ext Triton kernel.

Multi-tensor layout (apex's): the host gives each kernel a chunk table of
``(tensor index, first element)`` pairs, one program per pair, and per tensor list an
int64 table of ``data_ptr()``s indexed by tensor (``*_tab``). A program handles
``UNROLL`` consecutive blocks of ``BLOCK`` elements of one tensor. Chunks that lie
wholly inside their tensor run in an unmasked launch; the last, partial chunk of each
tensor runs in a second, masked launch (``MASKED``). ``ALIGN`` is 16 when every address
is 16-byte aligned, else 1: with it, the unmasked launch uses 16-byte vector accesses.
No loop bound is read from memory (the Triton interpreter cannot run such loops).

Scalars that change during training are read from the ``coeffs`` tensor
(``marthe_ext.backends.api``); fixed hyperparameters from a float64 ``hyper`` tensor
(layout ``H_*`` below). Both are float64 in memory and rounded once to the compute
dtype, so the same kernel serves float32 and float64 and the host never synchronises.

bfloat16 is converted with integer bit operations rather than ``.to()``: the Triton
interpreter truncates on the way down and loses subnormals on the way up, and these
bit operations give round-to-nearest-even, exactly what torch and the GPU do, in both.
"""
import triton
import triton.language as tl

from ..backends.api import COEFF_BC1, COEFF_BC2, COEFF_ETA, COEFF_MU, COEFF_OK, COEFF_SCALE

C_ETA = tl.constexpr(COEFF_ETA)
C_MU = tl.constexpr(COEFF_MU)
C_SCALE = tl.constexpr(COEFF_SCALE)
C_BC1 = tl.constexpr(COEFF_BC1)
C_BC2 = tl.constexpr(COEFF_BC2)
C_OK = tl.constexpr(COEFF_OK)

# Layout of the fused update's float64 ``hyper`` tensor; ``pack_hyper`` fills it.
H_WD = tl.constexpr(0)
H_CLIP = tl.constexpr(1)
H_MOMENTUM = tl.constexpr(2)
H_BETA1 = tl.constexpr(3)
H_1M_BETA1 = tl.constexpr(4)
H_BETA2 = tl.constexpr(5)
H_1M_BETA2 = tl.constexpr(6)
H_2_1M_BETA2 = tl.constexpr(7)
H_EPS = tl.constexpr(8)

# Layout of the reductions' float64 ``consts`` tensor.
K_SCALE = tl.constexpr(0)
K_CLIP = tl.constexpr(1)


def pack_hyper(opts) -> list:
    """The values of the ``hyper`` tensor for one ``GroupOptions``, in ``H_*`` order.

    ``1 - beta`` and ``2 (1 - beta2)`` are formed in float64 on the host, as the torch
    reference does with Python floats, and rounded once on the device.
    """
    clip = 0.0 if opts.grad_clip is None else float(opts.grad_clip)
    b1, b2 = float(opts.beta1), float(opts.beta2)
    return [float(opts.weight_decay), clip, float(opts.momentum), b1, 1 - b1, b2, 1 - b2,
            2 * (1 - b2), float(opts.eps)]


@triton.jit
def chunk_origin(chunks, numels, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor index, first element and (masked launch only) tensor size."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(chunks + 2 * pid)
    start = tl.multiple_of(tl.load(chunks + 2 * pid + 1), BLOCK)
    if MASKED:
        n = tl.load(numels + t)
    else:
        n = start
    return t, start, n


@triton.jit
def table_ptr(tab, t, DT: tl.constexpr, ALIGN: tl.constexpr):
    """Tensor ``t``'s data pointer from an int64 pointer table, typed and aligned."""
    return tl.multiple_of(tl.load(tab + t).to(tl.pointer_type(DT)), ALIGN)


@triton.jit
def load_flag(ptr):
    # Through int32: the interpreter keeps a float comparison's result as float data,
    # which then cannot be combined with other masks by ``&``.
    return (tl.load(ptr) != 0).to(tl.int32) != 0


@triton.jit
def block_offsets(start, j, n, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """Offsets of block ``j`` of the chunk and which are in range. In an unmasked launch
    the mask is a constant the compiler folds away (the loads stay vectorised)."""
    offs = start + j * BLOCK + tl.arange(0, BLOCK)
    if MASKED:
        live = offs < n
    else:
        live = tl.full([BLOCK], 1, tl.int1)
    return offs, live


@triton.jit
def load_as(p, offs, live, DT: tl.constexpr, CDT: tl.constexpr):
    """Load one block of a ``DT`` tensor and convert it to the compute dtype ``CDT``."""
    x = tl.load(p + offs, mask=live, other=0.0)
    if DT == tl.bfloat16:
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(CDT)


@triton.jit
def store_as(p, offs, x, mask, DT: tl.constexpr):
    """Round ``x`` to nearest-even in ``DT`` and store it where ``mask`` holds."""
    if DT == tl.bfloat16:
        xf = x.to(tl.float32)
        bits = xf.to(tl.uint32, bitcast=True)
        hi = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        hi = tl.where(xf != xf, 0x7FC0, hi)
        tl.store(p + offs, hi.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(p + offs, x.to(DT), mask=mask)


@triton.jit
def div_rn(x, y):
    """``x / y`` rounded to nearest (IEEE), as torch computes it.

    On the GPU Triton's float32 ``/`` and ``tl.sqrt`` are approximate; the ``_rn``
    forms are exact but float32-only, while the float64 operators are already exact.
    """
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def sqrt_rn(x):
    """``sqrt(x)`` rounded to nearest (IEEE); see ``div_rn``."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)
