"""CLIP-like unit vectors with a modality gap: image embeddings in one cone, text queries shifted out of it.

Image vectors: a common mean direction plus a Zipf mixture of clusters, the clusters' centres and the
points around them drawn with a power-law spectrum (variance of the i-th of 512 directions ~ 1/i)
in a random orthonormal basis, then normalised. Text queries: their target image shifted by one
fixed gap vector (which also takes back part of the image mean) plus isotropic noise, normalised.
With the defaults: cosine of a random image pair 0.40, text-target 0.30, text-random image 0.10,
random text pair 0.47 (`describe` measures them), the figures of OpenAI CLIP ViT-B models; an
IVF index trained on images then needs several times the nprobe for text queries that it needs
for image queries. Used by benchmarks/bench_index.py and tests/test_index.py.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CHUNK_ROWS = 250_000


class ClipLikeSpace:
    """One draw of the space (basis, mean, clusters, gap): the same seed always gives the same space."""

    def __init__(self, dim: int = 512, clusters: int = 2_000, seed: int = 0, spectrum_exponent: float = 1.0,
                 cluster_share: float = 0.5, image_pair_cosine: float = 0.40, mean_kept_by_text: float = 0.75,
                 gap_norm: float = 2.0, text_noise: float = 2.04):
        space = np.random.default_rng(seed)
        self.dim = dim
        variances = np.arange(1, dim + 1, dtype=np.float64) ** -spectrum_exponent
        variances /= variances.sum()  # a point's spread has unit expected squared norm
        rotation = np.linalg.qr(space.standard_normal((dim, dim)))[0]
        self.basis = (np.sqrt(variances)[:, None] * rotation.T).astype(np.float32)  # standard normal @ basis
        self.mean = _unit(space.standard_normal(dim))
        # A spread of unit squared norm around mean_weight * mean: random pairs meet at w^2 / (1 + w^2).
        self.mean_weight = float(np.sqrt(image_pair_cosine / (1 - image_pair_cosine)))
        self.cluster_share = cluster_share
        self.centres = (space.standard_normal((clusters, dim)) @ self.basis * np.sqrt(cluster_share)).astype(np.float32)
        weights = 1.0 / np.arange(1, clusters + 1)
        self.weights = weights / weights.sum()
        # The gap: part of the image mean removed (a unit image vector carries sqrt(image_pair_cosine)
        # of it), and a fixed direction away from it.
        gap_direction = space.standard_normal(dim)
        gap_direction = _unit(gap_direction - (gap_direction @ self.mean) * self.mean)
        removed = (1 - mean_kept_by_text) * np.sqrt(image_pair_cosine)
        self.gap = (-removed * self.mean + gap_norm * gap_direction).astype(np.float32)
        self.text_noise = text_noise

    def images(self, count: int, seed: int = 1, chunk_rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
        """Chunks of `count` unit image vectors [rows, dim], float32."""
        draws = np.random.default_rng([seed, count])
        for start in range(0, count, chunk_rows):
            rows = min(chunk_rows, count - start)
            members = draws.choice(len(self.centres), size=rows, p=self.weights)
            spread = draws.standard_normal((rows, self.dim), dtype=np.float32) @ self.basis
            vectors = self.centres[members] + np.sqrt(1 - self.cluster_share) * spread
            vectors += self.mean_weight * self.mean.astype(np.float32)
            yield _unit_rows(vectors)

    def texts(self, targets: np.ndarray, seed: int = 2) -> np.ndarray:
        """One text query per target image row [n, dim]: target + gap + noise, normalised."""
        draws = np.random.default_rng(seed)
        targets = np.asarray(targets, dtype=np.float32)
        noise = draws.standard_normal(targets.shape, dtype=np.float32) * (self.text_noise / np.sqrt(self.dim))
        return _unit_rows(targets + self.gap + noise)


def describe(space: ClipLikeSpace, count: int = 4_000, seed: int = 5) -> dict:
    """Mean cosines of the space, measured on fresh draws: image pairs, text-target, text-random image, text pairs."""
    images = next(space.images(count, seed=seed))
    texts = space.texts(images, seed=seed)
    shifted = np.roll(np.arange(count), 1)
    return {
        "image_pair": round(float(np.mean(np.sum(images * images[shifted], 1))), 3),
        "text_target": round(float(np.mean(np.sum(texts * images, 1))), 3),
        "text_random_image": round(float(np.mean(np.sum(texts * images[shifted], 1))), 3),
        "text_pair": round(float(np.mean(np.sum(texts * texts[shifted], 1))), 3),
    }


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


if __name__ == "__main__":
    print(describe(ClipLikeSpace()))
