"""The data blocks of a STAR file, each loop read by pandas' C parser straight from the file, and
written a chunk of rows at a time.

starfile (the writer used elsewhere) reads a loop by holding its text several times over (the file's
lines, their join, a copy with quotes replaced, a StringIO of it): reading a 124 MB particle file of
300000 rows took 0.9 GB beyond the table it made, so that a million particles would need about 3 GB.
Here one pass over the file's lines finds where each block's rows lie, and pandas parses each loop's
rows from the file itself, holding little more than the table.

    blocks = read_star("run_data.star", string_columns=["rlnImageName"])
    particles = blocks["particles"]  # a loop: pd.DataFrame, columns without the leading "_"
    general = read_star("run_model.star")["model_general"]  # a block of "_name value" pairs: dict
    write_star("run_cones.star", {"cones": table}, float_format="%.6f")

Writing is chunked for the same reason: starfile's writer took 0.68 GB to write 4 million rows of
four columns.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from relion_graphsplit.files import atomic_path

NA_VALUES = ["nan", "NaN", "<NA>", ""]
"""The values read as missing, the values a row cut short lacks included (pandas' own long list is not
used: "NA" or "None" may be a name)."""


class StarParseError(ValueError):
    """A loop whose rows do not hold one value per column (a file cut short, or a row broken)."""


@dataclass
class _Block:
    """Where one data block lies in the file: its name and either its loop's columns and rows (the
    0-based number of the line before its first row, and how many rows it holds) or its pairs."""

    name: str
    columns: list[str] | None = None
    skip: int = 0
    rows: int = 0
    pairs: dict[str, str] = field(default_factory=dict)


def read_star(
    path: str | os.PathLike, string_columns: Iterable[str] = (), keep: Callable[[str], bool] | None = None
) -> dict[str, pd.DataFrame | dict]:
    """Every data block of a STAR file by name (without "data_"), in file order.

    Parameters
    ----------
    path : str or os.PathLike
        The STAR file.
    string_columns : iterable of str
        Columns (without "_") kept as text wherever they appear, such as file names that could read as
        numbers.
    keep : callable or None
        Given a loop column's name (without "_"), whether to read it; None: every column. A loop's
        other columns are skipped by the parser, which then checks the rows' lengths less strictly;
        a loop none of whose columns is kept reads as an empty table.

    Returns
    -------
    dict of str to pd.DataFrame or dict
        A loop as a DataFrame (columns named without the leading "_"; numbers as int64 or float64, text
        as str; "nan" read as missing); a block of "_name value" pairs as a dict of name to value (a
        number where the value reads as one).

    Raises
    ------
    StarParseError
        When a loop's rows hold fewer or more values than it has columns (pandas' ParserError, or a
        table whose rows all hold fewer values). A last row cut short is read with missing values, as
        pandas reads any short row; the caller may look for it.
    OSError
        When the file cannot be read.
    """
    strings = set(string_columns)
    blocks: dict[str, pd.DataFrame | dict] = {}
    for block in _blocks(path):
        if block.columns is None:
            blocks[block.name] = {k: v if k in strings else _number(v) for k, v in block.pairs.items()}
        else:
            blocks[block.name] = _read_loop(path, block, strings, keep)
    return blocks


def _blocks(path: str | os.PathLike) -> Iterator[_Block]:
    """The file's data blocks, found in one pass over its lines (nothing but the current line held)."""
    block: _Block | None = None
    in_rows = False
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, raw in enumerate(f):
            line = raw.strip()
            if line.startswith("data_"):
                if block is not None:
                    yield block
                block, in_rows = _Block(line[5:]), False
            elif block is None or not line or line.startswith("#"):
                continue
            elif line.startswith("loop_"):
                block.columns, in_rows = [], False
            elif line.startswith("_") and not in_rows:
                if block.columns is None:
                    name, *value = line.split(None, 1)
                    block.pairs[name[1:]] = _unquoted(value[0] if value else "")
                else:
                    block.columns.append(line.split()[0][1:])
            elif block.columns is not None:
                if not in_rows:
                    block.skip, in_rows = number, True
                block.rows += 1
    if block is not None:
        yield block


def _read_loop(
    path: str | os.PathLike, block: _Block, strings: set[str], keep: Callable[[str], bool] | None
) -> pd.DataFrame:
    """A loop's rows parsed from the file by pandas (C engine), as a table with the block's columns
    (those `keep` accepts, where given)."""
    columns = block.columns or []
    wanted = None if keep is None else [i for i, name in enumerate(columns) if keep(name)]
    names = columns if wanted is None else [columns[i] for i in wanted]
    if block.rows == 0 or wanted == []:
        return pd.DataFrame({name: pd.Series(dtype="float64") for name in names})
    try:
        table = pd.read_csv(
            path, sep=r"\s+", header=None, skiprows=block.skip, nrows=block.rows, comment="#",
            skip_blank_lines=True, quotechar='"', keep_default_na=False, na_values=NA_VALUES, engine="c",
            dtype={index: str for index, name in enumerate(columns) if name in strings}, usecols=wanted,
        )  # fmt: skip
    except pd.errors.ParserError as err:
        raise StarParseError(f"data_{block.name}, a row holds more values than the first") from err
    if table.shape[1] != len(names):
        raise StarParseError(f"data_{block.name}, rows of {table.shape[1]} values for {len(columns)} columns")
    table.columns = names
    return table


def _number(value: str) -> int | float | str:
    """A pair's value as int or float where it reads as one, else the text."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _unquoted(value: str) -> str:
    """A pair's value without the quotes that hold its spaces."""
    try:
        parts = shlex.split(value)
    except ValueError:
        return value
    return parts[0] if len(parts) == 1 else value


def write_star(
    path: str | os.PathLike, blocks: dict[str, pd.DataFrame], float_format: str | None = None, chunk: int = 100_000
) -> None:
    """Write tables as the loops of a STAR file, whole or not at all.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write.
    blocks : dict of str to pd.DataFrame
        The loops by name (without "data_"), in order; column names without the leading "_".
    float_format : str or None
        printf format of float columns ("%.6f"); None: the shortest text that reads back to the same
        double.
    chunk : int
        Rows formatted at a time: the memory the writing takes beyond the tables.
    """
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for name, table in blocks.items():
            write_block(f, name, table, float_format=float_format, chunk=chunk)


def write_block(
    f, name: str, table: pd.DataFrame, version: int | None = None, float_format: str | None = None, chunk: int = 100_000
) -> None:
    """One loop into the open text file `f`: the version tag (RELION's "# version 30001", when given),
    data_ and loop_ lines, labels, rows `chunk` at a time, a blank line. Integers plain, floats as
    `write_star` says, strings quoted where they hold white space or are empty."""
    if version is not None:
        f.write(f"\n# version {version}\n")
    f.write(f"\ndata_{name}\n\nloop_ \n")
    f.writelines(f"_{column} #{i} \n" for i, column in enumerate(table.columns, start=1))
    for start in range(0, len(table), chunk):
        part = table.iloc[start : start + chunk]
        columns = [_format_column(part[c], float_format) for c in part.columns]
        f.writelines(" ".join(row) + "\n" for row in zip(*columns))
    f.write("\n")


def _format_column(column: pd.Series, float_format: str | None) -> list[str]:
    """STAR text for one column: floats exact (or by `float_format`), plain integers, strings quoted if needed."""
    if pd.api.types.is_bool_dtype(column):
        return column.astype(int).astype(str).tolist()
    if pd.api.types.is_float_dtype(column):
        values = column.to_numpy()
        return values.astype(str).tolist() if float_format is None else np.char.mod(float_format, values).tolist()
    if pd.api.types.is_integer_dtype(column):
        return column.astype(str).tolist()
    text = column.fillna("").astype(str)
    quote = text.str.contains(r"\s") | (text == "")
    return np.where(quote, '"' + text + '"', text).tolist()
