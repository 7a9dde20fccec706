"""`compsearch dashboard`: optuna-dashboard serves the study's own storage on loopback until Ctrl-C."""
import json
import signal
import subprocess
import sys
import urllib.request

from compsearch.search.spec import JobSpec
from compsearch.search.study import create_study, default_storage_url, open_storage


def test_dashboard_serves_the_study_until_interrupted(tiny_model_dir, tmp_path):
    spec = JobSpec(study="watched", model=str(tiny_model_dir), seq_len=32, eval_windows=4)
    create_study(spec, open_storage(default_storage_url(tmp_path, "watched")), {})
    server = subprocess.Popen([sys.executable, "-m", "compsearch", "dashboard", "--study", "watched",
                               "--results-dir", str(tmp_path), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("optuna-dashboard for study watched: http://127.0.0.1:"), line
        url = line.split()[4]
        root = url.split("/dashboard/")[0]
        with urllib.request.urlopen(f"{root}/api/studies", timeout=30) as response:
            studies = json.loads(response.read())["study_summaries"]
        assert [study["study_name"] for study in studies] == ["watched"]
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200
    finally:
        server.send_signal(signal.SIGINT)
        try:
            _, err = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()  # leave no server behind, then fail
            server.communicate()
            raise
    assert server.returncode == 130 and "interrupted" in err


def test_dashboard_of_a_missing_study_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "-m", "compsearch", "dashboard", "--study", "nothing",
                             "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no study 'nothing'" in result.stderr
