"""The demo's report: one Markdown file beside its PNG figures (no Ray, no HTML tooling).

:func:`write_report` takes the plain-dict results of the pipeline and writes
``report.md``; every number in it comes from those results.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from mendis_ray.atomic import write_atomic

__all__ = ["auroc_table", "write_report"]

#: score names in the AUROC table, in display order, with a short description
SCORES = {
    "flow_log_p": "flow log p(spectrum, labels)",
    "flow_signal": "flow signal score (log p at the projection on the top PCs)",
    "flow_ratio_gaussian": "log p flow - log p Gaussian",
    "gaussian": "Gaussian (Ledoit-Wolf) log p",
    "factor20": "factor analysis (20) log p",
    "pca20": "PPCA (20) log p",
    "t2_5": "Hotelling T^2 (5 PCs)",
    "signal_model": "signal-space model: score (signal + residual tail probabilities)",
    "signal_model_signal": "signal-space model: signal score",
    "signal_model_residual": "signal-space model: residual score",
}


def _f(v: object, digits: int = 3) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v)


def auroc_table(rows: list[dict], exclude: tuple[str, ...] = ("flow_ratio_gaussian",)) -> str:
    """Markdown table: one row per score, one column per outlier set.  The likelihood
    ratio is excluded by default: it compares two models, it does not rank typicality."""
    rows = [r for r in rows if r["score"] not in exclude]
    sets = list(dict.fromkeys(r["outliers"] for r in rows))
    inl = {r["outliers"]: r["inliers"] for r in rows}
    scores = [s for s in SCORES if any(r["score"] == s for r in rows)]
    scores += [s for s in dict.fromkeys(r["score"] for r in rows) if s not in scores]
    val = {(r["score"], r["outliers"]): r["auroc"] for r in rows}
    head = "| score | " + " | ".join(f"{s} vs {inl[s]}" for s in sets) + " |"
    sep = "|---|" + "---:|" * len(sets)
    lines = [head, sep]
    for sc in scores:
        cells = [_f(val.get((sc, s), float("nan"))) for s in sets]
        lines.append(f"| {SCORES.get(sc, sc)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, result: dict, figures: dict[str, Path]) -> Path:
    """Write ``out/report.md`` (atomically) and return its path."""
    out = Path(out)
    rel = {k: os.path.relpath(v, out) for k, v in figures.items()}
    md = [
        *_header(result),
        *_data_section(result["data"]),
        *_model_section(result, rel),
        *_likelihood_section(result["held_out_log_likelihood"]),
        *_ood_section(result["auroc"], rel),
        *_signal_section(result.get("signal_model")),
        *_conditional_section(result.get("conditional", {}), rel),
        *_reconstruction_section(result.get("reconstruction", {}), rel),
        *_files_section(result),
    ]
    text = "\n".join(md)
    return write_atomic(out / "report.md", lambda t: t.write_text(text))


def _header(result: dict) -> list[str]:
    """Title and where, when and how long the run was."""
    return [
        "# mendis_ray demo report",
        "",
        f"Ran {result['started']} on a Ray cluster with "
        + ", ".join(f"{v:g} {k}" for k, v in result["ray"]["resources"].items())
        + " "
        f"in {result['wall_seconds'] / 60:.1f} min "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in result['stage_seconds'].items())}).",
        "",
    ]


def _data_section(data: dict) -> list[str]:
    """The simulated training, test and outlier sets."""
    return [
        "## Data",
        "",
        f"Simulated with `mendis_ray.spectra.simulate` on the {data['grid']} grid "
        f"({data['n_pix']} pixels): {data['n_train']} noise-free training spectra "
        f"(Teff 4300-4500 K, log g 1.9-2.2, every [X/H] -0.1..0.05, N 0..0.15) degraded by "
        f"Ray Data to S/N {data['snr']} with label scatter 25 K / 0.1 / 0.01 dex "
        f"({'fresh noise every epoch' if data['fresh_noise'] else 'one fixed draw'}); "
        f"{data['n_test']} held-out inliers and {data['n_outlier']} of each outlier class at "
        "S/N 300. Hard cases, simulated in memory: the same inlier stars at S/N 1000 "
        "(`inliers_snr1000`) and stars with [Mg/H] 0.075-0.125, just above the training "
        "range (`mg_edge`).",
        "",
    ]


def _model_section(result: dict, rel: dict[str, str]) -> list[str]:
    """How the flow was trained (Ray Train), or which checkpoint was analyzed."""
    tr = result.get("training")
    if tr:
        return [
            "## Training (Ray Train, TorchTrainer)",
            "",
            f"Preset `{tr['preset']}` ({tr['n_parameters']:,} parameters), "
            f"{tr['workers']} worker(s) with DDP, Adam lr {tr['lr']:g} "
            f"(affine layers x{tr['linear_lr_scale']:g}), batch {tr['batch_size']}. "
            f"Start: {tr['start']} (validation log p "
            + ", ".join(f"{k} {v:.1f}" for k, v in tr["start_val_log_prob"].items())
            + f"). {tr['epochs_run']} epoch(s) in {tr['seconds']:.0f} s; best validation "
            f"log p {tr['best_val_log_prob']:.1f} at epoch {tr['best_epoch']} "
            "(-1 = the start was kept). Training throughput (median epoch, including each "
            f"epoch's Ray Data start): {tr['samples_per_s']:.0f} spectra/s.",
            "",
            f"![training]({rel['training']})",
            "",
        ]
    if "analyzed_checkpoint" in result:
        return ["## Model", "", f"Checkpoint `{result['analyzed_checkpoint']}`.", ""]
    return []


def _likelihood_section(ll: dict[str, float]) -> list[str]:
    """Mean held-out log p of each model."""
    return [
        "## Held-out log-likelihood (nats per spectrum, standardized units)",
        "",
        "| model | mean log p |",
        "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in ll.items()],
        "",
    ]


def _ood_section(auroc: list[dict], rel: dict[str, str]) -> list[str]:
    """The AUROC table of every score against every outlier set, and its figure."""
    return [
        "## Out-of-distribution triage (paper Fig. 2)",
        "",
        "AUROC of each score separating each outlier set from its inliers (1 = perfect, "
        "0.5 = blind). For `inliers_snr1000` a good OOD score should stay near 0.5: those "
        "are inliers observed at higher S/N, and raw log-likelihoods rank them as *more* "
        "typical (AUROC near 0).",
        "",
        auroc_table(auroc),
        "",
        f"![scores]({rel['scores']})",
        "",
    ]


def _conditional_section(cond: dict, rel: dict[str, str]) -> list[str]:
    """The conditional's pixel correlations against the simulator's (none if not run)."""
    if not cond:
        return []
    fc, tc = cond["flow_clusters"], cond["true_clusters"]
    return [
        "## Conditional p(spectrum | 4300 K, 2.1, 0.0) and its pixel correlations (paper Fig. 3)",
        "",
        f"MALA on the flow with the labels fixed: {cond['mala'].get('n_samples', '?')} "
        f"draws, acceptance {cond['mala'].get('acceptance', float('nan')):.2f}, max "
        f"R-hat {cond['mala'].get('max_rhat', float('nan')):.2f}, min ESS "
        f"{cond['mala'].get('min_ess', float('nan')):.0f}. Over "
        f"{cond['n_pixels']} absorption pixels the flow's correlation matrix differs "
        f"from the simulator's true conditional by RMSE "
        f"{cond['flow_vs_true']['rmse']:.3f} (Gaussian baseline "
        f"{cond['gaussian_vs_true']['rmse']:.3f}). The graph with an edge where the "
        f"correlation exceeds 0.8 has {fc['n_multi']} multi-pixel components (largest "
        f"{fc['largest']} pixels); agreement with the element that dominates each pixel: "
        f"ARI {fc['ari_vs_dominant_element']:.2f}, purity "
        f"{fc['purity_vs_dominant_element']:.2f} (the true conditional's own graph: ARI "
        f"{tc['ari_vs_dominant_element']:.2f}); flow components vs true components: ARI "
        f"{fc['ari_vs_true_clusters']:.2f}.",
        "",
        f"![correlation]({rel['correlation']})",
        "",
    ]


def _reconstruction_section(rec: dict, rel: dict[str, str]) -> list[str]:
    """The reconstruction residuals against the noise (none if not run)."""
    if not rec:
        return []
    return [
        "## Reconstruction argmin_z |x - f^-1(z)|^2",
        "",
        f"{rec['n']} held-out spectra: median RMS residual {rec['rms_median']:.5f} = "
        f"{rec['rms_over_noise']:.2f} x the noise ({rec['noise_median']:.5f}).",
        "",
        f"![reconstruction]({rel['reconstruction']})",
        "",
    ]


def _files_section(result: dict) -> list[str]:
    """Where the checkpoint, the numbers and the Ray Train run are."""
    return [
        "## Files",
        "",
        f"- checkpoint (weights, standardization, scoring reference): `{result['checkpoint']}`",
        f"- all numbers: `{result['results_json']}`",
        f"- Ray Train run folder: `{result.get('run_dir', '-')}`",
        "",
    ]


def _signal_section(sm: dict | None) -> list[str]:
    """The signal-space model beside the flow: what it is, its numbers, which to use."""
    if not sm:
        return []
    return [
        "## The signal-space model beside the flow",
        "",
        f"`mendis train --model signal` on the same training spectra: the paper's flow units "
        f"on k = {sm['k']} noise-weighted principal coordinates plus the labels, conditioned "
        f"on each star's noise level, and a calibrated residual scan for everything outside "
        f"those coordinates ({sm['epochs']} epochs, {sm['seconds']:.0f} s; checkpoint "
        f"`{sm['checkpoint']}`). Its rows in the tables above are `signal_model*`; its held-out "
        "log p is conditional on each star's noise (ivar), over the good pixels.",
        "",
        f"Which model to use: **{sm['recommended']}** ({sm['why']}). On the paper's narrow "
        "box every score separates the paper's classes; the survey benchmark "
        "(`python bench/bench_ood.py`, table in the README) is where the models differ: "
        "curved giant branch, two alpha sequences, S/N 50-1000, masks, and outliers that "
        "keep every single label in range.",
        "",
    ]
