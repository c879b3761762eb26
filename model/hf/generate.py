"""Generate text from an exported Hugging Face directory through `transformers` alone.

    python -m model.hf.generate --model HF_DIR --prompt "Once upon a time" [--max-new-tokens 32] [--sample]

Loads the directory the way any user would (AutoTokenizer + AutoModelForCausalLM, with
trust_remote_code for MemMamba's remote code; nothing of this project is used) and prints the
prompt followed by the continuation. Greedy by default; --sample draws with temperature 1.
The quickstart runs it on the model it just trained and exported.

Exit codes: 0 done, 2 bad input (one line on stderr naming it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def generate(model_dir: str | Path, prompt: str, max_new_tokens: int = 32, sample: bool = False, seed: int = 0) -> str:
    """The prompt's continuation (decoded new tokens only)."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--model {model_dir}: no config.json (expected a directory made by `python -m pretrain.export`)")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    try:
        remote = "auto_map" in json.loads(config_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: not valid UTF-8 JSON ({e})") from None
    if not (model_dir / "tokenizer.json").is_file():
        raise ValueError(f"--model {model_dir}: no tokenizer.json (pretrain.export writes one; was it copied?)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=remote).eval()
    except SafetensorError as e:
        raise ValueError(f"--model {model_dir}: unreadable weights (a truncated safetensors file? {e})") from None
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError("--prompt: empty; give at least one character")
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "top_k": 0} if sample else {"do_sample": False}  # top_k 0: the full distribution
    out = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.hf.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="HF directory (python -m pretrain.export)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    parser.add_argument("--sample", action="store_true", help="sample (temperature 1) instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    args = parser.parse_args(argv)
    try:
        continuation = generate(args.model, args.prompt, args.max_new_tokens, args.sample, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + continuation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
