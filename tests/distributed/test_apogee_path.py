"""Real APOGEE DR17 apStar spectra through the label-free scoring path of both model kinds
(issue 12): far outside the simulated training box, they must rank as the most outlying,
flagged, and no score or percentile may be NaN.  Runs in-process (the checkpoints are the
session's small trained flow and signal model); ``mendis score`` on the same files is
tested in test_infer.py."""

from __future__ import annotations

import numpy as np
import pytest

from mendis_ray.science.signal_scores import load_scorer
from mendis_ray.spectra.grid import paper_grid
from mendis_ray.spectra.ingest import ingest_apogee
from mendis_ray.spectra.shards import read_dataset, table_arrays

pytestmark = pytest.mark.shared

FLOAT_SCORES = ("log_p_marginal", "log_p_per_dim", "signal_score", "percentile",
                "signal_percentile", "score", "residual_score", "residual_percentile",
                "labels_used")  # fmt: skip


@pytest.fixture(scope="module")
def apogee(shared_data, tmp_path_factory):
    files = sorted((shared_data / "apogee_dr17").glob("apStar-dr17-*.fits"))
    assert len(files) == 2
    out = tmp_path_factory.mktemp("apogee") / "shards"
    ingest_apogee(files, out, grid=paper_grid())
    return table_arrays(read_dataset(out))


@pytest.mark.parametrize("kind", ["flow", "signal"])
def test_real_apstar_label_free_ranks_first_flagged_never_nan(
    kind, apogee, checkpoint, signal_checkpoint, sim_sets, survey_sets
):
    ckpt = checkpoint if kind == "flow" else signal_checkpoint
    inliers = table_arrays(read_dataset(sim_sets / "test" if kind == "flow"
                                        else survey_sets / "test"))  # fmt: skip
    scorer = load_scorer(ckpt)
    flux = np.concatenate([apogee.flux, inliers.flux[:30]])
    ivar = np.concatenate([apogee.ivar, inliers.ivar[:30]])
    out = scorer.score(flux, ivar, None)  # label-free for every row
    for key in FLOAT_SCORES:
        if key in out:
            assert not np.isnan(out[key]).any(), f"{kind}: NaN in {key}"
    n = len(apogee.flux)
    pct = out["percentile"]
    assert pct[:n].max() <= pct[n:].min(), f"{kind}: {pct[:n]} vs inliers {np.sort(pct[n:])[:3]}"
    assert (out["flags"][:n] != 0).all(), f"{kind}: real spectra not flagged {out['flags'][:n]}"
    assert (out["flags"][:n] & 4).all()  # flux outside the training range


def test_sky_line_pixels_are_masked_on_ingest(apogee, shared_data):
    """SIG_SKYLINE pixels reach the shards with ivar 0 (they showed as emission lines)."""
    from mendis_ray.spectra.fits import read_apstar

    idx = paper_grid().apstar_index
    ids = list(apogee.ids)
    for f in sorted((shared_data / "apogee_dr17").glob("apStar-dr17-*.fits")):
        spec = read_apstar(f)
        sky = (spec.bitmask[idx] & (1 << 12)) != 0
        assert sky.any() and np.all(apogee.ivar[ids.index(spec.id)][sky] == 0)
