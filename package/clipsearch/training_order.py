"""The order training reads its pairs in: fixed by the seed, per epoch, and resumable mid-epoch."""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

# Augmentation seeds are drawn below this bound: torch.manual_seed takes 64-bit values.
_SEED_BOUND = 2**62


class ResumableSampler(DistributedSampler):
    """Shuffled (index, augmentation seed) draws, a function of (seed, epoch) alone.

    Every rank computes the same permutation and takes every world-size-th draw, as
    DistributedSampler does; the ranks are read when iteration starts (after the process group
    exists), so one object serves one process, `ddp` and `ddp_spawn`. Being a DistributedSampler,
    Lightning leaves it in place rather than wrapping it.

    Each draw carries its own augmentation seed, so a crop depends on the draw, not on how many
    items came before it in a worker: a resumed run sees the same crops as an uninterrupted one.
    `position` (draws this rank finished in the current epoch) is set by the training loop and
    saved with `state_dict`; after `load_state_dict` the next iteration skips what was finished.
    """

    def __init__(self, dataset_size: int, seed: int):
        super().__init__(range(dataset_size), num_replicas=1, rank=0, shuffle=True, seed=seed)
        self.dataset_size = dataset_size
        self.position = 0
        self._resume_at = 0

    @staticmethod
    def _world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def _per_rank(self) -> int:
        world, _ = self._world()
        return math.ceil(self.dataset_size / world)

    def __len__(self) -> int:
        return self._per_rank()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        world, rank = self._world()
        if self._resume_at >= self._per_rank():  # the saved epoch was complete: the next one starts
            self.epoch, self._resume_at = self.epoch + 1, 0
        start, self._resume_at = self._resume_at, 0
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator).tolist()
        augment_seeds = torch.randint(_SEED_BOUND, (self.dataset_size,), generator=generator).tolist()
        draws = list(zip(order, augment_seeds))
        draws += draws[: self._per_rank() * world - len(draws)]  # pad so every rank has as many
        return iter(draws[rank::world][start:])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = self._resume_at = int(state["position"])


class ResumableLoader(DataLoader):
    """A DataLoader over a ResumableSampler, stateful in Lightning's sense.

    Lightning stores the `state_dict` of every training loader that has one (the fit loop's
    "combined_loader" entry), hands it back before the first batch of a resumed run, and warns
    that a loader without one is not resumable. That entry is missing from checkpoints saved
    after `fit` returns, so the training run also keeps the sampler's state in a callback.
    """

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def seed_generators(seed: int, device: torch.device | str = "cpu") -> None:
    """Seed torch's CPU generator, and CUDA's when `device` is a CUDA device.

    `torch.manual_seed` would do it too, but it also queues a seed for every accelerator that is not
    initialised (CUDA on a CPU run, XPU everywhere), formatting the caller's whole traceback for
    each: milliseconds a call, more the deeper the stack. Once per step inside Lightning's loop and
    once per training item in the data workers, that was 4% of the trainer's time and a third of a
    worker's on 2 cores (ViT-Small-16; BENCHMARKS.md, "Training: where the time goes").
    """
    torch.default_generator.manual_seed(seed)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    elif device.type != "cpu":  # another accelerator: its generators are seeded by torch's own call
        torch.manual_seed(seed)


@contextmanager
def seeded_randomness(seed: int | None):
    """Run a block with torch's CPU generator at `seed` (what data transforms draw from), and put the
    previous state back."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        seed_generators(seed)
        yield
