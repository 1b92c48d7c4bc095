"""Reference data path for `cellfleet ingest` and the sample stream: NVIDIA bionemo-scdl, installed from PyPI
(`pip install bionemo-scdl`), on the same .h5ad file.

usage: scdl_baseline.py convert H5AD OUT_DIR             -> conversion to SCDL's memory-mapped format
       scdl_baseline.py stream OUT_DIR SECONDS           -> shuffled single-row reads of the converted rows
       scdl_baseline.py loader OUT_DIR SECONDS [BATCH]   -> shuffled batches the way SCDL's docs load them:
                                                            torch DataLoader(shuffle=True) with its
                                                            collate_sparse_matrix_batch

Prints one JSON line: cells, wall seconds, CPU seconds (user + system of this process), peak RSS in MiB,
and for `stream`/`loader` rows read (imports and opening excluded). What it delivers: raw rows (values and
column indices; `loader`: one torch sparse CSR tensor per batch), no tokens, masks or augmentation. One
thread: torch is set to one thread and the DataLoader has no worker processes.
"""
import json
import os
import resource
import sys
import time

import numpy as np
import torch
from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset
from bionemo.scdl.util.torch_dataloader_utils import collate_sparse_matrix_batch
from torch.utils.data import DataLoader

torch.set_num_threads(1)


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds():
    """CPU seconds all cores spent busy since boot (/proc/stat: all but idle and iowait), the kernel's
    writeback of dirty pages included, which no process's own CPU time counts."""
    with open("/proc/stat") as stat:
        jiffies = [int(v) for v in stat.readline().split()[1:9]]
    return (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf("SC_CLK_TCK")


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    mode = sys.argv[1]
    if mode == "convert":
        h5ad, out = sys.argv[2], sys.argv[3]
        os.sync()
        machine = machine_busy_seconds()
        wall, cpu = time.perf_counter(), cpu_seconds()
        # X as stored (its own check wants integer counts; cellfleet reads the same X).
        data = SingleCellMemMapDataset(out, h5ad_path=h5ad, use_X_not_raw=True)
        data.save()
        seconds, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        # Its memory-mapped arrays written back to disk, as cellfleet's shards are by the bench's sync.
        os.sync()
        print(json.dumps({"cells": data.number_of_rows(), "seconds": seconds, "cpu_seconds": cpu,
                          "machine_cpu_seconds": machine_busy_seconds() - machine, "peak_mib": peak_mib()}))
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
    elif mode == "loader":
        out, seconds = sys.argv[2], float(sys.argv[3])
        batch = int(sys.argv[4]) if len(sys.argv) > 4 else 256
        data = SingleCellMemMapDataset(out)
        loader = DataLoader(data, batch_size=batch, shuffle=True, collate_fn=collate_sparse_matrix_batch,
                            generator=torch.Generator().manual_seed(0))
        rows, first, wall, cpu = 0, None, time.perf_counter(), cpu_seconds()
        while time.perf_counter() - wall < seconds:
            for x in loader:
                if first is None:
                    first = {"type": f"{type(x).__module__}.{type(x).__name__}", "layout": str(x.layout),
                             "dtype": str(x.dtype), "shape": list(x.shape)}
                rows += x.shape[0]
                if time.perf_counter() - wall >= seconds:
                    break
        print(json.dumps({"cells": data.number_of_rows(), "rows": rows, "seconds": time.perf_counter() - wall,
                          "cpu_seconds": cpu_seconds() - cpu, "peak_mib": peak_mib(), "batch": first}))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
