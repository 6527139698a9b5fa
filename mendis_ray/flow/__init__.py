"""The Mendis flow (torch + nflows only): invertible layers, the flow built from a
FlowConfig, the density over physical (flux, labels), and pickle-free checkpoints."""

from mendis_ray.flow import layers
from mendis_ray.flow.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mendis_ray.flow.density import SpectrumDensity, Standardizer
from mendis_ray.flow.model import MendisFlow, count_parameters

__all__ = [
    "CheckpointError",
    "MendisFlow",
    "SpectrumDensity",
    "Standardizer",
    "count_parameters",
    "layers",
    "load_checkpoint",
    "save_checkpoint",
]
