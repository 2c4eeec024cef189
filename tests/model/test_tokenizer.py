"""Tokenizer and chat template: rendering matches transformers' own Jinja rendering."""

import pytest

from expertpool.model.tokenizer import (ASSISTANT, BOS, EOS, USER, Tokenizer, TokenizerError, build_tiny_tokenizer,
                                       tokenizer_files)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    for k, v in tokenizer_files(build_tiny_tokenizer(), 2048).items():
        (d / k).write_text(v)
    return d


CONV = [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, how are you?"},
        {"role": "user", "content": "What is the capital of France?"}]


def test_chat_template_system_user_assistant(tok_dir):
    t = Tokenizer.from_dir(tok_dir)
    assert (t.bos_token_id, t.eos_token_id) == (0, 1)
    text = t.apply_chat_template(CONV, add_generation_prompt=True)
    assert text == (f"{BOS}Be brief.\n\nBe kind.{USER}Hi there{ASSISTANT}Hello, how are you?{EOS}"
                    f"{USER}What is the capital of France?{ASSISTANT}")
    assert not t.apply_chat_template(CONV, add_generation_prompt=False).endswith(ASSISTANT)
    with pytest.raises(TokenizerError, match="unsupported role"):
        t.apply_chat_template([{"role": "wizard", "content": "x"}])


def test_rendering_matches_transformers(tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    t = Tokenizer.from_dir(tok_dir)
    for gen in (True, False):
        assert t.apply_chat_template(CONV, add_generation_prompt=gen) == hf.apply_chat_template(
            CONV, tokenize=False, add_generation_prompt=gen)
    text = "def add(a, b): return a + b"
    assert t.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False)
    assert t.decode(t.encode(text)) == text


def test_encode_chat_masks_exactly_the_assistant_turns(tok_dir):
    t = Tokenizer.from_dir(tok_dir)
    conv = CONV[2:4] + [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]
    ids, mask = t.encode_chat(conv)
    assert ids == t.encode(t.apply_chat_template(conv, add_generation_prompt=False), add_bos=False)
    assert (t.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
            == f"Hello, how are you?{EOS}fine{EOS}")


def test_chat_template_jinja_wins_as_in_transformers(tok_dir, tmp_path):
    """Recent transformers write the template to chat_template.jinja; it takes precedence over
    tokenizer_config.json's, and extra template variables (chat_template_kwargs) reach it."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path / "jinja"
    d.mkdir()
    for f in tok_dir.iterdir():
        (d / f.name).write_text(f.read_text())
    (d / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if thinking %}<think>{% endif %}{% if add_generation_prompt %}[assistant]{% endif %}")
    t = Tokenizer.from_dir(d)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(d))
    conv = CONV[2:3]
    for kw in ({}, {"thinking": True}):
        assert t.apply_chat_template(conv, **kw) == hf.apply_chat_template(
            conv, tokenize=False, add_generation_prompt=True, **kw)
    assert t.apply_chat_template(conv, thinking=True) == f"{BOS}[user]Hi there<think>[assistant]"


def test_tool_calls_and_tool_outputs_render_as_deepseek_v3(tok_dir):
    t = Tokenizer.from_dir(tok_dir)
    conv = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
                {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "CET"}}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "-3 C"},
            {"role": "tool", "tool_call_id": "c2", "content": "12:00"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                               "parameters": {"type": "object"}}}]
    text = t.apply_chat_template(conv, tools=tools)
    assert text == (
        f"{BOS}## Tools\nYou have access to the following tools:\n\n### get_weather\nDescription: Weather.\n"
        'Parameters: {"type": "object"}\n\nTo call tools, answer exactly in this format:\n'
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGUMENTS\n```"
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
        f"{USER}Weather in Oslo?{ASSISTANT}<｜tool▁calls▁begin｜>"
        '<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city":"Oslo"}\n```<｜tool▁call▁end｜>\n'
        '<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{"zone": "CET"}\n```<｜tool▁call▁end｜>'
        f"<｜tool▁calls▁end｜>{EOS}<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>-3 C<｜tool▁output▁end｜>\n"
        "<｜tool▁output▁begin｜>12:00<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")


KIMI_STYLE = '''
import tiktoken

class TikTokenTokenizer:
    special_tokens = {}
    pat_str = "|".join([
        r"""[\\p{Han}]+""",
        r"""[^\\r\\n\\p{L}\\p{N}]?\\p{L}+""",
        r"""\\p{N}{1,3}""",
        r""" ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*""",
        r"""\\s+(?!\\S)""",
        r"""\\s+""",
    ])
'''


def test_tiktoken_vocabulary_loads_like_kimi(tmp_path):
    """A Kimi-K2/Moonlight-style directory: tiktoken.model, the split pattern in tokenization_*.py
    (read, never run), named specials in tokenizer_config.json, the rest of the reserved ids named."""
    import base64

    ranks = {bytes([b]): b for b in range(256)}
    for m in (b"he", b"ll", b"hell", b"hello", b" w", b"or", b"ld"):
        ranks[m] = len(ranks)
    (tmp_path / "tiktoken.model").write_text("".join(f"{base64.b64encode(k).decode()} {v}\n" for k, v in ranks.items()))
    (tmp_path / "tokenization_kimi.py").write_text(KIMI_STYLE)
    n = len(ranks)
    cfg = {"bos_token": "[BOS]", "eos_token": "[EOS]", "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}",
           "added_tokens_decoder": {str(n): {"content": "[BOS]", "special": True},
                                    str(n + 1): {"content": "[EOS]", "special": True}}}
    import json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer.from_dir(tmp_path)
    assert (t.bos_token_id, t.eos_token_id) == (n, n + 1) and t.vocab_size == n + 256
    ids = t.encode("hello world 中文 123")
    assert ids[0] == n and ranks[b"hello"] in ids and ranks[b"ld"] in ids
    assert t.decode(ids) == "hello world 中文 123"
    assert t.decode([n + 1, n + 7], skip_special_tokens=False) == "[EOS]<|reserved_token_" + str(n + 7) + "|>"
    assert t.apply_chat_template([{"role": "user", "content": "hi"}]) == "[BOS]hi"
    lltok = t.llguidance_tokenizer(t.vocab_size)  # the grammar vocabulary builds from it too
    assert lltok.vocab_size == n + 256


def test_tiktoken_without_a_pattern_names_the_fix(tmp_path):
    (tmp_path / "tiktoken.model").write_text("YQ== 0\n")
    with pytest.raises(TokenizerError, match="pat_str"):
        Tokenizer.from_dir(tmp_path)
