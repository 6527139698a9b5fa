"""Shared by the job scripts: map one section of a YAML config onto ``mendis`` flags.

Every job is ``python jobs/<job>.py --config jobs/configs/<preset>.yaml [extra flags]``,
locally or through ``ray job submit --working-dir . -- python jobs/<job>.py ...``.  A
section key ``foo_bar: 3`` becomes ``--foo-bar 3``; ``true`` becomes a bare flag; the key
``args`` lists positional arguments.  Flags given on the command line come last and win.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package, when the job runs from a working dir

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "local.yaml"


def section_args(path: str | Path, section: str) -> list[str]:
    """``mendis`` arguments from ``section`` of the YAML file ``path``."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text()) or {}
    if section not in cfg:
        raise SystemExit(f"{path}: no '{section}:' section (sections: {sorted(cfg)})")
    positional: list[str] = []
    flags: list[str] = []
    for key, value in (cfg[section] or {}).items():
        if key == "args":
            positional += [str(v) for v in (value if isinstance(value, list) else [value])]
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, list):
            flags += [flag, ",".join(str(v) for v in value)]
        elif value is not False and value is not None:
            flags += [flag, str(value)]
    return positional + flags


def run(command: list[str], section: str, doc: str) -> int:
    """Parse ``--config``, build the ``mendis`` command line and run it."""
    from mendis_ray.cli import main

    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML preset (local, paper)")
    known, rest = p.parse_known_args()
    return main([*command, *section_args(known.config, section), *rest])
