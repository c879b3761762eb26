"""Hugging Face wrapper of MemMamba (remote code, shipped inside every exported MemMamba directory).

    model = AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
    model.generate(input_ids, max_new_tokens=32)          # O(1) time and memory per new token

The network is the project's pure-PyTorch reference (memmamba.py and the files it imports,
copied beside this one), so the exported model computes exactly what training computed.
Parameter names are the reference's, which are HF ``Mamba2ForCausalLM``'s plus
``backbone.layers.{i}.memory.*``.

Generation: the recurrent cache (conv + SSM state, note pool, pending notes per layer; see
decode.py) is returned as ``past_key_values``. The first call prefills it with the parallel
forward, every later call feeds the new token(s) through the step function; transformers'
``generate`` passes only the last token once a cache exists. Beam search (cache reordering) is
not supported.

Padding: an ``attention_mask`` with zeros makes every run of padding a document of its own
(documents.padded_document_ids), the mechanism that resets at EOD: a left-padded prompt gets the
logits, cache and continuation it gets alone, pad positions write no note it can read and enter
neither its SSM state nor its conv window. The mask matters only when the cache is filled (or
without a cache); later steps read each row's own cache.

This file only works inside an exported directory: `python -m pretrain.export` assembles it.
"""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_memmamba import MemMambaConfig
from .decode import MemMambaCache
from .documents import padded_document_ids
from .memmamba import MemMambaForCausalLM as ReferenceLM


class MemMambaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MemMambaConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _no_split_modules = ["MemMambaBlock"]
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}
    _is_stateful = True  # a recurrent state, not a growing KV cache

    def __init__(self, config: MemMambaConfig):
        super().__init__(config)
        reference = ReferenceLM(config.model_config())
        self.backbone = reference.backbone
        self.lm_head = reference.lm_head
        # The reference LM owns the decoding logic and shares these very modules. Set past
        # nn.Module.__setattr__ so its parameters are not registered (and saved) a second time.
        object.__setattr__(self, "reference", reference)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our own recurrent cache, created in forward

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing to do: the reference constructors initialise every parameter (the memory's
        fusion at zero, so a fresh MemMamba equals its Mamba2 backbone) and from_pretrained
        overwrites them all. HF's generic per-module init would undo the zero fusion."""

    def forward(
        self,
        input_ids: torch.LongTensor,
        past_key_values: MemMambaCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, L) -> logits (B, L, V), the cache if one is used, and the mean next-token
        loss if ``labels`` (B, L) are given (shifted inside, -100 ignored, as in HF models)."""
        if use_cache is None:
            use_cache = self.config.use_cache
        if past_key_values is not None:
            # Decode: feed the new tokens one at a time through the recurrent step.
            logits = torch.stack([self.reference.step(token, past_key_values) for token in input_ids.unbind(1)], 1)
            return self._output(logits, labels, past_key_values)
        seq_idx = padded_document_ids(attention_mask, self.reference.document_ids(input_ids))
        if use_cache and labels is None and not self.training:
            past_key_values = self.reference.allocate_cache(input_ids.shape[0])
            logits = self.reference.prefill(input_ids, past_key_values, seq_idx)
        else:
            logits = self.reference(input_ids, seq_idx=seq_idx)
        return self._output(logits, labels, past_key_values)

    @staticmethod
    def _output(logits: torch.Tensor, labels: torch.Tensor | None, cache: MemMambaCache | None
                ) -> CausalLMOutputWithPast:
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
