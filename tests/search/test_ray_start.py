"""A study's local Ray instance starts while the job is prepared, and is stopped again where preparing fails."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import threading, ray
    from compsearch.search.runner import prepare_while_ray_starts, start_ray, stop_ray

    def fail():
        raise ValueError("bad input")

    try:
        prepare_while_ray_starts(fail, None, 1)
    except ValueError as err:
        print("raised:", err, "| ray running:", ray.is_initialized())

    def prepare():
        return threading.current_thread() is not threading.main_thread(), ray.is_initialized()

    print("prepared in a thread, ray running meanwhile:", prepare_while_ray_starts(prepare, None, 1))
    print("the study's start_ray: started here:", start_ray(None, 1))
    stop_ray()
    print("after stop_ray: ray running:", ray.is_initialized())
""")


def test_ray_starts_while_the_job_is_prepared_and_stops_where_preparing_fails():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "raised: bad input | ray running: False" in lines
    # the thread may finish before Ray is up: whether it saw Ray running is left open
    assert any(line.startswith("prepared in a thread, ray running meanwhile: (True,") for line in lines)
    assert "the study's start_ray: started here: True" in lines  # so run_study stops it when done
    assert "after stop_ray: ray running: False" in lines
