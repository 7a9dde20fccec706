"""The knob table is the one list of knobs: plans, spaces, job specs and the CLI all follow it."""
from dataclasses import fields

from compsearch.search.cli import _parser
from compsearch.search.spec import JobSpec
from compsearch.search.sensitivity import FACTORS, OFF
from compsearch.spaces import Space
from compsearch.spaces.knobs import CHOICE_FIELDS, KNOB_NAMES, KNOBS
from compsearch.spaces.plan import LayerPlan


def test_layer_plan_fields_are_the_knobs_and_the_pattern_they_imply():
    assert {f.name for f in fields(LayerPlan)} == set(KNOB_NAMES) | {"pattern"}


def test_job_spec_and_cli_override_every_knob():
    spec_fields = {f.name for f in fields(JobSpec)}
    assert set(CHOICE_FIELDS) <= spec_fields
    submit = _parser()._subparsers._group_actions[0].choices["submit"]
    destinations = {action.dest: action for action in submit._actions}
    for knob in KNOBS:
        assert knob.flag in destinations[knob.choices].option_strings


def test_a_space_offers_every_knob_and_defaults_the_unsearched():
    space = Space("s", bits=(4, 16))
    assert set(space.choices) == set(KNOB_NAMES)
    assert space.knobs() == {"bits": (4, 16)}
    assert space.choices["group_size"] == next(k.default for k in KNOBS if k.name == "group_size")


def test_sensitivity_factors_cover_every_knob_once():
    assert sorted(k for members in FACTORS.values() for k in members) == sorted(KNOB_NAMES)
    assert set(OFF) == {k.name for k in KNOBS if k.off is not None}
