"""ScoreConfig is the one source of the score settings: the ``mendis score`` options are
generated from it, Serve's arguments and the HTTP parser take its defaults, the YAML job
configs map onto it, and its Scorer knobs reach the scorer (no Ray)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tiny_case import CFG, GRID, N_PIX, _data, one_torch_thread  # noqa: F401 (fixture)

from mendis_ray import cli_ray
from mendis_ray.cli import build_parser
from mendis_ray.cli_options import SERVE_SCORE_FIELDS, add_config_options, config_from_args
from mendis_ray.config import MARGINAL_MODES, RANK_BY, ScoreConfig, _setting

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ScoreConfig()


def _score_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["score", "CKPT", "IN", "--out", "OUT", *extra])


def test_mendis_score_options_are_the_score_config_fields():
    """Every field is an option of ``mendis score`` with the field's default, and the
    parsed options give back ScoreConfig() (or the values given)."""
    args = _score_args()
    for f in dataclasses.fields(ScoreConfig):
        assert getattr(args, f.name) == getattr(DEFAULT, f.name), f.name
    assert config_from_args(ScoreConfig, args) == DEFAULT
    args = _score_args("--marginal", "none", "--cpus-per-actor", "0.25", "--top-n", "7",
                       "--range-sigma", "3", "--flags-first", "--rank-by", "residual")  # fmt: skip
    cfg = config_from_args(ScoreConfig, args)
    want = {"marginal": "none", "num_cpus_per_actor": 0.25, "top_n": 7, "range_sigma": 3.0,
            "flags_first": True, "rank_by": "residual"}  # fmt: skip
    assert cfg == DEFAULT.replace(**want)
    with pytest.raises(SystemExit):  # choices come from the field
        _score_args("--marginal", "sometimes")


def test_a_score_config_change_shows_up_in_the_mendis_score_options(monkeypatch, capsys):
    """A new field, or a new default, of the ScoreConfig that the CLI uses becomes an
    option of ``mendis score`` with nothing else edited: there is no copy to drift."""

    @dataclasses.dataclass(frozen=True)
    class Changed(ScoreConfig):
        top_n: int = _setting(5, "rows of top_outliers.csv")
        new_knob: float = _setting(0.5, "a knob added later")

    monkeypatch.setattr(cli_ray, "ScoreConfig", Changed)
    args = _score_args()
    assert args.top_n == 5 and args.new_knob == 0.5
    assert _score_args("--new-knob", "2").new_knob == 2.0
    assert config_from_args(Changed, args) == Changed()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["score", "-h"])
    assert "--new-knob" in capsys.readouterr().out


def test_label_free_default_is_one_everywhere():
    """``mendis score``, Serve (its argument, the HTTP parser and the JSON schema), the
    YAML jobs of both presets and serve/config.yaml all use ScoreConfig's default."""
    from mendis_ray import scoring_api as sa
    from mendis_ray.distributed.serve_args import ServeArgs

    want = DEFAULT.marginal
    assert want == "unlabelled" and want in MARGINAL_MODES
    assert _score_args().marginal == want
    assert ServeArgs.model_fields["marginal"].default == want
    assert sa.DEFAULT_MARGINAL == want and sa.ParsedRequest([], None, None, None).marginal == want
    schema = sa.request_models(N_PIX).ScoreRequest.model_json_schema()
    assert schema["properties"]["marginal"]["default"] == want
    req = sa.parse_body(b'{"flux": [1.0, 1.0]}', "json", n_pix=2, model_grid={"n_pix": 2})
    assert req.marginal == want  # a request that does not say
    spec = importlib.util.spec_from_file_location("jobs_entry", ROOT / "jobs" / "_entry.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    for preset in ("local", "paper"):
        path = ROOT / "jobs" / "configs" / f"{preset}.yaml"
        args = build_parser().parse_args(["score", *entry.section_args(path, "score_catalog")])
        assert config_from_args(ScoreConfig, args).marginal == want, preset
    serve_cfg = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    (app,) = serve_cfg["applications"]
    assert app["args"].get("marginal", want) == want


def test_yaml_score_sections_hold_score_settings_only():
    """The ``score_catalog:`` keys are ScoreConfig fields (by their option names) or the
    run's arguments, so a renamed field cannot leave a stale key behind."""
    flags = {cli_ray_flag(f) for f in dataclasses.fields(ScoreConfig)}
    run_args = {"args", "out", "labels", "address", "num_cpus", "verdicts"}
    for preset in ("local", "paper"):
        section = yaml.safe_load((ROOT / "jobs" / "configs" / f"{preset}.yaml").read_text())
        keys = set(section["score_catalog"])
        assert keys <= flags | run_args, (preset, keys - flags - run_args)


def cli_ray_flag(f: dataclasses.Field) -> str:
    from mendis_ray.cli_options import option_flag

    return option_flag(f).removeprefix("--").replace("-", "_")


def test_serve_takes_the_shared_score_settings():
    """``mendis serve`` offers the shared settings (unset: ServeArgs' defaults, which are
    ScoreConfig's) and ServeArgs validates them and gives them back as a ScoreConfig."""
    from mendis_ray.distributed.serve_args import ServeArgs
    from mendis_ray.distributed.serve_local import _CLI_ARGS

    args = build_parser().parse_args(["serve", "CKPT"])
    assert all(getattr(args, k) is None for k in SERVE_SCORE_FIELDS)  # not given
    assert set(SERVE_SCORE_FIELDS) <= set(_CLI_ARGS) <= set(ServeArgs.model_fields)
    args = build_parser().parse_args(["serve", "CKPT", "--marginal", "none", "--profile-steps",
                                      "50", "--max-masked-fraction", "0.5"])  # fmt: skip
    given = {k: getattr(args, k) for k in SERVE_SCORE_FIELDS if getattr(args, k) is not None}
    s = ServeArgs(checkpoint="CKPT", **given)
    assert s.score_config() == DEFAULT.replace(marginal="none", profile_steps=50,
                                               max_masked_fraction=0.5)  # fmt: skip
    for name in SERVE_SCORE_FIELDS:
        assert ServeArgs.model_fields[name].default == getattr(DEFAULT, name), name
    with pytest.raises(ValueError, match="marginal"):
        ServeArgs(checkpoint="CKPT", marginal="all")  # not a per-request mode


def test_score_config_validates_and_matches_its_readers():
    """Bad settings fail where the config is made; the Scorer knob defaults are the
    Scorer's own and the ranking keys are the ranking's."""
    from mendis_ray.science.ood import Scorer
    from mendis_ray.science.ranking import RANK_KEYS

    for bad in ({"marginal": "some"}, {"rank_by": "x"}, {"top_n": 0}, {"gallery_n": -1}):
        with pytest.raises(ValueError):
            DEFAULT.replace(**bad)
    scorer_defaults = {f.name: f.default for f in dataclasses.fields(Scorer)}
    for k, v in DEFAULT.scorer_kwargs().items():
        assert scorer_defaults[k] == v, k
    assert set(RANK_BY) == set(RANK_KEYS)


@pytest.fixture(scope="module")
def flow_checkpoint(tmp_path_factory):
    """A tiny full-space flow checkpoint with its scoring reference."""
    from mendis_ray.flow.checkpoint import save_checkpoint
    from mendis_ray.flow.density import SpectrumDensity, Standardizer
    from mendis_ray.flow.model import MendisFlow
    from mendis_ray.science.ood import Scorer

    flux, labels = _data(400)
    std = Standardizer.fit(flux, labels)
    torch.manual_seed(0)
    flow = MendisFlow(CFG).eval()
    density = SpectrumDensity(flow, std, CFG, GRID)
    sc = Scorer.fit(density, flux[:200], labels[:200], n_signal=2, n_marginal=0)
    path = save_checkpoint(tmp_path_factory.mktemp("ck") / "ck", density,
                           extra_arrays=sc.checkpoint_arrays())  # fmt: skip
    return path, flux[200:], labels[200:]


def test_scorer_knobs_reach_the_scorer(flow_checkpoint):
    """The knobs go through Predictor (Serve) and CatalogScorer (batch) into the Scorer
    and change its flags: 2 of 12 pixels masked is flagged under max_masked_fraction 0.1,
    not under the default 0.2."""
    from mendis_ray.distributed.infer import CatalogScorer
    from mendis_ray.predictor import Predictor

    path, flux, labels = flow_checkpoint
    cfg = DEFAULT.replace(max_masked_fraction=0.1, range_sigma=2.5, profile_steps=11)
    ivar = np.ones((3, N_PIX))
    ivar[:, :2] = 0.0
    default = Predictor.load(path)
    tuned = Predictor.load(path, scorer_kwargs=cfg.scorer_kwargs())
    for name, value in cfg.scorer_kwargs().items():
        assert getattr(tuned.scorer, name) == value
        assert getattr(default.scorer, name) == getattr(DEFAULT, name)
    no = np.zeros(3, bool)
    assert not default.score(flux[:3], ivar, labels[:3], no)["flag_masked"].any()
    assert tuned.score(flux[:3], ivar, labels[:3], no)["flag_masked"].all()
    actor = CatalogScorer(str(path), GRID, scorer_kwargs=cfg.scorer_kwargs())
    assert actor.scorer.max_masked_fraction == 0.1 and actor.marginal == DEFAULT.marginal


def test_config_options_generator_handles_optional_and_bool_fields():
    p = argparse.ArgumentParser()
    add_config_options(p, ScoreConfig, only=("max_actors", "html"), keep_defaults=False)
    a = p.parse_args(["--max-actors", "3"])
    assert a.max_actors == 3 and a.html is None  # not given: the config's default
    assert not hasattr(a, "top_n")
    assert config_from_args(ScoreConfig, a) == DEFAULT.replace(max_actors=3)
