"""Worker memory estimates and the warning that says how many workers fit."""
from compsearch.search.capacity import GIB, memory_warning, needs_hessians, worker_memory_bytes
from compsearch.search.job import prepare_job
from tests.search.helpers import tiny_spec


def test_hessian_spaces_cost_more_and_the_warning_names_the_workers_that_fit(tiny_model_dir):
    plain = prepare_job(tiny_spec(tiny_model_dir, space="quant"))
    structured = prepare_job(tiny_spec(tiny_model_dir, space="structured"))
    assert not needs_hessians(plain) and needs_hessians(structured)
    each = worker_memory_bytes(structured)
    assert each > worker_memory_bytes(plain) > 2 * 4 * plain.total_params
    assert memory_warning(structured, 2, available_bytes=2 * each) is None
    assert "use --workers 1" in memory_warning(structured, 2, available_bytes=int(1.5 * each))
    assert "even one may not fit" in memory_warning(structured, 2, available_bytes=each // 2)


def test_estimate_matches_the_measured_worker_of_the_default_model():
    from compsearch.search.spec import JobSpec

    ctx = prepare_job(JobSpec(study="estimate", space="gguf"))  # shapes only: no weights are loaded
    # workers of a 32-trial gguf-space study on SmolLM2-135M, keeping their compressed layer variants,
    # peaked at 3.8-4.9 GiB (trials.parquet peak_rss_bytes; 3.2-4.1 GiB in the structured space before
    # variants were kept)
    assert 4.5 * GIB < worker_memory_bytes(ctx) < 6.0 * GIB
