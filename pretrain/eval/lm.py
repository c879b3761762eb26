"""Language models and tokenizers as the evaluation tasks see them.

Every task talks to an ``EvalLM``, which wraps one of
* our models (``model.build_model``): ``final_hidden`` + ``lm_head`` for NLLs (logits a slice at
  a time), ``forward(ids, return_hidden_states=True)`` for layer outputs, and
  ``allocate_cache``/``prefill``/``step`` for O(1)-per-token greedy decoding;
* a Hugging Face ``PreTrainedModel`` (an exported directory loaded with
  ``AutoModelForCausalLM``): logits from ``forward(ids).logits``, layer outputs from forward
  hooks on its decoder-layer list (the residual stream after each block, the same tensor our
  models return; HF's ``output_hidden_states`` replaces the last one by its final norm),
  decoding through ``generate``;
* any ``nn.Module`` with ``config.vocab_size`` whose ``forward(ids)`` returns logits (test
  doubles); without a cache API, greedy decoding reruns the whole prefix per new token.

Tokenizers: our ``tokenizer.Tokenizer`` is used as is; an HF tokenizer is wrapped by
``HFTokenizer`` so that both offer ``encode(text) -> list[int]``, ``decode(ids) -> str`` and
``eod_id``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

NLL_CHUNK = 1024
"""Positions whose logits are materialised at once when computing NLLs (our models)."""


def _is_hf_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # an HF model implies transformers was imported
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


class EvalLM:
    """A causal LM in eval mode, with the three operations the tasks need (all under no_grad)."""

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None):
        self.model = model.eval()
        self.is_hf = _is_hf_model(model)
        self.vocab_size = int(model.config.vocab_size)
        self.autocast_dtype = autocast_dtype
        first = next(model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _logit_slices(self, inputs: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """(positions, their logits (B, n, V)) over inputs (B, L): all at once for HF and plain models;
        ours go through ``final_hidden`` and the LM head ``NLL_CHUNK`` positions at a time, never
        holding all L x vocab logits (2 GB at 16k tokens and a 32k vocabulary)."""
        if self.is_hf or not hasattr(self.model, "final_hidden"):
            out = self.model(inputs)
            yield slice(None), out.logits if self.is_hf else out
            return
        hidden = self.model.final_hidden(inputs)  # (B, L, D)
        weight = self.model.lm_head.weight  # (V, D)
        for s in range(0, hidden.shape[1], NLL_CHUNK):
            yield slice(s, s + NLL_CHUNK), hidden[:, s:s + NLL_CHUNK].to(weight.dtype) @ weight.T

    @torch.no_grad()
    def nll(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L + 1) -> next-token negative log-likelihoods (B, L) in float32 of tokens 1..L."""
        ids = ids.to(self.device)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        with self._autocast():
            return torch.cat([_token_nll(logits, targets[:, where]) for where, logits in self._logit_slices(inputs)],
                             dim=1)

    @torch.no_grad()
    def argmax(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> the most likely next token after each position (B, L), teacher-forced."""
        with self._autocast():
            return torch.cat([logits.argmax(-1) for _, logits in self._logit_slices(ids.to(self.device))], dim=1)

    @torch.no_grad()
    def layer_outputs(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """ids (B, L) -> the residual stream after each block, [(B, L, D)] * N, in float32 or float64."""
        ids = ids.to(self.device)
        with self._autocast():
            if not self.is_hf:
                _, hidden = self.model(ids, return_hidden_states=True)
            else:
                with _capture_layer_outputs(self.model) as hidden:
                    self.model(ids)
        return [h.to(torch.promote_types(h.dtype, torch.float32)) for h in hidden]

    @torch.no_grad()
    def greedy(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """prompt (B, L) -> the next ``new_tokens`` greedy tokens (B, new_tokens)."""
        prompt = prompt.to(self.device)
        with self._autocast():
            if self.is_hf:
                out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                          max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                          pad_token_id=self.model.config.eos_token_id)
                return out[:, prompt.shape[1]:]
            if hasattr(self.model, "allocate_cache"):
                return self._greedy_recurrent(prompt, new_tokens)
            return self._greedy_rerun(prompt, new_tokens)

    def _greedy_recurrent(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Prefill once, then one O(1) ``step`` per token (our models' decoding cache)."""
        cache = self.model.allocate_cache(prompt.shape[0])
        token = self.model.prefill(prompt, cache)[:, -1].argmax(-1)  # (B,)
        generated = [token]
        for _ in range(new_tokens - 1):
            token = self.model.step(token, cache).argmax(-1)
            generated.append(token)
        return torch.stack(generated, dim=1)

    def _greedy_rerun(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        ids = prompt
        for _ in range(new_tokens):
            ids = torch.cat([ids, self.model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return ids[:, prompt.shape[1]:]


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (B, n, V), targets (B, n) -> per-token cross-entropy (B, n) in float32."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


@contextlib.contextmanager
def _capture_layer_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect each decoder layer's output (first element when a layer returns a tuple)."""
    layers = next((m for name, m in model.named_modules() if name.endswith("layers") and isinstance(m, nn.ModuleList)),
                  None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder-layer list (a ModuleList named '*layers') to read "
                         f"layer outputs from")
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args, output) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class HFTokenizer:
    """A transformers tokenizer behind our Tokenizer's interface (no special tokens added)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.eod_id = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])
