"""Replays kept h5ad mutants (CELLFLEET_MUTANTS_KEEP=DIR of tests/tests/mutation.rs) through h5py's bundled
HDF5, a current release, to ask whether a newer library alone would stop the crashes the system HDF5 has.

Each mutant is read in its own process: every attribute, every dataset in full (variable-length strings
included), as ingest touches them. Prints, per outcome under the system HDF5, how many mutants crashed,
raised an error, or read cleanly under the bundled HDF5.

    python3 tests/py/h5ad_under_newer_hdf5.py DIR
"""
import collections
import pathlib
import subprocess
import sys

READ_ALL = r"""
import sys, h5py
def visit(name, obj):
    for key in obj.attrs:
        obj.attrs[key]
    if isinstance(obj, h5py.Dataset):
        obj[()]
with h5py.File(sys.argv[1], "r") as f:
    for key in f.attrs:
        f.attrs[key]
    f.visititems(visit)
"""


def main():
    import h5py

    keep = pathlib.Path(sys.argv[1])
    table = collections.Counter()
    for outcome_file in sorted(keep.glob("*.outcome")):
        mutant = outcome_file.with_suffix("")
        system = outcome_file.read_text().strip().split("(")[0]
        try:
            run = subprocess.run([sys.executable, "-c", READ_ALL, str(mutant)], capture_output=True, timeout=60)
            newer = "crash" if run.returncode < 0 else ("error" if run.returncode else "ok")
        except subprocess.TimeoutExpired:
            newer = "hang"
        table[(system, newer)] += 1
    print(f"bundled HDF5 {h5py.version.hdf5_version} (h5py {h5py.__version__}); rows: outcome under the system HDF5")
    for system in sorted({s for s, _ in table}):
        cells = ", ".join(f"{n} {table[(system, n)]}" for n in ("crash", "hang", "error", "ok") if table[(system, n)])
        print(f"  {system}: {cells}")


if __name__ == "__main__":
    main()
