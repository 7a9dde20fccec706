"""Knapsack seeds and guided children on a synthetic profile: exact, within budget, budget-preserving."""
import itertools

import numpy as np
import optuna
import pytest

from compsearch.search.guided import GuidedChildren
from compsearch.search.job import JobContext
from compsearch.search.seeding import Knapsack, group_options, preset_seed_choices
from compsearch.search.sensitivity import Profile, factor_options, option_key
from compsearch.search.spec import JobSpec
from compsearch.spaces.layers import LayerInfo
from compsearch.spaces.plan import Plan
from compsearch.spaces.space import get_space

LAYERS = [LayerInfo(f"model.layers.{b}.mlp.{kind}", 128, 64) for b in range(3) for kind in ("up_proj", "gate_proj")]


def _context(space_name="quant", budget=None) -> JobContext:
    space = get_space(space_name).with_choices(granularity="block")
    total = sum(layer.num_params for layer in LAYERS) + 1000
    ctx = JobContext(JobSpec(study="s", space=space_name), "model", space, LAYERS, total, None, budget, 0, 0)
    return ctx


def _profile(ctx: JobContext, seed=0) -> Profile:
    rng = np.random.default_rng(seed)
    kl = {}
    for group in ctx.space.groups(ctx.layers):
        sensitivity = rng.uniform(0.5, 5)
        kl[group] = {factor: {option_key(o): sensitivity * 2.0 ** -o.get("bits", 16) * (1 + o.get("group_size", 0) / 256)
                              for o in options} for factor, options in factor_options(ctx.space).items()}
    return Profile(kl)


def test_factor_options_measure_knobs_that_interact_together():
    factors = factor_options(get_space("joint"))
    assert set(factors) == {"quant", "sparsity", "lowrank"}
    assert len(factors["quant"]) == 7 * 2 and {"bits", "group_size"} == set(factors["quant"][0])
    assert len(factors["lowrank"]) == 3


def test_knapsack_is_exact_and_within_budget():
    ctx = _context()
    options = group_options(ctx, _profile(ctx))
    groups = list(options)
    combos = list(itertools.product(*(options[g] for g in groups)))
    sizes = [sum(o.nbytes for o in combo) for combo in combos]
    for budget in np.linspace(min(sizes), max(sizes), 7).astype(int):
        plan = Knapsack(options).plan(int(budget))
        assert plan is not None  # every budget from the smallest plan up has a plan
        chosen = [next(o for o in options[g] if o.choice == plan[g]) for g in groups]
        assert sum(o.nbytes for o in chosen) <= budget
        best = min(sum(o.estimate for o in combo) for combo, size in zip(combos, sizes) if size <= budget)
        # exact up to the byte rounding of the table (1/4096 of the range per group)
        assert sum(o.estimate for o in chosen) <= best * 1.05 + 1e-12


def test_dominated_options_are_dropped():
    ctx = _context()
    for options in group_options(ctx, _profile(ctx)).values():
        assert all(a.nbytes <= b.nbytes and a.estimate > b.estimate for a, b in zip(options, options[1:]))


@pytest.mark.parametrize("budget_fraction", [None, 0.5])
def test_guided_children_preserve_size_and_budget(budget_fraction):
    ctx = _context()
    full = ctx.plan_bytes(Plan())
    ctx.memory_budget_bytes = int(budget_fraction * full) if budget_fraction else None
    children = GuidedChildren(ctx, _profile(ctx), seed=3)
    study = optuna.create_study(directions=["minimize", "minimize"])
    parents = []
    rng = np.random.default_rng(0)
    for _ in range(6):
        choices = {g: options[rng.integers(len(options))].choice for g, options in children.options.items()}
        trial = optuna.trial.create_trial(params=ctx.space.params_for(choices), values=[1.0, 1.0],
                                          distributions={k: optuna.distributions.CategoricalDistribution(
                                              [v for v in ctx.space.knobs()[k.split(":")[1]]])
                                              for k in ctx.space.params_for(choices)})
        parents.append(trial)
    space = parents[0].distributions
    for _ in range(30):
        params = children(study, space, parents)
        plan = ctx.space.suggest_plan(optuna.trial.FixedTrial(params), ctx.layers)
        size = ctx.plan_bytes(plan)
        if ctx.memory_budget_bytes:
            assert size <= ctx.memory_budget_bytes
        largest_parent = max(ctx.plan_bytes(ctx.space.suggest_plan(optuna.trial.FixedTrial(p.params), ctx.layers))
                             for p in parents)
        assert size <= largest_parent


def test_enqueued_seeds_become_the_first_parents():
    from compsearch.search.study import ask

    parents_seen = []

    def child(study, search_space, parents):
        parents_seen.append(sorted(t.number for t in parents))
        return {}

    sampler = optuna.samplers.NSGAIISampler(population_size=4, seed=0, child_generation_strategy=child)
    study = optuna.create_study(directions=["minimize"], sampler=sampler)
    for value in (1.0, 2.0, 3.0, 4.0):
        study.enqueue_trial({"x": value})
    for _ in range(6):
        trial = ask(study)
        study.tell(trial, trial.suggest_float("x", 0, 10))
    assert parents_seen and parents_seen[0] == [0, 1, 2, 3]  # the seeds, not random trials


def test_guided_children_do_not_repeat_known_plans():
    ctx = _context()
    children = GuidedChildren(ctx, _profile(ctx), seed=3)
    distributions = {f"{group}:{knob}": optuna.distributions.CategoricalDistribution(list(choices))
                     for group in children.options for knob, choices in ctx.space.knobs().items()}
    study = optuna.create_study(directions=["minimize", "minimize"])
    start = {g: options[len(options) // 2].choice for g, options in children.options.items()}
    study.add_trial(optuna.trial.create_trial(params=ctx.space.params_for(start), values=[1.0, 1.0],
                                              distributions=distributions))
    parents = study.get_trials()
    seen = {tuple(sorted(parents[0].params.items()))}
    for _ in range(10):  # from one parent, local moves revisit plans from the 3rd child on unless redrawn
        params = children(study, distributions, parents)
        assert tuple(sorted(params.items())) not in seen
        seen.add(tuple(sorted(params.items())))
        study.add_trial(optuna.trial.create_trial(params=params, values=[1.0, 1.0], distributions=distributions))


def _trial_with_estimate(estimated: float, measured: float, **attrs) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(values=[1.0], user_attrs={"estimated_kl": estimated, "kl": measured, **attrs})


def test_calibration_learns_how_the_estimate_errs():
    from compsearch.search.calibration import Calibration

    truth = [(e, 2.0 * e ** 1.5) for e in (0.05, 0.2, 0.7, 1.5, 4.0)]
    corrected = Calibration.from_trials([_trial_with_estimate(e, m) for e, m in truth])
    assert corrected(1.0) == pytest.approx(2.0) and corrected(3.0) == pytest.approx(2.0 * 3.0 ** 1.5)
    few = Calibration.from_trials([_trial_with_estimate(e, m) for e, m in truth[:3]])  # too few for a power: a scale
    assert few.power == 1.0 and few(1.7) == pytest.approx(1.7 * np.exp(np.mean([np.log(m / e) for e, m in truth[:3]])))
    assert Calibration.from_trials([])(1.7) == 1.7  # nothing measured: as estimated
    assert corrected.spread == pytest.approx(0.0, abs=1e-9)  # the fit is exact: no error left
    noisy = [(e, m * np.exp(0.3 if index % 2 else -0.3)) for index, (e, m) in enumerate(truth + [(9.0, 54.0)])]
    assert Calibration.from_trials([_trial_with_estimate(e, m) for e, m in noisy]).spread == pytest.approx(0.3, abs=0.05)
    assert Calibration().spread == Calibration.DEFAULT_SPREAD  # nothing measured yet


def test_guided_children_keep_within_the_quality_floor():
    ctx = _context()
    children = GuidedChildren(ctx, _profile(ctx), seed=5)
    estimates = sorted(sum(o[level].estimate for o in children.options.values())
                       for level in range(min(len(o) for o in children.options.values())))
    floor = estimates[len(estimates) // 2]  # half of the uniform levels are past it
    ctx.spec = JobSpec(study="s", space="quant", max_ppl_ratio=float(np.exp(floor)))
    distributions = {f"{group}:{knob}": optuna.distributions.CategoricalDistribution(list(choices))
                     for group in children.options for knob, choices in ctx.space.knobs().items()}
    study = optuna.create_study(directions=["minimize", "minimize"])
    for level in range(min(len(o) for o in children.options.values())):  # parents on both sides of the floor
        choices = {g: options[level].choice for g, options in children.options.items()}
        study.add_trial(optuna.trial.create_trial(params=ctx.space.params_for(choices), values=[1.0, 1.0],
                                                  distributions=distributions))
    parents = study.get_trials()
    drawn = [children(study, distributions, parents) for _ in range(20)]
    levels = [children._levels(params) for params in drawn]
    assert all(children._estimate(level) <= floor for level in levels)


def test_hypervolume_gain_counts_only_the_area_the_front_does_not_hold():
    from compsearch.search.front import hypervolume_gain, measured_front

    trials = [optuna.trial.create_trial(values=[1.0], user_attrs={"memory_bytes": m, "ppl": p})
              for m, p in ((10, 20.0), (20, 12.0), (25, 15.0))]  # (25, 15) is dominated by (20, 12)
    front = measured_front(trials)
    assert front == [(10, 20.0), (20, 12.0)]
    assert hypervolume_gain(front, 15, 16.0, 30, 40) == pytest.approx((20 - 16) * 5)  # up to the next step
    assert hypervolume_gain(front, 5, 16.0, 30, 40) == pytest.approx((40 - 16) * 5 + (20 - 16) * 10)
    assert hypervolume_gain(front, 25, 13.0, 30, 40) == 0.0  # dominated
    assert hypervolume_gain(front, 25, 41.0, 30, 40) == 0.0  # past the floor
    assert hypervolume_gain([], 25, 13.0, 30, 40) == pytest.approx((40 - 13) * 5)


@pytest.mark.parametrize("stored, expected", [(14.0, 14.0), ("inf", 1.0), ("nan", 1.0), (None, 1.0)])
def test_the_base_perplexity_scales_gains_only_when_it_is_a_measured_number(stored, expected):
    from compsearch.search.front import base_ppl_of
    from compsearch.search.study import BASE_METRICS_ATTR

    study = optuna.create_study()
    if stored is not None:  # a diverged base model's perplexity is stored as a string
        study.set_user_attr(BASE_METRICS_ATTR, {"ppl": stored})
    assert base_ppl_of(study) == expected


def test_guided_children_go_where_the_front_can_gain_most(monkeypatch):
    """Of the children that pass, the one predicted to add most to the measured front runs: over the
    same draws, more predicted gain than running the first child that passes."""
    import compsearch.search.guided as guided
    from compsearch.search.front import hypervolume_gain, measured_front

    ctx = _context()
    base_ppl, limit = 10.0, (ctx.base_bytes * 1.01, np.log(3.0))  # in (bytes, KL)

    def predicted_gains(seed: int) -> list[float]:
        children = GuidedChildren(ctx, _profile(ctx), seed=seed)
        study, distributions = _measured_study(ctx, children, (1, 3, 5), base_ppl)
        parents = study.get_trials()
        front = measured_front(parents, "kl")
        gains = []
        for _ in range(10):
            levels = children._levels(children(study, distributions, parents))
            predicted = (children.kept_bytes + children._size(levels), children._estimate(levels))
            gains.append(hypervolume_gain(front, *predicted, *limit))
        return gains

    ranked = [sum(predicted_gains(seed)) for seed in range(4)]
    monkeypatch.setattr(guided, "CANDIDATES", 1)
    first = [sum(predicted_gains(seed)) for seed in range(4)]
    assert all(r >= f for r, f in zip(ranked, first)) and sum(ranked) > 1.2 * sum(first)


def test_budget_seeds_go_where_the_predicted_front_gains_most():
    """Seeds are knapsack plans within the floor, each adding predicted hypervolume to the measured front
    and the seeds before it; none is predicted dominated by another."""
    from compsearch.search.front import hypervolume_gain, pareto, ppl_limit, predicted_ppl
    from compsearch.search.seeding import budget_seeds, group_nbytes

    ctx = _context()
    ctx.spec = JobSpec(study="s", space="quant", max_ppl_ratio=3.0)
    sizes = [ctx.plan_bytes(ctx.space.plan(ctx.layers, choice)) for choice in ctx.space.uniform_choices()]
    ctx.smallest_plan_bytes, ctx.largest_plan_bytes = min(sizes), max(sizes)
    profile, base_ppl = _profile(ctx), 10.0
    groups = ctx.space.groups(ctx.layers)
    kept = ctx.plan_bytes(Plan()) - sum(layer.num_params for layer in ctx.layers) * 2

    def point(plan):
        size = kept + sum(group_nbytes(ctx, groups[g], choice) for g, choice in plan.items())
        return size, predicted_ppl(base_ppl, sum(profile.group_estimate(g, choice) for g, choice in plan.items()))

    measured = [(ctx.largest_plan_bytes * 0.6, 11.0)]
    seeds = budget_seeds(ctx, profile, 4, measured, base_ppl)
    points = [point(plan) for plan in seeds]
    assert 1 < len(seeds) <= 4 and all(ppl <= ppl_limit(base_ppl, 3.0) for _, ppl in points)
    assert len(pareto(points)) == len(points)  # none dominated by another seed
    bounds = (ctx.largest_plan_bytes * 1.01, 30.0)
    assert all(hypervolume_gain(pareto(measured), *p, *bounds) > 0 for p in points)


def test_profile_seeds_are_placed_with_the_estimate_corrected_by_the_first_trials():
    """A uniform seed that measured 3x its estimate moves where the profile's seeds may go: none whose
    estimate, so corrected, is past the quality floor; one that measured a third of it moves none (a
    seed past the floor is a wasted trial); half the study's trials are seeds."""
    from compsearch.search.seeding import seed_profile

    ctx = _context()
    ctx.spec = JobSpec(study="s", space="quant", max_ppl_ratio=3.0)
    sizes = [ctx.plan_bytes(ctx.space.plan(ctx.layers, choice)) for choice in ctx.space.uniform_choices()]
    ctx.smallest_plan_bytes, ctx.largest_plan_bytes = min(sizes), max(sizes)
    profile = _profile(ctx)
    uniform = {group: dict(next(iter(ctx.space.uniform_choices()))) for group in ctx.space.groups(ctx.layers)}
    params = ctx.space.params_for(uniform)
    assert ctx.space.choices_of(params, ctx.layers) == uniform
    distributions = {name: optuna.distributions.CategoricalDistribution(list(ctx.space.knobs()[name.split(":")[1]]))
                     for name in params}

    def seeds(measured_over_estimated: float) -> list[float]:
        study = optuna.create_study(directions=["minimize", "minimize"])
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions, values=[1.0, 1.0],
            user_attrs={"seed": "uniform", "kl": measured_over_estimated * profile.estimate(uniform),
                        "memory_bytes": ctx.plan_bytes(ctx.space.plan_for(uniform, ctx.layers))}))
        seed_profile(ctx, study, profile, trials=12, workers=1)
        waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
        assert len(waiting) <= max(12 // 2, ctx.spec.population_size) - 1  # with the uniform one
        return [profile.estimate(ctx.space.choices_of(trial.system_attrs["fixed_params"], ctx.layers))  # enqueued
                for trial in waiting]

    as_estimated, corrected = seeds(1.0), seeds(3.0)
    assert max(as_estimated) <= ctx.spec.max_kl < 3 * max(as_estimated)  # some would pass the floor corrected
    assert corrected and 3 * max(corrected) <= ctx.spec.max_kl
    assert seeds(1 / 3) == as_estimated


def _gguf_context(granularity: str, budget=None, quant_methods=None) -> JobContext:
    """16 blocks of SmolLM2-135M's shapes (576-wide rows: K-types only on down_proj) and a tied embedding."""
    kinds = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
             "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
    module = {kind: "mlp" if kind in ("gate_proj", "up_proj", "down_proj") else "self_attn" for kind in kinds}
    layers = [LayerInfo(f"model.layers.{b}.{module[kind]}.{kind}", *shape) for b in range(16) for kind, shape in kinds.items()]
    layers.append(LayerInfo("model.embed_tokens", 49152, 576))
    space = get_space("gguf").with_choices(granularity=granularity, quant_methods=quant_methods)
    total = sum(layer.num_params for layer in layers)
    return JobContext(JobSpec(study="s", space="gguf"), "model", space, layers, total, None, budget, 0, 0,
                      tied_embeddings=True)


def test_a_gguf_study_starts_from_llama_cpps_presets_within_its_budget():
    ctx = _gguf_context("layer")
    presets = preset_seed_choices(ctx, 10)
    names = [name for name, _ in presets]
    # Q3_K_S and Q2_K give this model one mix (K-types fall back to Q4_0 on 576-wide rows): the first named is kept
    assert names == ["Q3_K_S", "Q4_0", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"][-len(names):]
    sizes = [ctx.plan_bytes(ctx.space.plan_for(choices, ctx.layers)) for _, choices in presets]
    assert sizes == sorted(sizes)
    q4_k_m = dict(presets)["Q4_K_M"]
    assert q4_k_m["model.layers.0.mlp.down_proj"] == {"quant_method": "q6_k"}  # llama.cpp's more bits
    assert q4_k_m["model.layers.3.mlp.down_proj"] == {"quant_method": "q4_k"}
    assert q4_k_m["model.layers.3.self_attn.q_proj"] == {"quant_method": "q5_0"}  # Q4_K's fallback
    assert q4_k_m["model.embed_tokens"] == {"quant_method": "q8_0"}  # the tied output, Q6_K's fallback

    budget = sizes[names.index("Q4_K_M")]
    within = preset_seed_choices(_gguf_context("layer", budget=budget), 2)
    assert [name for name, _ in within] == ["Q4_K_S", "Q4_K_M"]  # the largest that fit
    assert preset_seed_choices(_gguf_context("block"), 10)[-1][0] == "Q8_0"  # one type per block: uniform mixes only
    assert "Q4_0" not in dict(preset_seed_choices(_gguf_context("layer", quant_methods=("f16", "q8_0", "q4_0")), 10))


def test_guided_children_are_placed_at_the_bytes_their_gguf_file_takes():
    """A GGUF study's plan bytes are its file's (header and vocabulary, 32-bit norms besides the
    tensors): children are predicted at those bytes, not 1.5 MB left of where they land (where each one
    looked like a new smallest plan)."""
    from compsearch.compress.gguf_export import GGUFFileLayout

    ctx = _gguf_context("block")
    norms = {f"model.layers.{b}.input_layernorm.weight": (576,) for b in range(16)}
    ctx.gguf_layout = GGUFFileLayout(1_500_000, 32, {f"{layer.name}.weight": (layer.out_features, layer.in_features)
                                                      for layer in ctx.layers} | norms)
    children = GuidedChildren(ctx, _profile(ctx))
    for level in range(3):
        levels = {group: min(level, len(options) - 1) for group, options in children.options.items()}
        plan = ctx.space.plan_for({g: children.options[g][lv].choice for g, lv in levels.items()}, ctx.layers)
        assert abs(children.kept_bytes + children._size(levels) - ctx.plan_bytes(plan)) <= 32 * len(ctx.layers)


def test_guided_children_share_their_gain_with_trials_of_about_their_size(monkeypatch):
    """A front's smallest plan, already tried at its size many times, draws fewer children there than
    the predicted gain alone would send."""
    import compsearch.search.guided as guided

    ctx = _context()
    base_ppl, window = 10.0, 0.03 * ctx.base_bytes  # the toy's options are a few percent of its size apart
    monkeypatch.setattr(guided, "CROWD_WINDOW", 0.03)

    def children_near_the_smallest(seed: int) -> int:
        children = GuidedChildren(ctx, _profile(ctx), seed=seed)
        study, distributions = _measured_study(ctx, children, (2, 2, 2, 2, 2, 2, 6, 10), base_ppl)
        smallest = children.kept_bytes + children._size({g: 2 for g in children.options})  # KL within log 3
        parents = study.get_trials()
        sizes = [children.kept_bytes + children._size(children._levels(children(study, distributions, parents)))
                 for _ in range(20)]
        return sum(abs(size - smallest) <= window for size in sizes)

    shared = sum(children_near_the_smallest(seed) for seed in range(3))
    monkeypatch.setattr(guided, "CROWD_WINDOW", 0.0)
    alone = sum(children_near_the_smallest(seed) for seed in range(3))
    assert shared < alone / 2  # measured: 12 against 45 of 60


def test_guided_children_correct_the_estimate_by_the_trials_of_about_their_size(monkeypatch):
    """Where the smallest plans measured more damage than the one calibration curve predicts, children
    are predicted with that error and go there less often."""
    from compsearch.search.calibration import SizeCorrection

    ctx = _context()

    def children_near_the_smallest(seed: int) -> int:
        children = GuidedChildren(ctx, _profile(ctx), seed=seed)
        study, distributions = _measured_study(ctx, children, (2, 2, 2, 4, 6, 8, 10), 10.0, {2: 2.0})
        smallest = children.kept_bytes + children._size({g: 2 for g in children.options})
        parents = study.get_trials()
        sizes = [children.kept_bytes + children._size(children._levels(children(study, distributions, parents)))
                 for _ in range(20)]
        return sum(abs(size - smallest) <= 0.03 * ctx.base_bytes for size in sizes)

    corrected = sum(children_near_the_smallest(seed) for seed in range(3))
    monkeypatch.setattr(SizeCorrection, "__call__", lambda self, memory_bytes: 1.0)
    uncorrected = sum(children_near_the_smallest(seed) for seed in range(3))
    assert corrected < uncorrected / 2  # measured: 24 against 60 of 60


def test_size_correction_is_the_error_of_the_trials_nearest_in_size():
    from compsearch.search.calibration import Calibration, SizeCorrection

    trials = [_trial_with_estimate(0.5, 0.5 * error, memory_bytes=size)
              for size, error in ((100, 2.0), (110, 2.0), (120, 2.0), (400, 1.0), (410, 1.0), (420, 1.0))]
    at_size = SizeCorrection(trials, Calibration())
    assert at_size(90) == pytest.approx(2.0) and at_size(500) == pytest.approx(1.0)
    assert at_size(258) == pytest.approx(np.exp(2 * np.log(2.0) / 3))  # 120, 110 (2x) and 400 (1x)
    assert SizeCorrection([], Calibration())(100) == 1.0


def test_guided_children_fill_the_gaps_between_the_fronts_sizes(monkeypatch):
    """With the front measured only at two sizes far apart, the child run is the profile's best plan
    between them; children of the larger parent alone stay near its size."""
    ctx = _context()

    def child_sizes() -> tuple[list[int], int, int]:
        children = GuidedChildren(ctx, _profile(ctx), seed=0)
        study, distributions = _measured_study(ctx, children, (2, 10), 10.0)
        low, high = sorted(trial.user_attrs["memory_bytes"] for trial in study.get_trials())
        largest = [max(study.get_trials(), key=lambda trial: trial.user_attrs["memory_bytes"])]
        sizes = [children.kept_bytes + children._size(children._levels(children(study, distributions, largest)))
                 for _ in range(5)]
        return sizes, low, high

    filled, low, high = child_sizes()
    monkeypatch.setattr(GuidedChildren, "_gap_fillers", lambda self, front: [])
    unfilled, _, _ = child_sizes()
    middle, quarter = (low + high) / 2, (high - low) / 4
    assert all(abs(size - middle) < quarter for size in filled)  # measured: 5 of 5 at 37.5 of 22.3 - 53.5 kB
    assert not any(abs(size - middle) < quarter for size in unfilled)  # 50.1 - 50.8 kB


def _measured_study(ctx: JobContext, children: GuidedChildren, levels: tuple[int, ...], base_ppl: float,
                    error_at_level: dict[int, float] | None = None):
    """A study holding one measured trial per entry of `levels` (every group at that level, or its last),
    its KL the profile's estimate exactly; and the search space's distributions. With `error_at_level`
    (level: measured / estimated KL, 1 where absent), the KL is off by that and the estimate is recorded."""
    from compsearch.search.study import BASE_METRICS_ATTR

    distributions = {f"{group}:{knob}": optuna.distributions.CategoricalDistribution(list(choices))
                     for group in children.options for knob, choices in ctx.space.knobs().items()}
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.set_user_attr(BASE_METRICS_ATTR, {"ppl": base_ppl})
    for level in levels:
        chosen = {g: min(level, len(options) - 1) for g, options in children.options.items()}
        estimate = children._estimate(chosen)
        kl = estimate * (error_at_level or {}).get(level, 1.0)
        recorded = {"estimated_kl": estimate} if error_at_level else {}
        study.add_trial(optuna.trial.create_trial(
            params=children._params(chosen, distributions), values=[1.0, 1.0], distributions=distributions,
            user_attrs={"memory_bytes": children.kept_bytes + children._size(chosen), "ppl": base_ppl * np.exp(kl),
                        "kl": kl, **recorded}))
    return study, distributions
