"""lungddpm: semantic-layout-guided 3D diffusion for thoracic CT synthesis (Lung-DDPM re-implementation)."""

from __future__ import annotations

__version__ = "0.1.0"
