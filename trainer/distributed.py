"""Training over several processes (torchrun): data parallel with DDP, or latents sharded over
ranks as in OpenAI's released code (Gao et al. 2024, Appendix on parallelism).

    torchrun --nproc-per-node N -m trainer train --out RUN ...      (or: saescope train --nproc N ...)
    torchrun --nproc-per-node N -m trainer train --out RUN --shard-latents 1 ...

Data parallel (the default): every rank holds the whole SAE and takes a slice of each global
batch (the global batch is --batch-size tokens, the same tokens a single process would train on,
so the result equals the single-process run up to floating-point summation order). Each rank
reads only its own token rows of the store. Gradients are averaged by DDP; since the loss is a
sum over the global batch divided by the global batch's variance, each rank's loss is scaled by
the world size so that the average is the single-process gradient. Fired-latent counters are
OR-reduced, so every rank sees the same dead latents.

Latent sharded: rank r owns latents [r n/W, (r+1) n/W) (its rows of W_dec, columns of W_enc,
entries of b_enc, Adam state and dead counters); b_dec is replicated. Every rank sees the same
batch. Top-k is sharded: each rank takes its local top k, the values are all-gathered, and the
k-th largest of the gathered values is the global threshold; a rank keeps its local entries at
or above it (ties at the threshold could keep more than k; with float pre-activations they do
not occur in practice). Each rank decodes its kept latents and the partial reconstructions are
all-reduced (sum), so every rank computes the same loss; the encoder input's gradient is summed
over ranks on the way back (b_dec receives it once).

Checkpoints and results are written by rank 0 in the single-process layout (shards are gathered
first), so a run can be resumed with another number of processes, or none.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from trainer.errors import ConfigError
from trainer.sae import top_k

# Which dimension of each SAE tensor runs over the latents (b_dec has none: replicated).
LATENT_DIM = {"W_dec": 0, "W_enc_T": 0, "W_enc": 1, "b_enc": 0, "tokens_since_fired": 0}  # W_enc: on disk


class Selection(NamedTuple):
    indices: torch.Tensor  # (B, k) latents of this rank
    pre: torch.Tensor  # (B, k) their float pre-activations; -inf where not in the global top k


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; World() is a single process."""

    rank: int = 0
    size: int = 1
    shard_latents: bool = False
    local_rank: int = 0
    gpus: bool = False  # the ranks run on GPUs and talk over NCCL (else on CPUs, over gloo)

    @property
    def data_parallel(self) -> bool:
        return self.size > 1 and not self.shard_latents

    @property
    def sharded(self) -> bool:
        return self.size > 1 and self.shard_latents

    @property
    def data_share(self) -> tuple[int, int]:
        """(which, of how many) slices of each batch this rank trains on."""
        return (self.rank, self.size) if self.data_parallel else (0, 1)

    @property
    def writes(self) -> bool:
        """Rank 0 writes checkpoints, results and logs."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        if name:
            return torch.device(name)
        on_gpu = self.gpus if self.size > 1 else torch.cuda.is_available()
        return torch.device("cuda", self.local_rank) if on_gpu else torch.device("cpu")

    def latents(self, n_latents: int) -> slice:
        """The latents this rank owns."""
        if not self.sharded:
            return slice(0, n_latents)
        return slice(self.rank * n_latents // self.size, (self.rank + 1) * n_latents // self.size)

    # ------------------------------------------------------------ reductions (no-ops alone)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that split the batch (data parallel); the tensor itself otherwise."""
        if self.data_parallel:
            tensor = tensor.clone()
            dist.all_reduce(tensor)
        return tensor

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """Logical or over the ranks that split the batch."""
        return self.sum(mask.to(torch.int32)) > 0 if self.data_parallel else mask

    def count(self, mask: torch.Tensor) -> int:
        """True entries over all latents (summed over shards when sharded)."""
        total = mask.sum().to(torch.int64)
        if self.sharded:
            dist.all_reduce(total)
        return int(total)

    def batch_variance(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ||x - mean||^2 over the global batch: the FVU denominator. Two passes (mean,
        then spread) so that a large mean does not cancel digits."""
        if not self.data_parallel:
            return (x - x.mean(0)).pow(2).sum()
        total = self.sum(torch.cat([x.sum(0), x.new_tensor([x.shape[0]])]))
        mean = total[:-1] / total[-1]  # (d,)
        return self.sum((x - mean).pow(2).sum())

    # ------------------------------------------------------------ sharded top-k and decoder

    def topk(self, pre: torch.Tensor, k: int) -> Selection:
        """The k largest pre-activations of each token, over all latents: (B, k) of this rank's."""
        values, indices = top_k(pre, min(k, pre.shape[1]))  # (B, k)
        values = values.float()
        if not self.sharded:
            return Selection(indices, values)
        gathered = [torch.empty_like(values) for _ in range(self.size)]
        dist.all_gather(gathered, values)
        threshold = torch.cat(gathered, 1).topk(k, dim=-1).values[:, -1:]  # (B, 1): global k-th largest
        return Selection(indices, values.masked_fill(values < threshold, -float("inf")))

    def to_shards(self, x_c: torch.Tensor) -> torch.Tensor:
        """Identity; when sharded, the gradient coming back is summed over the shards."""
        return _SumGradient.apply(x_c) if self.sharded else x_c

    def from_shards(self, x_hat: torch.Tensor) -> torch.Tensor:
        """The sum of every shard's partial reconstruction (B, d); identity gradient."""
        return _SumForward.apply(x_hat) if self.sharded else x_hat

    # ------------------------------------------------------------ state in the single-process layout

    def shard_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a tensor in the single-process layout."""
        dim = LATENT_DIM.get(name)
        if not self.sharded or dim is None or tensor.dim() == 0:
            return tensor
        part = self.latents(tensor.shape[dim])
        return tensor.narrow(dim, part.start, part.stop - part.start).clone()

    def gather_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The single-process layout of a sharded tensor, on every rank (shards are equal in size)."""
        dim = LATENT_DIM.get(name)
        if not self.sharded or dim is None or tensor.dim() == 0:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim)


    def shard_module(self, sae: nn.Module) -> nn.Module:
        """Keep this rank's latents of an SAE built whole (a no-op unless sharded)."""
        if self.sharded:
            for name in ("W_dec", "W_enc_T", "b_enc"):
                setattr(sae, name, nn.Parameter(self.shard_tensor(name, getattr(sae, name).data)))
            sae.n_latents = sae.W_dec.shape[0]
        return sae

    def gather_state(self, sae: nn.Module, optimizer: torch.optim.Optimizer, tokens_since_fired: torch.Tensor) -> dict:
        """SAE, Adam state and dead-latent counters in the single-process layout (collective)."""
        names = [name for name, _ in sae.named_parameters()]
        optimizer_state = optimizer.state_dict()
        optimizer_state["state"] = {
            index: {key: self.gather_tensor(names[index], value) for key, value in state.items()}
            for index, state in optimizer_state["state"].items()
        }
        return {
            "sae": {name: self.gather_tensor(name, value) for name, value in sae.state_dict().items()},
            "optimizer": optimizer_state,
            "tokens_since_fired": self.gather_tensor("tokens_since_fired", tokens_since_fired),
        }

    def shard_state(self, state: dict, sae: nn.Module) -> dict:
        """The inverse of gather_state: this rank's part of a checkpoint, with every Adam moment
        laid out in memory like its parameter (the fused Adam kernel pairs elements in memory
        order, so a moment laid out otherwise would be applied to the wrong weights)."""
        params = dict(sae.named_parameters())
        names = list(params)

        def like_param(index: int, value: torch.Tensor) -> torch.Tensor:
            param, value = params[names[index]], self.shard_tensor(names[index], value)
            return torch.empty_like(param).copy_(value) if value.shape == param.shape else value

        optimizer_state = dict(state["optimizer"])
        optimizer_state["state"] = {
            index: {key: like_param(index, value) for key, value in entry.items()}
            for index, entry in optimizer_state["state"].items()
        }
        return {
            **state,
            "sae": {name: self.shard_tensor(name, value) for name, value in state["sae"].items()},
            "optimizer": optimizer_state,
            "tokens_since_fired": self.shard_tensor("tokens_since_fired", state["tokens_since_fired"]),
        }


class _SumGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad


class _SumForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


class StepForward(nn.Module):
    """What DDP wraps: the SAE, with the training step's forward (a function of the batch) as
    its forward, so that DDP averages the gradients of everything that function computes."""

    def __init__(self, sae: nn.Module):
        super().__init__()
        self.sae = sae

    def forward(self, losses, x: torch.Tensor):
        return losses(x)


def training_forward(world: World, sae: nn.Module):
    """A callable (losses, x) -> losses(x): under DDP when data parallel, plain otherwise."""
    if not world.data_parallel:
        return lambda losses, x: losses(x)
    device_ids = [world.local_rank] if next(sae.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(StepForward(sae), device_ids=device_ids)


# ------------------------------------------------------------ process group


def uses_gpus(device: str) -> bool:
    """Whether processes asked to train on `device` ("" = the best there is) run on GPUs."""
    return torch.cuda.is_available() and not device.startswith("cpu")


def check_gpus(nproc: int, device: str) -> None:
    """One GPU per process, before torchrun starts any: a rank without one would fail in CUDA."""
    from trainer.config import ConfigError

    if uses_gpus(device) and nproc > torch.cuda.device_count():
        raise ConfigError(f"--nproc {nproc} needs {nproc} GPUs, this machine has {torch.cuda.device_count()} "
                          f"(--device cpu runs the processes on the CPU)")


def init_world(shard_latents: bool = False, device: str = "") -> World:
    """The World torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK), with the
    process group started: NCCL on GPUs, gloo on CPUs (also on a GPU machine with --device cpu).
    A single process without torchrun: World()."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(shard_latents=shard_latents)
    check_gpus(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), device)
    world = World(int(os.environ["RANK"]), size, shard_latents, int(os.environ.get("LOCAL_RANK", "0")), uses_gpus(device))
    if not dist.is_initialized():
        if world.gpus:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if world.gpus else "gloo")
        # Shut the group's threads down before the interpreter does: a rank that finishes first
        # otherwise exits with gloo's threads alive and aborts ("terminate called without an
        # active exception"), which torchrun reports as a failed run.
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return world


def finish_world(world: World) -> None:
    """After a run that succeeded: the ranks wait for each other, then shut their process group
    down together. Rank 0 writes the run folder after the others are done; a rank that exited
    meanwhile could still abort in gloo's threads (seen in the resume test after the atexit
    shutdown above), so no rank leaves before all have finished."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch(parallel, train_args: list[str]) -> int:
    """`saescope train --nproc N ...`: run `python -m trainer train ...` on N ranks under torchrun;
    its exit status."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={parallel.nproc}",
               "-m", "trainer", "train", "--shard-latents" if parallel.shard_latents else "--no-shard-latents", *train_args]
    return subprocess.run(command).returncode


def check_world(cfg, world: World) -> None:
    """What the split needs, before any work: whole shares of each batch, or of the latents."""
    if world.gpus and cfg.device.startswith("cpu"):
        raise ConfigError("this run trains on the CPU (--device cpu): give --device cpu here too, so that its processes talk over gloo")
    check_split(cfg, world.size, bool(world.shard_latents))


def check_split(cfg, processes: int, shard_latents: bool) -> None:
    """Whole shares for `processes`; also checked before torchrun starts them (one line, not one
    per process and a torchrun traceback)."""
    if processes > 1 and not shard_latents and cfg.batch_size % processes:
        raise ConfigError(f"--batch-size {cfg.batch_size} must divide into {processes} processes")
    if processes > 1 and shard_latents and cfg.n_latents % processes:
        raise ConfigError(f"--latents {cfg.n_latents} must divide into {processes} shards")


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
