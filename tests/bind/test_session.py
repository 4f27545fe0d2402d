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


# --- reading back what serve left: no more trust than serve itself gives -------------------

#: A user other than the one running the tests (``nobody``); giving it a file needs root.
OTHER_UID = 65534
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving a file to another user needs root"
)


def _write_session(directory: Path) -> ServeState:
    """Both session files as ``serve`` writes them, with this process as the ``serve``."""
    token_file = write_token_file(directory, new_token(), port=4300)
    state = ServeState(url="http://127.0.0.1:4300", token_file=token_file, pid=os.getpid())
    write_serve_state(directory, state)
    return state


@pytest.mark.parametrize(
    "case",
    [
        "writable by everyone",
        "writable by the group",
        "a symlink",
        pytest.param("another user's", marks=needs_root),
    ],
)
def test_a_state_dir_serve_would_refuse_is_refused_when_read_back(
    tmp_path: Path, case: str
) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    _write_session(directory)
    if case == "writable by everyone":
        directory.chmod(0o777)
    elif case == "writable by the group":
        directory.chmod(0o770)
    elif case == "a symlink":
        (tmp_path / "alias").symlink_to(directory)
        directory = tmp_path / "alias"
    else:
        os.chown(directory, OTHER_UID, OTHER_UID)
    with pytest.raises(SessionFileError) as caught:
        read_serve_state(directory)
    assert caught.value.reason is Reason.STORE_ERROR


@pytest.mark.parametrize(
    "case",
    [
        "readable by others",
        "readable by the group",
        pytest.param("another user's", marks=needs_root),
    ],
)
def test_a_state_file_not_as_serve_writes_it_is_refused(tmp_path: Path, case: str) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    _write_session(directory)
    state_file = directory / "serve.json"
    if case == "readable by others":
        state_file.chmod(0o604)
    elif case == "readable by the group":
        state_file.chmod(0o640)
    else:
        os.chown(state_file, OTHER_UID, OTHER_UID)
    with pytest.raises(SessionFileError) as caught:
        read_serve_state(directory)
    assert caught.value.reason is Reason.STORE_ERROR


@pytest.mark.parametrize(
    "case",
    [
        "readable by others",
        "writable by the group",
        pytest.param("another user's", marks=needs_root),
    ],
)
def test_a_named_token_file_not_as_serve_writes_it_is_refused(tmp_path: Path, case: str) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    state = _write_session(directory)
    if case == "readable by others":
        state.token_file.chmod(0o604)
    elif case == "writable by the group":
        state.token_file.chmod(0o620)
    else:
        os.chown(state.token_file, OTHER_UID, OTHER_UID)
    with pytest.raises(SessionFileError) as caught:
        read_token_file(read_serve_state(directory).token_file, private=True)
    assert caught.value.reason is Reason.STORE_ERROR
    # A token file the user names is the user's choice: only its shape is checked.
    assert read_token_file(state.token_file)


@pytest.mark.parametrize("case", ["another directory", "a symlink to the directory", "its parent"])
def test_a_state_file_naming_a_token_file_outside_the_state_dir_is_refused(
    tmp_path: Path, case: str
) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    state = _write_session(directory)
    elsewhere = prepare_state_dir(tmp_path / "elsewhere")
    if case == "another directory":
        recorded = write_token_file(elsewhere, new_token(), port=4300)
    elif case == "a symlink to the directory":
        (tmp_path / "alias").symlink_to(directory)
        recorded = tmp_path / "alias" / state.token_file.name
    else:
        recorded = directory / ".."
    write_serve_state(directory, ServeState(url=state.url, token_file=recorded, pid=state.pid))
    with pytest.raises(SessionFileError) as caught:
        read_serve_state(directory)
    assert caught.value.reason is Reason.STORE_ERROR


def test_a_state_dir_spelled_another_way_still_finds_its_token_file(tmp_path: Path) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    state = _write_session(directory)
    respelled = tmp_path / "state" / "." / ".." / "state"
    read = read_serve_state(respelled)
    assert read.token_file == respelled / state.token_file.name
    assert read_token_file(read.token_file, private=True) == read_token_file(state.token_file)


def test_a_missing_state_dir_is_file_not_found_and_stays_missing(tmp_path: Path) -> None:
    with pytest.raises(SessionFileError) as caught:
        read_serve_state(tmp_path / "state")
    assert caught.value.reason is Reason.FILE_NOT_FOUND
    assert not (tmp_path / "state").exists()
