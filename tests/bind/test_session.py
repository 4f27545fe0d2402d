"""Session files: the token file and the state file, on a real file system."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from companion_runtime import Reason
from companion_runtime.bind.session import (
    STATE_DIR_ENV,
    ServeState,
    SessionFileError,
    default_state_dir,
    new_token,
    prepare_state_dir,
    read_serve_state,
    read_token_file,
    remove_serve_state,
    write_serve_state,
    write_token_file,
)

pytestmark = [pytest.mark.unit, pytest.mark.security]


def test_tokens_are_long_random_and_url_safe() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert len(token) >= 43
        assert all(character.isalnum() or character in "-_" for character in token)


def test_token_file_is_private_exclusive_and_round_trips(tmp_path: Path) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    token = new_token()
    path = write_token_file(directory, token, port=4242)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_token_file(path) == token
    # A second serve in the same process on the same port cannot overwrite it.
    with pytest.raises(SessionFileError) as caught:
        write_token_file(directory, new_token(), port=4242)
    assert caught.value.reason is Reason.STORE_ERROR
    assert read_token_file(path) == token


def test_a_planted_symlink_is_never_followed(tmp_path: Path) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    target = tmp_path / "elsewhere"
    target.write_text("original")
    (directory / f"frontdoor-4243-{os.getpid()}.token").symlink_to(target)
    with pytest.raises(SessionFileError):
        write_token_file(directory, new_token(), port=4243)
    assert target.read_text() == "original"
    link = tmp_path / "link.token"
    link.symlink_to(target)
    with pytest.raises(SessionFileError):
        read_token_file(link)


def test_a_shared_or_foreign_state_dir_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(SessionFileError) as caught:
        prepare_state_dir(shared)
    assert caught.value.reason is Reason.STORE_ERROR
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    with pytest.raises(SessionFileError):
        prepare_state_dir(tmp_path / "alias")


def test_state_file_round_trip_and_removal_only_by_its_owner(tmp_path: Path) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    with pytest.raises(SessionFileError) as caught:
        read_serve_state(directory)
    assert caught.value.reason is Reason.FILE_NOT_FOUND
    state = ServeState(url="http://127.0.0.1:5000", token_file=directory / "t", pid=12345)
    path = write_serve_state(directory, state)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_serve_state(directory) == state
    remove_serve_state(directory, pid=999)
    assert read_serve_state(directory) == state
    remove_serve_state(directory, pid=12345)
    assert not path.exists()
    assert list(directory.iterdir()) == []


def test_malformed_state_and_token_files_are_refused(tmp_path: Path) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    (directory / "serve.json").write_text('{"url": 1}')
    with pytest.raises(SessionFileError):
        read_serve_state(directory)
    empty = directory / "empty.token"
    empty.write_text("\n")
    with pytest.raises(SessionFileError):
        read_token_file(empty)
    huge = directory / "huge.token"
    huge.write_text("a" * 10000)
    with pytest.raises(SessionFileError):
        read_token_file(huge)


@pytest.mark.timeout(20)
def test_fifos_and_deeply_nested_state_are_refused_at_once(tmp_path: Path) -> None:
    # A FIFO would block the open until a writer came; 4,000 brackets fit under the size cap
    # and exhaust the JSON decoder's recursion.
    directory = prepare_state_dir(tmp_path / "state")
    fifo = directory / "frontdoor.token"
    os.mkfifo(fifo)
    with pytest.raises(SessionFileError) as caught:
        read_token_file(fifo)
    assert caught.value.reason is Reason.STORE_ERROR
    os.mkfifo(directory / "serve.json")
    with pytest.raises(SessionFileError):
        read_serve_state(directory)
    (directory / "serve.json").unlink()
    (directory / "serve.json").write_text("[" * 4000)
    with pytest.raises(SessionFileError) as caught:
        read_serve_state(directory)
    assert caught.value.reason is Reason.STORE_ERROR


def test_state_dir_env_overrides_the_default(tmp_path: Path) -> None:
    assert default_state_dir({STATE_DIR_ENV: str(tmp_path)}) == tmp_path
    assert default_state_dir({}).name == "companion-runtime"
