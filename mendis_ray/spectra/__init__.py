"""Spectra: wavelength grids, the simulator, Payne emulators, FITS ingest, Parquet shards.

Depends on numpy, scipy, pyarrow and astropy only (no torch, no ray).
"""
