"""What a user does with exported directories, run by `run_isolated` where the project is not importable.

Arguments: one HF directory per check, each followed by "remote" (pass trust_remote_code=True)
or "native" (pass nothing). Reads inputs.pt from the working directory: ids (B, L) for logits (and optionally packed (B, L), rows of
several documents),
prompt (B, P) for a greedy generate() of new_tokens tokens, text for the tokenizer,
optionally padded_ids / padded_mask (B, L), a left-padded batch whose logits (parallel forward)
and greedy continuation are compared with each row's prompt run alone, and
optionally valid (B, L + 1) for a validation loss. For check i it writes outputs_i.pt (logits,
generated tokens, loss); it prints one JSON list with, per check, the model class and module,
the tokenizer ids, whether save_pretrained + from_pretrained gives the same logits, and per forward call of generate() the number of input tokens and (for our
remote code) the cache size in bytes.
"""

CODE = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

inputs = torch.load("inputs.pt")
report = []
for i, (directory, mode) in enumerate(zip(sys.argv[1::2], sys.argv[2::2])):
    remote = mode == "remote"
    model = AutoModelForCausalLM.from_pretrained(directory, **({"trust_remote_code": True} if remote else {})).eval()
    with torch.no_grad():
        logits = model(inputs["ids"]).logits
        packed_logits = model(inputs["packed"]).logits if "packed" in inputs else None
        loss = None
        if "valid" in inputs:
            valid_logits = model(inputs["valid"][:, :-1]).logits.double()
            loss = torch.nn.functional.cross_entropy(valid_logits.flatten(0, 1), inputs["valid"][:, 1:].flatten()).item()
    padded = {}
    if "padded_ids" in inputs:
        ids, mask, new = inputs["padded_ids"], inputs["padded_mask"], inputs["new_tokens"]
        greedy = dict(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=3)
        with torch.no_grad():
            padded["logits"] = model(ids, attention_mask=mask, use_cache=False).logits
        padded["generated"] = model.generate(ids, attention_mask=mask, **greedy)[:, ids.shape[1]:]
        padded["alone_logits"], padded["alone_generated"] = [], []
        for row, row_mask in zip(ids, mask):
            alone = row[row_mask.bool()][None]
            with torch.no_grad():
                padded["alone_logits"].append(model(alone, use_cache=False).logits[0])
            padded["alone_generated"].append(model.generate(alone, **greedy)[0, alone.shape[1]:])

    calls, caches = [], []
    forward = model.forward
    def recording_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        cache = out.get("past_key_values", out.get("cache_params"))  # HF's Mamba2 calls it cache_params
        caches.append(id(cache))
        nbytes = model.reference.cache_nbytes(cache) if hasattr(model, "reference") else None
        calls.append([kwargs["input_ids"].shape[1], nbytes])
        return out
    model.forward = recording_forward
    prompt = inputs["prompt"]
    generated = model.generate(prompt, max_new_tokens=inputs["new_tokens"], do_sample=False, eos_token_id=None)

    # Plain AutoTokenizer, as for any tokenizer. For a remote-code directory transformers first asks on
    # stdin whether to run the custom config code; answered "no" (stdin is empty) it still loads the tokenizer.
    tokenizer = AutoTokenizer.from_pretrained(directory)
    # save_pretrained of the loaded model (e.g. after fine-tuning) gives a directory that loads the same.
    del model.forward  # back to the class method
    model.save_pretrained(f"resaved_{i}")
    resaved = AutoModelForCausalLM.from_pretrained(f"resaved_{i}", **({"trust_remote_code": True} if remote else {}))
    with torch.no_grad():
        resaved_equal = torch.equal(resaved.eval()(inputs["ids"]).logits, logits)

    torch.save({"logits": logits, "packed_logits": packed_logits, "generated": generated[:, prompt.shape[1]:],
                "loss": loss, "padded": padded}, f"outputs_{i}.pt")
    report.append({"class": type(model).__name__, "module": type(model).__module__,
                   "module_file": sys.modules[type(model).__module__].__file__, "calls": calls,
                   "one_cache_object": len(set(caches)) == 1, "resaved_equal": resaved_equal,
                   "tokenizer_class": type(tokenizer).__name__,
                   "text_ids": tokenizer.encode(inputs["text"])})
print("\n" + json.dumps(report))
"""
