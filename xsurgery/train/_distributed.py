"""One process or many (``torchrun``): process-group set-up and the evaluation sampler."""

from __future__ import annotations

import os

import torch

from ..errors import UserError

__all__ = ["Dist", "ShardSampler"]


class Dist:
    """Process group set-up from torchrun's environment (a no-op for one process)."""

    def __init__(self, device: str | None) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want = device or "auto"
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
            self.device = torch.device("cuda", self.local_rank) if want == "cuda" else torch.device(want)
            torch.cuda.set_device(self.device)
        elif want == "cpu":
            self.device = torch.device("cpu")
        else:
            raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {want!r}")
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class ShardSampler(torch.utils.data.Sampler):
    """Every world-th index, no padding: distributed evaluation counts each image once."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
