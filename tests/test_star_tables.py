"""read_star: every block of a STAR file, loops parsed by pandas from the file itself."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from relion_graphsplit.relion.star_tables import StarParseError, read_star, write_star

TEXT = """
# version 30001

data_general

_rlnFinalResolution	3.5
_rlnName   'a name'
_rlnMicrographName 0001

# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
1 opticsGroup1
2 opticsGroup2

# version 30001

data_particles

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnDefocusU #3
_rlnClassNumber #4
000001@a.mrcs 0001 12000.5 1

# a comment between rows
000002@a.mrcs 0001 nan 2
000003@a.mrcs 0002   13000 1

data_empty

loop_
_rlnX #1
"""


def test_blocks_pairs_loops_blank_lines_and_comments(tmp_path: Path):
    path = tmp_path / "a.star"
    path.write_text(TEXT)
    blocks = read_star(path, string_columns=["rlnMicrographName", "rlnImageName"])
    assert list(blocks) == ["general", "optics", "particles", "empty"]
    assert blocks["general"] == {"rlnFinalResolution": 3.5, "rlnName": "a name", "rlnMicrographName": "0001"}
    assert blocks["optics"]["rlnOpticsGroupName"].tolist() == ["opticsGroup1", "opticsGroup2"]
    particles = blocks["particles"]
    assert particles.columns.tolist() == ["rlnImageName", "rlnMicrographName", "rlnDefocusU", "rlnClassNumber"]
    assert particles["rlnImageName"].tolist() == ["000001@a.mrcs", "000002@a.mrcs", "000003@a.mrcs"]
    assert particles["rlnMicrographName"].tolist() == ["0001", "0001", "0002"]  # kept as text
    assert particles["rlnClassNumber"].dtype == np.int64 and particles["rlnClassNumber"].tolist() == [1, 2, 1]
    assert np.isnan(particles["rlnDefocusU"][1]) and particles["rlnDefocusU"][2] == 13000.0
    assert blocks["empty"].columns.tolist() == ["rlnX"] and len(blocks["empty"]) == 0


def test_only_the_columns_asked_for(tmp_path: Path):
    """With `keep`, each loop holds only the columns it accepts, with the values of a full read."""
    path = tmp_path / "a.star"
    path.write_text(TEXT)
    full = read_star(path, string_columns=["rlnMicrographName"])
    wanted = {"rlnMicrographName", "rlnClassNumber"}
    some = read_star(path, string_columns=["rlnMicrographName"], keep=wanted.__contains__)
    assert some["particles"].columns.tolist() == ["rlnMicrographName", "rlnClassNumber"]
    pd.testing.assert_frame_equal(some["particles"], full["particles"][["rlnMicrographName", "rlnClassNumber"]])
    assert some["optics"].columns.tolist() == [] and len(some["optics"]) == 0
    assert some["general"] == full["general"]  # pairs are not filtered


def test_the_same_tables_as_starfile_reads(tmp_path: Path):
    """Tables starfile wrote read back as starfile reads them."""
    gen = np.random.default_rng(0)
    table = pd.DataFrame({
        "rlnImageName": [f"{i:06d}@Extract/job007/stack.mrcs" for i in range(1, 501)],
        "rlnAngleRot": gen.uniform(-180, 180, 500),
        "rlnRandomSubset": gen.integers(1, 3, 500),
        "rlnDefocusU": gen.uniform(5000, 30000, 500),
    })  # fmt: skip
    path = tmp_path / "w.star"
    starfile.write({"optics": pd.DataFrame({"rlnOpticsGroup": [1]}), "particles": table}, path)
    ours = read_star(path)
    theirs = starfile.read(path, always_dict=True)
    for name in ("optics", "particles"):
        pd.testing.assert_frame_equal(ours[name], theirs[name])


def test_rows_of_the_wrong_length_are_refused(tmp_path: Path):
    path = tmp_path / "bad.star"
    path.write_text("data_particles\nloop_\n_rlnA #1\n_rlnB #2\n1 2\n1 2 3\n")
    with pytest.raises(StarParseError, match="data_particles"):
        read_star(path)
    path.write_text("data_particles\nloop_\n_rlnA #1\n_rlnB #2\n_rlnC #3\n1 2\n")  # cut inside its only row
    with pytest.raises(StarParseError, match="rows of 2 values for 3 columns"):
        read_star(path)


_LARGE_FILE = """
import sys
from relion_graphsplit.relion.star_tables import read_star
def hwm():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
before = hwm()
table = read_star(sys.argv[1])["particles"]
print(hwm() - before, table.memory_usage(deep=True).sum() / 2**20, len(table))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_a_large_table_is_read_in_little_more_than_its_own_memory(tmp_path: Path):
    """60000 rows of 26 columns (26 MB of text): reading took 0.9 GB per 124 MB with starfile's reader."""
    names = [f"rlnValue{k}" for k in range(24)]
    header = "data_particles\nloop_\n_rlnImageName #1\n_rlnMicrographName #2\n" + "".join(
        f"_{name} #{k + 3}\n" for k, name in enumerate(names)
    )
    row = " ".join(f"{v:12.6f}" for v in np.linspace(-1000, 1000, 24))
    path = tmp_path / "large.star"
    with open(path, "w") as f:
        f.write(header)
        for i in range(60000):
            stack, micrograph = f"Extract/job007/Movies/stack_{i // 300:05d}.mrcs", f"MotionCorr/job003/mic_{i // 300:05d}.mrc"
            f.write(f"{i + 1:06d}@{stack} {micrograph} {row}\n")
    done = subprocess.run([sys.executable, "-c", _LARGE_FILE, str(path)], capture_output=True, text=True, check=True)
    growth, table, rows = (float(v) for v in done.stdout.split())
    assert rows == 60000
    assert growth < 2 * table + 30  # MiB: the table, pandas' chunks, not the text several times over


def test_tables_written_a_chunk_at_a_time_read_back(tmp_path):
    """write_star's loops read back as written (floats to the format asked for, strings with spaces and
    empty ones quoted, an empty loop as an empty table), and the chunking does not change the file."""
    rng = np.random.default_rng(0)
    memberships = pd.DataFrame({"cone": np.repeat(np.arange(5), 7), "rho": rng.normal(size=35)})
    names = pd.DataFrame({"cone": [0, 1, 2], "label": ["a b", "", "c"], "weight": [0.5, np.nan, 2.0]})
    empty = pd.DataFrame({"cone1": pd.Series([], dtype=np.int64), "weight": pd.Series([], dtype=float)})
    blocks = {"memberships": memberships, "names": names, "edges": empty}
    write_star(tmp_path / "whole.star", blocks, float_format="%.6f")
    write_star(tmp_path / "chunked.star", blocks, float_format="%.6f", chunk=4)
    assert (tmp_path / "whole.star").read_text() == (tmp_path / "chunked.star").read_text()
    back = read_star(tmp_path / "chunked.star", string_columns=["label"])
    assert back["memberships"]["cone"].tolist() == memberships["cone"].tolist()
    np.testing.assert_allclose(back["memberships"]["rho"], memberships["rho"], rtol=0, atol=5e-7)
    assert back["names"]["label"].fillna("").tolist() == ["a b", "", "c"]
    assert np.isnan(back["names"]["weight"][1]) and back["names"]["weight"][2] == 2.0
    assert back["edges"].empty and list(back["edges"].columns) == ["cone1", "weight"]
    write_star(tmp_path / "exact.star", {"memberships": memberships})
    assert read_star(tmp_path / "exact.star")["memberships"]["rho"].tolist() == memberships["rho"].tolist()
