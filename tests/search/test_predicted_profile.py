"""The predicted sensitivity profile: one KL measured per group and factor, the rest scaled from block
output errors, ranking the options as the fully measured profile does."""
import pytest
from scipy.stats import spearmanr

from compsearch.search.job import prepare_job
from compsearch.search.runner import start_workers
from compsearch.search.sensitivity import SensitivityCache, cache_path, measure_profile, profile_cells
from tests.search.helpers import tiny_spec


def _flat(kl: dict) -> dict:
    return {(group, factor, option): value for group, factors in kl.items()
            for factor, options in factors.items() for option, value in options.items()}


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
    full_kl, predicted_kl = _flat(full.kl), _flat(predicted.kl)
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
