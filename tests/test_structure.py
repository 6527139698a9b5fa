"""Structure tests (mendis_ray.science.structure): FastICA, the grid densities, and a gap
that a joint Gaussian does not see."""

from __future__ import annotations

import numpy as np
import pytest

from mendis_ray.science import structure
from mendis_ray.science.metrics import auroc
from mendis_ray.science.structure import StructureTests, fastica, platykurtic_first


def _sources(n: int, rng) -> np.ndarray:
    """(n, 3) independent, unit-variance sources: bimodal, uniform, Laplace."""
    bimodal = rng.choice([-1.0, 1.0], n) + 0.25 * rng.standard_normal(n)
    uniform = rng.uniform(-1, 1, n)
    s = np.c_[bimodal, uniform, rng.laplace(size=n)]
    return (s - s.mean(0)) / s.std(0)


def test_fastica_recovers_independent_sources() -> None:
    rng = np.random.default_rng(0)
    s = _sources(8000, rng)
    rot = np.linalg.qr(rng.standard_normal((3, 3)))[0]  # whitened data: a rotation
    w = fastica(s @ rot.T, seed=1)
    np.testing.assert_allclose(w @ w.T, np.eye(3), atol=1e-10)
    corr = np.abs(np.corrcoef((s @ rot.T @ w.T).T, s.T)[:3, 3:])  # recovered vs true
    assert np.all(corr.max(axis=0) > 0.98), corr
    np.testing.assert_array_equal(w, fastica(s @ rot.T, seed=1))  # deterministic


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_platykurtic_first_finds_the_two_peaked_direction(seed: int) -> None:
    """Among a uniform (kurtosis -1.2), three heavy-tailed (Student t, 3 dof) and three
    Gaussian sources, the first row of the unmixing is the two-peaked source (kurtosis
    -1.8, the most sub-Gaussian); the rest is an orthogonal completion."""
    rng = np.random.default_rng(seed)
    n, d = 8000, 8
    s = np.c_[_sources(n, rng)[:, :2], rng.standard_t(3, (n, 3)), rng.standard_normal((n, 3))]
    rot = np.linalg.qr(rng.standard_normal((d, d)))[0]
    x = s @ rot.T
    x = (x - x.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(x.T)).T)  # whitened
    w = platykurtic_first(x, seed=seed)
    np.testing.assert_allclose(w @ w.T, np.eye(d), atol=1e-9)
    assert abs(np.corrcoef(x @ w[0], s[:, 0])[0, 1]) > 0.98
    np.testing.assert_array_equal(w, platykurtic_first(x, seed=seed))  # deterministic
    x[0] *= 1e4  # a star far out: log cosh stays finite (np.cosh overflowed to inf there)
    with np.errstate(over="raise"):
        far = platykurtic_first(x, seed=seed)
    np.testing.assert_allclose(far @ far.T, np.eye(d), atol=1e-9)


def _population(n: int, rng, gap: bool = False) -> np.ndarray:
    """(n, 2 + 3): k = 2 signal coordinates, then 3 labels.  Coordinate 0 is a linear
    function of the labels plus one of two sequences (+-1, sd 0.2); ``gap``: between them."""
    labels = rng.standard_normal((n, 3))
    seq = 0.0 if gap else rng.choice([-1.0, 1.0], n)
    c0 = 0.8 * labels[:, 2] - 0.3 * labels[:, 0] + seq + 0.2 * rng.standard_normal(n)
    c1 = 0.5 * labels[:, 1] + rng.standard_normal(n)
    return np.c_[c0, c1, labels]


def test_structure_tests_find_a_gap_a_joint_gaussian_misses() -> None:
    rng = np.random.default_rng(2)
    train, test, odd = _population(6000, rng), _population(500, rng), _population(100, rng, True)
    tests = StructureTests.fit(train, k=2)
    assert tests.pairs.shape == (6, 2) and tests.log_density.shape == (6, 64, 64)
    assert auroc(-tests.statistic(test), -tests.statistic(odd)) > 0.95  # higher = typical
    prec = np.linalg.inv(np.cov(train.T))  # the joint Gaussian: the gap is its centre
    d = lambda y: -np.einsum("ni,ij,nj->n", y - train.mean(0), prec, y - train.mean(0))  # noqa: E731
    assert auroc(d(test), d(odd)) < 0.7


def test_grid_densities_are_normalised_and_arrays_round_trip() -> None:
    rng = np.random.default_rng(3)
    train = _population(4000, rng)
    tests = StructureTests.fit(train, k=2)
    for p in range(len(tests.pairs)):
        mass = np.exp(tests.log_density[p]).sum() * np.prod(tests.step[p])
        assert mass == pytest.approx(1.0, abs=0.01)
    again = StructureTests.from_arrays(tests.arrays())
    np.testing.assert_array_equal(again.statistic(train[:50]), tests.statistic(train[:50]))
    assert StructureTests.from_arrays({}) is None


def test_far_and_broken_rows_get_large_finite_statistics() -> None:
    rng = np.random.default_rng(4)
    train = _population(3000, rng)
    tests = StructureTests.fit(train, k=2)
    y = train[:4].copy()
    y[1, 0] = 50.0  # far beyond the grid
    y[2, 0] = 1e200  # squares overflow
    y[3, 3] = np.nan
    u = tests.statistic(y)
    assert np.all(np.isfinite(u))
    assert u[1] > 100 and u[2] >= u[1] and u[3] >= u[1]
    assert u[0] < 10


def _label_clumps(n: int, rng, label_valley: bool = False, gap: bool = False) -> np.ndarray:
    """``_population`` with label 2 in two clumps (+-1, sd 0.45), coordinate 0 following
    it; ``label_valley``: label 2 between the clumps (rare there, its coordinates typical
    for it); ``gap``: coordinate 0 between its two sequences."""
    labels = rng.standard_normal((n, 3))
    clumps = rng.choice([-1.0, 1.0], n) + 0.45 * rng.standard_normal(n)
    labels[:, 2] = 0.1 * rng.standard_normal(n) if label_valley else clumps
    seq = 0.0 if gap else rng.choice([-1.0, 1.0], n)
    c0 = 0.5 * labels[:, 2] - 0.3 * labels[:, 0] + seq + 0.2 * rng.standard_normal(n)
    return np.c_[c0, 0.5 * labels[:, 1] + rng.standard_normal(n), labels]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_label_s_own_rarity_is_no_gap(seed: int) -> None:
    """The ratio is of a component given the label: stars whose label is rare (between a
    two-clumped label's clumps) but whose components are typical for it are not in a gap
    (AUROC against inliers 0.51-0.57; the joint ratio of references written before it
    flags them at 0.96-0.97); stars in a component's gap are found as well as before."""
    rng = np.random.default_rng(seed)
    train, test = _label_clumps(6000, rng), _label_clumps(1000, rng)
    valley, odd = _label_clumps(200, rng, label_valley=True), _label_clumps(200, rng, gap=True)
    tests = StructureTests.fit(train, k=2)
    old = {key: a for key, a in tests.arrays().items() if not key.endswith(".label_ratio")}
    joint = StructureTests.from_arrays(old)  # written before: the joint ratio
    found = {}
    for name, t in (("conditional", tests), ("joint", joint)):
        typical = -t.statistic(test)
        found[name] = auroc(typical, -t.statistic(valley)), auroc(typical, -t.statistic(odd))
    assert found["conditional"][0] < 0.65 and found["joint"][0] > 0.9, found
    assert found["conditional"][1] > 0.95 and found["conditional"][1] >= found["joint"][1] - 0.005


@pytest.mark.parametrize("label_ratio", [-3.0, -0.5, 0.0, 1.0, 3.0])
def test_given_the_label_empty_cells_still_tie(label_ratio: float) -> None:
    """The ratio given the label: at or below the floor (an empty cell, or bilinear
    rounding under it) it stays the floor, whatever the label's own ratio, so a star
    further out in an empty region never ranks as more typical; well above the floor it
    is the pair's ratio minus the label's; it never falls as the pair's ratio rises."""
    from mendis_ray.science.structure import _FLOOR, _given_label

    floor = np.log(_FLOOR)
    ratio = np.r_[floor - 5.0, floor - 1e-9, floor, np.linspace(floor + 1e-6, 20.0, 400)]
    out = _given_label(ratio, np.full(ratio.size, label_ratio))
    np.testing.assert_array_equal(out[:3], floor)
    assert np.all(np.diff(out) >= 0) and np.all(np.isfinite(out))
    np.testing.assert_allclose(out[-50:], ratio[-50:] - label_ratio, rtol=0, atol=1e-9)


def test_further_out_never_ranks_as_more_typical() -> None:
    """Along a component and along a label, from the populated region's edge to far beyond
    the grid, the statistic does not fall (by more than the kernel density's wiggles) and
    the furthest star is the most unusual."""
    rng = np.random.default_rng(5)
    train = _population(6000, rng)
    tests = StructureTests.fit(train, k=2)
    for col in (1, 4):  # signal coordinate 1, label 2 ([Fe/H]-like)
        y = np.repeat(train.mean(0)[None], 400, axis=0)
        y[:, col] += np.linspace(3.5, 40.0, 400) * train[:, col].std()
        u = tests.statistic(y)
        assert np.all(np.diff(u) >= -0.05) and u[-1] == u.max() and u[-1] > 1e3, col


@pytest.mark.parametrize("case", ["k=1", "constant label"])
def test_degenerate_training_sets_fit_and_score(case: str) -> None:
    rng = np.random.default_rng(6)
    train = _population(800, rng)
    if case == "k=1":
        train = train[:, 1:]  # one signal coordinate
        k = 1
    else:
        train[:, 3] = 2.2  # every star with the same log g
        k = 2
    tests = StructureTests.fit(train, k=k)
    assert len(tests.pairs) == (3 if k == 1 else 2 * k)  # a constant label: no pairs
    u = tests.statistic(train[:100])
    assert np.all(np.isfinite(u)) and np.median(u) < 2


def _noisy_labels(n: int, rng, label_noise: float, gap: bool = False) -> np.ndarray:
    """(n, 4 + 3): coordinate 0 on one of two sequences whose level depends on label 2
    (slopes 1 and 0: they part as label 2 grows), three coordinates that track the labels
    (a spectrum's continuum and line depths), then the labels with catalogue errors."""
    true = rng.standard_normal((n, 3))
    upper, lower = 1.0 + true[:, 2], -1.0 + 0.0 * true[:, 2]
    c0 = 0.5 * (upper + lower) if gap else np.where(rng.random(n) < 0.5, upper, lower)
    c0 = c0 - 0.3 * true[:, 0] + 0.15 * rng.standard_normal(n)
    tracks = true + 0.05 * rng.standard_normal((n, 3))
    return np.c_[c0, tracks, true + label_noise * rng.standard_normal((n, 3))]


@pytest.mark.parametrize("label_noise", [0.0, 0.5])
def test_the_label_weight_is_the_one_that_sees_most_structure(label_noise: float) -> None:
    """``select`` keeps the weight (and rotation) whose pairs are furthest from Gaussian in
    held-out stars (the rule, checked against every candidate); with catalogue errors it
    leans on the spectrum's prediction, and the gap is found at least as well as with the
    catalogue's labels alone."""
    from mendis_ray.science.structure import _CANDIDATES, LABEL_WEIGHTS

    rng = np.random.default_rng(8)
    train, held_out = _noisy_labels(6000, rng, label_noise), _noisy_labels(2000, rng, label_noise)
    test, odd = _noisy_labels(1000, rng, label_noise), _noisy_labels(200, rng, label_noise, True)
    chosen = StructureTests.select(train, held_out, k=4)
    kl = [StructureTests.fit(train, 4, label_weight=w, ica_start=s, rotation=r)
          .log_ratios(held_out).mean(0).sum()
          for w in LABEL_WEIGHTS for r, s in _CANDIDATES]  # fmt: skip
    assert chosen.log_ratios(held_out).mean(0).sum() == max(kl)
    plain = StructureTests.fit(train, k=4)
    found = auroc(-chosen.statistic(test), -chosen.statistic(odd))
    assert found > 0.95 and found >= auroc(-plain.statistic(test), -plain.statistic(odd)) - 0.005
    if label_noise > 0:
        assert chosen.label_weight[0] > 0


def test_the_fastica_start_that_isolates_a_bimodal_direction_is_kept() -> None:
    """FastICA has local optima.  Seven coordinates mixing a two-peaked source (a
    minority 1 sd away), three heavy-tailed (Student t, 3 dof) and three Gaussian ones:
    from start 0 the rotation mixes the two-peaked source with a heavy-tailed one, and
    the stars in the valley are found at 0.63; ``select`` tries ``ICA_STARTS`` starts
    and keeps the one whose pairs see most structure in held-out stars, which isolates
    it (0.77)."""
    rng = np.random.default_rng(4)
    n, k = 8000, 7
    two_peaks = np.where(rng.random(n) < 0.25, 1.0, 0.0) + rng.normal(0, 0.3, n)
    sources = np.c_[two_peaks, rng.standard_t(3, (n, 3)), rng.standard_normal((n, 3))]
    mix = np.linalg.qr(np.random.default_rng(104).standard_normal((k, k)))[0]
    labels = rng.standard_normal((n, 3))
    y = np.c_[sources @ mix.T, labels]
    valley = sources[6000:].copy()
    valley[:, 0] = 0.5 + rng.normal(0, 0.05, len(valley))
    odd = np.c_[valley @ mix.T, labels[6000:]]
    found = lambda t: auroc(-t.statistic(y[6000:]), -t.statistic(odd))  # noqa: E731
    assert found(StructureTests.fit(y[:6000], k)) < 0.66
    assert found(StructureTests.select(y[:6000], y[6000:], k)) > 0.74


def test_references_without_the_label_weight_use_the_catalogue_labels() -> None:
    """Arrays written before the label denoising (no ``label_pred``, ``label_weight``)
    load as weight 0: the same statistics as a fit with the catalogue's labels."""
    rng = np.random.default_rng(9)
    train = _population(3000, rng)
    tests = StructureTests.fit(train, k=2)  # label_weight 0
    old = {key: v for key, v in tests.arrays().items() if "label_pred" not in key
           and "label_weight" not in key}  # fmt: skip
    again = StructureTests.from_arrays(old)
    np.testing.assert_array_equal(again.statistic(train[:200]), tests.statistic(train[:200]))
    mixed = StructureTests.fit(train, k=2, label_weight=0.5)
    assert not np.array_equal(mixed.statistic(train[:200]), tests.statistic(train[:200]))
    reloaded = StructureTests.from_arrays(mixed.arrays())  # a weight > 0 survives the arrays
    assert reloaded.label_weight[0] == 0.5
    np.testing.assert_array_equal(reloaded.statistic(train[:200]), mixed.statistic(train[:200]))


def test_too_few_labelled_held_out_stars_keep_the_catalogue_labels() -> None:
    from mendis_ray.science.structure import MIN_HELD_OUT

    rng = np.random.default_rng(10)
    train, held_out = _noisy_labels(3000, rng, 0.5), _noisy_labels(MIN_HELD_OUT + 20, rng, 0.5)
    held_out[:40, -1] = np.nan  # label-free rows have no say
    assert StructureTests.select(train, held_out, k=4).label_weight[0] == 0.0
    assert StructureTests.select(train, held_out[40:], k=4).label_weight[0] == 0.0


def _sequence(n: int, rng, off: bool = False) -> np.ndarray:
    """(n, 2 + 3): labels on a narrow curved sequence (label 0 = label 1^2 + sd 0.15, as
    a giant branch's Teff against log g; ``off``: 4-5 sd to either side), and two signal
    coordinates that track labels 0 and 2."""
    g, feh = rng.uniform(-1.5, 1.5, n), rng.standard_normal(n)
    shift = rng.uniform(4, 5, n) * rng.choice([-1.0, 1.0], n) if off else rng.standard_normal(n)
    teff = g**2 + 0.15 * shift
    coords = np.c_[teff, feh] + 0.05 * rng.standard_normal((n, 2))
    return np.c_[coords, teff, g, feh]


def _tilted(n: int, rng, off: bool = False) -> np.ndarray:
    """(n, 2 + 3): labels 0 and 1 on a narrow straight sequence at 45 degrees (label 0 =
    label 1 + sd 0.1; ``off``: 2.5-3 sd to either side), and two signal coordinates."""
    g, feh = rng.standard_normal(n), rng.standard_normal(n)
    shift = rng.uniform(2.5, 3.0, n) * rng.choice([-1.0, 1.0], n) if off else rng.standard_normal(n)
    teff = g + 0.1 * shift
    coords = np.c_[teff, feh] + 0.05 * rng.standard_normal((n, 2))
    return np.c_[coords, teff, g, feh]


@pytest.mark.parametrize("seed", [0, 1])
def test_the_label_density_kernel_has_the_labels_covariance_shape(seed, monkeypatch) -> None:
    """The label density's kernel is isotropic in the whitened labels, so it is narrow
    across a tilted sequence (as the giant branch in Teff and log g), where an
    axis-aligned kernel of the same width blurs it: stars 2.5-3 sd off the sequence
    0.69 -> 0.96 (seeds 0-2).  A reference written before the whitening (no
    ``label_white``) reads its table on the standardized labels' axes, as it was made."""
    rng = np.random.default_rng(seed)
    train, test, odd = _tilted(6000, rng), _tilted(500, rng), _tilted(100, rng, off=True)
    tests = StructureTests.fit(train, k=2)
    cov = np.cov((tests.labels(train) @ tests.label_white).T)
    np.testing.assert_allclose(cov, np.eye(3), atol=1e-8)
    assert auroc(tests.label_log_density(test), tests.label_log_density(odd)) > 0.93
    monkeypatch.setattr(structure, "_whitening", lambda labels: np.eye(3))  # as before
    axes = StructureTests.fit(train, k=2)
    assert auroc(axes.label_log_density(test), axes.label_log_density(odd)) < 0.8
    old = {key: a for key, a in axes.arrays().items() if key != "structure.label_white"}
    np.testing.assert_array_equal(
        StructureTests.from_arrays(old).label_log_density(test), axes.label_log_density(test)
    )


@pytest.mark.parametrize("constant", [[2], [0, 1, 2]])
def test_a_constant_label_is_not_stretched_by_the_whitening(constant) -> None:
    """A label constant in training (or all three, where the denoised labels' covariance
    is rounding noise of ~1e-26) keeps unit scale in the whitening: the label density stays
    a finite density, and a star off the constant value falls off as the kernel does."""
    rng = np.random.default_rng(3)
    train, test = _tilted(3000, rng), _tilted(200, rng)
    train[:, [2 + c for c in constant]] = 0.5
    test[:, [2 + c for c in constant]] = 0.5
    for w in (0.0, 0.75):
        tests = StructureTests.fit(train, k=2, label_weight=w)
        assert np.all(np.isfinite(tests.label_white)) and np.abs(tests.label_white).max() < 1e3
        v = tests.label_log_density(test)
        assert np.all(np.isfinite(v)) and v.max() < 10.0


def test_label_density_finds_stars_off_a_narrow_label_sequence() -> None:
    """The 3-D kernel density of the labels is normalised, survives the arrays, and finds
    stars moved off a narrow curved sequence, where the labels' joint Gaussian is blind;
    further out never ranks as more typical; broken labels are finite and far below; a
    reference written before it has none."""
    rng = np.random.default_rng(12)
    train, test, odd = _sequence(6000, rng), _sequence(500, rng), _sequence(100, rng, off=True)
    tests = StructureTests.fit(train, k=2)
    assert tests.label_density.shape == (64, 64, 64)
    # a density of the standardized labels; the grid's cells are in the whitened ones
    mass = np.exp(tests.label_density).sum() * np.prod(tests.label_step)
    assert mass / abs(np.linalg.det(tests.label_white)) == pytest.approx(1.0, abs=0.01)
    assert auroc(tests.label_log_density(test), tests.label_log_density(odd)) > 0.95
    lab = train[:, 2:]
    prec = np.linalg.inv(np.cov(lab.T))
    d = lambda y: -np.einsum("ni,ij,nj->n", y[:, 2:] - lab.mean(0), prec, y[:, 2:] - lab.mean(0))  # noqa: E731
    assert auroc(d(test), d(odd)) < 0.7
    again = StructureTests.from_arrays(tests.arrays())
    np.testing.assert_array_equal(again.label_log_density(test), tests.label_log_density(test))
    y = np.zeros((300, 5))  # on the sequence at its densest (label 1 = 0, label 0 = 0)
    y[:, 4] = np.linspace(0.0, 60.0, 300)  # then along [Fe/H], out past the grid
    v = tests.label_log_density(y)
    assert v[0] > tests.label_log_density(test).mean()  # starts dense
    assert np.all(np.diff(v) <= 0.02) and v[-1] == v.min() and v[-1] < -1e3
    broken = test[:3].copy()
    broken[0, 2], broken[1, 3], broken[2, 4] = np.nan, 1e200, -np.inf
    w = tests.label_log_density(broken)
    assert np.all(np.isfinite(w)) and np.all(w < v[-1])
    new = ("label_lo", "label_step", "label_bandwidth", "label_density", "label_white")
    old = {key: a for key, a in tests.arrays().items() if key.split(".")[1] not in new}
    assert StructureTests.from_arrays(old).label_log_density(test) is None
    partial = old | {"structure.label_density": tests.label_density}  # a table, no grid
    with pytest.raises(ValueError, match="label_"):
        StructureTests.from_arrays(partial)
