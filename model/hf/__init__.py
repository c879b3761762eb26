"""Hugging Face interop: the config/parameter mapping and the remote code of exported MemMamba models.

==========================  =====================================================================
file                        role
==========================  =====================================================================
mapping.py                  one ``HFFormat`` record per HF model type (Mamba2, Llama, MemMamba):
                            the ModelConfig <-> HF config fields and every other fact of the
                            format, and the tied-head key rule; standard library only
configuration_memmamba.py   ``MemMambaConfig`` (remote code)
modeling_memmamba.py        ``MemMambaForCausalLM(PreTrainedModel, GenerationMixin)`` (remote code)
generate.py                 ``python -m model.hf.generate``: text from an exported dir via transformers
==========================  =====================================================================

The two remote-code files import the reference network with sibling imports (``from .memmamba
import ...``): they run inside an exported directory, where `python -m pretrain.export` copies
them flat beside model/{config,decode,mamba2,memmamba,memory,ssd}.py and mapping.py. They are
not importable from this package; tests load them through ``from_pretrained``.
"""
