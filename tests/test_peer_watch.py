"""A sharded server notices a process of its ring group going away by the group's own
connections (gemma4_mlx/peer_watch.py), where MLX's ring backend leaves a collective waiting
forever; the worker then answers the running job and stops (Worker.peer_lost)."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from gemma4_mlx import peer_watch
from gemma4_mlx.server_api import GenerationRequest
from gemma4_mlx.server_worker import Failed, Job, Worker


@pytest.fixture
def tcp_pair():
    """A connected pair of TCP sockets over 127.0.0.1, and the listener closed (as the ring's is)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    near = socket.create_connection(listener.getsockname())
    far, _ = listener.accept()
    listener.close()
    yield near, far
    near.close()
    far.close()


def test_a_live_connection_is_not_closed_and_pending_data_stays_to_be_read(tcp_pair):
    near, far = tcp_pair
    assert peer_watch.closed_by_peer(near) is None
    far.sendall(b"abc")
    time.sleep(0.05)
    assert peer_watch.closed_by_peer(near) is None
    assert near.recv(3) == b"abc"  # the peek consumed nothing


def test_a_connection_the_peer_closed_reads_as_closed(tcp_pair):
    near, far = tcp_pair
    far.close()
    time.sleep(0.05)
    assert peer_watch.closed_by_peer(near) == "its connection closed"


def test_the_group_connections_are_the_tcp_ones_at_a_hostfile_address(tcp_pair):
    """Both ends of a connection at a rank's address: the one that connected to it and the one
    accepted there; not a listening socket at the same address, nor a connection elsewhere."""
    near, far = tcp_pair
    address = far.getsockname()[:2]
    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind(("127.0.0.1", 0))
    listening.listen(1)
    other = socket.create_connection(listening.getsockname())
    try:
        found = peer_watch.peer_connections({address})
        try:
            ends = {c.getsockname()[:2] for c in found}
            assert ends == {near.getsockname()[:2], far.getsockname()[:2]}
        finally:
            for c in found:
                c.close()
        assert peer_watch.peer_connections({("192.0.2.1", 5000)}) == []
    finally:
        other.close()
        listening.close()
    assert peer_watch.closed_by_peer(near) is None  # closing the duplicates left the originals open
    assert peer_watch.closed_by_peer(far) is None


def test_hostfile_addresses(tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([["10.0.0.1:5000", "10.0.0.1:5001"], ["10.0.0.2:5000"]]))
    assert peer_watch.hostfile_addresses(str(hostfile)) == {("10.0.0.1", 5000), ("10.0.0.1", 5001),
                                                            ("10.0.0.2", 5000)}
    for bad in ("not json", json.dumps([["10.0.0.1"]]), json.dumps([["10.0.0.1:port"]])):
        hostfile.write_text(bad)
        assert peer_watch.hostfile_addresses(str(hostfile)) == set(), bad
    hostfile.write_text(json.dumps([["localhost:5000"]]))  # a name: its addresses too
    assert ("127.0.0.1", 5000) in peer_watch.hostfile_addresses(str(hostfile))
    assert peer_watch.hostfile_addresses(str(tmp_path / "missing.json")) == set()
    assert peer_watch.hostfile_addresses("") == set()


def test_the_watch_tells_once_when_a_connection_ends(tcp_pair):
    near, far = tcp_pair
    told = []
    done = threading.Event()
    watch = peer_watch.PeerWatch([near], lambda why: told.append(why) or done.set(), interval=0.02).start()
    time.sleep(0.1)
    assert not told
    far.close()
    assert done.wait(5)
    watch._thread.join(5)
    assert not watch._thread.is_alive() and told == ["its connection closed"]


def test_a_watch_without_connections_does_nothing():
    watch = peer_watch.PeerWatch([], lambda why: pytest.fail("told")).start()
    assert not watch._thread.is_alive()


def _worker():
    return Worker(lambda: pytest.fail("not loaded here"))


def _job():
    return Job(GenerationRequest(kind="completion", prompt=[1, 2], max_tokens=4, temperature=0.0, top_p=1.0,
                                 top_k=0, min_p=0.0))


def test_a_lost_peer_answers_the_running_job_and_breaks_the_worker():
    """The generation thread may be stuck in a collective that never ends: the job still gets its
    answer and the server its reason to stop."""
    worker, job = _worker(), _job()
    worker._admitted, worker._current = 1, job
    stopped = []
    worker.on_fatal = stopped.append
    worker.peer_lost("its connection closed", grace=0.01)
    event = job.events.get_nowait()
    assert isinstance(event, Failed) and event.status == 503
    assert "another process of the group is gone (its connection closed)" in event.message
    assert job.outcome == "failed" and worker.fatal == stopped[0] and "is gone" in worker.fatal
    assert worker._admitted == 0 and not worker.alive()
    # the stuck thread answering the same job later changes nothing
    worker._finish(job, "finished", "late")
    assert job.events.empty() and job.outcome == "failed" and worker._admitted == 0 and worker.completed == 1


def test_a_lost_peer_leaves_alone_a_worker_that_failed_on_its_own():
    """MLX raised in the generation thread within the grace: its answer stands."""
    worker, job = _worker(), _job()
    worker._admitted, worker._current = 1, job
    threading.Timer(0.05, worker._broken, args=("another process of the group is gone ([ring] lost)",)).start()
    worker.peer_lost("its connection closed", grace=5)
    assert job.outcome is None and worker.fatal.endswith("([ring] lost)")
