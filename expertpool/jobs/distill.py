"""Self-distillation data for ``mode: mtp``: the base model's own greedy continuations of dataset prompts.

``GreedyContinuations(model, prompt_tokens, seq_len)`` turns a batch of training rows [B, S] into
[B, S]: each row's first ``prompt_tokens`` tokens, then the base model's greedy continuation up to
``seq_len``. It runs the serving forward (``platform.worker.ModelRunner``: paged latent cache, one
prefill step, then one decode step per new token), so a continuation costs what serving it costs,
not a full forward per token. Every rank runs the same number of steps whatever its rows, because
the MoE layers of an expert-parallel model are collectives; the rows themselves differ per rank.

The main model is frozen in this mode, so a prompt's continuation never changes: it is computed once
and kept (a dict keyed by the prompt's bytes; B x S token ids per batch, small), and later epochs
reuse it. The runner's KV cache lives only during one call.

Why targets come from the base and not from the rows: the draft of token i+2 is accepted when it
equals the base's greedy choice after token i+1, so the MTP module learns that choice
(``Trainer.losses``); on the continuation it is the next row token, on the prompt it is what the base
would have said, and both teach the same function.
"""

import torch

from expertpool.model.sampling import SamplingParams
from expertpool.platform.scheduler import StepItem
from expertpool.platform.worker import ModelRunner

BLOCK = 16  # KV block size of the generation cache (any size works; 16 as in serving)


class GreedyContinuations:
    def __init__(self, model, prompt_tokens: int, seq_len: int, device):
        assert 0 < prompt_tokens < seq_len, f"prompt_tokens {prompt_tokens} must be in (0, seq_len {seq_len})"
        self.model, self.prompt_tokens, self.seq_len, self.device = model, prompt_tokens, seq_len, device
        self.cache: dict[bytes, list[int]] = {}
        self.generated_tokens = 0  # tokens the base generated (new prompts only)

    def __call__(self, ids_BS: torch.Tensor) -> torch.Tensor:
        """Rows [B, S] -> prompt + greedy continuation [B, seq_len] (collective: every rank calls it
        once per step, with its own rows)."""
        P = self.prompt_tokens
        prompts = [row[:P].tolist() for row in ids_BS]
        keys = [torch.tensor(p, dtype=torch.int64).numpy().tobytes() for p in prompts]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        # the steps run on every rank as soon as any rank has a new prompt (the MoE layers are collectives)
        outs = self._generate([prompts[i] for i in todo]) if self._anyone_has(len(todo)) else []
        for i, out in zip(todo, outs):
            self.cache[keys[i]] = prompts[i] + out
        return torch.tensor([self.cache[k] for k in keys], dtype=torch.long, device=ids_BS.device)

    def _anyone_has(self, n: int) -> bool:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return n > 0
        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t)
        return int(t) > 0

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]]) -> list[list[int]]:
        n_new, P = self.seq_len - self.prompt_tokens, self.prompt_tokens
        per_seq = -(-self.seq_len // BLOCK)
        rows = max(1, len(prompts))  # a rank with nothing new still steps, with one dummy row
        runner = ModelRunner(self.model, rows * per_seq, BLOCK, self.device)
        greedy = SamplingParams(max_tokens=n_new, temperature=0)
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(rows)]
        real = prompts or [[0] * P]
        items = [StepItem(f"d{i}", p, 0, tables[i], True, greedy) for i, p in enumerate(real)]
        out = [[t] for t in runner.step(items)]  # prefill: the first new token of every row
        for j in range(1, n_new):
            items = [StepItem(f"d{i}", [o[-1]], P + j - 1, tables[i], True, greedy) for i, o in enumerate(out)]
            for o, t in zip(out, runner.step(items)):
                o.append(t)
        self.generated_tokens += n_new * len(prompts)
        return out if prompts else []
