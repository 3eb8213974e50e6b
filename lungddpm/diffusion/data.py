"""Training data: cached volumes and deterministic per-step batches.

Determinism: the t-th optimizer step draws its global batch — which case, timestep and noise for global sample
``j`` — from seeds derived from ``(train.seed, step, j)`` only. Hence a resumed run sees exactly the batches an
uninterrupted run sees, and ``torchrun --nproc_per_node N`` with batch ``b`` follows the same trajectory as one
process with batch ``N * b``: rank ``r`` takes its slice of the same global batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import LungDDPMError
from ..preprocessing.layout import read_case_pair
from .encoding import ANY_TEXTURE, NODULE_THRESHOLD, hu_to_model, layout_to_channels


@dataclass(frozen=True)
class TrainData:
    """Training volumes cached in memory."""

    images: torch.Tensor  # [N, 1, D, H, W] in [-1, 1]
    layouts: torch.Tensor  # [N, 2, D, H, W] in {-1, 1} (lesion scale: the nodule channel at texture levels)
    case_ids: tuple[str, ...]
    weights: torch.Tensor | None = None  # [N, 1, D, H, W] lesion-focused loss weights, or None (uniform)
    groups: tuple[str, ...] | None = None  # per sample: texture class or 'free' (train.balance_textures)


def data_digest(data: TrainData) -> str:
    """sha256 of what a training draws from, as loaded: sample ids, groups, images, layouts (texture levels and context
    channels included) and loss weights. A resume compares it, so that no training, finished or not, is continued on
    other data (another split, preprocessing, ROIs, texture levels or generated regions)."""
    h = hashlib.sha256(repr((data.case_ids, data.groups)).encode())
    for t in (data.images, data.layouts, data.weights):
        if t is not None:
            a = np.ascontiguousarray(t.numpy())
            h.update(repr((a.dtype.str, a.shape)).encode())
            h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def load_training_data(
    ct_paths: Sequence[Path], layout_paths: Sequence[Path], hu_window: tuple[float, float], multiple: int
) -> TrainData:
    """Read preprocessed CTs and their layouts (each pair on the same grid, every grid the same shape)."""
    if not ct_paths:
        raise LungDDPMError("no training cases: the train split is empty (check split.* and data.*)")
    images, layouts, ids = [], [], []
    shape = None
    for ct_path, layout_path in zip(ct_paths, layout_paths, strict=True):
        hu, lay, _ = read_case_pair(ct_path, layout_path)
        if shape is None:
            shape = hu.shape
            if any(s % multiple for s in shape):
                raise LungDDPMError(
                    f"{ct_path}: grid {shape} is not a multiple of {multiple} (the UNet halves it "
                    f"{int(np.log2(multiple))} times); change preprocess.size or model.channel_mult"
                )
        elif hu.shape != shape:
            raise LungDDPMError(f"{ct_path}: grid {hu.shape} differs from {shape}; rerun preprocess")
        images.append(hu_to_model(hu, hu_window)[None])
        layouts.append(layout_to_channels(lay, str(layout_path)))
        ids.append(Path(layout_path).name.removesuffix(".nii.gz"))
    return TrainData(torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(layouts)), tuple(ids))


def _seed(*parts: int) -> int:
    # SeedSequence pads with zeros, so _seed(s, step) == _seed(s, step, 0): harmless, as the first seeds numpy's
    # PCG64 (the step's case draw) and the second torch's Mersenne Twister (sample 0), unrelated generators;
    # changing it would change every training's draws (a ``train`` version bump).
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset indexed by optimizer step -> this rank's micro-batches for that step."""

    def __init__(
        self,
        data: TrainData,
        seed: int,
        micro: int,
        world: int,
        rank: int,
        accum: int,
        timesteps: int,
        first_step: int,
        last_step: int,
        cond_dropout: float = 0.0,
        flip: bool = False,
        balance: bool = False,
        crop: int = 0,
    ) -> None:
        self.data, self.seed, self.micro, self.world, self.rank = data, seed, micro, world, rank
        self.accum, self.timesteps, self.first, self.last = accum, timesteps, first_step, last_step
        self.cond_dropout, self.flip, self.crop = cond_dropout, flip, crop
        if crop and (any(crop > s for s in data.images.shape[2:])):
            raise LungDDPMError(f"train.crop {crop} is larger than the training grid {tuple(data.images.shape[2:])}")
        self.probs = None
        if balance and data.groups is not None:  # each group equally often
            groups = np.asarray(data.groups)
            counts = {g: int((groups == g).sum()) for g in set(data.groups)}
            self.probs = np.array([1.0 / (counts[g] * len(counts)) for g in data.groups])

    def __len__(self) -> int:
        return max(self.last - self.first, 0)

    @property
    def global_batch(self) -> int:
        return self.micro * self.world * self.accum

    def __getitem__(self, i: int) -> list[dict[str, torch.Tensor]]:
        step = self.first + i + 1  # optimizer steps are numbered from 1
        n = len(self.data.case_ids)
        rng = np.random.default_rng(_seed(self.seed, step))
        if self.probs is None:
            cases = rng.integers(0, n, size=self.global_batch)
        else:
            cases = rng.choice(n, size=self.global_batch, p=self.probs)
        out = []
        for m in range(self.accum):
            lo = (m * self.world + self.rank) * self.micro
            idx = list(range(lo, lo + self.micro))
            ts, noises, samples = [], [], []
            for j in idx:
                g = torch.Generator().manual_seed(_seed(self.seed, step, j))
                ts.append(torch.randint(0, self.timesteps, (1,), generator=g))
                noise = torch.randn(self.data.images.shape[1:], generator=g)
                sample = self._augment(int(cases[j]), g)
                if self.crop:
                    sample, noise = self._crop({**sample, "noise": noise}, g)
                noises.append(noise)
                samples.append(sample)
            batch = {k: torch.stack([smp[k] for smp in samples]) for k in samples[0]}
            out.append({**batch, "t": torch.cat(ts), "noise": torch.stack(noises)})
        return out

    def _augment(self, case: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        """One sample, with the nodule texture dropped to 'any texture' (p = ``cond_dropout``: every nodule voxel,
        whatever its texture level) and random flips; the random draws come after the timestep and noise, so they
        leave those unchanged."""
        d = self.data
        sample = {"x0": d.images[case], "layout": d.layouts[case]}
        if d.weights is not None:
            sample["weight"] = d.weights[case]
        if self.cond_dropout > 0 and float(torch.rand((), generator=g)) < self.cond_dropout:
            lay = sample["layout"].clone()
            lay[1] = torch.where(lay[1] > NODULE_THRESHOLD, torch.tensor(ANY_TEXTURE), lay[1])
            sample["layout"] = lay
        if self.flip:
            dims = [a + 1 for a in range(3) if float(torch.rand((), generator=g)) < 0.5]
            if dims:
                sample = {k: v.flip(dims) for k, v in sample.items()}
        return sample

    def _crop(self, sample: dict[str, Tensor], g: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
        """The same random ``crop``³ window of every tensor [C, D, H, W] (drawn last, uniform over the grid) ->
        (the sample, its noise [1, c, c, c])."""
        c = self.crop
        lo = [int(torch.randint(0, n - c + 1, (1,), generator=g)) for n in sample["x0"].shape[1:]]
        win = (slice(None), *(slice(a, a + c) for a in lo))
        out = {k: v[win] for k, v in sample.items()}
        return out, out.pop("noise")
