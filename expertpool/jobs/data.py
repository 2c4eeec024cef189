"""Fine-tuning data: read JSONL/Parquet, tokenize with the model's chat template, mask, pack, split.

Contract. A record holds either ``messages`` (chat turns, rendered with the model's chat template;
the loss covers exactly the assistant turns, from ``Tokenizer.encode_chat``) or ``text`` (BOS +
text; the loss covers every token but BOS). Records longer than ``seq_len`` are truncated. Records
are packed greedily, in order, whole records only, into rows of exactly ``seq_len`` tokens padded
with the pad token (mask 0). A row is ``input_ids`` [S], ``loss_mask`` [S] and ``token_mask`` [S]:
``loss_mask[i]`` says token i is a training target, ``token_mask[i]`` that it is a real token (prompt
or completion) and not padding. ESFT scores experts on the real tokens only (``jobs.esft``): pads
route to a few experts and would otherwise skew the selection. Packed records attend to each other
(no document masking), the usual trade-off of packed SFT; each record starts with BOS.

Split: the last ``round(n * eval_fraction)`` records (at least 1 when the fraction is > 0) are the
held-out eval set; the generator of the demo data shuffles topics, so the tail is representative.

Two drivers share ``TokenizePack``: ``ray_datasets`` (Ray Data: pyarrow readers, ``map_batches``
over blocks of ``PACK_RECORDS`` records, materialized once so every worker and every restart sees
the same rows in the same order) and ``local_rows`` (the same functions over pyarrow tables, for
the one-process ``train_loop`` and the benchmark baseline). Both pack within groups of
``PACK_RECORDS`` records, so they produce identical rows.

The training loop reads its rows through ``TrainData``: ``LocalRows`` (the one-process rows) or
``RayShards`` (a Ray Train worker's dataset shards). Each yields endless passes of global batches
(every rank reads the same batches and keeps its own rows of each) and the eval rows whole.
"""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa

from expertpool.model.storage import resolve_model
from expertpool.model.tokenizer import PAD, Tokenizer

PACK_RECORDS = 256  # records per packing group (one Ray Data batch)


def n_eval_records(n: int, eval_fraction: float) -> int:
    if eval_fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(n * eval_fraction)))


def encode_record(tok: Tokenizer, record, field: str) -> tuple[list[int], list[bool]]:
    if field == "messages":
        messages = [{"role": m["role"], "content": m["content"]} for m in record]
        return tok.encode_chat(messages)
    ids = tok.encode(str(record), add_bos=True)
    return ids, [False] + [True] * (len(ids) - 1)


def pack(encoded: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Greedy in-order packing of whole (truncated) records into [N, seq_len] rows."""
    rows_ids, rows_mask, rows_tokens = [], [], []
    cur_ids: list[int] = []
    cur_mask: list[bool] = []

    def flush():
        if cur_ids:
            pad = seq_len - len(cur_ids)
            rows_ids.append(cur_ids + [pad_id] * pad)
            rows_mask.append(cur_mask + [False] * pad)
            rows_tokens.append([True] * len(cur_ids) + [False] * pad)

    for ids, mask in encoded:
        ids, mask = ids[:seq_len], mask[:seq_len]
        if len(cur_ids) + len(ids) > seq_len:
            flush()
            cur_ids, cur_mask = [], []
        cur_ids = cur_ids + ids
        cur_mask = cur_mask + list(mask)
    flush()
    if not rows_ids:
        return {"input_ids": np.zeros((0, seq_len), np.int64), "loss_mask": np.zeros((0, seq_len), np.bool_),
                "token_mask": np.zeros((0, seq_len), np.bool_)}
    return {"input_ids": np.asarray(rows_ids, np.int64), "loss_mask": np.asarray(rows_mask, np.bool_),
            "token_mask": np.asarray(rows_tokens, np.bool_)}


class TokenizePack:
    """Ray Data ``map_batches`` callable (also used directly): a pyarrow batch of records -> packed rows."""

    def __init__(self, model_dir: str | None, field: str, seq_len: int):
        if model_dir is None:  # the embedded model, resolved on the node that runs this task
            from expertpool.model.embedded import ensure_embedded_model

            model_dir = str(ensure_embedded_model())
        # any checkpoint location: only its config and tokenizer files are fetched to this node
        self.tok = Tokenizer.from_dir(resolve_model(model_dir, weights=False))
        self.field, self.seq_len = field, seq_len
        pad = self.tok._tok.token_to_id(PAD)
        self.pad_id = pad if pad is not None else (self.tok.eos_token_id or 0)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        records = batch.column(self.field).to_pylist()
        return pack([encode_record(self.tok, r, self.field) for r in records], self.seq_len, self.pad_id)


def _files(path: Path) -> list[str]:
    return [str(p) for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [str(path)]


def read_table(path, fmt: str, field: str) -> pa.Table:
    """All records as one pyarrow table with only ``field`` (local driver)."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    files = _files(Path(path))
    tables = [pq.read_table(f, columns=[field]) if fmt == "parquet" else pj.read_json(f).select([field])
              for f in files]
    return pa.concat_tables(tables)


def local_rows(path, fmt: str, field: str, model_dir, seq_len: int, eval_fraction: float):
    """(train rows, eval rows), each {"input_ids": [N, S] int64, "loss_mask": [N, S] bool}."""
    table = read_table(path, fmt, field)
    n = table.num_rows
    n_eval = n_eval_records(n, eval_fraction)
    fn = TokenizePack(str(model_dir), field, seq_len)

    def run(t: pa.Table):
        parts = [fn(t.slice(i, PACK_RECORDS)) for i in range(0, t.num_rows, PACK_RECORDS)]
        if not parts:
            return pack([], seq_len, fn.pad_id)
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    return run(table.slice(0, n - n_eval)), run(table.slice(n - n_eval, n_eval))


def ray_datasets(path, fmt: str, field: str, model_dir, seq_len: int, eval_fraction: float):
    """(train, eval) Ray Datasets of packed rows, materialized in a fixed order (eval None if empty)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # job logs carry per-step progress; bars would flood them
    files = _files(Path(path))
    if fmt == "parquet":
        ds = ray.data.read_parquet(files, columns=[field])
    else:
        ds = ray.data.read_json(files, lines=True).select_columns([field])
    n = ds.count()
    n_eval = n_eval_records(n, eval_fraction)
    train, evals = ds.split_at_indices([n - n_eval])
    fn_args = (None if model_dir is None else str(model_dir), field, seq_len)

    def tok(d):
        return d.map_batches(TokenizePack, fn_constructor_args=fn_args, batch_size=PACK_RECORDS,
                             batch_format="pyarrow", concurrency=1, num_cpus=0.25).materialize()

    return tok(train), (tok(evals) if n_eval else None)


class TrainData(Protocol):
    def train_epochs(self, batch_size: int) -> Callable[[], Iterator[dict]]:
        """A function that iterates one epoch of global batches ({"input_ids", "loss_mask", "token_mask"}
        of ``batch_size`` rows; the last partial batch dropped)."""
        ...

    def eval_rows(self) -> dict | None:
        """Every eval row as tensors {"input_ids": [N, S], "loss_mask": [N, S]}, or None without eval data."""
        ...


class LocalRows:
    """``TrainData`` of one process: the (train, eval) rows of ``local_rows``, in memory."""

    def __init__(self, train: dict[str, np.ndarray], evals: dict[str, np.ndarray]):
        self.train, self.evals = train, evals

    def train_epochs(self, batch_size: int) -> Callable[[], Iterator[dict]]:
        def iterate():
            for i in range(0, len(self.train["input_ids"]) - batch_size + 1, batch_size):
                yield {k: v[i:i + batch_size] for k, v in self.train.items()}
        return iterate

    def eval_rows(self) -> dict | None:
        import torch

        return {k: torch.as_tensor(v) for k, v in self.evals.items()} if len(self.evals["input_ids"]) else None


class RayShards:
    """``TrainData`` inside a Ray Train worker: the job's ``train`` dataset shard (not split: every
    worker reads all of it, see ``finetune.run_ray``) and its ``eval`` shard if the job has one."""

    def __init__(self, has_eval: bool):
        self.has_eval = has_eval

    def train_epochs(self, batch_size: int) -> Callable[[], Iterator[dict]]:
        import ray.train

        train = ray.train.get_dataset_shard("train")
        return lambda: train.iter_torch_batches(batch_size=batch_size, drop_last=True, prefetch_batches=1)

    def eval_rows(self) -> dict | None:
        import ray.train
        import torch

        if not self.has_eval:
            return None
        batches = list(ray.train.get_dataset_shard("eval").iter_torch_batches(batch_size=256))
        return {k: torch.cat([b[k] for b in batches]) for k in ("input_ids", "loss_mask")} if batches else None
