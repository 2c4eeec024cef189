"""The shared-memory all-to-all (``model.shm_exchange``), its ranks as threads of one process: the
bytes each rank receives are what ``all_to_all_single`` defines, for uneven splits, empty pairs and
messages many slots long; a dead peer, an abort and a timeout each raise ``PeerGone`` naming what
happened; a segment that is not the group's is refused. (Across processes and against gloo:
tests/model/test_dispatch.py.)"""

import os
import subprocess
import threading
import time

import pytest
import torch

from expertpool.kernels import cpu_experts
from expertpool.model.shm_exchange import PeerGone, ShmExchange, slot_bytes_for, supported

x86_only = pytest.mark.skipif(not supported(), reason="shared-memory exchange: x86 with /dev/shm only")
# the loop in C (kernels/csrc/shm_ring.c: futex waits) and the Python loop (naps), the same protocol
LOOPS = pytest.mark.parametrize("loop", ["c", "python"])


def _group(world: int, slot_bytes: int, timeout_s: float = 30.0, loop: str = "c") -> list[ShmExchange]:
    if loop == "c" and cpu_experts.library() is None:
        pytest.skip("no C compiler: the CPU kernels' library (and the exchange's C loop) is not built")
    path = f"/dev/shm/expertpool-test-{os.getpid()}-{time.monotonic_ns()}"
    ex0 = ShmExchange.create(path, world, slot_bytes, timeout_s)
    group = [ex0] + [ShmExchange.attach(path, r, world, slot_bytes, ex0.token, timeout_s) for r in range(1, world)]
    for ex in group:
        ex.ready()
        if loop == "python":
            ex._lib = None
        assert (ex._lib is not None) == (loop == "c")
    assert not os.path.exists(path)  # unlinked once all mapped: nothing left behind
    return group


def _run_all(fns) -> list:
    out, errors = [None] * len(fns), []

    def run(i):
        try:
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 (re-raised below)
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "an exchange hung"
    if errors:
        raise errors[0]
    return out


@x86_only
@LOOPS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_rows_arrive_where_all_to_all_puts_them(dtype, loop):
    world, D = 3, 37
    g = torch.Generator().manual_seed(0)
    # counts[s][d]: rows s sends d; zeros included (a pair with nothing to send sends no piece), and
    # pairs far larger than the 4 KiB slots (many pieces through a ring of two, both directions at once)
    counts = [[5, 0, 300], [0, 1, 0], [260, 7, 2]]
    sends = [(torch.randn(sum(counts[s]), D, generator=g) * 100).to(dtype) for s in range(world)]
    group = _group(world, slot_bytes=4096, loop=loop)
    for _ in range(3):  # the rings carry on from call to call
        outs = [torch.empty(sum(counts[s][d] for s in range(world)), D, dtype=dtype) for d in range(world)]
        _run_all([lambda d=d: group[d].all_to_all_single(outs[d], sends[d], [counts[s][d] for s in range(world)],
                                                        counts[d]) for d in range(world)])
        for d in range(world):
            want = torch.cat([sends[s][sum(counts[s][:d]):sum(counts[s][:d + 1])] for s in range(world)])
            assert torch.equal(outs[d], want), d
    # equal splits (the dispatcher's counts exchange), and a rank with no rows at all
    counts_sent = [torch.tensor([10 * s + d for d in range(world)]) for s in range(world)]
    got = [torch.empty(world, dtype=torch.long) for _ in range(world)]
    _run_all([lambda d=d: group[d].all_to_all_single(got[d], counts_sent[d]) for d in range(world)])
    assert [t.tolist() for t in got] == [[10 * s + d for s in range(world)] for d in range(world)]
    empty = [torch.empty(0, D, dtype=dtype) for _ in range(world)]
    _run_all([lambda d=d: group[d].all_to_all_single(torch.empty(0, D, dtype=dtype), empty[d], [0] * world,
                                                    [0] * world) for d in range(world)])
    for ex in group:
        ex.close()


@x86_only
@LOOPS
def test_a_dead_peer_an_abort_and_a_timeout_raise(loop):
    a, b = _group(2, slot_bytes=4096, timeout_s=1.0, loop=loop)
    x, out = torch.ones(4, 8), torch.empty(4, 8)
    # rank 1's process has exited (a reaped pid): rank 0 waiting for its rows says so at once
    gone = subprocess.Popen(["true"])
    gone.wait()
    a._pids[1] = gone.pid
    t0 = time.monotonic()
    with pytest.raises(PeerGone, match=f"peer rank 1 \\(pid {gone.pid}\\) exited"):
        a.all_to_all_single(out, x, [2, 2], [2, 2])
    assert time.monotonic() - t0 < 1.0
    a._pids[1] = os.getpid()
    # a live peer that never sends: the collective timeout
    a2, b2 = _group(2, slot_bytes=4096, timeout_s=0.3, loop=loop)
    t0 = time.monotonic()
    with pytest.raises(PeerGone, match="ranks \\[1\\] sent nothing"):
        a2.all_to_all_single(out, x, [2, 2], [2, 2])
    assert 0.3 <= time.monotonic() - t0 < 5
    # the executor's abort releases a rank stuck waiting, from another thread
    a3, b3 = _group(2, slot_bytes=4096, timeout_s=60.0, loop=loop)
    threading.Timer(0.2, a3.abort).start()
    t0 = time.monotonic()
    with pytest.raises(PeerGone, match="aborted"):
        a3.all_to_all_single(out, x, [2, 2], [2, 2])
    assert time.monotonic() - t0 < 5
    for ex in (a, b, a2, b2, a3, b3):
        ex.close()


@x86_only
def test_a_sleeping_rank_is_woken_by_its_peer_not_by_its_timeout():
    """With no spinning every wait sleeps on the futex; each exchange's sleeper must be woken by the
    other rank's doorbell (microseconds), not by the 2 ms timeout its sleep also has: 200 exchanges
    would take >= ~0.4 s that way."""
    group = _group(2, slot_bytes=4096, loop="c")
    for ex in group:
        ex._spin_ns = 0
    n = 200
    x = [torch.full((2, 16), float(r)) for r in range(2)]
    outs = [torch.empty(2, 16) for _ in range(2)]

    def ping(r):
        for _ in range(n):
            group[r].all_to_all_single(outs[r], x[r])
        return outs[r]
    _run_all([lambda: ping(0), lambda: ping(1)])  # warm-up (thread start, first-touch of the slots)
    t0 = time.perf_counter()
    got = _run_all([lambda: ping(0), lambda: ping(1)])
    elapsed = time.perf_counter() - t0
    assert [g[:, 0].tolist() for g in got] == [[0.0, 1.0], [0.0, 1.0]]
    assert elapsed < 0.2, f"{n} exchanges took {elapsed:.3f} s: the waits end by timeout, not by the doorbell"
    for ex in group:
        ex.close()


@x86_only
def test_a_segment_that_is_not_the_groups_is_refused(tmp_path):
    path = f"/dev/shm/expertpool-test-{os.getpid()}-{time.monotonic_ns()}"
    ex = ShmExchange.create(path, 2, 4096)
    try:
        with pytest.raises(ValueError, match="token"):  # another group's (or another container's) file
            ShmExchange.attach(path, 1, 2, 4096, ex.token + 1)
        with pytest.raises(ValueError, match="size"):
            ShmExchange.attach(path, 1, 3, 4096, ex.token)
    finally:
        ex.ready()
        ex.close()
    with pytest.raises(FileExistsError):  # never someone else's file: created exclusively
        p = tmp_path / "taken"
        p.write_bytes(b"")
        ShmExchange.create(str(p), 2, 4096)


@x86_only
def test_slot_sizes_keep_the_segment_bounded():
    assert slot_bytes_for(2) == 1 << 20  # 8 MiB: a decode step's rows in one piece
    for world in (2, 4, 8, 16, 64):
        slot = slot_bytes_for(world)
        assert slot % 4096 == 0 and slot >= 4096
        assert 2 * world * world * slot <= 32 << 20 or slot == 4096  # the slots within 32 MiB, or 4 KiB


def test_join_group_keeps_gloo_where_shared_memory_is_not_supported(monkeypatch):
    """A one-rank gloo group: on a platform without it every rank gets None (the dispatcher keeps gloo);
    where it is supported, an exchange that copies the rank's own rows."""
    import torch.distributed as dist

    from expertpool.model import shm_exchange
    from tests.ports import free_port

    own = not dist.is_initialized()  # an earlier test of this process may have left its one-rank group
    if own:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        monkeypatch.setattr(shm_exchange, "supported", lambda: False)
        assert shm_exchange.join_group() is None
        monkeypatch.undo()
        if supported():
            ex = shm_exchange.join_group(slot_bytes=4096)
            x = torch.arange(6.0).view(3, 2)
            assert torch.equal(ex.all_to_all_single(torch.empty(3, 2), x, [3], [3]), x)
            ex.close()
    finally:
        if own:
            dist.destroy_process_group()
