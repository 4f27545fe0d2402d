"""Session files: the token file and the state files, on a real file system."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from companion_runtime import Reason
from companion_runtime.bind.session import (
    STATE_DIR_ENV,
    ServeState,
    SessionFileError,
    check_state_dir,
    default_state_dir,
    forget_serve,
    is_serving,
    new_token,
    prepare_state_dir,
    read_recorded_serves,
    read_serve_records,
    read_serve_state,
    read_token_file,
    record_serve,
    write_serve_state,
    write_token_file,
)
from tests.support.acl import grant_write_by_acl
from tests.support.port_taker import PortTaker, port_taker
from tests.support.supervision import wait_for
from tests.support.would_block import opener_that_would_block

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
    # A second serve with the same pid on the same port cannot overwrite it: it gets a file of
    # its own.
    other = write_token_file(directory, new_token(), port=4242)
    assert other != path and other.parent == directory
    assert read_token_file(path) == token


def test_a_planted_symlink_is_never_followed(tmp_path: Path) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    target = tmp_path / "elsewhere"
    target.write_text("original")
    planted = directory / f"frontdoor-4243-{os.getpid()}.token"
    planted.symlink_to(target)
    written = write_token_file(directory, new_token(), port=4243)
    assert written != planted and not written.is_symlink()
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


def test_a_state_dir_with_a_nul_in_its_path_is_refused_not_a_crash(tmp_path: Path) -> None:
    # No file can have such a name: the lookup raised ValueError out of both, a traceback
    # instead of a refusal.
    for check in (prepare_state_dir, check_state_dir):
        with pytest.raises(SessionFileError) as caught:
            check(tmp_path / "state\0dir")
        assert caught.value.reason is Reason.STORE_ERROR


def test_the_directories_prepare_state_dir_makes_are_owner_only_whatever_the_umask(
    tmp_path: Path,
) -> None:
    # The directories missing on the way had been made with the umask's mode (rwxrwxr-x
    # under umask 002): group-writable directories above the state directory, refused
    # where the user's primary group is not theirs alone, though prepare_state_dir made them.
    directory = tmp_path / "run" / "companion-runtime"
    previous = os.umask(0o002)
    try:
        prepare_state_dir(directory)
    finally:
        os.umask(previous)
    for made in (tmp_path / "run", directory):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700


def test_state_file_round_trip_and_removal_only_by_its_owner(tmp_path: Path) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    with pytest.raises(SessionFileError) as caught:
        read_serve_state(directory)
    assert caught.value.reason is Reason.FILE_NOT_FOUND
    # A live process of this user's (this one): another serve's exit leaves its serve.json.
    state = ServeState(url="http://127.0.0.1:5000", token_file=directory / "t", pid=os.getpid())
    path = write_serve_state(directory, state)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_serve_state(directory) == state
    forget_serve(directory, pid=999)
    assert read_serve_state(directory) == state
    forget_serve(directory, pid=os.getpid())
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


@pytest.mark.timeout(20)
def test_a_fifo_given_as_the_token_file_is_refused_without_being_opened(tmp_path: Path) -> None:
    # status --token-file names any path: a FIFO there had been opened (without waiting),
    # which let a writer blocked on it go on, only to die of SIGPIPE once it was closed.
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", 'echo token > "$0"', str(fifo)])
    try:
        time.sleep(0.2)
        assert writer.poll() is None
        with pytest.raises(SessionFileError) as caught:
            read_token_file(fifo)
        assert caught.value.reason is Reason.STORE_ERROR
        time.sleep(0.3)
        assert writer.poll() is None  # still waiting for a reader: never opened
    finally:
        writer.kill()
        writer.wait()


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


# --- several serves sharing one state directory ---------------------------------------------


def _record_live_serve(directory: Path, taker: PortTaker) -> ServeState:
    """What a ``serve`` listening where ``taker`` listens records once ready."""
    token_file = write_token_file(directory, new_token(), port=taker.port)
    state = ServeState(url=taker.url, token_file=token_file, pid=taker.pid)
    record_serve(directory, state)
    return state


def test_each_serve_keeps_its_own_record_and_serve_json_follows_the_live_ones(
    tmp_path: Path,
) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    with port_taker() as first_taker, port_taker() as second_taker:
        first = _record_live_serve(directory, first_taker)
        second = _record_live_serve(directory, second_taker)
        # The second did not overwrite the first: both are recorded, the latest in serve.json.
        assert read_serve_state(directory) == second
        assert read_serve_records(directory) == [second, first]
        assert read_recorded_serves(directory) == [second, first]
        for state in (first, second):
            record = directory / f"serve-{state.pid}.json"
            assert stat.S_IMODE(record.stat().st_mode) == 0o600
        # The latest exits: serve.json names the one still alive instead of disappearing.
        second.token_file.unlink()
        forget_serve(directory, pid=second.pid)
        assert read_serve_state(directory) == first
        assert read_serve_records(directory) == [first]
        # One that serve.json does not name exits: serve.json stays as it is.
        third = _record_live_serve(directory, second_taker)
        first.token_file.unlink()
        forget_serve(directory, pid=first.pid)
        assert read_serve_state(directory) == third
        # The last one exits: nothing is left.
        third.token_file.unlink()
        forget_serve(directory, pid=third.pid)
        first_taker.stop()
        second_taker.stop()
    assert list(directory.iterdir()) == []


def test_serve_json_is_removed_when_no_other_serve_is_alive(tmp_path: Path) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    with port_taker() as gone_taker, port_taker() as taker:
        gone = _record_live_serve(directory, gone_taker)
        latest = _record_live_serve(directory, taker)
        gone_taker.stop()
        assert wait_for(lambda: not is_serving(gone), 10)
        latest.token_file.unlink()
        forget_serve(directory, pid=latest.pid)
        taker.stop()
    # The record of a serve that is no longer alive is no reason to keep serve.json.
    assert not (directory / "serve.json").exists()
    assert list(directory.iterdir()) == []


def test_serve_json_naming_a_killed_serve_follows_the_live_ones_when_another_exits(
    tmp_path: Path,
) -> None:
    # The latest serve is killed (SIGKILL: it cannot clean up), so serve.json names it. When
    # another serve exits, the killed one's record and token file go, and serve.json with them:
    # it names the most recently started serve still alive, or is removed.
    directory = prepare_state_dir(tmp_path / "state")
    with port_taker() as first_taker, port_taker() as second_taker, port_taker() as killed_taker:
        first = _record_live_serve(directory, first_taker)
        second = _record_live_serve(directory, second_taker)
        killed = _record_live_serve(directory, killed_taker)
        assert read_serve_state(directory) == killed
        killed_taker.stop()
        assert wait_for(lambda: not psutil.pid_exists(killed.pid), 10)
        second.token_file.unlink()
        forget_serve(directory, pid=second.pid)
        assert not killed.token_file.exists()
        assert read_serve_state(directory) == first
        first.token_file.unlink()
        forget_serve(directory, pid=first.pid)
        first_taker.stop()
        second_taker.stop()
    assert list(directory.iterdir()) == []


def test_records_of_serves_that_died_are_removed_with_their_token_files(tmp_path: Path) -> None:
    # What a serve killed with SIGKILL leaves: its record and token file, its pid gone.
    directory = prepare_state_dir(tmp_path / "state")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead_token = write_token_file(directory, new_token(), port=4400)
    dead = ServeState(url="http://127.0.0.1:4400", token_file=dead_token, pid=gone.pid)
    (directory / f"serve-{gone.pid}.json").write_text(json.dumps(dead.to_dict()))
    (directory / f"serve-{gone.pid}.json").chmod(0o600)
    with port_taker() as taker:
        alive = _record_live_serve(directory, taker)
        taker.stop()
    assert not (directory / f"serve-{gone.pid}.json").exists()
    assert not dead_token.exists()
    assert read_serve_records(directory) == [alive]
    assert alive.token_file.exists()


def test_recording_waits_while_another_serve_updates_the_state_files(tmp_path: Path) -> None:
    # Another serve starting or exiting holds the directory's lock: this one must not replace
    # serve.json under it (it would undo the other's update), but wait and then record itself.
    import fcntl
    import threading

    directory = prepare_state_dir(tmp_path / "state")
    other = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        with port_taker() as taker:
            recorded: list[ServeState] = []
            recording = threading.Thread(
                target=lambda: recorded.append(_record_live_serve(directory, taker))
            )
            recording.start()
            recording.join(timeout=1)
            assert recording.is_alive()
            assert not (directory / "serve.json").exists()
            assert not (directory / f"serve-{taker.pid}.json").exists()
            fcntl.flock(other, fcntl.LOCK_UN)
            recording.join(timeout=10)
            assert not recording.is_alive()
            assert read_serve_state(directory) == recorded[0]
            taker.stop()
    finally:
        os.close(other)


def test_a_record_whose_pid_still_runs_is_kept_but_not_followed(tmp_path: Path) -> None:
    # Its pid runs but does not listen where it recorded: a serve that cannot be inspected just
    # now, or a pid reused after a SIGKILL. Its files stay (removing a live serve's token file
    # would lock its clients out), and serve.json never names it in place of a live serve.
    directory = prepare_state_dir(tmp_path / "state")
    with subprocess.Popen(["sleep", "60"]) as sleeper:
        try:
            token_file = write_token_file(directory, new_token(), port=4401)
            quiet = ServeState(url="http://127.0.0.1:4401", token_file=token_file, pid=sleeper.pid)
            record_serve(directory, quiet)
            with port_taker() as taker:
                latest = _record_live_serve(directory, taker)
                assert (directory / f"serve-{sleeper.pid}.json").exists()
                latest.token_file.unlink()
                forget_serve(directory, pid=latest.pid)
                taker.stop()
            assert not (directory / "serve.json").exists()
            assert read_serve_records(directory) == [quiet]
            assert token_file.exists()
        finally:
            sleeper.kill()


@pytest.mark.parametrize(
    "case",
    [
        "readable by others",
        "readable by the group",
        "a pid other than its name's",
        "a token file outside the state dir",
        pytest.param("another user's", marks=needs_root),
    ],
)
def test_a_record_not_as_serve_writes_it_is_refused(tmp_path: Path, case: str) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    state = _write_session(directory)
    record = directory / f"serve-{state.pid}.json"
    write_serve_state(directory, state)
    (directory / "serve.json").rename(record)
    assert read_serve_records(directory) == [state]
    if case == "readable by others":
        record.chmod(0o604)
    elif case == "readable by the group":
        record.chmod(0o640)
    elif case == "a pid other than its name's":
        record.rename(directory / f"serve-{state.pid + 1}.json")
    elif case == "a token file outside the state dir":
        elsewhere = write_token_file(prepare_state_dir(tmp_path / "elsewhere"), new_token(), port=1)
        record.unlink()
        write_serve_state(directory, ServeState(url=state.url, token_file=elsewhere, pid=state.pid))
        (directory / "serve.json").rename(record)
    else:
        os.chown(record, OTHER_UID, OTHER_UID)
    for read in (read_serve_records, read_recorded_serves):
        with pytest.raises(SessionFileError) as caught:
            read(directory)
        assert caught.value.reason is Reason.STORE_ERROR


def test_nothing_recorded_is_file_not_found(tmp_path: Path) -> None:
    directory = prepare_state_dir(tmp_path / "state")
    (directory / "serve-x.json").write_text("not a record's name")
    with pytest.raises(SessionFileError) as caught:
        read_recorded_serves(directory)
    assert caught.value.reason is Reason.FILE_NOT_FOUND
    with pytest.raises(SessionFileError) as caught:
        read_recorded_serves(tmp_path / "missing")
    assert caught.value.reason is Reason.FILE_NOT_FOUND


#: A serve in a pid namespace of its own: it records itself from there, then waits for its
#: stdin to close. Its pid is a number in that namespace only.
_SANDBOXED_SERVE = """
import os, socket, sys
from pathlib import Path
from companion_runtime.bind.session import ServeState, new_token, record_serve, write_token_file
directory = Path(sys.argv[1])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
port = listener.getsockname()[1]
token_file = write_token_file(directory, new_token(), port=port)
state = ServeState(url=f"http://127.0.0.1:{port}", token_file=token_file, pid=os.getpid())
record_serve(directory, state)
print(os.getpid(), flush=True)
sys.stdin.read()
"""


needs_namespaces = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a pid namespace of its own needs Linux, root and unshare",
)


@needs_namespaces
def test_a_serve_in_another_pid_namespace_keeps_its_record_and_token_file(
    tmp_path: Path,
) -> None:
    # A sandbox (bwrap --unshare-pid, a container) sharing the state directory: its serve's pid
    # names no process out here. Taken for gone, its record and token file were removed by the
    # next serve to start or exit here, and its clients could no longer read the token.
    directory = prepare_state_dir(tmp_path / "state")
    # The next pid in the new namespace is set high, so that it names no process out here.
    script = 'echo 3999990 > /proc/sys/kernel/ns_last_pid && "$@"'
    command = ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script, "sh"]
    sandbox = subprocess.Popen(
        [*command, sys.executable, "-c", _SANDBOXED_SERVE, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert sandbox.stdout is not None and sandbox.stdin is not None
        line = sandbox.stdout.readline()
        if not line:
            pytest.skip("unshare could not make a pid namespace here")
        inner_pid = int(line)
        if psutil.pid_exists(inner_pid):
            pytest.skip("the sandbox's pid names a process out here too")
        # Named for its pid namespace too: another sandbox's serve may have the same pid.
        (record,) = directory.glob(f"serve-{inner_pid}-*.json")
        sandboxed = read_serve_state(directory)
        assert sandboxed.pid == inner_pid and record.exists()
        with port_taker() as taker:
            latest = _record_live_serve(directory, taker)
            # Never asked from here: its pid means nothing here.
            assert not is_serving(sandboxed)
            assert record.exists() and sandboxed.token_file.exists()
            latest.token_file.unlink()
            forget_serve(directory, pid=latest.pid)
            taker.stop()
        assert record.exists() and sandboxed.token_file.exists()
        assert read_serve_records(directory) == [sandboxed]
    finally:
        if sandbox.stdin is not None:
            sandbox.stdin.close()
        try:
            sandbox.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(sandbox.pid, signal.SIGKILL)
            sandbox.wait()


#: Two serves in one sandbox: prints their pids, then waits for its stdin to close.
_SANDBOX_OF_TWO = """
import subprocess, sys
serves = [
    subprocess.Popen(
        [sys.executable, "-c", sys.argv[2], sys.argv[1]],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    for _serve in range(2)
]
pids = []
for serve in serves:
    pids.append(serve.stdout.readline().strip())
print(*pids, flush=True)
sys.stdin.read()
for serve in serves:
    serve.stdin.close()
    serve.wait()
"""


@needs_namespaces
def test_a_sandbox_without_a_proc_of_its_own_removes_no_live_serve_s_files(
    tmp_path: Path,
) -> None:
    # A pid namespace whose /proc is still the machine's (bwrap --unshare-pid --dev-bind / /,
    # unshare --pid --fork without --mount-proc): its pids are looked up there, where they name
    # other processes or none. The second serve to start in it took the first, alive, for
    # gone, and removed its record and token file.
    directory = prepare_state_dir(tmp_path / "state")
    script = 'echo 3999990 > /proc/sys/kernel/ns_last_pid && "$@"'
    command = ["unshare", "--pid", "--fork", "sh", "-c", script, "sh"]
    sandbox = subprocess.Popen(
        [*command, sys.executable, "-c", _SANDBOX_OF_TWO, str(directory), _SANDBOXED_SERVE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert sandbox.stdout is not None and sandbox.stdin is not None
        line = sandbox.stdout.readline().split()
        if len(line) != 2:
            pytest.skip("unshare could not make a pid namespace here")
        first, second = (int(pid) for pid in line)
        if psutil.pid_exists(first) or first == second:
            pytest.skip("the sandbox's pid names a process out here too")
        # Both records stay, each with its token file.
        assert len(list(directory.glob(f"serve-{first}-*.json"))) == 1
        assert len(list(directory.glob(f"serve-{second}-*.json"))) == 1
        assert len(list(directory.glob("frontdoor-*.token"))) == 2
    finally:
        if sandbox.stdin is not None:
            sandbox.stdin.close()
        try:
            sandbox.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(sandbox.pid, signal.SIGKILL)
            sandbox.wait()


#: A serve in a pid namespace of its own that cleans up when its stdin closes, as serve does.
_SANDBOXED_SERVE_THAT_EXITS = (
    _SANDBOXED_SERVE
    + """
from companion_runtime.bind.session import forget_serve
token_file.unlink()
forget_serve(directory, pid=os.getpid())
"""
)


@needs_namespaces
def test_serves_with_one_pid_in_two_pid_namespaces_keep_a_record_each(tmp_path: Path) -> None:
    # Two sandboxes sharing the state directory, whose serves have the same pid number (each
    # the first process its sandbox started): both wrote serve-<pid>.json, the later replaced
    # the earlier's record, and the earlier, exiting, removed the later's, which status could
    # then no longer find.
    directory = prepare_state_dir(tmp_path / "state")
    script = 'echo 3999990 > /proc/sys/kernel/ns_last_pid && "$@"'
    command = ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script, "sh"]
    sandboxes = []
    try:
        pids = []
        for _sandbox in range(2):
            sandbox = subprocess.Popen(
                [*command, sys.executable, "-c", _SANDBOXED_SERVE_THAT_EXITS, str(directory)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            sandboxes.append(sandbox)
            assert sandbox.stdout is not None
            line = sandbox.stdout.readline()
            if not line:
                pytest.skip("unshare could not make a pid namespace here")
            pids.append(int(line))
        if pids[0] != pids[1]:
            pytest.skip("the two sandboxes' serves did not get the same pid")
        first, second = read_serve_records(directory)[::-1]
        assert (first.pid, second.pid) == (pids[0], pids[0])
        assert first.pid_ns != second.pid_ns and first.url != second.url
        assert [state.url for state in read_recorded_serves(directory)] == [second.url, first.url]
        # The first exits: its record and token file go, the second's stay.
        first_sandbox = sandboxes[0]
        assert first_sandbox.stdin is not None
        first_sandbox.stdin.close()
        first_sandbox.wait(timeout=30)
        assert [state.url for state in read_serve_records(directory)] == [second.url]
        assert second.token_file.exists() and not first.token_file.exists()
    finally:
        for sandbox in sandboxes:
            if sandbox.stdin is not None and not sandbox.stdin.closed:
                sandbox.stdin.close()
            try:
                sandbox.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(sandbox.pid, signal.SIGKILL)
                sandbox.wait()


def test_a_serve_with_the_pid_of_one_killed_before_gets_its_own_token_file(
    tmp_path: Path,
) -> None:
    # The pid of a serve killed with SIGKILL, reused by the next serve (a container run again
    # gets the same pids), on the same port: the dead one's token file had the very name the
    # new one wanted, and the new serve was refused. It now writes its own and, replacing the
    # dead one's record, removes the token file that record named.
    directory = prepare_state_dir(tmp_path / "state")
    port = free_port()
    killed_token = write_token_file(directory, new_token(), port=port)
    killed = ServeState(url=f"http://127.0.0.1:{port}", token_file=killed_token, pid=os.getpid())
    record_serve(directory, killed)
    with socket.socket() as listener:
        # This process, as the next serve, listens where the killed one did.
        listener.bind(("127.0.0.1", port))
        listener.listen()
        token_file = write_token_file(directory, new_token(), port=port)
        assert token_file != killed_token and killed_token.exists()
        assert stat.S_IMODE(token_file.lstat().st_mode) == 0o600
        latest = ServeState(url=killed.url, token_file=token_file, pid=os.getpid())
        record_serve(directory, latest)
    # It listens where the killed one did: nothing tells the killed one's token file from that
    # of another serve in this same process, so it stays (only a left-over file).
    assert killed_token.exists()
    killed_token.unlink()
    assert read_serve_records(directory) == [latest]
    # On another port, the record it replaces is of a serve that is gone: its token file goes.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        token_file = write_token_file(directory, new_token(), port=port)
        assert token_file != latest.token_file
        latest, replaced = ServeState(url=url, token_file=token_file, pid=os.getpid()), latest
        record_serve(directory, latest)
    assert not replaced.token_file.exists()
    assert read_serve_records(directory) == [latest]
    assert sorted(path.name for path in directory.iterdir()) == sorted(
        ["serve.json", f"serve-{os.getpid()}.json", token_file.name]
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@needs_namespaces
def test_a_record_from_a_container_s_own_path_for_the_directory_hides_no_serve(
    tmp_path: Path,
) -> None:
    # A container that mounts the state directory at a path of its own: its serve records a
    # token file under that path, which out here is another directory. That record made every
    # record unreadable out here (store_error), so status could ask no serve at all.
    directory = prepare_state_dir(tmp_path / "state")
    inside = tmp_path / "inside"
    inside.mkdir(mode=0o700)
    script = (
        'mount --bind "$0" "$1" && echo 3999990 > /proc/sys/kernel/ns_last_pid && "$2" -c "$3" "$1"'
    )
    unshare = ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script]
    sandbox = subprocess.Popen(
        [*unshare, str(directory), str(inside), sys.executable, _SANDBOXED_SERVE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert sandbox.stdout is not None and sandbox.stdin is not None
        line = sandbox.stdout.readline()
        if not line:
            pytest.skip("unshare could not make the namespaces here")
        inner_pid = int(line)
        (record,) = directory.glob(f"serve-{inner_pid}-*.json")
        with port_taker() as taker:
            latest = _record_live_serve(directory, taker)
            recorded = read_recorded_serves(directory)
            assert [state.pid for state in recorded] == [latest.pid, inner_pid]
            assert [state for state in recorded if is_serving(state)] == [latest]
            latest.token_file.unlink()
            forget_serve(directory, pid=latest.pid)
            taker.stop()
        assert record.exists()
    finally:
        if sandbox.stdin is not None:
            sandbox.stdin.close()
        try:
            sandbox.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(sandbox.pid, signal.SIGKILL)
            sandbox.wait()


def test_a_relative_state_dir_is_recorded_as_an_absolute_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The token file's path goes into the records; a client in another directory must find it.
    monkeypatch.chdir(tmp_path)
    directory = default_state_dir({STATE_DIR_ENV: "state"})
    assert directory == tmp_path / "state"
    prepare_state_dir(directory)
    state = _write_session(directory)
    assert state.token_file.is_absolute()
    monkeypatch.chdir("/")
    assert read_serve_state(directory).token_file == state.token_file
    assert read_token_file(read_serve_state(directory).token_file) == read_token_file(
        state.token_file
    )


def test_temp_files_a_killed_writer_left_are_swept_and_no_others(tmp_path: Path) -> None:
    # A serve killed between creating a state file's temp copy and renaming it leaves the
    # copy; the next serve to record itself removes it once it is stale and its writer gone.
    directory = prepare_state_dir(tmp_path / "state")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    hour_ago = time.time() - 2 * 3600
    minute_ago = time.time() - 120
    files = {
        f".serve-{gone.pid}.json.{gone.pid}.0123abcd": (minute_ago, False),  # writer gone
        f".serve.json.{gone.pid}.89abcdef": (minute_ago, False),
        f".serve.json.{os.getpid()}.00000000": (minute_ago, True),  # writer alive
        f".serve.json.{os.getpid()}.11111111": (hour_ago, False),  # abandoned whatever pid
        f".serve.json.{gone.pid}.22222222": (time.time(), True),  # may still be renamed
        f".serve.json.{gone.pid}.notmine": (hour_ago, True),  # not a name serve writes
        f"other.{gone.pid}.33333333": (hour_ago, True),
    }
    for name, (written, _kept) in files.items():
        (directory / name).write_text("{}")
        os.utime(directory / name, (written, written))
    with port_taker() as taker:
        _record_live_serve(directory, taker)
        taker.stop()
    left = {name for name in os.listdir(directory) if name in files}
    assert left == {name for name, (_written, kept) in files.items() if kept}


@pytest.mark.security
@pytest.mark.parametrize("mode", [0o777, 0o773, 0o757], ids=["all", "others", "others-no-read"])
@pytest.mark.parametrize("through", ["path", "symlink"])
def test_a_state_dir_inside_a_directory_others_can_write_to_is_refused(
    tmp_path: Path, mode: int, through: str
) -> None:
    # Whoever can rename entries of a directory above the state directory can move it aside
    # and put one of their own at its path, with the records and token file status trusts.
    # Only the state directory itself had been checked.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    real = shared / "state"
    directory = real if through == "path" else tmp_path / "elsewhere" / "state"
    if through == "symlink":
        real.mkdir(mode=0o700)
        (tmp_path / "elsewhere").symlink_to(shared)
    with pytest.raises(SessionFileError) as caught:
        prepare_state_dir(directory)
    assert caught.value.reason is Reason.STORE_ERROR
    real.mkdir(mode=0o700, exist_ok=True)
    for check in (check_state_dir, read_serve_state):
        with pytest.raises(SessionFileError) as caught:
            check(directory)
        assert caught.value.reason is Reason.STORE_ERROR
    shared.chmod(mode | stat.S_ISVTX)  # sticky, like /tmp: only an entry's owner renames it
    assert prepare_state_dir(directory) == directory
    shared.chmod(0o775)  # group write on a directory of this user's own: its own group
    assert prepare_state_dir(directory) == directory


@pytest.mark.security
def test_a_state_dir_reached_through_a_symlink_in_a_directory_others_can_write_to_is_refused(
    tmp_path: Path,
) -> None:
    # home/run/state, where home/run -> shared/run and shared/run -> safe, but shared may be
    # written by anyone, who could point "run" elsewhere: that directory is neither above the
    # state directory as written nor where it resolves, and had not been looked at.
    safe = tmp_path / "safe"
    (safe / "state").mkdir(parents=True, mode=0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "run").symlink_to(safe)
    home = tmp_path / "home"
    home.mkdir()
    (home / "run").symlink_to(shared / "run")
    directory = home / "run" / "state"
    for check in (prepare_state_dir, check_state_dir):
        with pytest.raises(SessionFileError) as caught:
            check(directory)
        assert caught.value.reason is Reason.STORE_ERROR
    shared.chmod(0o1777)  # sticky, like /tmp: only the symlink's owner can replace it
    assert check_state_dir(directory) == directory


@pytest.mark.security
@pytest.mark.skipif(os.geteuid() != 0, reason="a symlink of another user needs root")
def test_a_state_dir_through_another_user_s_symlink_in_a_sticky_directory_is_refused(
    tmp_path: Path,
) -> None:
    # With XDG_RUNTIME_DIR unset the state directory is under /tmp/runtime-<uid>, a name
    # another user can create first: as a symlink into a directory of the user's own it
    # passed, and its owner could point it elsewhere at any time.
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    mine = tmp_path / "mine"
    (mine / "companion-runtime").mkdir(parents=True, mode=0o700)
    link = sticky / "runtime"
    link.symlink_to(mine)
    os.lchown(link, 65534, 65534)
    directory = link / "companion-runtime"
    for check in (prepare_state_dir, check_state_dir):
        with pytest.raises(SessionFileError) as caught:
            check(directory)
        assert caught.value.reason is Reason.STORE_ERROR
    os.lchown(link, os.getuid(), os.getgid())
    assert check_state_dir(directory) == directory


@pytest.mark.security
def test_no_state_dir_is_made_where_a_symlink_others_control_leads(tmp_path: Path) -> None:
    # The state directory had been made first and refused afterwards, wherever a symlink in
    # a directory anyone can write sent the mkdir.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    (shared / "run").symlink_to(mine)
    with pytest.raises(SessionFileError) as caught:
        prepare_state_dir(shared / "run" / "deeper" / "companion-runtime")
    assert caught.value.reason is Reason.STORE_ERROR
    assert list(mine.iterdir()) == []


@pytest.mark.security
def test_a_state_dir_inside_a_directory_an_acl_lets_another_user_write_to_is_refused(
    tmp_path: Path,
) -> None:
    # With an access ACL naming another user, the group bits are its mask: the directory
    # showed as writable by the user's own group only, and was accepted.
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    directory = shared / "state"
    assert prepare_state_dir(directory) == directory
    grant_write_by_acl(shared, 65534)
    assert shared.stat().st_mode & stat.S_IWGRP and shared.stat().st_gid == os.getegid()
    for check in (prepare_state_dir, check_state_dir):
        with pytest.raises(SessionFileError) as caught:
            check(directory)
        assert caught.value.reason is Reason.STORE_ERROR


@pytest.mark.security
@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_state_dir_inside_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    # Its owner can rename the state directory away whatever its mode.
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(SessionFileError):
        prepare_state_dir(theirs / "state")
    os.chown(theirs, 0, 0)
    prepare_state_dir(theirs / "state")


@pytest.mark.parametrize("given", [b"", b"tokentokentoken"], ids=["nothing", "part"])
def test_a_token_file_with_no_bytes_to_give_for_now_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: bytes
) -> None:
    # Read non-blocking, such a file (/proc/kmsg, a file in user space) answers None: status
    # ended in a TypeError traceback, or sent what came before it as the whole token.
    path = tmp_path / "front.token"
    path.write_text("tokentokentoken-and-the-rest\n")
    monkeypatch.setattr(
        os, "fdopen", opener_that_would_block(os.fdopen, inode=path.stat().st_ino, given=given)
    )
    with pytest.raises(SessionFileError) as caught:
        read_token_file(path)
    assert caught.value.reason is Reason.STORE_ERROR
