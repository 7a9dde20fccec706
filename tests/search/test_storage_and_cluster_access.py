"""Storage that cannot be made and cluster addresses where nothing listens are one clear error naming the
value and the fix, at once (not a traceback, not a hang); Ray's cluster token stays its owner's."""
import pytest

from compsearch.search.errors import UserError
from compsearch.search.study import open_storage


@pytest.mark.parametrize("url, fragment", [
    ("journal:/proc/x", "cannot be opened"),
    ("journal:/proc/none/x.log", "cannot be made"),
    ("sqlite:////proc/none/x.db", "cannot be made"),
])
def test_storage_in_places_that_cannot_hold_it(url, fragment):
    with pytest.raises(UserError, match=fragment):
        open_storage(url)


def test_a_storage_password_never_reaches_the_message():
    with pytest.raises(UserError, match="cannot be opened") as raised:
        open_storage("postgresql://bob:s3cret@127.0.0.1:1/studies")  # nothing listens on port 1
    assert "s3cret" not in str(raised.value) and "bob:***@127.0.0.1" in str(raised.value)


def test_a_file_where_the_study_folder_goes(tmp_path):
    (tmp_path / "study").write_text("")
    with pytest.raises(UserError, match="a file of that name is in the way"):
        open_storage(f"sqlite:///{tmp_path}/study/study.db")


def test_a_cluster_address_where_nothing_listens_is_refused_at_once():
    import socket

    from compsearch.search.cluster import check_reachable

    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    check_reachable(f"127.0.0.1:{port}")
    check_reachable(f"http://127.0.0.1:{port}")
    check_reachable("auto")
    listening.close()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(UserError, match=f"nothing answers at 127.0.0.1:{port}"):
            check_reachable(address)


def test_rays_token_file_is_kept_to_its_owner(tmp_path, monkeypatch):
    from compsearch.search.cluster import protect_token_file

    token = tmp_path / "auth_token"
    token.write_text("secret")
    token.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    protect_token_file()
    assert token.stat().st_mode & 0o777 == 0o600
