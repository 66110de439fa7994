"""Reading the user's data files (CSV, TSV, JSONL, JSON, Parquet) in chunks of rows, with bounded memory.

A file is read a chunk of rows at a time and only the columns asked for are kept; text cells longer than
``MAX_CELL_CHARS`` are cut to that (a model reads at most a few thousand tokens of a row; see
:mod:`bitfit.data.tokens` for the exact cut at tokenising); more than ``max_rows`` rows kept from one file is
refused as soon as the count passes it (the error names ``--max-rows`` and ``--train-size``). Files over
``PROGRESS_BYTES`` show a progress bar in bytes.
"""

from __future__ import annotations

import bisect
import csv
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ..errors import DataError
from .tokens import cut

FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet",
           ".pq": "parquet"}
ACCEPTED = ".csv, .tsv, .txt (tab-separated), .jsonl, .json, .parquet or .pq"
MAX_ROWS = 2_000_000  # rows kept from one file by default (--max-rows): about 5 GB at 128 tokens a row
MAX_CELL_CHARS = 1_000_000
CHUNK_ROWS = 20_000
PROGRESS_BYTES = 32 * 2**20

csv.field_size_limit(2**31 - 1)


def too_many_rows(path: str, max_rows: int) -> DataError:
    return DataError(f"data file {path} has more than {max_rows:,} rows, the limit of --max-rows; train on a "
                     f"random subset with --train-size N, or raise --max-rows (memory grows by about 2.5 GB per "
                     f"million rows of 128 tokens)")


class Source:
    """One data file: its format, its header (None where rows carry their own keys: JSON, JSONL) and a
    chunked reader."""

    def __init__(self, path: str):
        self.name = path
        self.path = Path(os.path.expanduser(path))
        if not self.path.exists():
            raise DataError(f"data file {path} not found")
        self.fmt = FORMATS.get(self.path.suffix.lower())
        if self.fmt is None:
            raise DataError(f"data file {path}: unknown format {self.path.suffix!r}; the format comes from the "
                            f"extension: {ACCEPTED}")
        if self.path.is_dir():
            raise DataError(f"could not read {path} as {self.fmt}: it is a folder; give a file ({ACCEPTED})")
        self.size = self.path.stat().st_size
        if self.size == 0:
            raise DataError(f"data file {path} is empty")
        self.header = self._header()

    def _header(self) -> Optional[list]:
        if self.fmt in ("csv", "tsv"):
            with open(self.path, newline="", encoding="utf-8-sig", errors="replace") as f:
                first = f.readline()
            if self.path.suffix.lower() == ".txt" and "\t" not in first:
                raise DataError(f"data file {self.name}: a .txt file is read as tab-separated (TSV), and its first "
                                f"line has no tab; rename a comma-separated file to .csv (accepted: {ACCEPTED})")
            reader = csv.reader([first], delimiter="\t" if self.fmt == "tsv" else ",",
                                quoting=csv.QUOTE_NONE if self.fmt == "tsv" else csv.QUOTE_MINIMAL)
            names = [c.strip() for c in next(reader, [])]
        elif self.fmt == "parquet":
            import pyarrow.parquet as pq

            try:
                names = [str(n).strip() for n in pq.ParquetFile(self.path).schema_arrow.names]
            except Exception as exc:
                raise DataError(f"could not read {self.name} as parquet: {type(exc).__name__}: {exc}") from None
        else:
            return None
        seen: dict = {}
        for i, n in enumerate(names):
            if n in seen:
                raise DataError(f"data file {self.name}: the header names column {n!r} twice (columns "
                                f"{seen[n] + 1} and {i + 1}); rename one so that each column has its own name")
            seen[n] = i
        return names

    def columns(self) -> list:
        """The column names: the header, or the keys of the first rows of a JSON/JSONL file."""
        if self.header is not None:
            return list(self.header)
        for _, chunk in self.chunks(None, max_rows=None, first_only=True):
            return [str(c) for c in chunk.columns]
        return []

    def chunks(self, columns: Optional[Sequence[str]], text_columns: Sequence[str] = (), max_rows: Optional[int] =
               MAX_ROWS, rows: Optional[Sequence[int]] = None, first_only: bool = False) -> Iterator:
        """(number of the chunk's first row in the file, DataFrame) per chunk of rows, holding ``columns``
        (None: all) and only the ``rows`` given (sorted row numbers; None: all). ``text_columns`` are read
        as text and cut to ``MAX_CELL_CHARS``. More than ``max_rows`` rows kept is a DataError."""
        from tqdm.auto import tqdm

        kept = 0
        with tqdm(total=self.size, desc=f"reading {self.path.name}", unit="B", unit_scale=True, leave=False,
                  disable=self.size < PROGRESS_BYTES) as bar:
            for start, df, done in self._raw_chunks(columns, text_columns):
                bar.update(max(0, done - bar.n))
                df.columns = [str(c).strip() for c in df.columns]
                if columns is not None:
                    df = df.reindex(columns=list(columns))
                if rows is not None:
                    lo, hi = bisect.bisect_left(rows, start), bisect.bisect_left(rows, start + len(df))
                    df = df.iloc[[r - start for r in rows[lo:hi]]]
                for c in text_columns:
                    if c in df.columns:
                        df[c] = [cut(v, MAX_CELL_CHARS) if isinstance(v, str) else v for v in df[c]]
                kept += len(df)
                if max_rows is not None and kept > max_rows:
                    raise too_many_rows(self.name, max_rows)
                yield start, df
                if first_only:
                    return

    def _raw_chunks(self, columns, text_columns) -> Iterator:
        import pandas as pd

        wanted = None if columns is None else {str(c) for c in columns}
        try:
            if self.fmt in ("csv", "tsv"):
                raw = {n.strip(): n for n in self._raw_header()}
                kw = dict(keep_default_na=False, na_values=[""], chunksize=CHUNK_ROWS, encoding="utf-8-sig",
                          dtype={raw[c]: object for c in text_columns if c in raw})
                if self.fmt == "tsv":
                    kw.update(sep="\t", quoting=3)
                if wanted is not None:
                    kw["usecols"] = lambda c: str(c).strip() in wanted
                start = 0
                with open(self.path, "rb") as f:
                    for df in pd.read_csv(f, **kw):
                        yield start, df, f.tell()
                        start += len(df)
            elif self.fmt == "jsonl":
                yield from self._jsonl_chunks()
            elif self.fmt == "json":
                try:
                    df = pd.read_json(self.path, dtype=False)
                except ValueError:
                    yield from self._jsonl_chunks()
                    return
                for start in range(0, len(df), CHUNK_ROWS):
                    yield start, df.iloc[start:start + CHUNK_ROWS], self.size
            else:
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(self.path)
                names = [n for n in pf.schema_arrow.names if wanted is None or str(n).strip() in wanted]
                start, n_all = 0, max(1, pf.metadata.num_rows)
                for batch in pf.iter_batches(batch_size=CHUNK_ROWS, columns=names):
                    df = batch.to_pandas()
                    yield start, df, self.size * (start + len(df)) // n_all
                    start += len(df)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"could not read {self.name} as {self.fmt}: {type(exc).__name__}: {exc}") from None

    def _raw_header(self) -> list:
        with open(self.path, newline="", encoding="utf-8-sig", errors="replace") as f:
            first = f.readline()
        return next(csv.reader([first], delimiter="\t" if self.fmt == "tsv" else ",",
                               quoting=csv.QUOTE_NONE if self.fmt == "tsv" else csv.QUOTE_MINIMAL), [])

    def _jsonl_chunks(self) -> Iterator:
        import pandas as pd

        start, records, line_no = 0, [], 0
        with open(self.path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{self.name}, line {line_no}: not valid JSON ({exc}); each line of a .jsonl "
                                    "file must be one JSON object") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{self.name}, line {line_no}: a JSON {type(rec).__name__}, not an object "
                                    "({\"text\": ..., \"label\": ...}); each line must be one JSON object")
                records.append(rec)
                if len(records) == CHUNK_ROWS:
                    yield start, pd.DataFrame.from_records(records), f.tell()
                    start, records = start + len(records), []
            if records:
                yield start, pd.DataFrame.from_records(records), self.size


def read_table(path: str, max_rows: Optional[int] = MAX_ROWS):
    """A pandas DataFrame of ``path`` (all columns); the format comes from the extension."""
    import pandas as pd

    src = Source(path)
    parts = [df for _, df in src.chunks(None, max_rows=max_rows)]
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(df) == 0:
        raise DataError(f"data file {path} has no rows")
    return df
