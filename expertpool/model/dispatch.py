"""Token dispatchers: how a MoE layer's (token, slot) pairs reach the routed experts and come back.

Shape legend: T local tokens, K experts per token, P = T*K (token, slot) pairs, R received pairs,
D hidden, E routed experts, W ranks.

The seam. ``MoE.forward`` routes, then calls ``dispatcher(x_TD, ids_TK, weights_TK, experts)`` and
gets the weighted sum of the routed experts' outputs per token [T, D]. ``Dispatcher`` names that
contract; ``ExpertGroup`` names what crosses it: the experts this process holds (the model's
``Experts`` module, or a training view of it), a table ``global_to_local`` from (variant-offset)
global expert ids to local slots (-1: not held here) and a call that runs local slots. Only a
dispatcher knows about expert parallelism; the two here are drop-ins for each other:

- ``LocalDispatcher``: all routed compute in this process (the reference: CPU tests, one-process
  training). Slots routed to experts not loaded here contribute zero.
- ``AllToAllDispatcher``: expert parallelism over a torch.distributed group (serving actors, Ray
  Train workers). Ownership is a per-expert owner table ``owner_E``, or for serving with replicated
  experts (``platform.placement``) a list of the ranks holding a copy of each; the default (``expert_owners``)
  gives rank r the contiguous range [r*E//W, (r+1)*E//W): E/W experts each when W divides E
  (serving requires that), and ranges differing by at most one expert otherwise (elastic
  fine-tuning may restart on any worker count).

All-to-all: pairs are sorted by owning rank, counts exchanged (the layer's one host read: the split
sizes), then token rows and expert ids are exchanged with ``all_to_all_single`` (uneven splits); at
inference the ids ride in the rows' exchange as 8 extra bytes per row (three collectives per layer
instead of four).
Each rank runs its local experts on the rows it received (unweighted), sends the outputs back along
the reverse splits, and the origin applies the routing weights and sums each token's slots in fp32
in a fixed order (``combine_pairs``: no atomics, so greedy output is reproducible on GPU). Weights
never travel. On the CPU at inference the pack (destinations, order, rows with their ids, counts)
and the combine are one C call each (``cpu_experts.ep_pack`` / ``ep_combine``, the same bits as the
torch ops): a bench-mini layer's dispatcher took 99-101 against 185-187 µs with the exchange and the
experts stubbed (8 tokens x top-6, one thread). The collectives come from
``torch.distributed.nn.functional`` so gradients flow back through dispatch and combine in training.
Every rank must call every MoE layer each step, with zero tokens if it has none: the collectives
are matched by order. Works on gloo (CPU) and NCCL (GPU); at inference, ranks on one CPU host pass
their rows through shared memory instead of gloo (``model.shm_exchange``, 5-10x less per exchange).
Plain torch.distributed, no Ray: the model layer stays importable anywhere.
"""

from typing import Protocol

import torch
import torch.distributed as dist
from torch.distributed.nn import functional as dist_fn

from expertpool.kernels import cpu_experts
from expertpool.kernels.backend import fast_paths
from expertpool.kernels.reference import combine_pairs


class ExpertGroup(Protocol):
    """The routed experts one process holds, as a dispatcher sees them (``moe.Experts``, or the
    trainer's view of it)."""

    global_to_local: torch.Tensor  # [E * variants] local slot of each (variant-offset) global id; -1 = elsewhere

    def __call__(self, x_TD: torch.Tensor, local_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """Weighted sum per token of the local experts in ``local_ids_TK`` (-1 slots skipped)."""
        ...


class Dispatcher(Protocol):
    def __call__(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                 experts: ExpertGroup) -> torch.Tensor:
        """Routed experts' output [T, D] for tokens ``x_TD`` routed to global ids ``ids_TK`` with weights
        ``weights_TK``, whichever process holds each expert."""
        ...


class LocalDispatcher:
    """All routed compute in this process. Slots routed to experts not loaded here contribute zero."""

    def __call__(self, x_TD, ids_TK, weights_TK, experts: ExpertGroup) -> torch.Tensor:
        if getattr(experts, "identity_map", False):  # every expert here, no variants: ids are slots
            return experts(x_TD, ids_TK, weights_TK)
        local_ids_TK = experts.global_to_local[ids_TK]
        return experts(x_TD, local_ids_TK, weights_TK)


def owned_experts(rank: int, world: int, n_routed_experts: int) -> list[int]:
    """Global ids of the experts rank ``rank`` of ``world`` owns: [r*E//W, (r+1)*E//W)."""
    assert 0 <= rank < world <= n_routed_experts, f"rank {rank} of {world} over {n_routed_experts} experts"
    return list(range(rank * n_routed_experts // world, (rank + 1) * n_routed_experts // world))


def expert_owners(n_routed_experts: int, world: int) -> torch.Tensor:
    """The owner rank of every global expert [E] under ``owned_experts``."""
    owner_E = torch.empty(n_routed_experts, dtype=torch.long)
    for r in range(world):
        owner_E[owned_experts(r, world, n_routed_experts)] = r
    return owner_E


class GroupExchange:
    """``all_to_all_single`` over a torch.distributed group, in the shape of ``model.shm_exchange``'s:
    what the dispatcher and the split output head call when the ranks do not share memory."""

    def __init__(self, group=None):
        self.group = group

    def all_to_all_single(self, out: torch.Tensor, send: torch.Tensor, recv_counts: list[int] | None = None,
                          send_counts: list[int] | None = None) -> torch.Tensor:
        dist.all_to_all_single(out, send.contiguous(), recv_counts, send_counts, group=self.group)
        return out


class AllToAllDispatcher:
    """Expert parallelism over ``group``: see the module docstring."""

    def __init__(self, n_routed_experts: int, group=None, owner_E: torch.Tensor | None = None,
                 replicas: list[list[int]] | None = None, exchange=None):
        """``replicas``: per expert, the ranks holding a copy (replicated experts, ``platform.placement``);
        default: one owner per expert, ``owner_E`` or the contiguous ranges. ``exchange``: an object with
        ``all_to_all_single(out, send, recv_counts, send_counts)`` over the same ranks
        (``model.shm_exchange``) for the exchanges without gradients; default: ``group``'s collectives."""
        self.group = group
        self.exchange = exchange if exchange is not None else GroupExchange(group)
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.n_routed = n_routed_experts
        if replicas is not None:
            assert owner_E is None, "give owner_E or replicas, not both"
            assert len(replicas) == n_routed_experts and all(replicas), "every expert needs at least one rank"
            width = max(len(r) for r in replicas)
            # copies_EC[e, c]: the rank of copy c of expert e (padded by repeating the first copy)
            self.copies_EC = torch.tensor([list(r) + [r[0]] * (width - len(r)) for r in replicas], dtype=torch.long)
            self.ncopies_E = torch.tensor([len(r) for r in replicas], dtype=torch.long)
            owner_E = self.copies_EC[:, 0].clone()
        else:
            self.copies_EC = self.ncopies_E = None
            owner_E = expert_owners(n_routed_experts, self.world) if owner_E is None else owner_E.long().cpu()
        assert owner_E.shape == (n_routed_experts,), f"owner table {tuple(owner_E.shape)} != ({n_routed_experts},)"
        assert bool(((owner_E >= 0) & (owner_E < self.world)).all()), f"owner ranks outside [0, {self.world})"
        self.owner_E = owner_E
        self.replicated = self.ncopies_E is not None and bool((self.ncopies_E > 1).any())
        self._on: dict[torch.device, tuple] = {}  # the tables on each device ids arrive on

    def owner_range(self, rank: int | None = None) -> list[int]:
        r = self.rank if rank is None else rank
        return torch.nonzero(self.owner_E == r).flatten().tolist()

    def _tables(self, device: torch.device) -> tuple:
        if device not in self._on:
            self._on[device] = tuple(None if t is None else t.to(device)
                                     for t in (self.owner_E, self.copies_EC, self.ncopies_E))
        return self._on[device]

    def destinations(self, ids_P: torch.Tensor) -> torch.Tensor:
        """The rank each pair goes to. A replicated expert's pairs are spread over its copies by pair
        index (pair p takes copy p mod copies): deterministic, so every run sends the same rows to
        the same ranks, and every copy holds the same weights, so the output does not depend on it."""
        owner_E, copies_EC, ncopies_E = self._tables(ids_P.device)
        e_P = ids_P % self.n_routed  # variant-offset virtual ids (e + v * E) go where base expert e is
        if not self.replicated:
            return owner_E[e_P]
        pick_P = torch.arange(len(e_P), device=e_P.device) % ncopies_E[e_P]
        return copies_EC[e_P, pick_P]

    def _exchange(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        out = send.new_empty((sum(recv_counts),) + tuple(send.shape[1:]))
        if send.requires_grad:
            return dist_fn.all_to_all_single(out, send, recv_counts, send_counts, group=self.group)
        return self.exchange.all_to_all_single(out, send, recv_counts, send_counts)

    def _c_ops(self, x_TD: torch.Tensor) -> bool:
        """Whether this layer's pack and combine run as one C call each (``cpu_experts.ep_pack`` /
        ``ep_combine``: the same rows, order and roundings as the torch ops below, without their ~20
        dispatches a layer): inference on the CPU in fp32 or bf16 with the CPU kernels' library."""
        return (x_TD.device.type == "cpu" and not x_TD.requires_grad and x_TD.dtype in (torch.float32, torch.bfloat16)
                and cpu_experts.EP_OPS.on() and fast_paths() and cpu_experts.library() is not None)

    def _call_c(self, x_TD, ids_TK, weights_TK, experts: ExpertGroup) -> torch.Tensor:
        owner_E, copies_EC, ncopies_E = self._tables(x_TD.device)
        counts_2W = torch.empty(2, self.world, dtype=torch.long)  # sent, received
        send, order_P, _ = cpu_experts.ep_pack(
            x_TD, ids_TK, self.n_routed, self.world, owner_E, copies_EC if self.replicated else None,
            ncopies_E if self.replicated else None, counts_out=counts_2W[0])
        self.exchange.all_to_all_single(counts_2W[1], counts_2W[0])
        send_counts, recv_counts = counts_2W.tolist()  # the layer's one host read: the split sizes
        back_PD = self._experts_and_back(self._exchange(send, send_counts, recv_counts), x_TD.shape[1], experts,
                                         send_counts, recv_counts)
        return cpu_experts.ep_combine(back_PD, weights_TK, order_P)

    def _experts_and_back(self, packed: torch.Tensor, D: int, experts: ExpertGroup, send_counts: list[int],
                          recv_counts: list[int]) -> torch.Tensor:
        """The received rows (each with its expert id's 8 bytes as extra columns past ``D``) through this
        rank's experts, unweighted, and their outputs back along the reverse splits."""
        recv_x_RD, recv_ids_R = packed[:, :D], packed[:, D:].contiguous().view(torch.int64).view(-1)
        return self._experts_and_back_rows(recv_x_RD, recv_ids_R, experts, send_counts, recv_counts)

    def _experts_and_back_rows(self, recv_x_RD: torch.Tensor, recv_ids_R: torch.Tensor, experts: ExpertGroup,
                               send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        # every received id has a copy here (same tables on every rank): the table gives its slot
        local_R1 = experts.global_to_local[recv_ids_R].unsqueeze(1)
        ones_R1 = torch.ones(local_R1.shape, dtype=torch.float32, device=recv_x_RD.device)
        y_RD = experts(recv_x_RD, local_R1, ones_R1)
        return self._exchange(y_RD, recv_counts, send_counts)

    def __call__(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                 experts: ExpertGroup) -> torch.Tensor:
        if self._c_ops(x_TD):
            return self._call_c(x_TD, ids_TK, weights_TK, experts)
        T, K = ids_TK.shape
        flat_ids_P = ids_TK.reshape(-1)
        dest_P = self.destinations(flat_ids_P)
        order_P = torch.argsort(dest_P, stable=True)
        tok_P = torch.div(order_P, K, rounding_mode="floor")
        counts_2W = torch.zeros(2, self.world, dtype=torch.long, device=dest_P.device)
        counts_2W[0].scatter_add_(0, dest_P, torch.ones_like(dest_P))  # bincount would read the host for its size
        self.exchange.all_to_all_single(counts_2W[1], counts_2W[0])
        send_counts, recv_counts = counts_2W.tolist()  # the one host read of the layer: the split sizes

        rows_PD, ids_P = x_TD.index_select(0, tok_P), flat_ids_P[order_P]  # index_select: a row copy each
        if rows_PD.requires_grad or 8 % rows_PD.element_size():
            recv_ids_R = self._exchange(ids_P, send_counts, recv_counts)
            recv_x_RD = self._exchange(rows_PD, send_counts, recv_counts)
            back_PD = self._experts_and_back_rows(recv_x_RD, recv_ids_R, experts, send_counts, recv_counts)
        else:  # one exchange: each row carries its expert id's 8 bytes as extra columns (bit-exact, no arithmetic)
            # (explicit width: a rank with no pairs this step has an empty id list, and view(0, -1) raises)
            id_cols_P2 = ids_P.view(rows_PD.dtype).view(len(ids_P), 8 // rows_PD.element_size())
            packed = self._exchange(torch.cat([rows_PD, id_cols_P2], 1), send_counts, recv_counts)
            back_PD = self._experts_and_back(packed, rows_PD.shape[1], experts, send_counts, recv_counts)
        w_P1 = weights_TK.reshape(-1)[order_P].unsqueeze(1).to(back_PD.dtype)
        # each pair's row back to its (token, slot) place, slots summed in fp32 in a fixed order
        return combine_pairs(back_PD * w_P1, order_P, T, K)
