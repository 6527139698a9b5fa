"""mendis_ray: the Mendis normalizing flow for stellar spectra, at survey scale with Ray.

Subpackages: ``spectra`` (grids, simulator, emulators, FITS ingest, Parquet shards; numpy,
scipy, pyarrow and astropy only).  Ray is imported only by ``mendis_ray.distributed``.
"""

__version__ = "0.1.0"
