"""Text sources: where documents come from, named by one string.

| spec                           | what it reads                                                              |
|--------------------------------|----------------------------------------------------------------------------|
| `pg19:PATH`                    | the PG19 release layout: `PATH/{train,validation,test}/<id>.txt` and       |
|                                | `PATH/metadata.csv` (no header: `id,title,year,url`); books in numeric id  |
|                                | order, titles kept for the manifest                                        |
| `hf:NAME_OR_PATH`              | Hugging Face `datasets`: a `save_to_disk` directory, data files            |
|                                | (parquet/jsonl/json/arrow/csv; split from the file name, else `train`),    |
|                                | or a hub name when a hub is reachable; the text column is `text_field`     |
| `jsonl:PATH`                   | one JSON object per line with a `text_field` key; a file is the train      |
|                                | split, a directory holds `<split>.jsonl` files                             |
| `synthetic[:docs=N,seed=S,words=W]` | the embedded long-document generator (`data_prep/synthetic.py`)      |
| `needles[:docs=N,seed=S,words=W,facts=F]` | retrieval-dense documents: a passkey and F key -> value facts at |
|                                | distances spanning the document, varied filler, questions at the end     |
|                                | (`data_prep/needles.py`)                                                   |
| `copies[:docs=N,seed=S,lines=L]` | digit-copy drills, "Copy 7301948 again 7301948." (`data_prep/copies.py`): |
|                                | the warm-up that lets small models tell digits apart                       |

Decoding policy for files: UTF-8; invalid bytes become U+FFFD, are counted per file and reported
in the manifest (`decode_errors`), and are not fatal: a stray Latin-1 byte in one book should not
stop a 28k-book run.

Every source lists its splits, counts each split's documents (needed to divide work between
SLURM array tasks) and streams documents `start:stop` of a split in a fixed, documented order.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import copies, needles, synthetic

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclass
class Source:
    """A named corpus: its splits, their sizes, and their documents in order."""

    spec: str
    text_field: str = "text"
    decode_errors: dict[str, int] = field(default_factory=dict)
    """Invalid UTF-8 bytes replaced per file (pg19 only), filled while documents are read."""

    def splits(self) -> list[str]:
        raise NotImplementedError

    def count(self, split: str) -> int:
        raise NotImplementedError

    def documents(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
        raise NotImplementedError

    def describe(self, split: str, start: int = 0, stop: int | None = None) -> dict[str, Any]:
        """Extra facts about documents `start:stop` of a split for the manifest (e.g. book titles)."""
        return {}

    def identity(self) -> dict[str, Any]:
        """What the source holds, cheaply: a resumed prepare refuses to mix content from before and after a change."""
        return {}

    def require_split(self, split: str) -> None:
        if split not in self.splits():
            raise ValueError(f"{self.spec}: split '{split}' not found (available: {', '.join(self.splits()) or 'none'})")


class PG19Source(Source):
    def __init__(self, spec: str, root: Path):
        super().__init__(spec)
        self.root = root
        if not root.is_dir():
            raise ValueError(f"{root}: PG19 directory not found")
        self.books = {split: sorted((root / split).glob("*.txt"), key=_numeric_stem)
                      for split in SPLITS if (root / split).is_dir()}
        self.books = {split: files for split, files in self.books.items() if files}
        if not self.books:
            raise ValueError(f"{root}: no <id>.txt books in train/, validation/ or test/")
        self.titles = self._read_metadata(root / "metadata.csv")

    @staticmethod
    def _read_metadata(path: Path) -> dict[str, str]:
        if not path.is_file():
            raise ValueError(f"{path}: missing (PG19 layout needs metadata.csv: id,title,year,url without header)")
        titles = {}
        for line_no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            book_id, _, rest = line.partition(",")
            parts = rest.rsplit(",", 2)  # titles may hold commas in other releases; year and url never do
            if not book_id.isdigit() or len(parts) != 3:
                raise ValueError(f"{path}:{line_no}: malformed row, expected 'id,title,year,url' with a numeric id")
            titles[book_id] = parts[0]
        if not titles:
            raise ValueError(f"{path}: empty (expected one 'id,title,year,url' row per book)")
        return titles

    def splits(self) -> list[str]:
        return list(self.books)

    def count(self, split: str) -> int:
        self.require_split(split)
        return len(self.books[split])

    def documents(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
        self.require_split(split)
        for path in self.books[split][start:stop]:
            raw = path.read_bytes()
            text = raw.decode("utf-8", errors="replace")
            bad = text.count("\ufffd") - raw.count("\ufffd".encode())
            if bad:
                self.decode_errors[f"{split}/{path.name}"] = bad
                log.warning("%s: %d invalid UTF-8 byte sequence(s) replaced by U+FFFD", path, bad)
            yield text

    def describe(self, split: str, start: int = 0, stop: int | None = None) -> dict[str, Any]:
        return {"books": [[p.stem, self.titles.get(p.stem, "")] for p in self.books[split][start:stop]]}

    def identity(self) -> dict[str, Any]:
        return files_identity(self.root, [self.root / "metadata.csv", *(p for files in self.books.values() for p in files)])


def files_identity(root: Path, files: list[Path]) -> dict[str, Any]:
    """Names, sizes and modification times of ``files`` (not their bytes: 28k books stat in a second)."""
    digest = hashlib.sha256()
    for path in files:
        info = path.stat()
        digest.update(f"{path.relative_to(root)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return {"files": len(files), "sha256": digest.hexdigest()}


def _numeric_stem(path: Path) -> tuple[int, str]:
    return (int(path.stem), path.stem) if path.stem.isdigit() else (1 << 62, path.stem)


class JsonlSource(Source):
    def __init__(self, spec: str, path: Path, text_field: str):
        super().__init__(spec, text_field)
        if path.is_file():
            self.files = {"train": path}
        elif path.is_dir():
            self.files = {split: path / f"{split}.jsonl" for split in SPLITS if (path / f"{split}.jsonl").is_file()}
            if not self.files:
                raise ValueError(f"{path}: no train.jsonl, validation.jsonl or test.jsonl inside")
        else:
            raise ValueError(f"{path}: jsonl file or directory not found")

    def splits(self) -> list[str]:
        return list(self.files)

    def identity(self) -> dict[str, Any]:
        files = list(self.files.values())
        return files_identity(files[0].parent, files)

    def count(self, split: str) -> int:
        self.require_split(split)
        with open(self.files[split], "rb") as f:
            return sum(1 for line in f if line.strip())

    def documents(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
        self.require_split(split)
        path = self.files[split]
        index = 0
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if stop is not None and index >= stop:
                    return
                if index >= start:
                    yield _text_of(line, self.text_field, f"{path}:{line_no}")
                index += 1


def _text_of(line: str, text_field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise ValueError(f"{where}: expected an object with a string field '{text_field}'")
    return record[text_field]


class HFSource(Source):
    _FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow", ".csv": "csv"}

    def __init__(self, spec: str, name_or_path: str, text_field: str):
        super().__init__(spec, text_field)
        import datasets  # imported here: it is slow to import and only this source needs it

        path = Path(name_or_path)
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        elif path.exists():
            files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in self._FILE_BUILDERS)
            if not files:
                raise ValueError(f"{path}: no dataset (save_to_disk) or parquet/jsonl/json/arrow/csv files")
            builders = {self._FILE_BUILDERS.get(p.suffix) for p in files}
            if len(builders) != 1 or None in builders:
                raise ValueError(f"{path}: expected data files of one format, found {sorted(p.name for p in files)}")
            data_files: dict[str, list[str]] = {}
            for p in files:
                split = next((s for s in SPLITS if p.name.startswith(s)), "train")
                data_files.setdefault(split, []).append(str(p))
            loaded = datasets.load_dataset(builders.pop(), data_files=data_files)
        else:
            try:
                loaded = datasets.load_dataset(name_or_path)
            except Exception as e:  # the hub raises many types; the user needs one line
                raise ValueError(f"hf:{name_or_path}: not a local path and not loadable from the hub ({e})") from None
        self.splits_data = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        for split, data in self.splits_data.items():
            if text_field not in data.column_names:
                raise ValueError(f"{spec}: split '{split}' has no column '{text_field}' "
                                 f"(columns: {', '.join(data.column_names)}); pass --text-field")

    def splits(self) -> list[str]:
        return list(self.splits_data)

    def identity(self) -> dict[str, Any]:
        # datasets' own fingerprint: a hash of the data files (and of every transform applied to them)
        return {split: data._fingerprint for split, data in self.splits_data.items()}

    def count(self, split: str) -> int:
        self.require_split(split)
        return len(self.splits_data[split])

    def documents(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
        self.require_split(split)
        data = self.splits_data[split]
        stop = len(data) if stop is None else min(stop, len(data))
        batch = 256  # arrow slices are cheap; row-by-row access is not
        for begin in range(start, stop, batch):
            yield from data[begin:min(begin + batch, stop)][self.text_field]


GENERATORS = {"synthetic": (synthetic, synthetic.SyntheticConfig), "needles": (needles, needles.NeedlesConfig),
              "copies": (copies, copies.CopiesConfig)}
"""Generated corpora: spec kind -> (module with split_sizes and documents, its config dataclass)."""


class GeneratedSource(Source):
    """A generated corpus (synthetic.py, needles.py): `kind:key=integer,...` options fill its config."""

    def __init__(self, spec: str, options: str, generator, config_class: type):
        super().__init__(spec)
        self.generator = generator
        known = config_class.__dataclass_fields__
        values: dict[str, int] = {}
        for item in filter(None, options.split(",")):
            key, _, value = item.partition("=")
            if key not in known or not (value.isascii() and value.isdigit()):  # isdigit alone takes '²'
                raise ValueError(f"{spec}: bad option '{item}', expected key=integer with key in {', '.join(known)}")
            if key in values:
                raise ValueError(f"{spec}: option '{key}' given twice")
            values[key] = int(value)
        self.config = config_class(**values)
        problems = self.config.problems()
        if problems:
            raise ValueError(f"{spec}: " + "; ".join(problems))

    def splits(self) -> list[str]:
        return list(SPLITS)

    def count(self, split: str) -> int:
        self.require_split(split)
        return self.generator.split_sizes(self.config)[split]

    def documents(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
        self.require_split(split)
        count = self.count(split)  # like the other sources, a stop past the split's end ends at it
        return self.generator.documents(self.config, split, start, count if stop is None else min(stop, count))

    def describe(self, split: str, start: int = 0, stop: int | None = None) -> dict[str, Any]:
        return {self.spec.partition(":")[0]: vars(self.config)}


def open_source(spec: str, text_field: str = "text") -> Source:
    """Parse a source spec (see the module docstring) and open it; ValueError on bad input."""
    kind, _, arg = spec.partition(":")
    if kind == "pg19" and arg:
        return PG19Source(spec, Path(arg))
    if kind == "jsonl" and arg:
        return JsonlSource(spec, Path(arg), text_field)
    if kind == "hf" and arg:
        return HFSource(spec, arg, text_field)
    if kind in GENERATORS:
        generator, config_class = GENERATORS[kind]
        return GeneratedSource(spec, arg, generator, config_class)
    raise ValueError(f"source '{spec}': expected pg19:PATH, hf:NAME_OR_PATH, jsonl:PATH, synthetic[:docs=N,seed=S,words=W], "
                     f"needles[:docs=N,seed=S,words=W,facts=F] or copies[:docs=N,seed=S,lines=L]")
