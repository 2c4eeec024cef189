"""Tokenizer: ``tokenizer.json`` through HF ``tokenizers``, chat templates rendered with Jinja2 as HF does.

BOS/EOS come from ``tokenizer_config.json`` (falling back to the model's config.json ids). The chat
template is rendered in a sandboxed Jinja2 environment with HF's settings (trim_blocks,
lstrip_blocks, ``raise_exception``, ``tojson``). ``encode_chat`` also returns a loss mask that
covers exactly the assistant turns (content and closing EOS), found by rendering prefixes.
``build_tiny_tokenizer`` trains the small byte-level BPE that ships with the embedded tiny model.
"""

import json
from functools import cached_property
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT, PAD = "<｜User｜>", "<｜Assistant｜>", "<｜▁pad▁｜>"

# The DeepSeek-V3 chat template's system/user/assistant behaviour (tool calls omitted).
DEEPSEEK_V3_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first_sp=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{%- elif message['role'] != 'system' %}{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


class TokenizerError(ValueError):
    pass


def _raise(msg):
    raise jinja2.exceptions.TemplateError(msg)


class Tokenizer:
    def __init__(self, tok: HFTokenizer, bos_token: str | None, eos_token: str | None, chat_template: str | None,
                 add_bos: bool = True):
        self._tok = tok
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template
        self.add_bos_default = add_bos
        self.bos_token_id = tok.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tok.token_to_id(eos_token) if eos_token else None

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise TokenizerError(f"{tj}: not found; the model directory needs a tokenizer.json")
        tok = HFTokenizer.from_file(str(tj))
        cfg = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text())

        def tok_str(v):
            return v.get("content") if isinstance(v, dict) else v
        bos, eos = tok_str(cfg.get("bos_token")), tok_str(cfg.get("eos_token"))
        if (bos is None or eos is None) and (path / "config.json").exists():
            mc = json.loads((path / "config.json").read_text())
            bos = bos or (tok.id_to_token(mc["bos_token_id"]) if mc.get("bos_token_id") is not None else None)
            eos = eos or (tok.id_to_token(mc["eos_token_id"]) if mc.get("eos_token_id") is not None else None)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # HF allows named templates
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        return cls(tok, bos, eos, template, cfg.get("add_bos_token", True))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _template(self) -> jinja2.Template:
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat_template in tokenizer_config.json; "
                                 "send /v1/completions or add a chat_template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
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
