"""Load test of the Ray Serve scoring endpoint against in-process ``Scorer.score``.

    python bench/bench_serve.py                   # compact preset (38M parameters)
    python bench/bench_serve.py --quick           # a tiny flow, fewer requests (smoke test)
    python bench/bench_serve.py --checkpoint mendis_out/compact/checkpoint

Loopback only (127.0.0.1, a free port), a fixed number of requests.  Measured in one run,
on the same cores and with the same torch thread count (``--threads``, default all cores):

1. in-process: ``Scorer.score`` of ``--batch`` spectra at a time (the baseline), before
   and after the Serve runs (their mean is the reference);
2. single-spectrum JSON requests, ``--concurrency`` at a time, so ``@serve.batch`` fans
   them in to model batches;
3. batched requests of ``--batch`` spectra, as JSON and as Arrow IPC streams, two at a
   time (one is read and parsed while the other is in the model).

Reports spectra/s, p50/p99 latency, Serve throughput as a fraction of in-process (target
>= 70% for batched requests), and where the replica spends its time (reading bodies,
parsing, model, responding; from ``GET /model``).  Without ``--checkpoint`` it trains its
own (the steps of the ``checkpoint`` test fixture: noise-free simulated spectra plus S/N
300 noise, 1 epoch from the Gaussian start, the scorer's reference on held-out spectra).
Writes ``bench/results/bench_serve.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

log = logging.getLogger("bench_serve")
TARGET_RATIO = 0.70


# ---------------------------------------------------------------------- data and model


def simulate(n: int, seed: int, snr: float | None) -> tuple[np.ndarray, ...]:
    """(flux, ivar, labels) of n training-like spectra on the paper grid; ``snr=None``
    is noise-free (ivar from S/N 300, as the test fixture trains)."""
    from mendis_ray.spectra.degrade import add_noise, scatter_labels
    from mendis_ray.spectra.simulate import Simulator, paper_training_labels

    rng = np.random.default_rng(seed)
    lab = paper_training_labels(n, rng)
    clean = Simulator()(lab)
    flux, ivar = add_noise(clean, 300.0 if snr is None else snr, rng)
    true = np.stack([lab.teff, lab.logg, lab.feh], axis=1)
    labels = scatter_labels(true, rng).astype(np.float32)
    return flux.astype(np.float32), ivar.astype(np.float32), labels


def build_checkpoint(path: Path, preset: str, n_train: int) -> Path:
    """Train 1 epoch (the test fixture's recipe) and save a checkpoint with its scorer."""
    from mendis_ray.config import FlowConfig, TrainConfig, get_preset
    from mendis_ray.experiment import Arrays, train_flow
    from mendis_ray.flow.checkpoint import save_checkpoint
    from mendis_ray.science.ood import Scorer
    from mendis_ray.spectra.grid import paper_grid

    if preset == "tiny-paper":  # the test fixture's flow, on the paper grid
        flow_cfg = FlowConfig(name="test", n_units=1, hidden=16, n_blocks=1, n_bins=4)
    else:
        flow_cfg = get_preset(preset)[0]
    train_cfg = TrainConfig(lr=1e-4, batch_size=128, epochs=1, linear_lr_scale=0.0)
    t0 = time.perf_counter()
    flux, ivar, labels = simulate(n_train, seed=1, snr=None)
    ref_flux, _, ref_labels = simulate(128, seed=2, snr=300.0)
    res = train_flow(Arrays(flux, ivar, labels), flow_cfg, train_cfg, paper_grid().describe(),
                     show_progress=False)  # fmt: skip
    scorer = Scorer.fit(res.density, ref_flux, ref_labels, n_marginal=2, gaussian=res.gaussian)
    save_checkpoint(path, res.density, train_cfg, metrics={"epochs": 1, "bench": True},
                    extra_arrays=scorer.checkpoint_arrays())  # fmt: skip
    log.info("built a %s checkpoint in %.0f s: %s", flow_cfg.name, time.perf_counter() - t0, path)
    return path


# ---------------------------------------------------------------------- in-process


#: The in-process baseline runs in one worker thread with the replica's torch thread count,
#: as the replica's model thread does.  (In the main thread, under CPU contention from other
#: processes, OpenMP's active spin-waiting made the same calls 5-10x slower in CPU time on
#: the shared development machine; OMP_WAIT_POLICY=passive removed that, a worker thread
#: did not show it.  The comparison is of Serve's overhead, not of that.)
_MODEL_THREAD: list[ThreadPoolExecutor] = []


def in_process(scorer, flux, ivar, labels, batch: int) -> dict:
    """Spectra/s of ``Scorer.score`` on ``batch`` spectra per call, over all of ``flux``,
    in the model thread (see ``_MODEL_THREAD``)."""
    return _MODEL_THREAD[0].submit(_in_process, scorer, flux, ivar, labels, batch).result()


def _in_process(scorer, flux, ivar, labels, batch: int) -> dict:
    n = (len(flux) // batch) * batch
    c0, t0 = tree_cpu_seconds(), time.perf_counter()
    for a in range(0, n, batch):
        sl = slice(a, a + batch)
        scorer.score(flux[sl], ivar[sl], labels[sl], marginal="none", batch_size=batch)
    wall = time.perf_counter() - t0
    cpu = tree_cpu_seconds() - c0
    return {"spectra_per_s": n / wall, "spectra": n, "wall_s": wall, "cpu_ms_per_spectrum":
            1e3 * cpu / n}  # fmt: skip


# ---------------------------------------------------------------------- HTTP client


class Client:
    """Keep-alive HTTP connections to 127.0.0.1:port, one per client thread."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.local = threading.local()

    def post(self, body: bytes, ctype: str) -> tuple[int, bytes, float]:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/score", body=body, headers={"Content-Type": ctype})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            self.local.conn = None
            conn.close()
            raise
        return resp.status, data, time.perf_counter() - t0

    def get(self, path: str) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()


def load(client: Client, bodies: list[bytes], ctype: str, per_request: int, conc: int) -> dict:
    """Send every body (``conc`` in flight); spectra/s and latency percentiles."""
    before = client.get("/model")["stats"]
    c0, t0 = tree_cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        outs = list(pool.map(lambda b: client.post(b, ctype), bodies))
    wall = time.perf_counter() - t0
    cpu = tree_cpu_seconds() - c0
    after = client.get("/model")["stats"]
    bad = [(s, d[:200]) for s, d, _ in outs if s != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} failed requests, e.g. {bad[0]}")
    lat = np.array([t for _, _, t in outs]) * 1e3
    n = per_request * len(bodies)
    delta = {k: after[k] - before[k] for k in after if isinstance(after[k], int | float)}
    return {
        "requests": len(bodies),
        "spectra": n,
        "spectra_per_s": n / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "wall_s": wall,
        "cpu_ms_per_spectrum": 1e3 * cpu / n,
        "replica": delta,
        "first_response": json.loads(outs[0][1]),
    }


def json_body(flux, ivar, labels, rows) -> bytes:
    spectra = [
        {"id": str(i), "flux": flux[i].tolist(), "ivar": ivar[i].tolist(),
         "teff": float(labels[i, 0]), "logg": float(labels[i, 1]), "feh": float(labels[i, 2])}
        for i in rows
    ]  # fmt: skip
    payload = spectra[0] if len(spectra) == 1 else {"spectra": spectra}
    return json.dumps(payload).encode()


def arrow_body(flux, ivar, labels, rows) -> bytes:
    import pyarrow as pa

    from mendis_ray.spectra.shards import make_table

    rows = np.asarray(rows)
    t = make_table([str(i) for i in rows], flux[rows], ivar[rows], teff=labels[rows, 0],
                   logg=labels[rows, 1], feh=labels[rows, 2])  # fmt: skip
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue().to_pybytes()


def check_against(first: dict, scorer, flux, ivar, labels, rows) -> float:
    """Max relative difference of the first response's log_p from in-process."""
    want = scorer.score(flux[rows], ivar[rows], labels[rows], marginal="none")["log_p"]
    got = np.array([r["log_p"] for r in first["results"]], dtype=np.float64)
    return float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1.0)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu_seconds(root: int | None = None) -> float:
    """User + system CPU seconds of a process and all its live descendants (Linux /proc;
    NaN elsewhere).  The bench's local Ray (GCS, raylet, Serve proxy, replica) descends
    from this process, so this counts every CPU-second the endpoint costs, whatever else
    runs on the machine."""
    root = root or os.getpid()
    proc = Path("/proc")
    if not (proc / str(root) / "stat").exists():
        return float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parent[int(d.name)] = int(fields[1])
        cpu[int(d.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, stack = 0.0, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while stack:
        pid = stack.pop()
        total += cpu.get(pid, 0.0)
        stack.extend(children.get(pid, []))
    return total


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: train one")
    ap.add_argument("--preset", default="compact", help="preset of the checkpoint built")
    ap.add_argument("--quick", action="store_true", help="tiny flow, fewer requests")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument("--batch", type=int, default=64, help="spectra per batch and per request")
    ap.add_argument("--single", type=int, default=128, help="single-spectrum requests a round")
    ap.add_argument("--concurrency", type=int, default=64, help="single requests in flight")
    ap.add_argument("--batched", type=int, default=8, help="batched requests a round, per format")
    ap.add_argument("--batched-concurrency", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--wait-ms", type=float, default=10.0, help="batch_wait_timeout_s in ms")
    ap.add_argument("--name", default="bench_serve", help="results/NAME.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    if args.quick:
        args.preset = "tiny-paper" if args.checkpoint is None else args.preset
        args.single, args.batched, args.rounds = 64, 4, 2
    for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ.setdefault(k, v)

    import torch

    from mendis_ray.science.ood import Scorer

    torch.set_num_threads(args.threads)
    _MODEL_THREAD.append(ThreadPoolExecutor(1, "inproc", torch.set_num_threads, (args.threads,)))
    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
    ckpt = args.checkpoint or build_checkpoint(Path(tmp.name) / "checkpoint", args.preset, 512)
    b = args.batch
    n_data = max(args.single, b * args.batched)
    flux, ivar, labels = simulate(min(n_data, 1024), seed=3, snr=100.0)
    reps = -(-n_data // len(flux))  # reuse spectra beyond 1024 (same cost)
    flux, ivar, labels = (np.concatenate([x] * reps)[:n_data] for x in (flux, ivar, labels))
    scorer = Scorer.from_checkpoint(str(ckpt))
    cfg = scorer.density.config
    n_params = sum(p.numel() for p in scorer.density.flow.parameters())
    print(f"model {cfg.name}: {n_params / 1e6:.1f}M parameters, {cfg.n_pix} px; "
          f"{args.threads} torch threads; batch {b}")  # fmt: skip
    scorer.score(flux[:b], ivar[:b], labels[:b], marginal="none")  # warm-up
    single_inproc = in_process(scorer, flux[:32], ivar[:32], labels[:32], 1)

    from ray import serve

    from mendis_ray.distributed.serving import build_app
    from mendis_ray.distributed.session import ensure_ray

    ensure_ray(num_cpus=max(4, args.threads + 2))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.perf_counter()
    serve.run(
        build_app({
            "checkpoint": str(ckpt), "num_replicas": 1, "num_cpus": float(args.threads),
            "num_threads": args.threads, "batch_size": b,
            "batch_wait_timeout_s": args.wait_ms / 1e3,
            "max_ongoing_requests": max(256, 2 * args.concurrency),
            "max_request_bytes": 512 << 20, "max_spectra": 65536,
        }),
        name="bench", route_prefix="/",
    )  # fmt: skip
    ready_s = time.perf_counter() - t0
    client = Client(port)
    J, A = "application/json", "application/vnd.apache.arrow.stream"
    single = [json_body(flux, ivar, labels, [i]) for i in range(args.single)]
    groups = [range(i * b, (i + 1) * b) for i in range(args.batched)]
    bjson = [json_body(flux, ivar, labels, g) for g in groups]
    barrow = [arrow_body(flux, ivar, labels, list(g)) for g in groups]
    nb = b * args.batched
    modes = {  # name -> (bodies, content type, spectra per request, requests in flight)
        "single json": (single, J, 1, args.concurrency),
        f"batch{b} json": (bjson, J, b, args.batched_concurrency),
        f"batch{b} arrow": (barrow, A, b, args.batched_concurrency),
    }
    rounds: list[dict[str, dict]] = []
    try:
        load(client, single[:32], J, 1, 16)  # warm-up
        load(client, bjson[:2], J, b, 2)
        load(client, barrow[:2], A, b, 2)
        # Interleaved rounds, in-process between Serve runs: in-process, json, in-process,
        # arrow, in-process, single.  Each Serve run is compared with the mean of the
        # in-process runs beside it, so that the load of this shared machine moves both
        # numbers of a ratio alike; the summary takes the median over rounds.
        for r in range(args.rounds):
            rnd: dict[str, dict] = {}
            inproc = []
            for name, (bodies, ctype, per, conc) in modes.items():
                inproc.append(in_process(scorer, flux[:nb], ivar[:nb], labels[:nb], b))
                res = load(client, bodies, ctype, per, conc)
                first = res.pop("first_response")
                res["max_rel_diff_log_p"] = check_against(first, scorer, flux, ivar, labels,
                                                          list(range(per)))  # fmt: skip
                res["concurrency"] = conc
                rnd[name] = res
            inproc.append(in_process(scorer, flux[:nb], ivar[:nb], labels[:nb], b))
            for k, name in enumerate(modes):  # the in-process runs before and after
                near = inproc[k : k + 2]
                rnd[name]["in_process_per_s"] = statistics.mean(x["spectra_per_s"] for x in near)
                rnd[name]["in_process_cpu_ms"] = statistics.mean(
                    x["cpu_ms_per_spectrum"] for x in near
                )
            rnd["in-process"] = {
                "spectra_per_s": statistics.mean(x["spectra_per_s"] for x in inproc),
                "cpu_ms_per_spectrum": statistics.mean(x["cpu_ms_per_spectrum"] for x in inproc),
                "runs": inproc,
            }
            rates = ", ".join(f"{k} {v['spectra_per_s']:.1f}/s" for k, v in rnd.items())
            log.info("round %d: %s (load %.1f)", r, rates, os.getloadavg()[0])
            rounds.append(rnd)
    finally:
        serve.shutdown()

    def med(name: str, key: str) -> float:
        return statistics.median(rnd[name][key] for rnd in rounds)

    ref = med("in-process", "spectra_per_s")
    rows = [{
        "mode": f"in-process batch{b}", "requests": args.batched, "conc": 1, "body_MB": "-",
        "spectra/s": ref, "p50_ms": 1e3 * b / ref, "p99_ms": "-", "vs_inproc": 1.0,
        "cpu_ms/spec": med("in-process", "cpu_ms_per_spectrum"), "cpu_eff": 1.0,
        "model%": "-", "parse%": "-",
    }]  # fmt: skip
    summary: dict[str, dict] = {}
    for name, (bodies, _, _, conc) in modes.items():
        ratio = statistics.median(rnd[name]["spectra_per_s"] / rnd[name]["in_process_per_s"]
                                  for rnd in rounds)  # fmt: skip
        cpu_eff = statistics.median(
            rnd[name]["in_process_cpu_ms"] / rnd[name]["cpu_ms_per_spectrum"] for rnd in rounds
        )
        rep = {
            k: sum(rnd[name]["replica"][k] for rnd in rounds) for k in rounds[0][name]["replica"]
        }
        wall = sum(rnd[name]["wall_s"] for rnd in rounds)
        summary[name] = {
            "spectra_per_s": med(name, "spectra_per_s"), "p50_ms": med(name, "p50_ms"),
            "p99_ms": med(name, "p99_ms"), "ratio_to_in_process": ratio,
            "cpu_ms_per_spectrum": med(name, "cpu_ms_per_spectrum"),
            "cpu_efficiency_vs_in_process": cpu_eff,
            "mean_model_batch": rep["spectra"] / max(rep["batches"], 1),
            "replica_share_of_wall": {k: rep[k] / wall for k in
                                      ("read_s", "parse_s", "model_s", "respond_s")},
            "max_rel_diff_log_p": max(rnd[name]["max_rel_diff_log_p"] for rnd in rounds),
            "body_mb": statistics.mean(len(x) for x in bodies) / 1e6,
        }  # fmt: skip
        sh = summary[name]["replica_share_of_wall"]
        rows.append({
            "mode": name, "requests": len(bodies), "conc": conc,
            "body_MB": summary[name]["body_mb"], "spectra/s": summary[name]["spectra_per_s"],
            "p50_ms": summary[name]["p50_ms"], "p99_ms": summary[name]["p99_ms"],
            "vs_inproc": ratio, "cpu_ms/spec": summary[name]["cpu_ms_per_spectrum"],
            "cpu_eff": cpu_eff, "model%": 100 * sh["model_s"], "parse%": 100 * sh["parse_s"],
        })  # fmt: skip
    checks = {
        f"{k} >= {TARGET_RATIO:.0%} of in-process": v["ratio_to_in_process"] >= TARGET_RATIO
        for k, v in summary.items()
        if k.startswith("batch")
    }
    extra = {
        "model": {
            "preset": cfg.name,
            "n_parameters": n_params,
            "n_pix": cfg.n_pix,
            "checkpoint": str(args.checkpoint or "built by the bench"),
        },
        "threads": args.threads,
        "batch": b,
        "batch_wait_timeout_s": args.wait_ms / 1e3,
        "serve_ready_s": ready_s,
        "load_average": os.getloadavg(),
        "in_process_single_spectrum_per_s": single_inproc["spectra_per_s"],
        "summary": summary,
        "rounds": rounds,
        "targets": checks,
        "notes": "vs_inproc: median over rounds of Serve spectra/s over the mean in-process "
        "spectra/s of the runs just before and after it. cpu_ms/spec: CPU-milliseconds per "
        "spectrum of this process and its descendants (the local Ray: proxy, replica, ...), "
        "client included; cpu_eff = in-process cpu_ms/spec / Serve cpu_ms/spec (less "
        "sensitive to other load on the machine than wall-clock ratios). model%/parse%: the "
        "replica's time in the model thread / validating bodies, as % of the wall time",
        "command": " ".join(["python", "bench/bench_serve.py", *(argv or sys.argv[1:])]),
    }
    report(args.name, rows, extra)
    print(f"in-process single spectra (batch 1): {single_inproc['spectra_per_s']:.1f}/s")
    for k, v in summary.items():
        print(f"  {k}: mean model batch {v['mean_model_batch']:.1f} spectra, "
              f"max |log p - in-process| / |log p| = {v['max_rel_diff_log_p']:.1e}")  # fmt: skip
    for k, ok in checks.items():
        print(f"  target {k}: {'met' if ok else 'NOT met'}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
