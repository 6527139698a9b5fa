"""Listening TCP sockets of a running ``mendis`` command's process tree, as ``ss -ltnp``
prints them, then Ctrl-C and what is left (issue 14: only loopback may listen).

    python bench/listeners.py --name serve -- serve /tmp/mendis_probe_ckpt/checkpoint
    python bench/listeners.py --name demo --seconds 140 -- demo --quick --no-conditional \
        --out /tmp/listeners_demo

Starts ``python -m mendis_ray.cli ARGS`` from this checkout (its PYTHONPATH) in a new
session with SIGINT at its default (as in a terminal), takes ``ss -ltnp`` every second for
``--seconds`` once the embedded Ray's GCS listens, keeps the lines whose pid belongs to
the command's process tree, sends SIGINT and waits ``--grace`` s.  Writes the raw lines
of the snapshot with the most listeners, every distinct listener seen, and the
processes of the tree still alive after Ctrl-C to ``bench/results/listeners_NAME.txt``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from mendis_ray.distributed.session import is_loopback, process_tree  # noqa: E402

PID = re.compile(r"pid=(\d+)")


def stamp() -> str:
    return time.strftime("%H:%M:%S")


def ss_lines(tree: set[int]) -> list[str]:
    """``ss -ltnp`` lines held by a process of ``tree``."""
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True, check=True).stdout
    return [ln for ln in out.splitlines()[1:] if tree & {int(p) for p in PID.findall(ln)}]


def address(line: str) -> str:
    """The local address of an ``ss -ltn`` line (``[::ffff:127.0.0.1]:80`` -> inner)."""
    local = line.split()[3]
    return local.rsplit(":", 1)[0].strip("[]").split("%")[0]


def _loopback(addr: str) -> bool:
    """``*`` (ss's wildcard: every interface) or anything unparsable is not loopback."""
    try:
        return is_loopback(addr)
    except ValueError:
        return False


def alive(pids: set[int]) -> list[str]:
    left = []
    for pid in sorted(pids):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            left.append(f"{pid} {Path(f'/proc/{pid}/comm').read_text().strip()}")
    return left


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--seconds", type=float, default=20.0, help="sampling after Ray is up")
    p.add_argument("--grace", type=float, default=20.0, help="wait after Ctrl-C")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    log = open(f"/tmp/listeners_{a.name}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mendis_ray.cli", *args], env=env, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )  # fmt: skip
    seen: set[int] = set()
    best: list[str] = []
    distinct: dict[tuple, str] = {}
    t_up = None
    deadline = time.time() + 180 + a.seconds
    while proc.poll() is None and time.time() < deadline:
        tree = set(process_tree(proc.pid))
        seen |= tree
        lines = ss_lines(tree)
        if t_up is None and any("gcs_server" in ln for ln in lines):
            t_up = time.time()
        for ln in lines:
            distinct.setdefault((ln.split()[3], PID.findall(ln)[0]), (stamp(), ln))
        best = lines if len(lines) > len(best) else best
        if t_up is not None and time.time() - t_up > a.seconds:
            break
        time.sleep(1.0)
    running = proc.poll() is None
    seen |= set(process_tree(proc.pid))
    if running:
        os.kill(proc.pid, signal.SIGINT)
    try:
        rc = proc.wait(120)
    except subprocess.TimeoutExpired:
        rc = None
    time.sleep(a.grace)
    left = alive(seen - {proc.pid})
    exposed = [ln for _, ln in distinct.values() if not _loopback(address(ln))]
    text = [f"# mendis {' '.join(args)}  (still running when sampled: {running})",
            f"# ss -ltnp, lines of its process tree, snapshot with the most listeners "
            f"({len(best)}):", *best,
            f"# distinct listeners over {a.seconds:.0f} s of 1-s snapshots: {len(distinct)}; "
            f"not loopback: {len(exposed)}", *exposed,
            "# every distinct listener (time first seen):",
            *(f"{t} {ln}" for t, ln in distinct.values()),
            f"# after Ctrl-C: exit status {rc}; processes of its tree alive {a.grace:.0f} s "
            f"later: {len(left)}", *left]  # fmt: skip
    path = HERE / "results" / f"listeners_{a.name}.txt"
    path.write_text("\n".join(text) + "\n")
    print("\n".join(text))
    for entry in left:  # clean up what it left, our own processes, by PID
        os.kill(int(entry.split()[0]), signal.SIGKILL)
    return 0 if running and not exposed and not left else 1


if __name__ == "__main__":
    sys.exit(main())
