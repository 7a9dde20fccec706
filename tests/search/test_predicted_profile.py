"""The predicted sensitivity profile: one KL measured per group and factor, the rest scaled from block
output errors, ranking the options as the fully measured profile does."""
import pytest
from scipy.stats import spearmanr

from compsearch.search.job import prepare_job
from compsearch.search.runner import start_workers
from compsearch.search.sensitivity import (
    OUTPUT_ERROR, UNSEEN, SensitivityCache, _anchors, _scaled, cache_path, measure_profile, profile_cells,
)
from tests.search.helpers import tiny_spec


def test_the_predicted_profile_measures_few_options_and_ranks_like_the_measured_one(ray_session, tiny_model_dir,
                                                                                     tmp_path):
    ctx = prepare_job(tiny_spec(tiny_model_dir, "predicted"))
    pool = start_workers(ctx, 2, 1)
    full, _ = measure_profile(ctx, pool, tmp_path / "full", predict=False)
    seen = []
    predicted, seconds = measure_profile(ctx, pool, tmp_path / "predicted",
                                         on_progress=lambda what, done, total: seen.append((what, done, total)))
    assert seconds > 0 and {what for what, *_ in seen} == {"output errors", "KL measurements"}
    cache = SensitivityCache(cache_path(ctx, tmp_path / "predicted"))
    cells = profile_cells(ctx.space, ctx.space.groups(ctx.layers))
    options = sum(len(plans) for plans in cells.values())
    for (group, factor), plans in cells.items():
        measured = [key for key, plan in plans.items() if cache.key(plan) in cache.values]
        assert 1 <= len(measured) <= 2  # an anchor, and one more only where the anchor is noise
        for key in measured:  # measured the same way as the full profile
            assert predicted.kl[group][factor][key] == pytest.approx(full.kl[group][factor][key], rel=1e-6, abs=1e-9)
    assert sum(cache.key(plan) in cache.values for plans in cells.values() for plan in plans.values()) < options / 2
    full_kl, predicted_kl = full.options(), predicted.options()
    assert full_kl.keys() == predicted_kl.keys()
    keys = sorted(full_kl)
    assert spearmanr([full_kl[k] for k in keys], [predicted_kl[k] for k in keys]).statistic > 0.9
    again, seconds = measure_profile(ctx, pool, tmp_path / "predicted")
    assert seconds == 0 and again.kl == predicted.kl  # read back from the cache, nothing measured


def test_a_fully_measured_cache_is_used_as_it_is(ray_session, tiny_model_dir, tmp_path):
    ctx = prepare_job(tiny_spec(tiny_model_dir, "measured-first"))
    pool = start_workers(ctx, 1, 1)
    full, _ = measure_profile(ctx, pool, tmp_path, predict=False)
    again, seconds = measure_profile(ctx, pool, tmp_path)  # predicting needs nothing: every KL is there
    assert seconds == 0 and again.kl == full.kl


def _cache_with(tmp_path, errors: dict[str, float], kls: dict[str, float]) -> SensitivityCache:
    cache = SensitivityCache(tmp_path / "profile.json")
    for plan, error in errors.items():
        cache.values[cache.key(plan, OUTPUT_ERROR)] = error
    for plan, kl in kls.items():
        cache.values[cache.key(plan)] = kl
    return cache


def test_the_anchor_is_the_median_nonzero_error_and_the_rest_scale_from_it(tmp_path):
    plans = {"a": "pa", "b": "pb", "c": "pc", "d": "pd", "z": "pz", "u": "pu"}
    errors = {"pa": 1e-3, "pb": 2e-3, "pc": 4e-3, "pd": 8e-3, "pz": 0.0, "pu": UNSEEN}
    cache = _cache_with(tmp_path, errors, {})
    assert _anchors(plans, cache) == {"pc", "pu"}  # the unseen one in full; median of the four nonzero errors
    cache = _cache_with(tmp_path, errors, {"pc": 0.04, "pu": 0.5})
    assert _anchors(plans, cache, again=True) == set()  # the anchor is well above the noise
    kl = _scaled(plans, cache)
    assert kl == pytest.approx({"a": 0.01, "b": 0.02, "c": 0.04, "d": 0.08, "z": 0.0, "u": 0.5})


def test_a_noisy_anchor_gets_a_second_one_far_above_it(tmp_path):
    plans = {"a": "pa", "b": "pb", "c": "pc"}
    errors = {"pa": 1e-6, "pb": 2e-6, "pc": 1e-3}
    cache = _cache_with(tmp_path, errors, {"pb": 1e-5})
    assert _anchors(plans, cache, again=True) == {"pc"}
    cache = _cache_with(tmp_path, errors, {"pb": 1e-5, "pc": 0.3})
    kl = _scaled(plans, cache)
    assert kl["a"] == pytest.approx(5e-6) and kl["c"] == 0.3  # each option scales from the nearer anchor
