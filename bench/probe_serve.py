"""Adversarial probe of ``mendis serve`` (issue 14): poison requests under load, a
Parquet body with a lying footer, valid-looking extreme inputs, listening sockets, Ctrl-C.

    python bench/probe_serve.py --label after                     # this checkout
    python bench/probe_serve.py --label before --code /tmp/before  # another checkout

Starts ``python -m mendis_ray.cli serve CHECKPOINT`` from ``--code`` (its PYTHONPATH) on
127.0.0.1 and a free port, one replica, and measures:

1. poison under load: ``--clients`` threads post valid single-spectrum JSON requests for
   ``--duration`` s while ``--poison`` requests with flux ``[3e38] * n_pix`` are mixed in;
   valid requests that failed (any non-200), their p50/p99 latency, and the largest
   difference of a valid result from the same spectrum scored alone;
2. a Parquet body whose footer says 1 row while its pages hold ``--lie-rows`` rows: the
   status, the replica's peak RSS (VmHWM) before and after, and the longest ``/healthz``
   latency while the body is being handled (the event loop blocked or not);
3. statuses of flux +-3e38 (JSON) and of an Arrow body with list<uint64> 2^64-1;
4. the listening TCP sockets of the server's process tree (like ``ss -ltnp``);
5. Ctrl-C (SIGINT) of the server: processes of its tree still alive 15 s later.

Without ``--checkpoint`` it trains the tiny test-fixture flow once (bench_serve's
recipe) into ``--cache``.  Writes ``bench/results/probe_serve_LABEL.json``.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import report  # noqa: E402

log = logging.getLogger("probe_serve")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: bytes, ctype: str = "application/json", path: str = "/score",
         timeout: float = 120.0) -> tuple[int, bytes, float]:  # fmt: skip
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST" if body else "GET", path, body=body or None,
                     headers={"Content-Type": ctype})  # fmt: skip
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data, time.perf_counter() - t0
    except OSError:
        return 0, b"", time.perf_counter() - t0
    finally:
        conn.close()


def lying_parquet(n_rows: int, n_pix: int, claimed: int = 1) -> bytes:
    """A Parquet body of ``n_rows`` all-zero spectra whose footer claims ``claimed`` rows
    (the file's num_rows only; the row group keeps the truth, as the probe found)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mendis_ray.parquet_guard import read_footer, write_footer

    flux = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n_rows * n_pix, np.float32)), n_pix)
    buf = io.BytesIO()
    pq.write_table(pa.table({"flux": flux}), buf, compression="zstd", row_group_size=n_rows,
                   data_page_size=1 << 30)  # fmt: skip
    meta = read_footer(buf.getvalue())
    meta[3] = (meta[3][0], claimed)
    return write_footer(buf.getvalue(), meta)


def uint64_arrow(n_pix: int) -> bytes:
    import pyarrow as pa

    values = pa.array(np.full(n_pix, 2**64 - 1, dtype=np.uint64))
    table = pa.table({"flux": pa.FixedSizeListArray.from_arrays(values, n_pix)})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def replica_pid(root: int) -> int | None:
    from mendis_ray.distributed.session import process_tree

    for pid in process_tree(root):
        try:
            if Path(f"/proc/{pid}/comm").read_text().startswith("ray::ServeRepli"):
                return pid
        except OSError:
            continue
    return None


def start_server(code: Path, checkpoint: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(code), RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, "-m", "mendis_ray.cli", "serve", str(checkpoint), "--port", str(port),
           "--num-cpus", "2", "--batch-size", "64"]  # fmt: skip
    logf = open(f"/tmp/probe_server_{port}.log", "w")

    # a background process inherits SIGINT ignored: restore the default, as in a terminal
    def sigint_default() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=str(code),
                            preexec_fn=sigint_default)  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline:
        status, _, _ = post(port, b"", path="/healthz", timeout=5)
        if status == 200:
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {logf.name}")
        time.sleep(1)
    raise RuntimeError("server did not come up in 180 s")


def spectrum_json(flux, ivar, labels, i: int) -> bytes:
    return json.dumps({"id": str(i), "flux": flux[i].tolist(), "ivar": ivar[i].tolist(),
                       "teff": float(labels[i, 0]), "logg": float(labels[i, 1]),
                       "feh": float(labels[i, 2])}).encode()  # fmt: skip


def poison_under_load(port, bodies, reference, n_pix, clients, duration, n_poison) -> dict:
    poison = json.dumps({"flux": [3e38] * n_pix, "teff": 4400.0, "logg": 2.0,
                         "feh": 0.0}).encode()  # fmt: skip
    stop = time.time() + duration
    lock = threading.Lock()
    valid: list[tuple[int, float, float]] = []  # status, latency, |delta log_p|
    bad_status: list[int] = []

    def client(k: int) -> None:
        i = k
        while time.time() < stop:
            j = i % len(bodies)
            status, data, dt = post(port, bodies[j])
            delta = float("nan")
            if status == 200:
                got = json.loads(data)["results"][0]["log_p"]
                delta = abs(got - reference[j]) if got is not None else float("inf")
            with lock:
                valid.append((status, dt, delta))
            i += clients

    def poisoner() -> None:
        for _ in range(n_poison):
            time.sleep(duration / (n_poison + 1))
            status, _, _ = post(port, poison)
            with lock:
                bad_status.append(status)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    threads.append(threading.Thread(target=poisoner))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = sorted(v[1] for v in valid)
    ok = [v for v in valid if v[0] == 200]
    deltas = [v[2] for v in ok]
    return {
        "valid_requests": len(valid),
        "valid_failed": len(valid) - len(ok),
        "valid_5xx": sum(1 for v in valid if v[0] >= 500 or v[0] == 0),
        "p50_ms": 1e3 * statistics.median(lat) if lat else None,
        "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "max_abs_delta_log_p": max(deltas) if deltas else None,
        "poison_statuses": sorted(set(bad_status)),
    }


def lying_footer(port: int, root: int, n_pix: int, rows: int) -> dict:
    body = lying_parquet(rows, n_pix)
    pid = replica_pid(root)
    before = vm_hwm_mb(pid) if pid else float("nan")
    health: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            _, _, dt = post(port, b"", path="/healthz", timeout=120)
            health.append(dt)
            time.sleep(0.05)

    t = threading.Thread(target=probe)
    t.start()
    status, data, dt = post(port, body, "application/vnd.apache.parquet", timeout=300)
    done.set()
    t.join()
    return {
        "body_bytes": len(body),
        "status": status,
        "seconds": dt,
        "replica_peak_rss_before_mb": before,
        "replica_peak_rss_after_mb": vm_hwm_mb(pid) if pid else float("nan"),
        "max_healthz_ms": 1e3 * max(health) if health else None,
        "error": data[:200].decode("utf-8", "replace"),
    }


def listeners(root: int) -> list[dict]:
    from mendis_ray.distributed.session import listening_sockets, process_tree

    return listening_sockets(process_tree(root))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--label", default="after")
    p.add_argument("--code", default=str(HERE.parent), help="checkout whose server is probed")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--cache", default="/tmp/mendis_probe_ckpt")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--poison", type=int, default=7)
    p.add_argument("--lie-rows", type=int, default=100_000)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from bench_serve import build_checkpoint, simulate

    ckpt = Path(a.checkpoint) if a.checkpoint else Path(a.cache) / "checkpoint"
    if not (ckpt / "model.safetensors").is_file():
        build_checkpoint(ckpt, "tiny-paper", 480)
    flux, ivar, labels = simulate(64, seed=7, snr=300.0)
    n_pix = flux.shape[1]
    port = _free_port()
    (HERE / "results").mkdir(exist_ok=True)
    proc = start_server(Path(a.code).resolve(), ckpt, port)
    root = proc.pid
    out: dict = {"label": a.label, "code": str(Path(a.code).resolve())}
    try:
        bodies = [spectrum_json(flux, ivar, labels, i) for i in range(len(flux))]
        reference = []
        for b in bodies:  # each spectrum alone
            status, data, _ = post(port, b)
            reference.append(json.loads(data)["results"][0]["log_p"] if status == 200 else None)
        log.info("poison under load: %d clients, %.0f s, %d poison", a.clients, a.duration,
                 a.poison)  # fmt: skip
        out["poison_under_load"] = poison_under_load(
            port, bodies, reference, n_pix, a.clients, a.duration, a.poison
        )
        log.info("lying footer: %d rows claimed as 1", a.lie_rows)
        out["lying_footer"] = lying_footer(port, root, n_pix, a.lie_rows)
        extremes = {}
        for name, value in (("flux_+3e38", 3e38), ("flux_-3e38", -3e38)):
            body = json.dumps({"flux": [value] * n_pix, "teff": 4400.0, "logg": 2.0, "feh": 0.0})
            extremes[name] = post(port, body.encode())[0]
        extremes["arrow_uint64_max"] = post(port, uint64_arrow(n_pix),
                                            "application/vnd.apache.arrow.stream")[0]  # fmt: skip
        out["extreme_inputs"] = extremes
        out["listeners"] = listeners(root)
    finally:
        os.kill(root, signal.SIGINT)  # Ctrl-C of mendis serve
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        tree_pids = [r["pid"] for r in out.get("listeners", [])]
        time.sleep(15)
        alive = [pid for pid in set(tree_pids) if Path(f"/proc/{pid}").exists()]
        out["after_ctrl_c"] = {
            "server_exit": proc.poll(),
            "listener_pids_alive_15s": alive,
            "listeners_alive": [r for r in listening_sockets_of(alive)],
        }
        for pid in alive:  # clean up what it left (our own processes, by PID)
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        if proc.poll() is None:
            os.killpg(root, signal.SIGTERM)

    print("\nlistening sockets of the server's process tree (like ss -ltnp):")
    for r in out["listeners"]:
        print(f'  LISTEN {r["address"]}:{r["port"]:<6} users:(("{r["process"]}",pid={r["pid"]}))')
    pu, lf = out["poison_under_load"], out["lying_footer"]
    rows = [
        {"probe": "poison under load: valid failed", "value": f"{pu['valid_failed']} / "
         f"{pu['valid_requests']} ({pu['valid_5xx']} 5xx)"},
        {"probe": "poison under load: valid p50 / p99 ms",
         "value": f"{pu['p50_ms']:.0f} / {pu['p99_ms']:.0f}"},
        {"probe": "poison under load: max |delta log p| vs alone",
         "value": f"{pu['max_abs_delta_log_p']}"},
        {"probe": "poison statuses", "value": str(pu["poison_statuses"])},
        {"probe": f"lying footer ({lf['body_bytes']} B): status, s",
         "value": f"{lf['status']}, {lf['seconds']:.2f}"},
        {"probe": "lying footer: replica peak RSS before -> after MB",
         "value": f"{lf['replica_peak_rss_before_mb']:.0f} -> "
                  f"{lf['replica_peak_rss_after_mb']:.0f}"},
        {"probe": "lying footer: longest /healthz ms", "value": f"{lf['max_healthz_ms']:.0f}"},
        {"probe": "extreme inputs: statuses", "value": json.dumps(out["extreme_inputs"])},
        {"probe": "non-loopback listeners", "value": str(sum(
            1 for r in out["listeners"] if not _loop(r["address"])))},
        {"probe": "tree processes alive 15 s after Ctrl-C",
         "value": str(len(out["after_ctrl_c"]["listener_pids_alive_15s"]))},
    ]  # fmt: skip
    report(f"probe_serve_{a.label}", rows, extra=out)
    return 0


def _loop(addr: str) -> bool:
    from mendis_ray.distributed.session import is_loopback

    return is_loopback(addr)


def listening_sockets_of(pids: list[int]) -> list[dict]:
    from mendis_ray.distributed.session import listening_sockets

    return listening_sockets(pids)


if __name__ == "__main__":
    sys.exit(main())
