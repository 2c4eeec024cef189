"""Per-token overhead of grammar libraries for structured output, on this CPU.

Compares llguidance, xgrammar and outlines-core on the same JSON schema and the same token
sequence: per library, the time to compile the schema for the vocabulary, and the time per
generated token of the work constrained decoding adds to a step (compute the allowed-token mask,
apply it to the logits, accept the sampled token). Two vocabularies: the embedded tiny model's
(~1k tokens) and a 32k byte-level BPE trained here on the Python standard library's sources (no
download), the size class of real tokenizers' mask work (DeepSeek-V3: 129k).

The token sequence is the schema-valid JSON document ``DOC`` encoded with the tokenizer, so every
library accepts the same tokens in the same order.

    python -m bench.grammar [--vocab 32000] [--repeat 3]

Prints a table and appends it to docs/benchmarks.md.
"""

import argparse
import datetime
import glob
import json
import os
import platform
import sysconfig
import time

import torch

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}
DOC = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines", "poetry"],
                  "address": {"city": "London", "zip": "W1"}})


def stdlib_bpe(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from expertpool.model.tokenizer import BOS, EOS
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:200]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def bench_llguidance(tok_json: str, eos: int, vocab: int, ids: list[int]):
    import llguidance
    import llguidance.torch as lt
    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=eos)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)))
    t_compile = time.perf_counter() - t0
    mask = lt.allocate_token_bitmask(1, vocab)
    logits = torch.zeros(1, vocab)
    t0 = time.perf_counter()
    for t in ids:
        lt.fill_next_token_bitmask(m, mask, 0)
        lt.apply_token_bitmask_inplace(logits, mask)
        assert m.consume_token(t), m.get_error()
    dt = time.perf_counter() - t0
    assert m.is_accepting()
    return t_tok, t_compile, dt / len(ids)


def bench_xgrammar(tok, eos: int, vocab: int, ids: list[int]):
    import xgrammar as xgr
    t0 = time.perf_counter()
    encoded = [tok.id_to_token(i) or "" for i in range(tok.get_vocab_size())]
    info = xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    t_compile = time.perf_counter() - t0
    m = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, vocab)
    logits = torch.zeros(1, vocab)
    t0 = time.perf_counter()
    for t in ids:
        m.fill_next_token_bitmask(mask, 0)
        xgr.apply_token_bitmask_inplace(logits, mask)
        assert m.accept_token(t)
    dt = time.perf_counter() - t0
    return t_tok, t_compile, dt / len(ids)


def bench_outlines(tok, eos: int, vocab: int, ids: list[int]):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    t0 = time.perf_counter()
    by_str: dict[str, list[int]] = {}
    for i in range(tok.get_vocab_size()):
        if i == eos:
            continue
        by_str.setdefault(tok.decode([i]), []).append(i)
    voc = Vocabulary(eos, {s: v for s, v in by_str.items() if s})
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?"), voc)
    t_compile = time.perf_counter() - t0
    g = Guide(index)
    logits = torch.zeros(1, vocab)
    t0 = time.perf_counter()
    for t in ids[:-1]:  # outlines-core ends with is_finished(), not by accepting EOS
        allowed = torch.tensor(g.get_tokens())
        keep = torch.full((vocab,), float("-inf"))
        keep[allowed] = 0
        logits += keep
        g.advance(t)
    dt = time.perf_counter() - t0
    assert g.is_finished()
    return t_tok, t_compile, dt / (len(ids) - 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size of the trained BPE")
    ap.add_argument("--repeat", type=int, default=3, help="runs per library; the best is kept")
    ap.add_argument("--no-write", action="store_true", help="do not append to docs/benchmarks.md")
    a = ap.parse_args(argv)
    from tokenizers import Tokenizer as HF

    from expertpool.model.embedded import ensure_embedded_model
    torch.set_num_threads(1)
    tiny = HF.from_file(str(ensure_embedded_model() / "tokenizer.json"))
    vocabs = [("tiny", tiny), (f"bpe{a.vocab // 1000}k", stdlib_bpe(a.vocab))]
    rows = []
    for vname, tok in vocabs:
        eos = tok.token_to_id("<｜end▁of▁sentence｜>")
        n = tok.get_vocab_size()
        ids = tok.encode(DOC, add_special_tokens=False).ids + [eos]
        for lib, fn, arg in (("llguidance", bench_llguidance, tok.to_str()), ("xgrammar", bench_xgrammar, tok),
                             ("outlines-core", bench_outlines, tok)):
            best = None
            for _ in range(a.repeat):
                r = fn(arg, eos, n, ids)
                best = r if best is None or r[2] < best[2] else best
            rows.append((vname, n, lib, *best))
            print(f"{vname:8s} V={n:6d} {lib:14s} tokenizer {best[0] * 1e3:8.1f} ms  compile {best[1] * 1e3:8.1f} ms  "
                  f"per token {best[2] * 1e6:8.1f} us", flush=True)
    table = ["| vocabulary | library | tokenizer setup (ms) | schema compile (ms) | per token (µs) |",
             "|---|---|---:|---:|---:|"]
    table += [f"| {v} ({n}) | {lib} | {tt * 1e3:.1f} | {tc * 1e3:.1f} | {pt * 1e6:.1f} |"
              for v, n, lib, tt, tc, pt in rows]
    print("\n".join(table))
    if not a.no_write:
        with open(os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md"), "a") as f:
            f.write(f"\n## Grammar libraries: per-token mask overhead ({datetime.date.today()})\n\n"
                    f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch "
                    f"thread. Command: `python -m bench.grammar --vocab {a.vocab} --repeat {a.repeat}`. "
                    f"Schema of 4 required fields with a nested object and an array; {len(DOC)}-character "
                    "document. Per token = mask fill + apply to logits + accept.\n\n" + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
