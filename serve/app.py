"""Import path for Serve config files: ``import_path: serve.app:build_app``.

The application itself lives in :mod:`mendis_ray.distributed.serving`; this module only
re-exports its builder so that ``serve run`` / ``serve deploy`` find it from the
repository root (or a ``runtime_env`` ``working_dir`` holding it).  See serve/README.md.
"""

from mendis_ray.distributed.serving import build_app

__all__ = ["build_app"]
