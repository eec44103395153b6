"""Locked image-tower stages run once: their outputs for a few augmented views of every training image, on disk.

With `--lock_image`, the locked leading stages of the image tower compute the same thing every
epoch. Running them once per (image, view) and training the unlocked stages on what they produced
takes their forward pass out of every step (they had no backward, being locked). The price is
augmentation: each image has only `views` random crops, drawn once, instead of a fresh crop every
epoch.

Files, per rank (each rank caches every world-size-th image, so ranks share the work and no rank
waits for another's writes): `<rank>-of-<world>.f16`, an fp16 matrix [rows, views, *feature_shape],
and `<rank>-of-<world>.json`, which says what the matrix holds, how many rows are finished and
which images could not be read. A killed run resumes caching where it stopped.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from clipsearch.data_report import DataReport
from clipsearch.images import load_image
from clipsearch.models.bundle import in_cpu_chunks
from clipsearch.store import write_json
from clipsearch.training_order import seeded_randomness

logger = logging.getLogger(__name__)

# Children of a timm model that `forward_head` applies (pooling and classifier), not the trunk.
HEAD_CHILDREN = frozenset({"global_pool", "head", "head_drop", "fc", "fc_norm", "classifier", "pre_logits"})


class LockedPrefixSplit:
    """A timm tower cut after its last locked stage: `prefix` (locked, cacheable) then `suffix` (trained).

    timm's convolutional trunks (EfficientNet, MobileNet, ResNet, RegNet, ConvNeXt, ...) apply their
    children in order before `forward_head` pools them; the cut relies on that and checks it on a
    random input when made, so a model whose forward does more (a ViT adds its position embedding
    outside any child) is refused with a clear message instead of training on wrong features.
    """

    def __init__(self, tower: nn.Module, locked: Sequence[nn.Module], image_size: int, name: str = "image tower"):
        trunk = trunk_children(tower)
        locked_ids = {id(module) for module in locked}
        cut = max((position + 1 for position, module in enumerate(trunk) if id(module) in locked_ids), default=0)
        if cut == 0:
            raise ValueError(f"{name}: no locked stage to cache; pass --lock_image")
        if any(id(module) not in locked_ids for module in trunk[:cut] if _has_parameters(module)):
            raise ValueError(f"{name}: the locked stages are not a leading run of the trunk")
        self.tower = tower
        self.prefix_modules = trunk[:cut]
        self.suffix_modules = trunk[cut:]
        self._check(image_size, name)

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        hidden = images.contiguous(memory_format=torch.channels_last)
        for module in self.prefix_modules:
            hidden = module(hidden)
        return hidden

    def suffix(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pooled features from prefix outputs (cached ones come as fp16)."""
        parameter = next(self.tower.parameters())
        hidden = hidden.to(dtype=parameter.dtype)
        if hidden.ndim == 4:
            hidden = hidden.contiguous(memory_format=torch.channels_last)
        for module in self.suffix_modules:
            hidden = module(hidden)
        return self.tower.forward_head(hidden)

    def feature_shape(self, image_size: int) -> tuple[int, ...]:
        parameter = next(self.tower.parameters())
        with torch.inference_mode():
            probe = torch.zeros(1, 3, image_size, image_size, device=parameter.device)
            return tuple(self.prefix(probe).shape[1:])

    def _check(self, image_size: int, name: str) -> None:
        modes = {module: module.training for module in self.tower.modules()}  # locked stages stay in eval
        self.tower.eval()
        try:
            parameter = next(self.tower.parameters())
            generator = torch.Generator().manual_seed(0)
            probe = torch.randn(2, 3, image_size, image_size, generator=generator).to(parameter.device)
            with torch.inference_mode():
                whole = self.tower(probe.contiguous(memory_format=torch.channels_last))
                try:
                    split = self.suffix(self.prefix(probe))
                except (RuntimeError, TypeError, ValueError):  # the children do not chain at all
                    split = None
        finally:
            for module, training in modes.items():
                module.training = training
        if split is None or whole.shape != split.shape or not torch.allclose(whole, split, rtol=1e-3, atol=1e-4):
            raise ValueError(f"{name}: its forward is not its children in order, so its locked stages cannot be "
                             "cached; train without --cache_image_views")


def trunk_children(tower: nn.Module) -> list[nn.Module]:
    """The tower's children in forward order, a `blocks`/`stages`/`layers` sequence expanded, head left out."""
    children = []
    for name, child in tower.named_children():
        if name in HEAD_CHILDREN:
            continue
        if name in ("blocks", "stages", "layers") and isinstance(child, nn.Sequential):
            children.extend(child.children())
        else:
            children.append(child)
    return children


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


class _Views(Dataset):
    """`views` seeded augmentations of each of `paths`: [views, 3, H, W], or None for a bad image."""

    def __init__(self, paths: Sequence[str], indices: Sequence[int], views: int, transform: Callable, seed: int):
        self.paths, self.indices, self.views, self.transform, self.seed = paths, indices, views, transform, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        report = DataReport()
        image = load_image(self.paths[index], report)
        if image is None:
            return index, None, next(iter(report.skipped()), "unreadable image")
        crops = []
        for view in range(self.views):
            # The crop is a function of (seed, image, view): a resumed cache draws what the first run drew.
            with seeded_randomness(self.seed * 1_000_003 + index * 1_009 + view):
                crops.append(self.transform(image))
        return index, torch.stack(crops), None


def _same_settings(stored: dict | None, current: dict) -> bool:
    """Whether files made under `stored` hold what `current` asks for.

    Caches written before the identity left out the model flags that never change the features
    (the text tower's, the embedding size) recorded every model flag; they still match on the
    flags counted now.
    """
    if not isinstance(stored, dict):
        return False
    model = current.get("model")
    if isinstance(model, dict) and isinstance(stored.get("model"), dict):
        stored = {**stored, "model": {key: value for key, value in stored["model"].items() if key in model}}
    return stored == current


class ImageFeatureCache:
    """The prefix outputs of `views` crops of each image, split over `world_size` rank files."""

    def __init__(self, folder: str | Path | None, image_paths: Sequence[str], views: int, identity: dict,
                 world_size: int = 1):
        self.folder = Path(folder) if folder is not None else None  # None: the builder chooses it (a smoke run)
        self.image_paths = list(image_paths)
        self.views = int(views)
        self.world_size = int(world_size)  # set again by the builder once the ranks are known
        self.settings = {**identity, "images": len(self.image_paths), "views": self.views}
        self.row_of = {path: row for row, path in enumerate(self.image_paths)}
        self._matrices: dict[int, np.memmap] = {}
        self._bad: dict[int, str] | None = None

    @property
    def identity(self) -> dict:
        """What the files must have been made for to be reused: the run's settings and the rank split."""
        return {**self.settings, "world_size": self.world_size}

    def _files(self, rank: int) -> tuple[Path, Path]:
        stem = f"{rank}-of-{self.world_size}"
        return self.folder / f"{stem}.f16", self.folder / f"{stem}.json"

    def _state(self, rank: int) -> dict | None:
        _, progress = self._files(rank)
        try:
            state = json.loads(progress.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return state if _same_settings(state.get("identity"), json.loads(json.dumps(self.identity))) else None

    def rows_of_rank(self, rank: int) -> range:
        return range(rank, len(self.image_paths), self.world_size)

    def build(self, split: LockedPrefixSplit, transform: Callable, rank: int, seed: int, image_size: int,
              batch_size: int = 32, num_workers: int = 0) -> None:
        """Cache this rank's images, continuing a cache a killed run left; does nothing when it is complete."""
        self.folder.mkdir(parents=True, exist_ok=True)
        matrix_file, progress_file = self._files(rank)
        indices = list(self.rows_of_rank(rank))
        feature_shape = split.feature_shape(image_size)
        state = self._state(rank)
        if state is None or tuple(state["feature_shape"]) != feature_shape or not matrix_file.exists():
            state = {"identity": self.identity, "feature_shape": list(feature_shape), "done": 0, "bad": {}}
            np.memmap(matrix_file, dtype=np.float16, mode="w+", shape=(max(len(indices), 1), self.views, *feature_shape)).flush()
        if state["done"] >= len(indices):
            return
        matrix = np.memmap(matrix_file, dtype=np.float16, mode="r+")
        matrix = matrix.reshape(-1, self.views, *feature_shape)
        todo = _Views(self.image_paths, indices[state["done"]:], self.views, transform, seed)
        loader = DataLoader(todo, batch_size=None, num_workers=num_workers, collate_fn=None)
        device = next(split.tower.parameters()).device
        started, first_done, pending, pending_rows = time.perf_counter(), state["done"], [], []

        def flush() -> None:
            flushed = len(pending_rows)
            if pending:
                stacked = torch.cat(pending).to(device)
                with torch.inference_mode():
                    features = in_cpu_chunks(split.prefix, stacked.flatten(0, 1)).to(torch.float16).cpu()
                features = features.unflatten(0, (len(pending_rows), self.views))
                first = state["done"]
                matrix[first: first + len(pending_rows)] = features.contiguous().numpy()
                matrix.flush()
            state["done"] += len(pending_rows)
            write_json(progress_file, state)  # after the rows are on disk: a kill loses at most one batch
            pending.clear()
            pending_rows.clear()
            # A line per tenth, printed: minutes of caching with no sign of life look like a hang.
            if flushed and (state["done"] % max(1, total // 10) < flushed or state["done"] == total):
                rate = (state["done"] - first_done) / max(time.perf_counter() - started, 1e-9)
                print(f"caching the locked image stages (rank {rank}): {state['done']}/{total} images x "
                      f"{self.views} views, {rate:.1f} images/s", file=sys.stderr, flush=True)

        total = len(indices)
        megabytes = cache_megabytes(total, self.views, feature_shape)
        print(f"caching the locked image stages (rank {rank}): {total - state['done']} of {total} images x "
              f"{self.views} views into {self.folder} ({megabytes:.0f} MB), once for the whole run",
              file=sys.stderr, flush=True)
        for index, crops, reason in loader:
            pending_rows.append(index)
            if crops is None:
                state["bad"][str(index)] = reason
                pending.append(torch.zeros(1, self.views, 3, image_size, image_size))
            else:
                pending.append(crops.unsqueeze(0))
            if len(pending_rows) * self.views >= batch_size:
                flush()
        flush()
        if state["bad"]:
            logger.warning("image cache: %d unreadable images will be skipped", len(state["bad"]))

    def is_complete(self) -> bool:
        return all((state := self._state(rank)) is not None and state["done"] >= len(self.rows_of_rank(rank))
                   for rank in range(self.world_size))

    def bad_images(self) -> dict[int, str]:
        if self._bad is None:
            self._bad = {}
            for rank in range(self.world_size):
                state = self._state(rank) or {}
                self._bad.update({int(row): reason for row, reason in state.get("bad", {}).items()})
        return self._bad

    def read(self, image_path: str, view: int) -> tuple[torch.Tensor | None, str | None]:
        """One cached view (fp16) of an image, or (None, why) for an image that could not be read."""
        row = self.row_of[image_path]
        if row in self.bad_images():
            return None, self.bad_images()[row]
        rank = row % self.world_size
        if rank not in self._matrices:  # opened lazily: each DataLoader worker maps its own view
            state = self._state(rank)
            if state is None:
                raise FileNotFoundError(f"image cache {self._files(rank)[1]} is missing or was made for other settings")
            matrix = np.memmap(self._files(rank)[0], dtype=np.float16, mode="r")
            self._matrices[rank] = matrix.reshape(-1, self.views, *state["feature_shape"])
        return torch.from_numpy(np.array(self._matrices[rank][row // self.world_size, view % self.views])), None

    def __getstate__(self) -> dict:
        # DataLoader workers get the paths and reopen the maps themselves.
        return {**self.__dict__, "_matrices": {}}


def cache_megabytes(images: int, views: int, feature_shape: Sequence[int]) -> float:
    return images * views * math.prod(feature_shape) * 2 / 2**20
