"""All-to-all through shared memory, for the expert-parallel ranks of one CPU host.

On CPU the MoE layer's exchanges go over gloo, whose every collective is a TCP round trip handled by
a background thread: 0.2-0.5 ms per ``all_to_all_single`` on loopback between two 1-thread ranks,
however small the message, three per MoE layer. Ranks on one host can instead copy rows through a
shared-memory segment (what vLLM's and SGLang's CPU backends do for their collectives): 16-22 µs
with the C loop below, 24-32 µs with the Python one, when both ranks arrive together
(``bench/ep_exchange.py``).

Layout of the segment (a file in ``/dev/shm``, created by rank 0 and unlinked once every rank has
mapped it, so nothing is left behind when a process dies):

- a 64-byte record per rank: its pid (liveness) and the segment's token (a rank that maps another
  file, e.g. another pod's ``/dev/shm``, sees the wrong token and the group keeps gloo);
- a 64-byte header per ordered pair (src, dst): ``sent`` (pieces written, only src writes it) and
  ``taken`` (pieces consumed, only dst writes it);
- two slots of ``slot_bytes`` per pair: a single-producer single-consumer ring of two.

A message larger than a slot goes in pieces. Every call moves all of its pairs forward together
(write what the ring has room for, read what has arrived, repeat), so two ranks sending each other
more than a ring holds cannot deadlock. Message sizes are not sent: as with ``all_to_all_single``,
each rank passes the sizes it expects, and a pair with nothing to send sends no piece. The payload
is copied before the counter that publishes it is stored, and x86's stores become visible in program
order (TSO); other architectures keep gloo (``supported``).

Waiting. The loop runs in C (``kernels/csrc/shm_ring.c``, in the CPU kernels' library): a waiting
rank spins ``EXPERTPOOL_SHM_SPIN_US`` (1000 µs), then sleeps on a futex until a peer that publishes a
piece for it, or frees one of its slots, wakes it. Both ends matter on a VM: waking a sleeping rank
took ~100 µs here (an idle vCPU), so with a 20 µs spin most exchanges took that long and bench-mini's
in-process expert-parallel step grew to 25.7-30.1 ms (20.6-22.7 with a 200 µs spin, 20.2-21.3 with
the Python loop, alternated); a rank asleep leaves its core to the replica and Ray processes of a
full machine. Every 10 ms of waiting the call returns to Python, which checks that the
peers it waits for are alive (a dead rank raises at once, as gloo's closed socket does), the group's
abort flag (``abort``: the executor releasing a stuck step) and the timeout. Without the library (no C
compiler, or ``EXPERTPOOL_SHM_C_LOOP=0``) the same protocol runs as a Python loop: 64 polls, then
``EXPERTPOOL_SHM_NAP_US`` (20 µs; ~95 µs in practice) sleeps between polls (0: ``sched_yield``), and
the same checks every 32 naps (256 yields).
"""

import ctypes
import logging
import math
import mmap
import os
import platform
import secrets
import time

import torch

from expertpool.kernels import cpu_experts

log = logging.getLogger(__name__)

_REC = 64  # bytes per rank record and per pair header (one cache line each: no false sharing)
_SLICE_NS = 10_000_000  # the C loop returns this often while it waits (liveness, abort, timeout checks)
C_LOOP = cpu_experts.Switch("EXPERTPOOL_SHM_C_LOOP", "the shared-memory exchange polls and naps in Python")


def _ring_library():
    """The C loop (``kernels/csrc/shm_ring.c``, in the CPU kernels' library), or None: switched off, or
    no library (no compiler); then the Python loop."""
    return cpu_experts.library() if C_LOOP.on() else None


def supported() -> bool:
    """Shared-memory exchange needs TSO stores (x86) and a ``/dev/shm``."""
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie has exited
    except (OSError, IndexError):
        return False


class PeerGone(RuntimeError):
    """A rank of the group died, timed out or the exchange was aborted."""


class ShmExchange:
    """``all_to_all_single`` among ``world`` ranks of one host (see the module docstring).

    Build it with ``create`` on rank 0 and ``attach`` on the others (in that order: rank 0 first), then
    ``ready`` on every rank once all have attached (rank 0 unlinks the file)."""

    def __init__(self, path: str, rank: int, world: int, slot_bytes: int, token: int, fd: int,
                 timeout_s: float = 60.0):
        self.path, self.rank, self.world, self.slot_bytes, self.timeout_s = path, rank, world, slot_bytes, timeout_s
        self.token = token
        self._hdr0 = world * _REC
        self._slot0 = self._hdr0 + world * world * _REC
        size = self._slot0 + world * world * 2 * slot_bytes
        self._mm = mmap.mmap(fd, size)
        os.close(fd)
        self._q = memoryview(self._mm).cast("q")  # int64 view of the records and headers
        self._bytes = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.aborted = False
        self._nap = float(os.environ.get("EXPERTPOOL_SHM_NAP_US", "20")) * 1e-6
        self._spin_ns = int(float(os.environ.get("EXPERTPOOL_SHM_SPIN_US", "1000")) * 1000)
        self._lib = _ring_library()
        self._arrays = tuple((ctypes.c_int64 * world)() for _ in range(4))  # s_end, r_end, tx, rx
        self._pids: list[int] = []
        self._q[rank * _REC // 8] = os.getpid()

    def describe_wait(self) -> str:
        """How a waiting rank waits, for the logs."""
        if self._lib is not None:
            return f"C loop: spins {self._spin_ns / 1e3:g} us, then sleeps until a peer wakes it"
        return (f"Python loop: polls, then naps {self._nap * 1e6:g} us" if self._nap
                else "Python loop: polls and yields")

    @staticmethod
    def segment_bytes(world: int, slot_bytes: int) -> int:
        return world * _REC + world * world * (_REC + 2 * slot_bytes)

    @classmethod
    def create(cls, path: str, world: int, slot_bytes: int = 1 << 20, timeout_s: float = 60.0) -> "ShmExchange":
        """Rank 0: create and size the segment (space reserved now, so a full ``/dev/shm`` fails here
        with OSError rather than with SIGBUS at the first write)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, cls.segment_bytes(world, slot_bytes))
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        token = secrets.randbits(62)
        ex = cls(path, 0, world, slot_bytes, token, fd, timeout_s)
        ex._q[1] = token
        return ex

    @classmethod
    def attach(cls, path: str, rank: int, world: int, slot_bytes: int, token: int,
               timeout_s: float = 60.0) -> "ShmExchange":
        """Ranks > 0: map rank 0's segment; ``ValueError`` if it is not the one rank 0 made (another
        host's or another container's ``/dev/shm``)."""
        fd = os.open(path, os.O_RDWR)
        if os.fstat(fd).st_size != cls.segment_bytes(world, slot_bytes):
            os.close(fd)
            raise ValueError(f"{path} is not this group's segment (size)")
        ex = cls(path, rank, world, slot_bytes, token, fd, timeout_s)
        if ex._q[1] != token:
            ex.close()
            raise ValueError(f"{path} is not this group's segment (token)")
        return ex

    def ready(self) -> None:
        """Every rank has attached: read the peers' pids; rank 0 removes the file (the mappings stay)."""
        self._pids = [self._q[r * _REC // 8] for r in range(self.world)]
        if self.rank == 0:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self._bytes = None
        try:
            self._q.release()
            self._mm.close()
        except BufferError:  # a view still alive (e.g. in a failed step's traceback): unmapped when collected
            pass

    def abort(self) -> None:
        """Make a waiting (or the next) exchange raise ``PeerGone`` (the executor releasing a stuck step)."""
        self.aborted = True

    # ---- the exchange
    def _hdr(self, src: int, dst: int) -> int:
        return (self._hdr0 + (src * self.world + dst) * _REC) // 8  # [sent, taken] as int64 indices

    def _slot(self, src: int, dst: int, k: int) -> int:
        return self._slot0 + ((src * self.world + dst) * 2 + k) * self.slot_bytes

    def all_to_all_single(self, out: torch.Tensor, send: torch.Tensor, recv_counts: list[int] | None = None,
                          send_counts: list[int] | None = None) -> torch.Tensor:
        """``torch.distributed.all_to_all_single`` over dim 0 (equal splits when the counts are None)."""
        W, me = self.world, self.rank
        if self.aborted:
            raise PeerGone(f"rank {me}: the shared-memory exchange was aborted")
        send = send.contiguous()
        assert out.is_contiguous() and out.dtype == send.dtype, "out: contiguous, the dtype of send"
        row = math.prod(send.shape[1:]) * send.element_size()  # bytes per row (known with no rows too)
        send_counts = send_counts if send_counts is not None else [send.shape[0] // W] * W
        recv_counts = recv_counts if recv_counts is not None else [out.shape[0] // W] * W
        src_b, dst_b = send.view(-1).view(torch.uint8), out.view(-1).view(torch.uint8)
        s_off = [0] * (W + 1)
        r_off = [0] * (W + 1)
        for r in range(W):
            s_off[r + 1] = s_off[r] + send_counts[r] * row
            r_off[r + 1] = r_off[r] + recv_counts[r] * row
        if s_off[me + 1] > s_off[me]:
            dst_b[r_off[me]:r_off[me + 1]].copy_(src_b[s_off[me]:s_off[me + 1]])
        if self._lib is not None:
            return self._exchange_c(out, src_b, dst_b, s_off, r_off)
        q, buf, slot = self._q, self._bytes, self.slot_bytes
        tx = {d: s_off[d] for d in range(W) if d != me and s_off[d + 1] > s_off[d]}  # next byte to send
        rx = {s: r_off[s] for s in range(W) if s != me and r_off[s + 1] > r_off[s]}  # next byte to take
        spins, t_wait = 0, 0.0
        while tx or rx:
            moved = False
            for d in list(tx):
                h = self._hdr(me, d)
                sent = q[h]
                if sent - q[h + 1] < 2:  # room in the ring
                    pos = tx[d]
                    n = min(slot, s_off[d + 1] - pos)
                    o = self._slot(me, d, sent & 1)
                    buf[o:o + n].copy_(src_b[pos:pos + n])
                    q[h] = sent + 1  # publish after the payload (TSO)
                    moved = True
                    if pos + n >= s_off[d + 1]:
                        del tx[d]
                    else:
                        tx[d] = pos + n
            for s in list(rx):
                h = self._hdr(s, me)
                taken = q[h + 1]
                if q[h] > taken:  # a piece has arrived
                    pos = rx[s]
                    n = min(slot, r_off[s + 1] - pos)
                    o = self._slot(s, me, taken & 1)
                    dst_b[pos:pos + n].copy_(buf[o:o + n])
                    q[h + 1] = taken + 1  # the slot is free again
                    moved = True
                    if pos + n >= r_off[s + 1]:
                        del rx[s]
                    else:
                        rx[s] = pos + n
            if moved:
                spins = 0
                continue
            spins += 1
            if spins < 64:
                continue
            if self._nap:
                time.sleep(self._nap)
            else:
                os.sched_yield()
            if spins % (32 if self._nap else 256) == 0:
                now = time.monotonic()
                if not t_wait:
                    t_wait = now
                self._check(set(tx) | set(rx), now - t_wait)
        return out

    def _exchange_c(self, out, src_b, dst_b, s_off, r_off) -> torch.Tensor:
        """The loop in one C call (``kernels/csrc/shm_ring.c``), returning every ``_SLICE_NS`` while it
        waits so the peers' liveness, the abort flag and the timeout are checked here."""
        W, me = self.world, self.rank
        s_end, r_end, tx, rx = self._arrays
        for d in range(W):
            s_end[d], r_end[d] = s_off[d + 1], r_off[d + 1]
            tx[d], rx[d] = (s_off[d + 1], r_off[d + 1]) if d == me else (s_off[d], r_off[d])
        base = self._bytes.data_ptr()
        t_wait = 0.0
        while self._lib.shm_a2a(base, self._hdr0, self._slot0, self.slot_bytes, W, me, src_b.data_ptr(),
                                dst_b.data_ptr(), s_end, r_end, tx, rx, self._spin_ns, _SLICE_NS):
            now = time.monotonic()
            if not t_wait:
                t_wait = now - _SLICE_NS * 1e-9
            self._check({d for d in range(W) if d != me and (tx[d] < s_end[d] or rx[d] < r_end[d])},
                        now - t_wait)
        return out

    def _check(self, peers: set[int], waited_s: float) -> None:
        if self.aborted:
            raise PeerGone(f"rank {self.rank}: the shared-memory exchange was aborted")
        for p in sorted(peers):
            if not _alive(self._pids[p]):
                raise PeerGone(f"rank {self.rank}: peer rank {p} (pid {self._pids[p]}) exited during an exchange")
        if waited_s > self.timeout_s:
            raise PeerGone(f"rank {self.rank}: ranks {sorted(peers)} sent nothing for {waited_s:.0f}s "
                           f"(collective timeout {self.timeout_s:.0f}s)")


def slot_bytes_for(world: int, budget: int = 32 << 20, most: int = 1 << 20) -> int:
    """Slot size for ``world`` ranks: 1 MiB (a decode step's rows fit in one piece) while the segment
    stays within ``budget`` (8 MiB for 2 ranks, 32 MiB from 4), smaller slots beyond; at least 4 KiB."""
    return max(4096, min(most, budget // (2 * world * world)) // 4096 * 4096)


def join_group(group=None, slot_bytes: int = 1 << 20, timeout_s: float = 60.0, tag: str = "") -> ShmExchange | None:
    """Set up a ``ShmExchange`` over the ranks of the (gloo) process group ``group`` when they all share
    this host's ``/dev/shm`` and see each other's processes; None otherwise (the caller keeps gloo). A
    collective call: every rank of ``group`` must make it."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    ok = supported()
    path, token, ex = None, 0, None
    if rank == 0 and ok:
        path = f"/dev/shm/expertpool-a2a-{os.getpid()}-{tag or secrets.token_hex(4)}"
        try:
            ex = ShmExchange.create(path, world, slot_bytes, timeout_s)
            token = ex.token
        except OSError as e:
            log.info("shared-memory exchange unavailable (%s): the MoE exchanges stay on gloo", e)
            ok, ex = False, None
    info = [(path, token) if rank == 0 else None]
    dist.broadcast_object_list(info, src=0, group=group)
    path, token = info[0]
    if rank != 0:
        ex = None
        if ok and path is not None:
            try:
                ex = ShmExchange.attach(path, rank, world, slot_bytes, token, timeout_s)
            except (OSError, ValueError) as e:
                log.info("rank %d cannot map %s (%s)", rank, path, e)
    got = [None] * world
    dist.all_gather_object(got, os.getpid() if ex is not None else None, group=group)
    usable = all(p is not None for p in got) and all(_alive(p) for p in got)  # one pid namespace too
    flags = [None] * world
    dist.all_gather_object(flags, usable, group=group)
    if not all(flags):
        if ex is not None:
            if rank == 0:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            ex.close()
        return None
    ex.ready()
    return ex
