"""The signal-space model trained on a catalogue that holds the stars it is meant to find.

    python bench/bench_contaminated.py                 # 40 of each outlier kind (2.3%)
    python bench/bench_contaminated.py --per-set 10    # 0.6%

A survey user trains on the catalogue they then search: its binaries, chemically peculiar
stars and artefacts are among the training rows.  This trains the signal-space model on the
survey benchmark's training rows (``bench_ood.py``'s data, simulated if absent) as they
are and with ``--per-set`` fresh stars of each of the 12 outlier kinds put among them
(another seed: not the benchmark's outlier sets), both at each of ``--seeds`` (the
difference between seeds of the clean model is the yardstick for a difference between
the two), one run.  For each model it reports the AUROC of ``score`` against the
held-out inliers

- ``held_out``: the benchmark's outlier sets (1,000 each, in neither training set);
- ``in_catalog``: the contaminating stars themselves (for the clean model they are new
  stars; for the other, rows it trained or calibrated on: the search a user runs);

and k, the validation log q, the held-out inliers' mean percentile and the fraction of
them below 1%.  Writes ``bench/results/contaminated[_n<per-set>].json`` and ``.md``.

The ``far_left_out`` columns are the contaminated model with its scorer refitted on the
same held-out rows less those far outside the rest (``SignalScorer.fit(far_iqr=FAR_IQR)``,
:func:`~mendis_ray.science.signal_tails.far_out`; the default keeps every one).  The
committed ``contaminated_n5`` results were measured when that rule was the default: their
``contaminated`` columns had it, their ``keep_all`` columns did not.  ``--far-iqr X`` sets
that cut (default ``FAR_IQR``; another value adds ``_farX`` to the result files' names).

``--decompose`` asks where the loss comes from instead (seed 0): the clean and the
contaminated model, each with a scorer whose held-out reference is the contaminated
set's validation rows with and without the contaminants (2 x 2 AUROCs), then, for the
clean model, its clean reference with one group of arrays at a time taken from the
contaminated reference (``cal.structure``, ``structure``, ...): which calibration the
contaminants move.  Writes ``bench/results/contaminated_decompose.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from bench_ood import load, simulate

from mendis_ray.config import SignalConfig
from mendis_ray.science.benchmark import BenchData, ModelRun, signal_run
from mendis_ray.science.metrics import auroc
from mendis_ray.science.signal_scores import SignalScorer
from mendis_ray.science.signal_tails import FAR_IQR
from mendis_ray.spectra.datasets import SurveySpec, write_survey_set
from mendis_ray.spectra.population import SURVEY_SETS
from mendis_ray.spectra.shards import SpectraArrays, read_dataset, table_arrays
from mendis_ray.spectra.simulate import Simulator
from mendis_ray.train.signal import train_signal_model

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = [k for k in SURVEY_SETS if not k.startswith("snr")]  # the 12 outlier kinds
SEED = 77  # the contaminants' seed: bench_ood's sets use 0
log = logging.getLogger("bench_contaminated")


def contaminants(work: Path, per_set: int) -> dict[str, SpectraArrays]:
    """``per_set`` fresh stars of each outlier kind, simulated once into ``work``."""
    sim = Simulator()
    for j, kind in enumerate(KINDS):
        if not (work / kind / "_manifest.json").is_file():
            write_survey_set(work, SurveySpec(kind, per_set, SURVEY_SETS[kind]), sim,
                             seed=SEED, set_index=j)  # fmt: skip
    return {kind: table_arrays(read_dataset(work / kind)) for kind in KINDS}


def mixed(train: SpectraArrays, extra: dict[str, SpectraArrays], seed: int) -> SpectraArrays:
    """The training rows with ``extra``'s put at seeded random places, the training rows
    in their own order (the last 10% validate and calibrate: the clean set's split, give
    or take the contaminants, which fall in both parts, every kind in each)."""
    parts = [train, *extra.values()]
    n, m = len(train.flux), sum(len(a.flux) for a in parts)
    rng = np.random.default_rng(seed)
    at = rng.choice(m, m - n, replace=False)  # their places, the kinds in random order
    order = np.empty(m, np.int64)  # place -> row of the concatenation
    order[at] = np.arange(n, m)
    order[np.setdiff1d(np.arange(m), at)] = np.arange(n)
    cat = lambda f: np.concatenate([f(a) for a in parts])[order]  # noqa: E731
    return SpectraArrays(ids=cat(lambda a: a.ids), flux=cat(lambda a: a.flux),
                         ivar=cat(lambda a: a.ivar), labels=cat(lambda a: a.labels),
                         snr=cat(lambda a: a.snr))  # fmt: skip


def refit(
    res, held: tuple[np.ndarray, ...], train: SpectraArrays, grid: dict, far_iqr=None
) -> SignalScorer:
    """A scorer for the trained model ``res`` (a ``SignalTrainResult`` of ``train``'s rows)
    with the held-out stars ``held`` = (flux, ivar, labels) as its reference."""
    tr = slice(0, res.val_rows.start)
    return SignalScorer.fit(res.model, *held, res.train_coords, grid=grid,
                            train=(train.flux[tr], train.ivar[tr], train.labels[tr]),
                            far_iqr=far_iqr)  # fmt: skip


def far_left_out(
    run: ModelRun, train: SpectraArrays, data: BenchData, far_iqr: float = FAR_IQR
) -> SignalScorer:
    """``run``'s scorer refitted on the same held-out rows, those more than ``far_iqr``
    interquartile ranges out left out."""
    va = run.extra["train_result"].val_rows
    held = (train.flux[va], train.ivar[va], train.labels[va])
    return refit(run.extra["train_result"], held, train, data.grid, far_iqr)


def summary(
    run: ModelRun, data: BenchData, extra: dict[str, SpectraArrays], scorer: SignalScorer
) -> dict:
    """k, validation log q, AUROCs (held-out sets and the contaminants), test percentiles,
    of ``run``'s model with ``scorer``."""
    out = scorer.score(data.test.flux, data.test.ivar, data.test.labels)
    test, pct = out["score"], out["percentile"]

    def score(a: SpectraArrays) -> np.ndarray:
        return scorer.score(a.flux, a.ivar, a.labels)["score"]

    return {
        "k": run.extra["k"],
        "best_val_log_q": run.extra["history"].best_val_log_prob,
        "train_s": run.train_seconds,
        "held_out": {s: auroc(test, score(a)) for s, a in data.sets.items()},
        "in_catalog": {kind: auroc(test, score(a)) for kind, a in extra.items()},
        "test_mean_percentile": float(np.nanmean(pct)),
        "test_below_1pct": float(np.nanmean(pct < 1.0)),
    }


def markdown(runs: dict[str, list[dict]]) -> str:
    """Rows: each measure; columns: clean and contaminated at each seed."""
    cols = [(name, i) for name in runs for i in range(len(runs[name]))]
    first = runs["clean"][0]
    rows = [("k", "k"), ("validation log q", "best_val_log_q"),
            ("held-out inliers: mean percentile", "test_mean_percentile"),
            ("held-out inliers below 1%", "test_below_1pct")]  # fmt: skip
    rows += [(f"held out: {s}", ("held_out", s)) for s in first["held_out"]]
    rows += [(f"in the catalogue: {s}", ("in_catalog", s)) for s in first["in_catalog"]]

    def cell(r: dict, key: str | tuple) -> str:
        v = r[key[0]][key[1]] if isinstance(key, tuple) else r[key]
        return str(v) if isinstance(v, int) else f"{v:.3f}"

    head = "| | " + " | ".join(f"{n} (seed {runs[n][i]['seed']})" for n, i in cols) + " |\n"
    head += "|---|" + "---|" * len(cols) + "\n"
    return head + "".join(
        f"| {label} | " + " | ".join(cell(runs[n][i], key) for n, i in cols) + " |\n"
        for label, key in rows
    )


def _group(key: str) -> str:
    """A reference array's group: ``cal.<name>`` for a calibration, else its first part."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "cal" else parts[0]


def decompose(data: BenchData, extra: dict[str, SpectraArrays], sets: list[str]) -> dict:
    """AUROCs of ``score`` (model x reference), and the clean model's clean reference with
    each group of arrays taken from the contaminated one, for the outlier sets ``sets``."""
    dirty = mixed(data.train, extra, 0)
    contaminant = ~np.char.startswith(np.asarray(dirty.ids).astype(str), "train-")
    n_val = round(0.1 * len(dirty.flux))  # train_signal_model's split
    va = slice(len(dirty.flux) - n_val, None)
    refs = {"clean_ref": ~contaminant[va], "contaminated_ref": np.ones(n_val, bool)}
    scorers = {}
    for name, train in (("clean_model", data.train), ("contaminated_model", dirty)):
        res = train_signal_model(train.flux, train.ivar, train.labels, SignalConfig(seed=0),
                                 show_progress=False)  # fmt: skip
        for ref_name, rows in refs.items():  # the reference: always the contaminated split
            held = tuple(a[va][rows] for a in (dirty.flux, dirty.ivar, dirty.labels))
            scorers[f"{name}+{ref_name}"] = refit(res, held, train, data.grid)
            log.info("decompose: %s + %s", name, ref_name)

    def aurocs(sc: SignalScorer) -> dict[str, float]:
        test = sc.score(data.test.flux, data.test.ivar, data.test.labels)["score"]
        return {s: auroc(test, sc.score(data.sets[s].flux, data.sets[s].ivar,
                                        data.sets[s].labels)["score"]) for s in sets}  # fmt: skip

    out = {"model_x_reference": {k: aurocs(sc) for k, sc in scorers.items()}, "swapped": {}}
    clean, other = scorers["clean_model+clean_ref"], scorers["clean_model+contaminated_ref"]
    for group in sorted({_group(k) for k in (*clean.ref, *other.ref)}):
        ref = {k: v for k, v in clean.ref.items() if _group(k) != group}
        ref |= {k: v for k, v in other.ref.items() if _group(k) == group}
        out["swapped"][group] = aurocs(SignalScorer(clean.model, ref, clean.grid))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-set", type=int, default=40, help="contaminants of each outlier kind")
    p.add_argument("--data", default="mendis_out/bench_ood/data", help="bench_ood's sets")
    p.add_argument("--work", default="mendis_out/bench_contaminated")
    p.add_argument("--seeds", default="0,1", help="training seeds (each trains both models)")
    p.add_argument("--decompose", action="store_true", help="where the loss comes from")
    p.add_argument("--far-iqr", type=float, default=FAR_IQR,
                   help="the far_left_out columns' cut, in IQRs below the median")  # fmt: skip
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("mendis_ray.train.loop").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    simulate(Path(args.data), 20_000, 10_000, 1000, 0)  # reused when present
    data = load(Path(args.data))
    extra = contaminants(Path(args.work) / f"contaminants_{args.per_set}", args.per_set)
    n_extra = sum(len(a.flux) for a in extra.values())
    share = n_extra / (len(data.train.flux) + n_extra)
    log.info("%d training stars + %d contaminants (%.1f%%)", len(data.train.flux), n_extra,
             100 * share)  # fmt: skip
    if args.decompose:
        sets = [s for s in data.sets if not s.startswith("snr")]
        out = decompose(data, extra, sets)
        for part, rows in out.items():
            print(f"{part}:")
            for name, row in rows.items():
                print(f"  {name:40s} " + " ".join(f"{s[:8]}={v:.3f}" for s, v in row.items()))
        path = RESULTS / "contaminated_decompose.json"
        path.write_text(json.dumps({"per_set": args.per_set, **out}, indent=1, default=float))
        print(f"wrote {path} in {(time.perf_counter() - t0) / 60:.1f} min")
        return
    runs: dict[str, list[dict]] = {"clean": [], "contaminated": [], "far_left_out": []}
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in ("clean", "contaminated"):  # the same seed: flow start, augmentation, ...
            train = data.train if name == "clean" else mixed(data.train, extra, seed)
            run = signal_run(BenchData(train, data.test, data.sets, data.grid),
                             SignalConfig(seed=seed))  # fmt: skip
            runs[name].append({"seed": seed, **summary(run, data, extra, run.extra["scorer"])})
            log.info("%s, seed %d: k = %d, %.0f s", name, seed, run.extra["k"], run.train_seconds)
        # the contaminated model's scorer with the far-out held-out rows left out
        scorer = far_left_out(run, train, data, args.far_iqr)
        runs["far_left_out"].append({"seed": seed, **summary(run, data, extra, scorer)})
    table = markdown(runs)
    print(table)
    tag = "contaminated" if args.per_set == 40 else f"contaminated_n{args.per_set}"
    tag += "" if args.far_iqr == FAR_IQR else f"_far{args.far_iqr:g}"
    payload = {"benchmark": tag, "per_set": args.per_set, "contaminants": n_extra,
               "far_iqr": args.far_iqr,
               "contaminated_share": share, "n_train": len(data.train.flux),
               "wall_seconds": time.perf_counter() - t0, **runs}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(payload, indent=1, default=float))
    (RESULTS / f"{tag}.md").write_text(table)
    print(f"wrote {RESULTS / (tag + '.json')} and .md in {payload['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
