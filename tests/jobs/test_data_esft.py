"""Data (masking, packing) and ESFT pieces (scores, selection). Pure torch."""

import pytest
import torch

from expertpool.jobs.data import TokenizePack, encode_record, n_eval_records, pack
from expertpool.jobs.esft import expert_scores, select_experts
from expertpool.model.moe import RoutingRecord
from expertpool.model.tokenizer import Tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is the chain worn?"},
        {"role": "assistant", "content": "Yes, replace it."}, {"role": "user", "content": "Price?"},
        {"role": "assistant", "content": "20 euros."}]


def test_chat_mask_covers_exactly_the_assistant_turns(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    ids, mask = encode_record(tok, CHAT, "messages")
    masked = [i for i, m in zip(ids, mask) if m]
    assistant = tok.encode("Yes, replace it.", add_bos=False) + [tok.eos_token_id] + \
        tok.encode("20 euros.", add_bos=False) + [tok.eos_token_id]
    assert masked == assistant
    assert tok.decode(ids[:len(ids) - len(masked)], skip_special_tokens=False).count("Assistant") >= 1


def test_text_mask_is_everything_but_bos(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    ids, mask = encode_record(tok, "plain domain text", "text")
    assert ids[0] == tok.bos_token_id and mask == [False] + [True] * (len(ids) - 1)


def test_pack_keeps_records_whole_truncates_and_pads():
    recs = [([1, 2, 3], [False, True, True]), ([4, 5], [False, True]), ([6, 7, 8, 9, 10, 11, 12], [True] * 7)]
    rows = pack(recs, 6, pad_id=0)
    assert rows["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 11]]
    assert rows["loss_mask"].tolist() == [[False, True, True, False, True, False], [True] * 6]
    # real tokens, prompt (mask False) included; only the padding is out
    assert rows["token_mask"].tolist() == [[True] * 5 + [False], [True] * 6]


def test_tokenize_pack_on_a_batch(tiny_dir):
    import pyarrow as pa

    fn = TokenizePack(str(tiny_dir), "messages", 512)
    out = fn(pa.table({"messages": [CHAT, CHAT, CHAT]}))
    n = len(encode_record(fn.tok, CHAT, "messages")[0])
    assert out["input_ids"].shape == (-(-3 // (512 // n)), 512)
    assert int(out["loss_mask"].sum()) == 3 * sum(encode_record(fn.tok, CHAT, "messages")[1])


def test_eval_split_size():
    assert [n_eval_records(n, f) for n, f in [(200, 0.1), (5, 0.1), (1, 0.5), (10, 0.0), (3, 0.99)]] == [20, 1, 0, 0, 2]


def test_select_smallest_prefix_reaching_p():
    s = {1: torch.tensor([1.0, 5.0, 3.0, 1.0], dtype=torch.float64), 2: torch.tensor([1.0, 1.0, 1.0, 1.0]).double()}
    assert select_experts(s, 0.5) == {1: [1], 2: [0, 1]}       # 5/10 reaches 0.5; ties break by id
    assert select_experts(s, 0.51) == {1: [1, 2], 2: [0, 1, 2]}
    assert select_experts(s, 1.0) == {1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}
    assert select_experts({1: torch.tensor([0.0, 2.0, 0.0]).double()}, 1.0) == {1: [1]}  # zero scores never added


def test_expert_scores_gate_and_token():
    rec = RoutingRecord(shape=(2, 2))
    ids = torch.tensor([[0, 1], [0, 2], [3, 1], [3, 0]])
    w = torch.tensor([[2.0, 0.5], [1.0, 1.5], [2.0, 0.5], [1.0, 1.5]])
    rec.layers[1] = (w, ids, None)
    rec.layers[5] = (w, ids, None)  # an MTP layer (>= n_layers): not scored
    tok = expert_scores(rec, 4, 3, "token")
    gate = expert_scores(rec, 4, 3, "gate")
    assert list(tok) == [1]
    # sequence 0 = tokens 0-1, sequence 1 = tokens 2-3; per-sequence means, summed
    assert tok[1].tolist() == [0.5 + 0.25, 0.25 + 0.25, 0.25, 0.0 + 0.5]
    assert gate[1].tolist() == [1.5 + 0.75, 0.25 + 0.25, 0.75, 1.5]


def test_parquet_text_and_jsonl_chat_read_the_same_way(tiny_dir, tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from expertpool.jobs.data import local_rows

    texts = [f"Order {i}: the brake pads of the city bike were replaced." for i in range(30)]
    pq.write_table(pa.table({"text": texts, "other": list(range(30))}), tmp_path / "d.parquet")
    train, ev = local_rows(tmp_path / "d.parquet", "parquet", "text", tiny_dir, 64, 0.1)
    tok = Tokenizer.from_dir(tiny_dir)
    n = len(tok.encode(texts[0]))
    assert len(ev["input_ids"]) == 3 // (64 // n) + bool(3 % (64 // n))  # 3 held-out records, packed
    assert int(train["loss_mask"].sum()) == sum(len(tok.encode(t)) - 1 for t in texts[:27])
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(4)))
    train, ev = local_rows(tmp_path / "d.jsonl", "jsonl", "messages", tiny_dir, 512, 0.25)
    assert int(train["loss_mask"].sum()) == 3 * sum(encode_record(tok, CHAT, "messages")[1])


def _esft_reference(seqs, n_experts: int, top_k: int, scoring: str, p: float) -> list[int]:
    """A port of DeepSeek ESFT's own math (scripts/expert/generate_expert_config.py and the paper),
    per layer, on unpadded sequences: per token the routed (ids, weights) as its logging model
    writes them; a sequence's score is the mean over its tokens of the gate value (``gate``) or of
    1/K per selected slot (``token``); scores are averaged over sequences, normalized over the
    layer's experts (the paper's normalization, not the script's cross-layer one, ESFT issue #17),
    and the experts are taken by descending score until the sum reaches p."""
    import numpy as np

    per_seq = []
    for ids, weights in seqs:
        acc = np.zeros(n_experts)
        for tok_ids, tok_w in zip(ids, weights):
            for e, w in zip(tok_ids, tok_w):
                acc[e] += w if scoring == "gate" else 1.0 / top_k
        per_seq.append(acc / len(ids))
    scores = np.mean(per_seq, axis=0)
    scores = scores / scores.sum()
    order = sorted(range(n_experts), key=lambda e: (-scores[e], e))
    chosen, total = [], 0.0
    for e in order:
        chosen.append(e)
        total += scores[e]
        if total >= p - 1e-12:
            break
    return sorted(chosen)


@pytest.mark.parametrize("scoring", ["gate", "token"])
@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_scores_real_tokens_only_like_esft(scoring, p):
    """Packed rows end in padding whose routing concentrates on a few experts; the score must be
    ESFT's on the unpadded sequences, whatever the pads route to."""
    g = torch.Generator().manual_seed(7)
    E, K, S, lengths = 16, 4, 12, [12, 7, 3]
    ids_BSK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(len(lengths) * S)]).view(-1, S, K)
    w_BSK = torch.rand(ids_BSK.shape, generator=g, dtype=torch.float64)
    token_mask = torch.zeros(len(lengths), S, dtype=torch.bool)
    for b, n in enumerate(lengths):
        token_mask[b, :n] = True
        ids_BSK[b, n:] = torch.tensor([15, 14, 13, 12])  # pads all route to experts 12-15, heavily
        w_BSK[b, n:] = 5.0
    rec = RoutingRecord(shape=(len(lengths), S))
    rec.layers[1] = (w_BSK.view(-1, K), ids_BSK.view(-1, K), None)
    ours = select_experts(expert_scores(rec, E, 3, scoring, token_mask), p)[1]
    seqs = [(ids_BSK[b, :n].tolist(), w_BSK[b, :n].tolist()) for b, n in enumerate(lengths)]
    assert ours == _esft_reference(seqs, E, K, scoring, p)
    # the pads really would have moved the selection: scoring every position picks others
    padded = select_experts(expert_scores(rec, E, 3, scoring), p)[1]
    with_pads = _esft_reference([(ids_BSK[b].tolist(), w_BSK[b].tolist()) for b in range(len(lengths))],
                                E, K, scoring, p)
    assert padded == with_pads != ours
