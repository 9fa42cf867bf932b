"""Data-parallel MARTHE: every rank takes the same step, as one process on the global batch.

Under ``torch.distributed`` each rank evaluates the closures on its own shard of the batch.
With equal shard sizes the global loss is the mean of the ranks' losses, so its gradient,
its Hessian-vector product, the validation gradient and every hypergradient are the means
of the ranks' values. ``GradientSync`` averages exactly these, right where the step has
them, and nothing else: weights, optimizer state, tangents, eta and beta then evolve
identically (bit for bit) on every rank, since every rank applies the same update to the
same averaged numbers.

What is reduced, per step (sum over ranks, then divided by the world size):

* the training gradient, the HVP, the loss and a has-gradient mask -- together, in flat
  buckets of at most ``bucket_cap_mb`` (one per dtype while they fit, as DDP's buckets);
  every bucket is launched asynchronously and waited for once, so buckets overlap. With
  the "reverse" and "fd" engines (closure style, no loss scaling) the gradient's buckets
  are launched as soon as the gradient exists (``hvp.on_gradients``), the HVP's after the
  HVP: the gradient's all-reduce overlaps the HVP's compute (one more collective);
* the validation gradient (``hypergrad="grad"``), before its elementwise clip -- one more
  bucketed reduction; with ``"jvp"``/``"fd"`` only the scalar h (and the fd error bound).

The non-finite flag needs no collective of its own: it is computed from the averaged loss,
gradient, HVP and h, which are bit-identical on every rank, and a NaN or inf on one rank
stays non-finite in the sum. So every rank skips the same steps.

Before the first step the weights are broadcast from the group's first rank (as DDP's
constructor does), so replicas seeded differently start, and stay, identical.

A parameter without a gradient on this rank contributes zeros (its slot in the buckets is
always there: every rank must reduce the same layout). It is updated when at least one
rank had a gradient for it -- as one process on the global batch would -- and left idle
(``Z <- mu Z``, weights and state unchanged) when none had: ``UnusedParams`` decides that
on the device from the reduced mask, so the host never waits for it.

``process_group``: None (the default) means the default group when ``torch.distributed``
is initialised with a world size above 1, else no syncing; a ``ProcessGroup`` picks that
group; ``False`` turns syncing off (independent replicas, each on its own data).

With ``DistributedDataParallel``: Marthe's closure step differentiates with
``torch.autograd.grad``, which never fires DDP's hooks, so DDP averages nothing and there is
no double averaging. The backward-style step (``loss.backward(create_graph=True)``) must
run under ``ddp.no_sync()`` (val_closure too): DDP's hooks cannot reduce a gradient that
carries a graph. See the README, "Multi-GPU and multi-node".
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

BUCKET_CAP_MB = 25.0  # DDP's default bucket size


def check_process_group(value: Any) -> None:
    """A clear error for anything but None, False or a ``ProcessGroup``."""
    if value is None or value is False:
        return
    if dist.is_available() and isinstance(value, dist.ProcessGroup):
        return
    raise TypeError(
        f"process_group must be None (the default group when torch.distributed is initialised), "
        f"a torch.distributed.ProcessGroup, or False (no syncing), got {value!r}")


def resolve_sync(process_group: Any, bucket_cap_mb: Optional[float] = None) -> "NoSync":
    """The sync object for ``process_group`` (see the module docstring): ``NoSync`` for one
    process or when syncing is off, else a ``GradientSync`` over the group (buckets of
    ``bucket_cap_mb``, by default the module's ``BUCKET_CAP_MB`` at the time of the call)."""
    check_process_group(process_group)
    if bucket_cap_mb is None:
        bucket_cap_mb = BUCKET_CAP_MB
    if process_group is False or not (dist.is_available() and dist.is_initialized()):
        if process_group not in (None, False):
            raise RuntimeError("process_group was given but torch.distributed is not initialised: "
                               "call torch.distributed.init_process_group first")
        return NoSync()
    group = process_group  # None is the default group for every torch.distributed call
    if dist.get_rank(group) < 0:
        raise ValueError("this rank is not a member of process_group: pass a group that contains "
                         "it (every rank must call step() on a group it belongs to)")
    size = dist.get_world_size(group)
    return NoSync() if size == 1 else GradientSync(group, size, bucket_cap_mb)


def check_not_sharded(params: Sequence[Tensor]) -> None:
    """FSDP2 (``fully_shard``) parameters are DTensors whose forward runs on all-gathered
    copies: ``torch.autograd.grad`` w.r.t. them finds no gradient (None with allow_unused,
    an error without), ``backward(create_graph=True)`` leaves their ``.grad`` without a
    graph and forward-mode dual DTensors fail (measured, torch 2.13): no engine works."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return
    if any(isinstance(p, DTensor) for p in params):
        raise NotImplementedError(
            "marthe_ext.Marthe does not support sharded (DTensor) parameters, e.g. from FSDP2's "
            "fully_shard: Marthe differentiates the closure with torch.autograd.grad and takes "
            "Hessian-vector products, but under fully_shard the forward runs on all-gathered "
            "copies, so the sharded parameters get no gradient through autograd.grad. Use data "
            "parallelism instead: a bare model or DistributedDataParallel, with Marthe averaging "
            "over the process group (see the README, 'Multi-GPU and multi-node')")


@contextlib.contextmanager
def _clear_errors():
    """A collective that fails (a peer raised, died or stopped calling collectives until the
    process group's timeout) says so in marthe_ext's words; the backend's error is chained."""
    try:
        yield
    except RuntimeError as exc:
        raise RuntimeError(
            "marthe_ext: averaging over the process group failed: another rank probably raised, "
            "died or stopped calling Marthe.step (every rank must step together; the wait is "
            "bounded by init_process_group's timeout)") from exc


class NoSync:
    """One process (or syncing off): every method returns its input."""

    world_size = 1
    collectives = 0  # collectives launched so far (benchmarks, tests)

    def broadcast_parameters_once(self, params):
        pass

    def average_gradients(self, loss, grads, hvps, params, states, started=None):
        return loss, grads, hvps, None

    def average_list(self, tensors, like):
        return tensors

    def average_scalars(self, *values: Tensor) -> tuple[Tensor, ...]:
        return values

    def agree(self, value):
        return value


class GradientSync(NoSync):
    """Averages over ``group`` (size > 1); see the module docstring for what and when."""

    def __init__(self, group, world_size: int, bucket_cap_mb: float = BUCKET_CAP_MB):
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        self.group = group
        self.world_size = world_size
        self.bucket_cap_bytes = int(bucket_cap_mb * 2 ** 20)
        self.collectives = 0
        self._masks: dict[tuple, Tensor] = {}  # has-gradient patterns, on the device once each
        self._started = False

    # ------------------------------------------------------------------ reductions
    def _buckets(self, tensors: Sequence[Tensor]) -> list[list[int]]:
        """Indices of ``tensors`` grouped by (dtype, device) in order, at most
        ``bucket_cap_bytes`` per group (a larger tensor gets a bucket of its own)."""
        buckets: list[list[int]] = []
        open_bucket: dict[tuple, tuple[list[int], int]] = {}
        for i, t in enumerate(tensors):
            key = (t.dtype, t.device)
            idx, size = open_bucket.get(key, (None, 0))
            nbytes = t.numel() * t.element_size()
            if idx is None or (size + nbytes > self.bucket_cap_bytes and idx):
                idx, size = [], 0
                buckets.append(idx)
            idx.append(i)
            open_bucket[key] = (idx, size + nbytes)
        return buckets

    def broadcast_parameters_once(self, params: Sequence[Tensor]) -> None:
        """Before the first step: every rank starts from the group's first rank's weights (as
        DDP's constructor does), so differently seeded replicas cannot drift apart silently."""
        if self._started:
            return
        self._started = True
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        data = [p.detach() for p in params]
        with torch.no_grad():
            for idx in self._buckets(data):
                flat = torch.cat([data[i].reshape(-1) for i in idx])
                with _clear_errors():
                    dist.broadcast(flat, src=src, group=self.group)
                self.collectives += 1
                offset = 0
                for i in idx:
                    n = data[i].numel()
                    data[i].copy_(flat[offset:offset + n].view_as(data[i]))
                    offset += n

    def _launch(self, tensors: list[Tensor]) -> tuple:
        """Start summing equally laid-out tensors over the group (every rank passes the same
        shapes and dtypes in the same order): every bucket in flight at once, copied out of
        ``tensors``, which the caller may then keep using."""
        buckets = self._buckets(tensors)
        flats = [torch.cat([tensors[i].reshape(-1) for i in idx]) for idx in buckets]
        with _clear_errors():
            works = [dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
                     for flat in flats]
        self.collectives += len(flats)
        return [t.shape for t in tensors], buckets, flats, works

    def _average_(self, tensors: list[Tensor]) -> list[Tensor]:
        """Means over the group of equally laid-out tensors; views of the flat buckets."""
        return self._finish(self._launch(tensors))

    def _finish(self, launched: tuple) -> list[Tensor]:
        """Wait for ``_launch``'s buckets (once each) and return the means."""
        shapes, buckets, flats, works = launched
        with _clear_errors():
            for work in works:
                work.wait()
        out: list[Optional[Tensor]] = [None] * len(shapes)
        for idx, flat in zip(buckets, flats):
            flat.div_(self.world_size)
            offset = 0
            for i in idx:
                n = shapes[i].numel()
                out[i] = flat[offset:offset + n].view(shapes[i])
                offset += n
        return out

    def _mask(self, present: Sequence[bool], like: Tensor) -> Tensor:
        """1.0 where this rank has a gradient; built on the device once per pattern (a fresh
        host-to-device copy every step could wait for the device)."""
        key = (tuple(present), like.dtype, like.device)
        if key not in self._masks:
            self._masks[key] = torch.tensor([float(x) for x in present], dtype=like.dtype,
                                            device=like.device)
        return self._masks[key]

    def start_gradients(self, loss: Optional[Tensor], grads: list[Optional[Tensor]],
                        params: Sequence[Tensor]) -> tuple:
        """Launch the reduction of the gradients, the loss and the has-gradient mask now, for
        ``average_gradients(..., started=...)`` to finish: the reverse and fd engines have the
        gradient before they take the HVP (``hvp.on_gradients``), so its all-reduce runs
        while the HVP is computed."""
        zero, grads, tail = self._filled(loss, grads, params)
        return zero, loss is not None, self._launch(grads + [tail])

    def _filled(self, loss, grads, params):
        """(which gradients this rank lacks, the gradients with zeros for those, the loss and
        the has-gradient mask in one tensor): the same layout on every rank."""
        zero = [g is None for g in grads]
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        # The loss (None in backward style, on every rank) rides in the mask's bucket.
        mask = self._mask([not z for z in zero], grads[0] if loss is None else loss)
        return zero, grads, mask if loss is None else torch.cat([loss.reshape(1), mask])

    def average_gradients(self, loss: Optional[Tensor], grads: list[Optional[Tensor]],
                          hvps: Optional[list[Optional[Tensor]]], params: Sequence[Tensor],
                          states: Sequence[dict], started: Optional[tuple] = None):
        """(mean loss, mean gradients, mean HVPs, ``UnusedParams`` or None).

        Without ``started``: the gradients, HVPs, loss and mask in one set of buckets. With
        ``started`` (``start_gradients``' result for this step's ``loss`` and ``grads``): only
        the HVPs are launched here, then both are waited for. The means are the same either
        way (a sum is elementwise, whatever the buckets hold).

        Every returned gradient (and HVP, when ``hvps`` is a list) is a tensor: zeros stand
        for this rank's missing ones. ``UnusedParams`` (None when this rank has every
        gradient) undoes the update of those that no rank had a gradient for.
        """
        n = len(grads)
        if hvps is not None:
            hvps = [torch.zeros_like(p) if h is None else h for p, h in zip(params, hvps)]
        if started is None:
            zero, filled, tail = self._filled(loss, grads, params)
            has_loss = loss is not None
            out = self._average_(filled + (hvps or []) + [tail])
            grads, extras = out[:n], out[-1]
            if hvps is not None:
                hvps = out[n:2 * n]
        else:
            zero, has_loss, launched = started
            hvp_launched = None if hvps is None else self._launch(hvps)
            out = self._finish(launched)
            grads, extras = out[:n], out[-1]
            hvps = None if hvp_launched is None else self._finish(hvp_launched)
        loss_avg = extras[0].reshape(()) if has_loss else None
        extras = extras[1:] if has_loss else extras
        unused = None
        if any(zero):
            # A mean count above 0 means some rank had a gradient: the parameter is used.
            used_anywhere = extras > 0
            unused = UnusedParams([i for i, z in enumerate(zero) if z], used_anywhere, params, states)
        return loss_avg, grads, hvps, unused

    def average_list(self, tensors: list[Optional[Tensor]], like: Sequence[Tensor]) -> list[Tensor]:
        """Means of a gradient-like list (None = zeros, shaped as ``like``)."""
        filled = [torch.zeros_like(p) if t is None else t for p, t in zip(like, tensors)]
        return self._average_(filled)

    def average_scalars(self, *values: Tensor) -> tuple[Tensor, ...]:
        """Means of device scalars, in one collective."""
        out = self._average_([torch.stack([v.reshape(()).to(torch.float64) for v in values])])[0]
        return tuple(out[i].to(v.dtype) for i, v in enumerate(values))

    def agree(self, value):
        """The group's first rank's ``value`` on every rank (a host object, e.g. the HVP
        engine that ``hvp="auto"`` timed: ranks must not pick different engines)."""
        box = [value]
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        with _clear_errors():
            dist.broadcast_object_list(box, src=src, group=self.group)
        self.collectives += 1
        return box[0]


class UnusedParams:
    """Parameters with no gradient on this rank, updated like the others with the averaged
    (possibly all-zero) gradient; ``restore_idle_`` then puts back the weights and state of
    those that no rank had a gradient for and decays their tangents (``Z <- mu Z``), as an
    idle parameter of one process. All on the device (``torch.where`` on the reduced mask)."""

    def __init__(self, indices: list[int], used_anywhere: Tensor, params: Sequence[Tensor],
                 states: Sequence[dict]):
        self.indices = indices
        self.used = [used_anywhere[i] for i in indices]
        self.params = [params[i] for i in indices]
        self.states = [states[i] for i in indices]
        self.saved_params = [p.detach().clone() for p in self.params]
        self.saved_states = [{k: t.clone() for k, t in st.items()} for st in self.states]

    def restore_idle_(self, ok: Tensor, mu: Tensor) -> None:
        decay = torch.where(ok, mu, torch.ones_like(mu))
        with torch.no_grad():
            for used, p, old_p, st, old in zip(self.used, self.params, self.saved_params,
                                               self.states, self.saved_states):
                p.copy_(torch.where(used, p, old_p))
                for k, t in st.items():
                    idle = old[k] * decay.to(t.dtype) if k.startswith("tangent") else old[k]
                    t.copy_(torch.where(used, t, idle))

    def hypergrad_correction(self, parts, backend, clip: Optional[float]) -> Tensor:
        """Train mode: the part of ``h = <clip(g + wd w), Zw>`` that parameters no rank used
        added through their coupled weight decay (one process would not count them)."""
        by_id = {id(p): j for j, p in enumerate(self.params)}
        total = torch.zeros((), dtype=torch.float64, device=self.params[0].device)
        for opts, _, bufs in parts:
            wd = opts.coupled_weight_decay
            if not wd:
                continue
            for p, g, z in zip(bufs.params, bufs.grads, bufs.tangents):
                j = by_id.get(id(p))
                if j is None:
                    continue
                dot = backend.clipped_dot([g], [z], clip=clip, a_extra=[p], a_extra_scale=wd)
                total = total + torch.where(self.used[j], torch.zeros_like(total), dot.to(torch.float64))
        return total
