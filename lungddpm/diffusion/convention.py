"""Model input conventions: how a case (HU volume + layout on the case's grid) becomes network input, and how a
sample becomes HU on the case's grid again. A checkpoint names its convention; sampling takes it from there.

- ``window`` — lungddpm's own (:mod:`lungddpm.diffusion.encoding`): HU clipped to ``hu_window`` and mapped linearly to
  [-1, 1], layout channels in {-1, 1}, the network works on the case's grid as it is.
- ``lung-ddpm`` — the training convention of the released Lung-DDPM checkpoint. Our ``[Z, Y, X]`` array is put
  in the original's stored array order (S0, S1, S2) by ``axes`` (then ``flip``); the CT is min-max scaled to
  [0, 1] separately for each index of S2 (over all voxels sharing that index: a *column* here — not an HU window);
  lung and nodule are one-hot channels; everything is arranged as (S0, S2, S1), resized trilinearly to ``size``³
  (layouts become soft) and mapped x2 - 1. The inverse undoes the per-column scaling *on the model grid* (the
  column minima and maxima resampled along S2 exactly as the image was) and then resamples the HU volume back to
  the case's grid; when the grids agree every resize is the identity and the inverse is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LungDDPMError
from ..preprocessing.layout import LUNG, NODULE, check_labels
from .encoding import hu_to_model, layout_to_channels, model_to_hu


class ConventionError(LungDDPMError):
    """A checkpoint or config whose input convention cannot be used."""


@dataclass(frozen=True)
class ModelInput:
    """One case in network units, with what the inverse needs."""

    image: np.ndarray  # [1, D, H, W] reference CT in model units on the network grid
    layout: np.ndarray  # [2, D, H, W] lung and nodule channels in [-1, 1]
    keep: np.ndarray  # bool [1, D, H, W] where anatomically-aware sampling keeps the reference
    case_shape: tuple[int, int, int]  # [Z, Y, X] of the case's grid
    record: dict[str, Any] = field(default_factory=dict)  # the scaling, JSON-able (goes into provenance)


class Convention(Protocol):
    name: str

    def to_model(self, ct: np.ndarray, layout: np.ndarray, keep: np.ndarray) -> ModelInput:
        """ct [Z, Y, X] HU, layout [Z, Y, X] labels 0/1/2, keep bool [Z, Y, X] -> network input."""
        ...

    def to_hu(self, x: np.ndarray, inp: ModelInput) -> np.ndarray:
        """x [D, H, W] network output in model units -> float32 HU [Z, Y, X] on the case's grid."""
        ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class WindowConvention:
    """lungddpm's own convention: a linear HU window, the case's grid."""

    hu_window: tuple[float, float]
    name: ClassVar[str] = "window"

    def to_model(self, ct: np.ndarray, layout: np.ndarray, keep: np.ndarray) -> ModelInput:
        return ModelInput(
            hu_to_model(ct, self.hu_window)[None],
            layout_to_channels(layout),
            np.asarray(keep, bool)[None],
            tuple(ct.shape),  # type: ignore[arg-type]
            {"convention": self.name, "hu_window": [float(v) for v in self.hu_window]},
        )

    def to_hu(self, x: np.ndarray, inp: ModelInput) -> np.ndarray:
        return model_to_hu(x, self.hu_window)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "hu_window": [float(v) for v in self.hu_window]}


def resize(volume: np.ndarray, size: tuple[int, ...], mode: str) -> np.ndarray:
    """[C, *spatial] float -> [C, *size] by ``torch`` interpolation (align_corners=False: voxel centres map onto
    voxel centres, the field of view is kept); the identity when the size already matches."""
    if tuple(volume.shape[1:]) == tuple(size):
        return volume
    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None]
    kwargs = {} if mode == "nearest-exact" else {"align_corners": False}
    return F.interpolate(t, size=size, mode=mode, **kwargs)[0].numpy()


@dataclass(frozen=True)
class LungDDPMConvention:
    """The released Lung-DDPM model's training convention (see the module docstring)."""

    axes: tuple[int, int, int] = (0, 1, 2)  # our array axes (0 z, 1 y, 2 x) that are the original's S0, S1, S2
    flip: tuple[bool, bool, bool] = (False, False, False)  # reverse S0, S1, S2 (after ``axes``)
    size: int = 128  # edge of the cubic network grid
    name: ClassVar[str] = "lung-ddpm"

    def __post_init__(self) -> None:
        if sorted(self.axes) != [0, 1, 2] or len(self.flip) != 3 or self.size < 1:
            raise ConventionError(
                f"lung-ddpm convention: axes {list(self.axes)} must be a permutation of [0, 1, 2], flip three "
                f"booleans and size positive (got flip {list(self.flip)}, size {self.size}); fix init_convention.*"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LungDDPMConvention:
        """From a checkpoint's ``convention`` or the config's ``init_convention`` section."""
        return cls(tuple(int(a) for a in d["axes"]), tuple(bool(f) for f in d["flip"]), int(d["size"]))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "axes": list(self.axes), "flip": list(self.flip), "size": self.size}

    # ---------------------------------------------------------------------------------------------- geometry
    def to_original(self, a: np.ndarray) -> np.ndarray:
        """[..., Z, Y, X] -> [..., S0, S1, S2] (the original's stored array order)."""
        lead = a.ndim - 3
        a = np.transpose(a, (*range(lead), *(lead + ax for ax in self.axes)))
        for ax, f in enumerate(self.flip):
            if f:
                a = np.flip(a, lead + ax)
        return a

    def from_original(self, a: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_original`."""
        lead = a.ndim - 3
        for ax, f in enumerate(self.flip):
            if f:
                a = np.flip(a, lead + ax)
        return np.transpose(a, (*range(lead), *(lead + ax for ax in np.argsort(self.axes))))

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.size,) * 3

    def _to_network(self, a: np.ndarray, mode: str) -> np.ndarray:
        """[C, Z, Y, X] -> [C, size³] arranged (S0, S2, S1)."""
        return resize(self.to_original(a).transpose(0, 1, 3, 2), self.grid, mode)

    # ------------------------------------------------------------------------------------------- intensity
    def column_range(self, ct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ct [Z, Y, X] HU -> (minimum, maximum) [n_S2] float64 of each column (index of S2)."""
        a = self.to_original(np.asarray(ct, dtype=np.float64))
        return a.min(axis=(0, 1)), a.max(axis=(0, 1))

    def scale(self, ct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ct [Z, Y, X] HU -> ([Z, Y, X] float32 in [0, 1], column minima, column maxima); a constant column
        maps to 0."""
        lo, hi = self.column_range(ct)
        span = hi - lo
        a = self.to_original(np.asarray(ct, dtype=np.float64))
        scaled = np.where(span > 0, (a - lo) / np.where(span > 0, span, 1.0), 0.0)
        return self.from_original(scaled).astype(np.float32), lo, hi

    def to_model(self, ct: np.ndarray, layout: np.ndarray, keep: np.ndarray) -> ModelInput:
        check_labels(layout, "layout")
        scaled, lo, hi = self.scale(ct)
        onehot = np.stack([layout == LUNG, layout == NODULE]).astype(np.float32)
        record = {
            "convention": self.name,
            "intensity": {
                **self.to_dict(),
                "column_axis": int(self.axes[2]),  # the axis of our [z, y, x] array whose indices are columns
                "column_min_hu": lo.tolist(),  # per index of S2 (after flip), on the case's grid
                "column_max_hu": hi.tolist(),
            },
        }
        return ModelInput(
            self._to_network(scaled[None], "trilinear") * 2.0 - 1.0,
            self._to_network(onehot, "trilinear") * 2.0 - 1.0,
            self._to_network(np.asarray(keep, np.float32)[None], "nearest-exact") > 0.5,
            tuple(ct.shape),  # type: ignore[arg-type]
            record,
        )

    def model_grid_hu(self, x: np.ndarray, inp: ModelInput) -> np.ndarray:
        """x [size³] network output (S0, S2, S1), model units -> float32 HU on the model grid: the per-column
        scaling undone with the column minima/maxima resampled along S2 to the model grid (values outside
        [-1, 1] clipped first)."""
        rec = inp.record["intensity"]
        ends = np.stack([rec["column_min_hu"], rec["column_max_hu"]])  # [2, n_S2]
        lo, hi = resize(ends, (x.shape[1],), "linear").astype(np.float64)
        unit = (np.clip(x.astype(np.float64), -1.0, 1.0) + 1.0) / 2.0
        return (unit * (hi - lo)[None, :, None] + lo[None, :, None]).astype(np.float32)

    def to_hu(self, x: np.ndarray, inp: ModelInput) -> np.ndarray:
        hu = self.model_grid_hu(x, inp)  # (S0, S2, S1) on the model grid
        n0, n1, n2 = (inp.case_shape[a] for a in self.axes)
        back = resize(hu[None], (n0, n2, n1), "trilinear")[0].transpose(0, 2, 1)  # (S0, S1, S2), case grid
        return np.ascontiguousarray(self.from_original(back), dtype=np.float32)


def convention_from_checkpoint(ckpt: dict[str, Any], path: Path | str) -> Convention:
    """The input convention a model checkpoint was trained with: ``convention`` (imported models) or the
    ``hu_window`` of a lungddpm-trained model."""
    conv = ckpt.get("convention")
    if conv is None:
        if "hu_window" not in ckpt:
            raise ConventionError(
                f"{path}: the checkpoint names no input convention (neither 'convention' nor 'hu_window'); rerun "
                "the train stage, or import_checkpoint for a released Lung-DDPM model"
            )
        return WindowConvention(tuple(float(v) for v in ckpt["hu_window"]))  # type: ignore[arg-type]
    if conv.get("name") == LungDDPMConvention.name:
        return LungDDPMConvention.from_dict(conv)
    if conv.get("name") == WindowConvention.name:
        return WindowConvention(tuple(float(v) for v in conv["hu_window"]))  # type: ignore[arg-type]
    raise ConventionError(
        f"{path}: unknown input convention {conv.get('name')!r}; this lungddpm knows 'window' and 'lung-ddpm' — "
        "re-import the checkpoint with this version"
    )
