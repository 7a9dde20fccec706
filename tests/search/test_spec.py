import pytest

from compsearch.search.errors import UserError
from compsearch.search.spec import JobSpec, parse_memory_budget


@pytest.mark.parametrize("text, expected", [
    ("60MB", 60_000_000), ("1.5GiB", int(1.5 * 2**30)), ("0.35", 350), ("35%", 350), ("512 KiB", 512 * 1024),
    ("1", 1000),
])
def test_memory_budget_units_and_fractions(text, expected):
    assert parse_memory_budget(text, base_bytes=1000) == expected


@pytest.mark.parametrize("text, fragment", [
    ("lots", "not a size"), ("12", "has no unit"), ("3furlongs", "unknown unit"), ("0MB", "must be positive"),
])
def test_bad_memory_budgets(text, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_memory_budget(text, base_bytes=1000)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"objectives": ("ppl", "speed")}, "objectives"), ({"sampler": "cmaes"}, "sampler 'cmaes'"),
    ({"space": "everything"}, "space 'everything'"), ({"granularity": "row"}, "granularity 'row'"),
    ({"bits": (4, 9)}, "bits 9"), ({"latency_budget_ms": -1.0}, "latency budget"), ({"study": "a b"}, "study name"),
    ({"study": "name\n"}, "study name"),
])
def test_bad_specs_name_the_value(kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        JobSpec(study=kwargs.pop("study", "s"), **kwargs)


def test_spec_round_trips_through_dict():
    spec = JobSpec(study="s", bits=(2, 4), objectives=("kl", "memory"), memory_budget="0.4")
    assert JobSpec.from_dict(spec.to_dict()) == spec


def test_latency_in_llama_cpp_needs_a_gguf_space():
    assert JobSpec(study="g", space="gguf").latency_runtime == "llamacpp"
    assert JobSpec(study="j").latency_runtime == "torch"
    with pytest.raises(UserError, match="GGUF types only"):
        JobSpec(study="j", runtime="llamacpp")
    with pytest.raises(UserError, match="runtime 'onnx' is unknown"):
        JobSpec(study="g", space="gguf", runtime="onnx")


def test_exports_copy_the_studys_own_gguf_template(tmp_path):
    """A study submitted with --gguf-template exports with it unless the export names another (a model
    without a bundled template, such as Gemma, could not be exported otherwise)."""
    from compsearch.search.models import study_gguf_template

    template, other = tmp_path / "base.gguf", tmp_path / "other.gguf"
    template.write_bytes(b"GGUF")
    other.write_bytes(b"GGUF")
    spec = JobSpec(study="t", model="smollm2-135m", space="gguf", gguf_template=str(template))
    assert study_gguf_template(spec) == template and study_gguf_template(spec, other) == other
