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
