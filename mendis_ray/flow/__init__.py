"""The Mendis flow (torch + nflows only): the invertible transforms (``actnorm``, ``lu``,
``coupling`` with the pure spline of ``spline`` and the conditioner of ``mlp``), the flow
built from a FlowConfig (``model``), the density over physical (flux, labels)
(``density``), and pickle-free checkpoints (``checkpoint``)."""

from mendis_ray.flow.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mendis_ray.flow.coupling import compiled_splines
from mendis_ray.flow.density import SpectrumDensity, Standardizer
from mendis_ray.flow.model import MendisFlow, count_parameters

__all__ = [
    "CheckpointError",
    "MendisFlow",
    "SpectrumDensity",
    "Standardizer",
    "compiled_splines",
    "count_parameters",
    "load_checkpoint",
    "save_checkpoint",
]
