"""Reference data path for `cellfleet ingest` and the sample stream: NVIDIA bionemo-scdl, installed from PyPI
(`pip install bionemo-scdl`), on the same .h5ad file.

usage: scdl_baseline.py convert H5AD OUT_DIR        -> conversion to SCDL's memory-mapped format
       scdl_baseline.py stream OUT_DIR SECONDS      -> shuffled single-row reads of the converted rows

Prints one JSON line: cells, wall seconds, CPU seconds (user + system of this process), peak RSS in MiB,
and for `stream` rows read. What it delivers: raw sparse rows (values and column indices), no tokens,
masks or augmentation.
"""
import json
import resource
import sys
import time

import numpy as np
from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    mode = sys.argv[1]
    if mode == "convert":
        h5ad, out = sys.argv[2], sys.argv[3]
        wall, cpu = time.perf_counter(), cpu_seconds()
        # X as stored (its own check wants integer counts; cellfleet reads the same X).
        data = SingleCellMemMapDataset(out, h5ad_path=h5ad, use_X_not_raw=True)
        data.save()
        print(json.dumps({"cells": data.number_of_rows(), "seconds": time.perf_counter() - wall,
                          "cpu_seconds": cpu_seconds() - cpu, "peak_mib": peak_mib()}))
    elif mode == "stream":
        out, seconds = sys.argv[2], float(sys.argv[3])
        data = SingleCellMemMapDataset(out)
        order = np.random.default_rng(0).permutation(data.number_of_rows())
        rows, wall, cpu = 0, time.perf_counter(), cpu_seconds()
        while time.perf_counter() - wall < seconds:
            for index in order[rows % len(order):rows % len(order) + 256]:
                (values, columns), *_ = data.get_row(int(index))
                rows += 1
        print(json.dumps({"cells": data.number_of_rows(), "rows": rows, "seconds": time.perf_counter() - wall,
                          "cpu_seconds": cpu_seconds() - cpu, "peak_mib": peak_mib()}))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
