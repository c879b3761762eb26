"""Export a SentencePiece tokenizer as a Hugging Face fast tokenizer that encodes exactly like it.

    python -m tokenizer.hf --tokenizer TOKENIZER_DIR --output HF_DIR

writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`, loadable with
`transformers.AutoTokenizer.from_pretrained(HF_DIR)` without sentencepiece installed.

Why a hand-built tokenizer.json (DESIGN.md §6): transformers' `LlamaTokenizer` ignores the
SentencePiece normalizer (wrong on leading spaces, wrong on Unigram) and a bare tokenizer.model
needs sentencepiece + protobuf and still mismatches. So the `tokenizers` pipeline is rebuilt
from the .model proto, step for step:

  normalizer     [precompiled charsmap, if the proto has one]
                 [strip + collapse spaces, if remove_extra_whitespaces]
                 [prepend "▁", if add_dummy_prefix]
                 replace " " -> "▁"
  pre-tokenizer  none (SentencePiece encodes the whole normalized text)
  model          BPE: vocab in SentencePiece id order, merges ordered by the id of the merged
                 piece (SentencePiece merges the pair whose result has the best score, and
                 BPE scores fall with the id), byte fallback. Unigram: the scored pieces.
  decoder        replace "▁" -> " ", byte fallback, fuse, [strip one leading space, if dummy prefix]

Control pieces (<unk>, <s>, </s>, <pad>) become special tokens and user-defined pieces added
tokens. Text is encoded like SentencePiece encodes it: no BOS/EOS is added, and a literal "</s>"
in the text stays characters (`split_special_tokens=True`); for Unigram models that last point
has one known exception, noted at the model below. Decoding equals SentencePiece's for valid
UTF-8; where byte pieces form invalid UTF-8 (random models), HF's byte-fallback decoder turns
every byte of the run into U+FFFD while SentencePiece replaces only the invalid bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, decoders, models, normalizers
from tokenizers import Tokenizer as HFTokenizer

from .tokenizer import Tokenizer

SPACE = "▁"
# SentencePiece piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
BPE, UNIGRAM = 2, 1


def load_proto(model_path: Path) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    return proto


def bpe_merges(pieces: list[str], mergeable: list[bool]) -> list[tuple[str, str]]:
    """Every split of a mergeable piece into two mergeable pieces, ordered by the merged piece's id
    (then by the left part's id): HF's BPE applies lower-ranked merges first, as SentencePiece
    applies higher-scored (lower-id) pieces first."""
    ids = {piece: i for i, piece in enumerate(pieces) if mergeable[i]}
    merges = []
    for merged_id, piece in enumerate(pieces):
        if not mergeable[merged_id]:
            continue
        splits = [(ids[piece[:k]], piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in ids and piece[k:] in ids]
        merges.extend((left, right) for _, left, right in sorted(splits))
    return merges


def build_hf_tokenizer(proto: sentencepiece_model_pb2.ModelProto) -> HFTokenizer:
    """The `tokenizers` pipeline equivalent to the SentencePiece model in `proto`."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.treat_whitespace_as_suffix:
        raise ValueError("tokenizer.model: treat_whitespace_as_suffix=True is not supported by the HF export")
    pieces = [p.piece for p in proto.pieces]
    unk = pieces[trainer.unk_id]
    if trainer.model_type == BPE:
        # Only normal and user-defined pieces take part in merges: control and byte pieces are never
        # built from text, so "<s>" must not be reachable by merging "<", "s", ">".
        mergeable = [p.type in (NORMAL, USER_DEFINED) for p in proto.pieces]
        model = models.BPE(vocab={piece: i for i, piece in enumerate(pieces)}, merges=bpe_merges(pieces, mergeable),
                           unk_token=unk, fuse_unk=True, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == UNIGRAM:
        # Known difference: SentencePiece keeps control and byte pieces out of its lattice, HF's Unigram
        # cannot, so a literal "</s>" or "<0x41>" in the text becomes that piece here. Lowering their
        # scores does not help: HF derives the unknown-character score from the lowest score.
        model = models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=trainer.unk_id,
                               byte_fallback=trainer.byte_fallback)
    else:
        raise ValueError(f"tokenizer.model: model type {trainer.model_type} is not supported (expected BPE or Unigram)")
    tok = HFTokenizer(model)

    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    tok.normalizer = normalizers.Sequence(steps)

    decode_steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode_steps)

    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in proto.pieces if p.type in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                    for p in proto.pieces if p.type == USER_DEFINED])
    return tok


def export_hf_tokenizer(tokenizer_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the HF tokenizer files of our tokenizer into `out_dir` (created if needed).

    Returns the written paths. Each file is written to a temp dir first and moved into place,
    so `out_dir` never holds half a tokenizer.json.
    """
    from transformers import PreTrainedTokenizerFast

    ours = Tokenizer(tokenizer_dir)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=build_hf_tokenizer(load_proto(ours.model_path)),
        unk_token=ours.id_to_piece(ours.unk_id), bos_token=ours.id_to_piece(ours.bos_id),
        eos_token=ours.id_to_piece(ours.eos_id), pad_token=ours.id_to_piece(ours.pad_id),
        add_bos_token=False, add_eos_token=False, split_special_tokens=True, clean_up_tokenization_spaces=False,
        model_max_length=sys.maxsize,  # a recurrent model has no context limit
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer.") as tmp:
        hf.save_pretrained(tmp)
        config_path = Path(tmp) / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        # Without an explicit class, a directory whose config.json says mamba2 loads GPTNeoXTokenizer.
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        for name in sorted(os.listdir(tmp)):
            os.replace(Path(tmp) / name, out_dir / name)
            written.append(out_dir / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenizer.hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True, help="our tokenizer dir (tokenizer.model + config)")
    parser.add_argument("--output", type=Path, required=True, help="directory for the HF tokenizer files")
    args = parser.parse_args(argv)
    try:
        written = export_hf_tokenizer(args.tokenizer, args.output)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(p.name for p in written)} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
