"""Tokenizer: ``tokenizer.json`` through HF ``tokenizers``, chat templates rendered with Jinja2 as HF does.

BOS/EOS come from ``tokenizer_config.json`` (falling back to the model's config.json ids). The chat
template is rendered in a sandboxed Jinja2 environment with HF's settings (trim_blocks,
lstrip_blocks, ``raise_exception``, ``tojson``). ``encode_chat`` also returns a loss mask that
covers exactly the assistant turns (content and closing EOS), found by rendering prefixes.
``build_tiny_tokenizer`` trains the small byte-level BPE that ships with the embedded tiny model.
"""

import ast
import base64
import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from expertpool.errors import UserError

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT, PAD = "<｜User｜>", "<｜Assistant｜>", "<｜▁pad▁｜>"

TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"

# The DeepSeek-V3 chat template: system/user/assistant turns, assistant tool calls and tool outputs
# as DeepSeek-V3's own template writes them, plus (as vLLM's tool_chat_template_deepseekv3.jinja)
# the request's tools described in the system prompt with the call format.
DEEPSEEK_V3_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first_sp=true, system_prompt='', is_tool=false) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if tools %}{% set ns.system_prompt = ns.system_prompt + ('\\n\\n' if ns.system_prompt else '') + "
    "'## Tools\\nYou have access to the following tools:' %}"
    "{%- for tool in tools %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n### ' + tool['function']['name'] + "
    "'\\nDescription: ' + (tool['function']['description'] or '') + '\\nParameters: ' + "
    "(tool['function']['parameters'] | tojson) %}{%- endfor %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\n\\nTo call tools, answer exactly in this format:\\n"
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGUMENTS\\n```"
    "<｜tool▁call▁end｜><｜tool▁calls▁end｜>' %}{%- endif %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' }}{%- set ns.is_tool = false -%}"
    "{%- else %}{{ '<｜Assistant｜>' }}{%- endif %}"
    "{{ message['content'] or '' }}"
    "{%- if message['tool_calls'] %}{{ '<｜tool▁calls▁begin｜>' }}"
    "{%- for tool in message['tool_calls'] %}{%- if not loop.first %}{{ '\\n' }}{%- endif %}"
    "{%- set args = tool['function']['arguments'] %}"
    "{{ '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n```json\\n' + "
    "(args if args is string else args | tojson) + '\\n```<｜tool▁call▁end｜>' }}"
    "{%- endfor %}{{ '<｜tool▁calls▁end｜>' }}{%- endif %}"
    "{{ '<｜end▁of▁sentence｜>' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if ns.is_tool %}{{ '\\n' }}{%- else %}{{ '<｜tool▁outputs▁begin｜>' }}{%- endif %}"
    "{%- set ns.is_tool = true -%}"
    "{{ '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}"
    "{%- elif message['role'] != 'system' %}{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{%- endif %}{%- endfor %}"
    "{%- if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' }}{%- endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{ '<｜Assistant｜>' }}{% endif %}"
)


class TokenizerError(UserError, ValueError):
    """A tokenizer or chat template that cannot be loaded or applied; the message names the file."""


def _raise(msg):
    raise jinja2.exceptions.TemplateError(msg)


def _read_chat_template(path: Path, cfg: dict) -> str | None:
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").exists():
        cfg = json.loads((path / "chat_template.json").read_text())
    template = cfg.get("chat_template")
    if isinstance(template, list):  # HF allows named templates
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    return template


class _Encoding:
    def __init__(self, ids: list[int]):
        self.ids = ids


class TiktokenBackend:
    """A tiktoken vocabulary (``tiktoken.model``: base64 token, rank per line) behind the methods of
    ``tokenizers.Tokenizer`` that ``Tokenizer`` uses. Kimi-K2 and Moonlight ship one with their own
    ``tokenization_*.py``; we take the split pattern from that file's ``pat_str`` assignment (parsed,
    never executed), the named special tokens from ``tokenizer_config.json``'s
    ``added_tokens_decoder``, and name the unnamed reserved ids after them ``<|reserved_token_N|>``
    as those files do."""

    def __init__(self, ranks: dict[bytes, int], pat_str: str, special: dict[str, int]):
        import tiktoken

        self.ranks, self.special = ranks, special
        self.enc = tiktoken.Encoding("expertpool", pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special)
        self.id_to_bytes = {i: b for b, i in ranks.items()} | {i: s.encode() for s, i in special.items()}
        self.special_ids = set(special.values())

    @classmethod
    def from_dir(cls, path: Path, cfg: dict, reserved: int = 256) -> "TiktokenBackend":
        ranks = {}
        for line in (path / "tiktoken.model").read_text().splitlines():
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
        special = {v["content"]: int(k) for k, v in cfg.get("added_tokens_decoder", {}).items()}
        taken = set(special.values())
        for i in range(len(ranks), len(ranks) + reserved):
            if i not in taken:
                special[f"<|reserved_token_{i}|>"] = i
        return cls(ranks, _pat_str(path), special)

    def get_vocab_size(self) -> int:
        return max(self.id_to_bytes) + 1

    def token_to_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        return self.ranks.get(token.encode())

    def id_to_token(self, i: int) -> str | None:
        b = self.id_to_bytes.get(i)
        return None if b is None else b.decode("utf-8", errors="replace")

    def encode(self, text: str, add_special_tokens: bool = False) -> _Encoding:
        return _Encoding(self.enc.encode(text, allowed_special="all"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return b"".join(self.id_to_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def llguidance_tokenizer(self, n_vocab: int, eos_id: int | None, bos_id: int | None):
        import llguidance

        backend = self

        class _Wrapped:  # llguidance.TokenizerWrapper's input: bytes per id, specials, an encoder
            eos_token_id, bos_token_id = eos_id, bos_id
            tokens = [backend.id_to_bytes.get(i, b"") for i in range(n_vocab)]
            special_token_ids = sorted(backend.special_ids)

            def __call__(self, s: bytes) -> list[int]:
                return backend.enc.encode(s.decode("utf-8", errors="replace"), allowed_special=set())

        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped()), n_vocab=n_vocab)


def _pat_str(path: Path) -> str:
    """The ``pat_str = ...`` of the model's ``tokenization_*.py``: a string literal, or ``"|".join([...])``
    of string literals."""
    for f in sorted(path.glob("tokenization_*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", getattr(t, "attr", None)) == "pat_str"
                                                    for t in node.targets):
                v = node.value
                if isinstance(v, ast.Constant) and isinstance(v.value, str):
                    return v.value
                if (isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute) and v.func.attr == "join"
                        and isinstance(v.func.value, ast.Constant) and len(v.args) == 1):
                    return v.func.value.value.join(ast.literal_eval(v.args[0]))
    raise TokenizerError(f"{path}: tiktoken.model needs its split pattern: no `pat_str = ...` found in a "
                         "tokenization_*.py beside it")


class Tokenizer:
    def __init__(self, tok, bos_token: str | None, eos_token: str | None, chat_template: str | None,
                 add_bos: bool = True):
        self._tok = tok  # tokenizers.Tokenizer, or a TiktokenBackend with the same methods
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template
        self.add_bos_default = add_bos
        self.bos_token_id = tok.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tok.token_to_id(eos_token) if eos_token else None

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """``tokenizer.json`` (HF tokenizers), else ``tiktoken.model`` (Kimi-K2, Moonlight). The chat
        template is read as transformers reads it: ``chat_template.jinja``, else ``chat_template.json``,
        else ``tokenizer_config.json``'s ``chat_template``."""
        path = Path(path)
        cfg = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        if (path / "tokenizer.json").exists():
            tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "tiktoken.model").exists():
            tok = TiktokenBackend.from_dir(path, cfg)
        else:
            raise TokenizerError(f"{path}: neither tokenizer.json nor tiktoken.model found; the model directory "
                                 "needs one of them")

        def tok_str(v):
            return v.get("content") if isinstance(v, dict) else v
        bos, eos = tok_str(cfg.get("bos_token")), tok_str(cfg.get("eos_token"))
        if (bos is None or eos is None) and (path / "config.json").exists():
            mc = json.loads((path / "config.json").read_text())
            bos = bos or (tok.id_to_token(mc["bos_token_id"]) if mc.get("bos_token_id") is not None else None)
            eos = eos or (tok.id_to_token(mc["eos_token_id"]) if mc.get("eos_token_id") is not None else None)
        return cls(tok, bos, eos, _read_chat_template(path, cfg), cfg.get("add_bos_token", True))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def llguidance_tokenizer(self, n_vocab: int):
        """The tokenizer the grammar library (``model.grammar``) masks over, built once per worker."""
        import llguidance

        if isinstance(self._tok, HFTokenizer):
            return llguidance.LLTokenizer(self._tok.to_str(), n_vocab=n_vocab, eos_token=self.eos_token_id)
        return self._tok.llguidance_tokenizer(n_vocab, self.eos_token_id, self.bos_token_id)

    @cached_property
    def _template(self) -> jinja2.Template:
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template (chat_template.jinja or tokenizer_config.json); "
                                 "send /v1/completions or add a chat_template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **template_kwargs) -> str:
        """Render as transformers does: ``messages``, ``tools``, ``add_generation_prompt``, the special
        tokens, and any extra keyword (``chat_template_kwargs``, e.g. DeepSeek-V3.1's ``thinking``)."""
        try:
            return self._template.render(**{"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                                            **template_kwargs, "messages": messages, "tools": tools,
                                            "add_generation_prompt": add_generation_prompt})
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from e

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """Token ids of a whole conversation and a mask that is True on assistant-turn tokens."""
        ids: list[int] = []
        mask: list[bool] = []
        rendered = ""
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                prefix = self.apply_chat_template(messages[:i], add_generation_prompt=True)
                target = False
            else:
                prefix = None
            full = self.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
            if prefix is not None and prefix.startswith(rendered):
                new = self.encode(prefix[len(rendered):], add_bos=False)
                ids += new
                mask += [False] * len(new)
                rendered = prefix
                target = True
            if not full.startswith(rendered):
                raise TokenizerError("chat template is not prefix-stable; cannot build a loss mask")
            new = self.encode(full[len(rendered):], add_bos=False)
            ids += new
            mask += [m["role"] == "assistant" and target] * len(new)
            rendered = full
        return ids, mask


TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. Expert parallel serving splits the routed experts of a
mixture-of-experts model over many workers. Each token is routed to a few experts, and the results are
combined with all-to-all communication. DeepSeek-V3 uses multi-head latent attention, which caches a
compressed latent vector per token instead of full keys and values. Fine-tuning only the experts that a
domain uses keeps the rest of the model unchanged. Hello, how are you today? I am fine, thank you.
What is the capital of France? The capital of France is Paris. def add(a, b): return a + b
for i in range(10): print(i) The contract shall be governed by the laws of the state. Please reset your
password from the account settings page. 0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' "
"""


def build_tiny_tokenizer(vocab_size: int = 512) -> HFTokenizer:
    """Deterministic byte-level BPE with the DeepSeek-V3 special tokens at ids 0..4."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, USER, ASSISTANT, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TINY_CORPUS] * 4, trainer=trainer)
    return tok


def tokenizer_files(tok: HFTokenizer, max_len: int) -> dict[str, str]:
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
           "add_bos_token": True, "add_eos_token": False, "model_max_length": max_len,
           "chat_template": DEEPSEEK_V3_CHAT_TEMPLATE}
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False)}
