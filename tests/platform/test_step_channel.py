"""The step channel (platform.step_channel) on its own: no Ray, a server thread and a client on a loop."""

import asyncio
import socket
import threading
import time

import pytest

from expertpool.platform.step_channel import ChannelClient, ChannelClosed, ChannelServer, StepDropped


class Runner:
    """Records what ran, in order; a step of ``["boom"]`` raises, ``["slow"]`` waits for ``gate``."""

    def __init__(self):
        self.log: list[tuple[str, list]] = []
        self.gate = threading.Event()
        self.started = threading.Event()

    def step(self, items):
        self.log.append(("step", list(items)))
        if items == ["boom"]:
            raise ValueError("bad step")
        if items == ["slow"]:
            self.started.set()
            assert self.gate.wait(10)
        if items == ["unpicklable"]:
            raise _Unpicklable()
        return [x * 2 if isinstance(x, int) else x for x in items]

    def release(self, ids):
        self.log.append(("release", list(ids)))


class _Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("cannot pickle this")


@pytest.fixture
def server():
    runner = Runner()
    srv = ChannelServer(runner.step, runner.release, threading.RLock(), "127.0.0.1")
    yield srv, runner
    runner.gate.set()
    srv.close()


def test_steps_and_releases_run_in_order_and_answer_in_order(server):
    srv, runner = server

    async def main():
        c = ChannelClient(srv.address, srv.token, rank=0)
        f1 = c.submit([1, 2])
        c.release(["a"])
        f2 = c.submit([3])
        big = list(range(200_000))  # a frame larger than the socket buffers: written in parts
        f3 = c.submit(big)
        out = await asyncio.wait_for(asyncio.gather(f1, f2, f3), 10)
        c.close()
        return out

    r1, r2, r3 = asyncio.run(main())
    assert r1 == [2, 4] and r2 == [6] and r3 == [2 * x for x in range(200_000)]
    assert [k for k, _ in runner.log] == ["step", "release", "step", "step"]
    assert runner.log[1] == ("release", ["a"])


def test_a_step_that_raises_answers_with_its_exception_and_the_next_still_runs(server):
    srv, _ = server

    async def main():
        c = ChannelClient(srv.address, srv.token, rank=3)
        bad, nope, good = c.submit(["boom"]), c.submit(["unpicklable"]), c.submit([5])
        with pytest.raises(ValueError, match="bad step"):
            await asyncio.wait_for(bad, 10)
        with pytest.raises(RuntimeError, match="_Unpicklable"):
            await asyncio.wait_for(nope, 10)
        assert await asyncio.wait_for(good, 10) == [10]
        c.close()

    asyncio.run(main())


def test_drop_answers_the_queued_steps_without_running_them_and_spares_the_next_connection(server):
    srv, runner = server

    async def main():
        c = ChannelClient(srv.address, srv.token, rank=0)
        running, queued = c.submit(["slow"]), c.submit([7])
        await asyncio.to_thread(runner.started.wait, 10)
        srv.drop(b"another connection")  # not this one: nothing changes
        srv.drop(c.conn_id)
        runner.gate.set()
        assert await asyncio.wait_for(running, 10) == ["slow"]
        with pytest.raises(StepDropped):
            await asyncio.wait_for(queued, 10)
        c.close()
        c2 = ChannelClient(srv.address, srv.token, rank=0)  # a new connection runs its steps again
        out = await asyncio.wait_for(c2.submit([8]), 10)
        c2.close()
        return out

    assert asyncio.run(main()) == [16]
    assert [items for _, items in runner.log] == [["slow"], [8]]


def test_closing_fails_every_step_in_flight_and_later_submits(server):
    srv, runner = server

    async def main():
        c = ChannelClient(srv.address, srv.token, rank=1)
        running = c.submit(["slow"])
        await asyncio.to_thread(runner.started.wait, 10)
        c.close("test")
        with pytest.raises(ChannelClosed, match="rank 1: test"):
            await running
        with pytest.raises(ChannelClosed):
            await c.submit([1])
        runner.gate.set()

    asyncio.run(main())


def test_a_dead_peer_fails_the_steps_in_flight_at_once():
    """The actor's process dying closes its sockets: the replica's futures fail without a timeout."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept_then_die():
        conn, _ = listener.accept()
        conn.recv(64)  # token and connection id
        accepted.append(conn)
        time.sleep(0.2)
        conn.close()  # as the kernel does when the process dies

    t = threading.Thread(target=accept_then_die)
    t.start()

    async def main():
        c = ChannelClient(listener.getsockname(), b"x" * 16, rank=2)
        f = c.submit([1])
        t0 = time.monotonic()
        # a close with the step frame unread resets the connection instead of ending it: both are a death
        with pytest.raises(ChannelClosed, match="rank 2: (the actor closed the connection|.*reset by peer)"):
            await asyncio.wait_for(f, 10)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 5
    t.join()
    listener.close()


def test_a_connection_without_the_token_is_refused_before_anything_is_unpickled(server):
    srv, runner = server

    async def main():
        c = ChannelClient(srv.address, b"\0" * 16, rank=0)
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(c.submit([1]), 10)

    asyncio.run(main())
    assert runner.log == []
    # the server goes on serving the right token
    async def right():
        c = ChannelClient(srv.address, srv.token, rank=0)
        out = await asyncio.wait_for(c.submit([4]), 10)
        c.close()
        return out

    assert asyncio.run(right()) == [8]


def test_steps_hold_the_lock_the_actor_methods_hold(server):
    """While another holder has the worker's lock, a channel step waits for it."""
    lock = threading.RLock()
    runner = Runner()
    srv = ChannelServer(runner.step, runner.release, lock, "127.0.0.1")

    async def main():
        c = ChannelClient(srv.address, srv.token, rank=0)
        with lock:
            f = c.submit([1])
            await asyncio.sleep(0.3)
            assert not f.done() and runner.log == []
        out = await asyncio.wait_for(f, 10)
        c.close()
        return out

    try:
        assert asyncio.run(main()) == [2]
    finally:
        srv.close()


def test_the_switch_between_channels_and_actor_tasks(monkeypatch):
    """Step channels by default and for 1; Ray actor tasks for 0; anything else is refused."""
    from types import SimpleNamespace

    from expertpool.platform.executor import RayExecutor

    spec = SimpleNamespace(collective_timeout_s=1.0)
    for mode, world, want in [("", 1, True), ("1", 2, True), ("0", 1, False), ("0", 2, False)]:
        monkeypatch.setenv("EXPERTPOOL_STEP_CHANNEL", mode)
        assert RayExecutor(spec, [{}] * world).use_channels is want, (mode, world)
    monkeypatch.delenv("EXPERTPOOL_STEP_CHANNEL")
    assert RayExecutor(spec, [{}]).use_channels
    monkeypatch.setenv("EXPERTPOOL_STEP_CHANNEL", "auto")
    with pytest.raises(ValueError, match="use 1 .step channels. or 0"):
        RayExecutor(spec, [{}])
