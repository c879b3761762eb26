"""Packed documents: which document each token is in, and the chunk layout the memory runs on.

Training samples are cut from a stream of documents, each ending with the end-of-document (EOD)
token, like Megatron's GPTDataset. With ``ModelConfig.reset_at_eod`` the model treats the token
after every EOD as the start of a new sequence: the SSD state, the conv window and the note pool
start empty there, and the Transformer attends within the document only (DESIGN.md §3). The EOD
itself belongs to the document it ends, as in Megatron's ``reset_attention_mask``.

Documents are numbered per row by ``document_ids`` (mamba_ssm's ``seq_idx``). The SSD scan and the
conv read it directly. The memory needs more: its chunks must start where each document starts,
or a packed document would cut its notes at other places than the same document alone.
``ChunkLayout`` places every document on whole chunks of a padded buffer (its ragged end padded),
so the memory's chunked code runs unchanged on that buffer and ``gather`` brings the result back.

Pure PyTorch, no project imports: this file travels with exported models (remote code).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def document_ids(input_ids: torch.Tensor, eod_token_id: int) -> torch.Tensor | None:
    """(B, L) index of each token's document in its row (0, 1, ...), or None when no row has a
    document boundary (an EOD before the last position), so callers keep their plain path."""
    ends = input_ids[:, :-1] == eod_token_id
    if not bool(ends.any()):
        return None
    return F.pad(ends.cumsum(1), (1, 0))


def reset_document_ids(input_ids: torch.Tensor, reset_at_eod: bool, eod_token_id: int) -> torch.Tensor | None:
    """``document_ids`` when the model resets at EOD (``ModelConfig.reset_at_eod``), else None."""
    return document_ids(input_ids, eod_token_id) if reset_at_eod else None


def padded_document_ids(attention_mask: torch.Tensor | None, seq_idx: torch.Tensor | None) -> torch.Tensor | None:
    """``seq_idx`` of a padded batch: every run of padding (mask 0) and every run of tokens (mask 1)
    becomes a document of its own, on top of the documents in ``seq_idx`` (None: one per row).
    A left-padded prompt is then computed exactly as if it stood alone: its SSM state, conv window
    and note pool start empty after the padding, as they do after an EOD. None when nothing is padded."""
    if attention_mask is None or bool(attention_mask.all()):
        return seq_idx
    mask = attention_mask.long()
    runs = F.pad((mask[:, 1:] != mask[:, :-1]).long().cumsum(1), (1, 0))
    return runs if seq_idx is None else seq_idx + runs


def position_in_document(seq_idx: torch.Tensor) -> torch.Tensor:
    """(B, L) distance of each token from the first token of its document."""
    positions = torch.arange(seq_idx.shape[1], device=seq_idx.device).expand_as(seq_idx)
    starts = torch.where(F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=True), positions, 0)
    return positions - starts.cummax(1).values


def segment_ids(seq_idx: torch.Tensor | None, batch: int, seqlen: int, segment: int, device=None) -> torch.Tensor:
    """(B, L) ``seq_idx`` refined so that a new index also starts every ``segment`` tokens of a document:
    the mixer's state starts afresh there (``MemMambaModel.mixer_segment``, a training-only option)."""
    if seq_idx is None:
        seq_idx = torch.zeros(batch, seqlen, dtype=torch.long, device=device)
    starts = (position_in_document(seq_idx) % segment == 0) | F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0))
    return starts.long().cumsum(1) - 1


@dataclass
class ChunkLayout:
    """Every document of a row on whole chunks of a (B, length) buffer, in order.

    ``index`` (B, L): buffer row of each token; ``row_doc`` (B, length): document of each buffer row,
    -1 for padding; ``doc_start`` (B, length / chunk_size): True where a chunk starts a document
    other than its row's first; ``doc_offset`` (B,): buffer row where the last document starts;
    ``doc_length`` (B,): its length in tokens. Without documents (``index`` None) the buffer is the
    sequence padded to whole chunks and the other fields are None.
    """

    seqlen: int
    length: int
    index: torch.Tensor | None = None
    row_doc: torch.Tensor | None = None
    doc_start: torch.Tensor | None = None
    doc_offset: torch.Tensor | None = None
    doc_length: torch.Tensor | None = None

    @classmethod
    def build(cls, seqlen: int, chunk_size: int, seq_idx: torch.Tensor | None) -> "ChunkLayout":
        whole = -(-seqlen // chunk_size) * chunk_size
        if seq_idx is None:
            return cls(seqlen, whole)
        batch = seq_idx.shape[0]
        doc = seq_idx - seq_idx[:, :1]  # (B, L) from 0 in every row
        lengths = torch.zeros(batch, int(doc[:, -1].max()) + 1, dtype=torch.long, device=doc.device)
        lengths.scatter_add_(1, doc, torch.ones_like(doc))
        padded = -(-lengths // chunk_size) * chunk_size
        offsets = padded.cumsum(1) - padded  # buffer row of each document's first token
        index = offsets.gather(1, doc) + position_in_document(seq_idx)
        length = max(int(padded.sum(1).max()), whole)
        row_doc = torch.full((batch, length), -1, dtype=torch.long, device=doc.device).scatter_(1, index, doc)
        rows, starts = (doc[:, 1:] != doc[:, :-1]).nonzero(as_tuple=True)  # tokens starting a later document
        doc_start = torch.zeros(batch, length // chunk_size, dtype=torch.bool, device=doc.device)
        doc_start[rows, index[rows, starts + 1] // chunk_size] = True
        last = doc[:, -1:]
        return cls(seqlen, length, index, row_doc, doc_start, offsets.gather(1, last).squeeze(1),
                   lengths.gather(1, last).squeeze(1))

    def scatter(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        """x (B, L, ...) -> (B, length, ...): each token at its buffer row, ``fill`` elsewhere."""
        if self.index is None:
            return F.pad(x, (0, 0) * (x.dim() - 2) + (0, self.length - self.seqlen), value=fill)
        out = x.new_full((x.shape[0], self.length, *x.shape[2:]), fill)
        index = self.index.view(*self.index.shape, *([1] * (x.dim() - 2))).expand_as(x)
        return out.scatter(1, index, x)

    def gather(self, buffer: torch.Tensor) -> torch.Tensor:
        """(B, length, ...) -> (B, L, ...): the rows of the tokens, in sequence order."""
        if self.index is None:
            return buffer[:, :self.seqlen]
        index = self.index.view(*self.index.shape, *([1] * (buffer.dim() - 2))).expand(-1, -1, *buffer.shape[2:])
        return buffer.gather(1, index)
