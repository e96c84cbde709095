"""Past one device on torch's own distributed stack (DESIGN section 5).

`dowser finetune` / `dowser probe` under ``torchrun --nproc-per-node N`` (or ``accelerate launch``,
which sets the same WORLD_SIZE / RANK / LOCAL_RANK variables) run one process per device: gloo on
CPU, nccl on CUDA with device ``cuda:LOCAL_RANK``.

Fine-tuning strategies:
- ``ddp``: data parallel; every rank holds the whole model, mask and masked optimiser state. The
  optimiser's hooks gather each gradient in fp32 as backward produces it (a masked matrix's k entries),
  and after the step's last micro-batch the ranks average those fp32 sums (``all_reduce_grads``): the
  sum over micro-batches and ranks never rounds to bf16, and only the trainable entries travel, not the
  whole matrices that ``DistributedDataParallel``'s buckets would send (it also cannot overlap them
  with backward, which a 10 % mask's tenth of the traffic affords).
- ``fsdp``: FSDP2 (``fully_shard``, reducing in fp32), one unit per decoder layer, then the root. Every parameter is a
  DTensor sharded on dim 0 (rank r holds rows ``[r*c, min((r+1)*c, out))``, c = ceil(out / world)), and
  each rank reads only its rows of the mask from the packed file, so its mask, trainable indices,
  moments and fp32 masters cover its shard only.

The global batch: ``--batch-size`` is per rank. Optimiser step s takes the examples a single process
would take with batch size ``world * batch_size`` and the same ``grad_accum`` (``training.step_examples``),
and rank r takes slice ``[r * batch_size, (r + 1) * batch_size)`` of every such global micro-batch. So a
global step is ``world * batch_size * grad_accum`` examples, and the loss of every rank is divided by the
global step's assistant-token count (times ``world``, since both strategies average gradients over ranks):
the summed gradient equals the single-process one.

Checkpoints and the delta are gathered to rank 0 and written in the single-process layout (values in
mask order, state per parameter), so a run's files do not depend on how it was launched."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from dowser_cli import scoring, training
from dowser_cli.errors import Interrupted, UserError
from dowser_cli.optim import local
from dowser_cli.resources import host_peak_since_reset_mb, peak_memory
from dowser_cli.training import STRATEGIES, FinetuneConfig, LocalBackend, LossHead, Trainable, apply_values

if TYPE_CHECKING:
    from dowser_cli.models import LoadedModel
    from dowser_cli.optim import MaskedAdamW

LAUNCH_HINT = "launch with `torchrun --nproc-per-node N -m dowser_cli ...` or `accelerate launch -m dowser_cli ...`"


@dataclass
class ShardInfo:
    """Rank's part of one parameter: rows [row0, row1) of dim 0, and for a masked matrix its trainable
    entries, which are entries [k0, k0 + k) of the whole matrix's (row-major) mask order."""

    row0: int
    row1: int
    k0: int = 0
    k: int = 0


@dataclass
class Dist(LocalBackend):
    """One rank of a launched run, and the training backend for DDP and FSDP: the operations of
    ``training.LocalBackend`` done with collectives (every rank must call each of them, in order)."""

    world: int
    rank: int
    local_rank: int
    device: str
    backend: str
    strategy: str                                   # ddp | fsdp ("" for a probe)
    shards: dict[str, ShardInfo] = field(default_factory=dict)   # fsdp: per trainable parameter
    held: dict[str, int] = field(default_factory=dict)          # bytes held at a step's peak (run.yaml)
    start_rss_mb: float | None = None                           # host RSS when training began
    load_peak_rss_mb: float | None = None                       # host peak before it (loading, sharding)

    # the optimiser's hooks gather every gradient in fp32 as backward produces it (FSDP2 calls them on the
    # sharded gradient it reduced in fp32); DDP all-reduces these fp32 gradients itself (after_backward)
    compact_grads = True
    stop_grace_s = 2.0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def empty(self) -> bool:
        """Under FSDP only rank 0 reads the weights; the other ranks build the module tree on device
        "meta" and receive their shards from it (``_fill_from_rank0``), so a host holds one copy of the
        model, not one per rank."""
        return self.strategy == "fsdp" and not self.main

    def load_device(self, device: str) -> str:
        # FSDP: rank 0 loads on the host; fully_shard then moves one unit at a time to the device, as shards
        return "cpu" if self.strategy == "fsdp" else device

    def global_cfg(self, cfg: FinetuneConfig) -> FinetuneConfig:
        """The single-process settings whose steps these ranks take together: batch size world * per-rank."""
        return dataclasses.replace(cfg, batch_size=cfg.batch_size * self.world)

    def wrap(self, lm: "LoadedModel", tr: Trainable, cfg: FinetuneConfig, mask_path: Path | None) -> nn.Module:
        return wrap(self, lm, tr, cfg, mask_path)

    def share(self, mb: list[int], batch_size: int) -> tuple[list[int], float]:
        # every rank runs the same number of micro-batches, so the collectives stay in step; a rank with
        # no example in a short last micro-batch runs one with weight 0
        mine = mb[self.rank * batch_size:(self.rank + 1) * batch_size]
        return (mine, float(self.world)) if mine else (mb[:1], 0.0)

    def accumulating(self, model, last: bool):
        # DDP: nothing is reduced during backward (after_backward reduces the step's fp32 sums once)
        return contextlib.nullcontext()

    def agree(self, loss: float, stop: bool) -> tuple[float, bool]:
        # every rank sees the same loss (and, below, the same reduced norm): all skip or stop together
        agreed = torch.tensor([loss, float(stop)], dtype=torch.float64, device=self.device)
        dist.all_reduce(agreed)
        return float(agreed[0]), bool(agreed[1] > 0)

    def after_backward(self, model, opt: "MaskedAdamW") -> None:
        if self.strategy == "ddp":
            all_reduce_grads(self, opt)
        if not self.held:
            self.held = held_bytes(model, opt)

    def norm_reduce(self) -> Callable[[float], float] | None:
        """Gradient clipping's squared norm over all ranks: FSDP grads are disjoint shards (sum them); DDP
        grads are already the same everywhere after the all-reduce (nothing to add)."""
        if self.strategy != "fsdp":
            return None

        def reduce(sq: float) -> float:
            t = torch.tensor([sq], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            return float(t)
        return reduce

    def trainable_values(self, tr: Trainable) -> dict[str, torch.Tensor] | None:
        """The delta's tensors on rank 0 (one process's layout), None on the other ranks."""
        if self.strategy != "fsdp":
            return training.trainable_values(tr) if self.main else None
        out = {}
        for n, v in training.trainable_values(_local_trainable(tr)).items():
            full = gather_cat(self, v)
            if self.main:
                out[n] = full if n in tr.masks else full.reshape(tr.params[n].shape)
        return out if self.main else None

    def checkpoint_tensors(self, tr: Trainable, opt: "MaskedAdamW") -> dict[str, torch.Tensor] | None:
        """Values and optimiser state, gathered to rank 0 in the single-process checkpoint layout."""
        if self.strategy != "fsdp":
            return super().checkpoint_tensors(tr, opt) if self.main else None
        values = self.trainable_values(tr)
        state = opt.named_state({q: n for n, q in tr.params.items()})
        out = {f"value/{n}": v for n, v in values.items()} if self.main else {}
        for key, t in state.items():
            full = gather_cat(self, t)
            if self.main:
                n = key.split("/", 1)[1]
                out[key] = full if n in tr.masks else full.reshape(tr.params[n].shape)
        return out if self.main else None

    def load_checkpoint(self, path: Path, tr: Trainable, opt: "MaskedAdamW", step: int, method=None) -> None:
        """FSDP: each rank reads only its part of every checkpoint tensor (safetensors slices)."""
        if self.strategy != "fsdp":
            return super().load_checkpoint(path, tr, opt, step, method)
        from safetensors import safe_open

        loc = _local_trainable(tr)
        names = {q: n for n, q in tr.params.items()}

        def part(f, key: str, n: str) -> torch.Tensor:
            s = self.shards[n]
            sl = f.get_slice(key)
            return sl[s.k0:s.k0 + s.k] if n in tr.masks else sl[s.row0:s.row1]

        with safe_open(str(path), framework="pt") as f:
            apply_values(loc.params, tr.masks, {n: part(f, f"value/{n}", n) for n in tr.params})
            keys = list(opt.named_state(names))
            opt.load_named_state(names, {k: part(f, k, k.split("/", 1)[1]) for k in keys}, step)

    def counts(self, tr: Trainable) -> dict[str, int]:
        if self.strategy != "fsdp":
            return tr.counts()
        k = torch.tensor([sum(int(m.sum()) for m in tr.masks.values())], dtype=torch.int64, device=self.device)
        dist.all_reduce(k)
        dense = sum(q.numel() for n, q in tr.params.items() if n not in tr.masks)
        return {"params": len(tr.params), "masked_params": len(tr.masks),
                "numel": sum(q.numel() for q in tr.params.values()), "trainable_entries": int(k) + dense}

    def rank_report(self, model: nn.Module, opt: "MaskedAdamW") -> list[dict]:
        """Per rank: peak memory (whole run; host peak while loading, and since training began) and the
        bytes held at the first step's peak (after its backward)."""

        mine = {"rank": self.rank, "device": self.device, "peak_memory": peak_memory(self.device),
                "load_peak_host_rss_mb": self.load_peak_rss_mb, "train_start_host_rss_mb": self.start_rss_mb,
                "train_peak_host_rss_mb": host_peak_since_reset_mb(),
                **(self.held or held_bytes(model, opt))}
        return all_gather_objects(mine)

    def optimizer_state_bytes(self, opt: "MaskedAdamW", ranks: list[dict] | None) -> int:
        # under FSDP the state is split over the ranks: the run's total; DDP: one rank's (each has it all)
        return sum(r["optimizer_state_bytes"] for r in ranks) if self.strategy == "fsdp" else opt.state_bytes()

    def describe(self, cfg: FinetuneConfig, ranks: list[dict] | None) -> dict:
        return {"world_size": self.world, "strategy": self.strategy, "backend": self.backend,
                "per_rank_batch_size": cfg.batch_size,
                "global_step_examples": self.world * cfg.batch_size * cfg.grad_accum, "ranks": ranks}


def launched_world() -> int:
    """World size set by the launcher (1 when run directly)."""
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}: not a number") from None




def _rank_device(device: str, local_rank: int) -> str:
    if device in ("auto", "cuda"):
        if torch.cuda.is_available():
            return f"cuda:{local_rank}"
        if device == "cuda":
            raise UserError("--device cuda: CUDA is not available")
        return "cpu"
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda:"):
        raise UserError(f"--device {device}: under a launcher every rank uses cuda:LOCAL_RANK; pass --device cuda")
    raise UserError(f"--device {device}: expected auto, cpu or cuda with several processes")


def setup(strategy: str, device: str, command: str = "finetune") -> Dist | None:
    """Check --strategy against the launch; join the process group when WORLD_SIZE > 1. None when run
    as one process (then everything runs exactly as before)."""
    if strategy not in ("",) + STRATEGIES:
        raise UserError(f"--strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    world = launched_world()
    if world <= 1:
        if strategy:
            raise UserError(f"--strategy {strategy}: needs several processes (WORLD_SIZE is 1); {LAUNCH_HINT}")
        return None
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise UserError(f"WORLD_SIZE={world} but RANK / MASTER_ADDR are not set; {LAUNCH_HINT}")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = _rank_device(device, local)
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if dev.startswith("cuda"):
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(world, rank, local, dev, backend, strategy or ("ddp" if command == "finetune" else ""))


@contextlib.contextmanager
def session(strategy: str, device: str, command: str = "finetune"):
    """``setup`` for one stage, and ``teardown`` on the way out: ranks that stopped together (an
    Interrupted whose ``together`` is not False) leave together; any other error leaves at once."""
    d = setup(strategy, device, command=command)
    try:
        yield d
    except Interrupted as e:
        teardown(d, wait=getattr(e, "together", True))
        raise
    except BaseException:
        teardown(d, wait=False)
        raise
    teardown(d)


def teardown(d: Dist | None, wait: bool = True) -> None:
    """Leave the process group; ``wait``: first let every rank arrive (a rank that leaves while rank 0
    still receives its last gather can abort gloo's connection)."""
    if d is not None and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def main_first(d: Dist, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` (which writes files) on rank 0 while the others wait. A UserError there is raised on
    every rank: the others would otherwise wait for rank 0 forever."""
    err, out = None, None
    if d.main:
        try:
            out = fn()
        except UserError as e:
            err = str(e)
    box = [err]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise UserError(box[0])
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _comm_view(t: torch.Tensor) -> torch.Tensor:
    # 2-byte floats travel as their bytes (a view: writes land in t): exact, and independent of which
    # dtypes a backend implements (gloo has neither bf16 nor int16)
    return t.reshape(-1).view(torch.uint8) if t.dtype in (torch.bfloat16, torch.float16) else t


def gather_cat(d: Dist, t: torch.Tensor) -> torch.Tensor | None:
    """Every rank's tensor flattened ([n_r], lengths may differ) concatenated in rank order on rank 0
    ([sum n_r], host); None on the other ranks."""
    flat = t.detach().reshape(-1).contiguous().to(d.device)
    n = torch.tensor([flat.numel()], dtype=torch.int64, device=d.device)
    sizes_t = [torch.zeros_like(n) for _ in range(d.world)]
    dist.all_gather(sizes_t, n)
    sizes = [int(s) for s in sizes_t]
    buf = flat.new_zeros(max(max(sizes), 1))
    buf[:flat.numel()] = flat
    bufs = [torch.empty_like(buf) for _ in range(d.world)] if d.main else None
    dist.gather(_comm_view(buf), [_comm_view(b) for b in bufs] if bufs else None, dst=0)
    if not d.main:
        return None
    return torch.cat([b[:s] for b, s in zip(bufs, sizes)]).cpu()


# ---- fine-tuning -----------------------------------------------------------------------------------

def shard_rows(d: Dist, rows: int) -> tuple[int, int]:
    """FSDP2's dim-0 split (torch.chunk): rank r holds rows [r*c, min((r+1)*c, rows)), c = ceil(rows/world)."""
    c = -(-rows // d.world)
    r0 = min(d.rank * c, rows)
    return r0, min(r0 + c, rows)


def read_mask_rows(path, name: str, shape: list[int], r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of a packed mask (bool [r1 - r0, *shape[1:]]), unpacking only their bytes."""
    from safetensors import safe_open

    row = 1
    for s in shape[1:]:
        row *= s
    lo, hi = r0 * row, r1 * row
    b0, b1 = lo // 8, -(-hi // 8)
    with safe_open(str(path), framework="pt") as f:
        packed = f.get_slice(name)[b0:b1]
    bits = scoring.unpack_bits(packed, (b1 - b0) * 8)[lo - b0 * 8: hi - b0 * 8]
    return bits.reshape(r1 - r0, *shape[1:])


class LossModule(nn.Module):
    """The model with its summed loss as forward(batch) -> scalar, so that DDP's and FSDP's forward
    hooks (gradient sync, all-gathers of the root's parameters) run around the loss computation, which
    calls the backbone and lm_head directly."""

    def __init__(self, lm: "LoadedModel"):
        super().__init__()
        self.model = lm.model
        self._head = LossHead(lm)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._head(batch)


def wrap(d: Dist, lm: "LoadedModel", tr: Trainable, cfg: FinetuneConfig, mask_path: Path | None) -> nn.Module:
    """The loss module, for DDP as it is (every rank holds the whole model; ``all_reduce_grads`` sums the
    step's fp32 gradients of the trainable entries), for FSDP2 sharded: FSDP replaces every parameter
    by its shard (a DTensor), so ``tr.params`` is re-pointed and ``tr.masks`` becomes each masked
    matrix's rows of this rank."""
    mod = LossModule(lm)
    if d.strategy == "ddp":
        return mod
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(torch.device(d.device).type, (d.world,))
    # the reduce-scatter sums in fp32 whatever the model's dtype (bf16 sums of many ranks round)
    mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    full = lm.model.state_dict() if d.main else {}   # references to rank 0's weights, no copies
    for layer in lm.model.get_submodule(lm.parts.layers_path):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(mod, mesh=mesh, mp_policy=mp)
    _fill_from_rank0(d, lm.model, full)
    del full
    named = dict(lm.model.named_parameters())
    tr.params = {n: named[n] for n in tr.params}
    masks = {}
    for n in tr.masks:
        r0, r1 = shard_rows(d, tr.params[n].shape[0])
        loc = local(tr.params[n])
        if loc.shape[0] != r1 - r0:
            raise RuntimeError(f"{n}: FSDP shard has {loc.shape[0]} rows, expected {r1 - r0}")
        masks[n] = read_mask_rows(mask_path, n, list(tr.params[n].shape), r0, r1).to(loc.device)
    tr.masks = masks
    ks = torch.tensor([int(masks[n].sum()) for n in masks], dtype=torch.int64, device=d.device)
    all_k = [torch.zeros_like(ks) for _ in range(d.world)]
    dist.all_gather(all_k, ks)
    for i, n in enumerate(masks):
        r0, r1 = shard_rows(d, tr.params[n].shape[0])
        d.shards[n] = ShardInfo(r0, r1, sum(int(all_k[r][i]) for r in range(d.rank)), int(ks[i]))
    for n, q in tr.params.items():
        if n not in d.shards:
            d.shards[n] = ShardInfo(*shard_rows(d, q.shape[0]))
    return mod


def _fill_from_rank0(d: Dist, model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """After ``fully_shard``: ranks > 0 allocate their (still meta) shards, then every rank gets its rows
    of rank 0's ``full`` state dict (torch.distributed.checkpoint's broadcast_from_rank0), and buffers
    (rotary tables, position ids: not in the state dict when non-persistent) are broadcast whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not d.main:
        model.to_empty(device=d.device)
    if d.backend == "gloo" and any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()):
        # gloo has no 2-byte floats: each tensor travels whole as its bytes, each rank keeps its rows
        for name, p in model.named_parameters():
            t = full[name].to(d.device).contiguous() if d.main else torch.empty(p.shape, dtype=p.dtype, device=d.device)
            dist.broadcast(_comm_view(t), src=0)
            r0, r1 = shard_rows(d, p.shape[0])
            with torch.no_grad():
                local(p).copy_(t[r0:r1])
    else:
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for b in model.buffers():
        dist.broadcast(_comm_view(b), src=0)


def all_reduce_grads(d: Dist, opt: "MaskedAdamW", chunk: int = 1 << 24) -> None:
    """DDP: average the step's gradients over the ranks, in fp32: each masked matrix's k gathered entries
    (not the whole matrix, as DDP's buckets would send) and each dense parameter's gradient. A rank
    whose batch left a parameter out of the graph (a text-only batch and the projector) adds zeros.
    Sent in flat fp32 buffers of at most ``chunk`` entries."""
    grads = [opt.grad_or_zeros(p) for p in opt._params()]
    i = 0
    while i < len(grads):
        j, n = i, 0
        while j < len(grads) and (n == 0 or n + grads[j].numel() <= chunk):
            n += grads[j].numel()
            j += 1
        flat = torch.cat([g.reshape(-1).float() for g in grads[i:j]]).to(d.device)
        dist.all_reduce(flat)
        flat.div_(d.world)
        off = 0
        for g in grads[i:j]:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()
        i = j


def _local_trainable(tr: "Trainable") -> "Trainable":
    return Trainable({n: local(q) for n, q in tr.params.items()}, tr.masks, tr.layers)


def held_bytes(model: nn.Module, opt: "MaskedAdamW") -> dict[str, int]:
    """Bytes this rank holds of parameters (its shards under FSDP), gradients and optimiser state."""
    params = sum(local(q).numel() * q.element_size() for q in model.parameters())
    grads = sum(local(q.grad).numel() * q.grad.element_size() for q in model.parameters() if q.grad is not None)
    grads += sum(g.numel() * g.element_size() for g in opt.compact.values())
    return {"param_bytes": params, "grad_bytes": grads, "optimizer_state_bytes": opt.state_bytes()}


# ---- probing -------------------------------------------------------------------------------------


def reduce_rows(d: Dist, store, lo: int, hi: int) -> None:
    """Sum rows [lo, hi) of every factor over the ranks. Each row was computed by exactly one rank and
    is zero on the others, so the sum is that rank's row, bit for bit."""
    if hi <= lo:
        return
    per_batch = (lo // store.probes, hi // store.probes)   # act_sq: one row per batch
    for table, (a, b) in ((store.psi, (lo, hi)), (store.act, (lo, hi)), (store.act_sq, per_batch)):
        for t in table.values():
            part = t[a:b].to(d.device)
            dist.all_reduce(part)
            t[a:b] = part.to(t.device)
