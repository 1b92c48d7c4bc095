"""PyTorch's own NCCL path on this GPU, as a control for `cellfleet bench nccl-check`.

    python3 scripts/gpu/nccl_torch_control.py process-group [--non-blocking]
    python3 scripts/gpu/nccl_torch_control.py direct

`process-group`: a one-rank torch.distributed group on the NCCL backend (PyTorch's own, non-blocking
communicator with --non-blocking), an in-place all-reduce of 256 MiB whose values must not change.
`direct`: torch.cuda.nccl.all_reduce, NCCL's blocking communicator on one device.
"""
import os
import sys
import time

mode = sys.argv[1]
if "--non-blocking" in sys.argv:
    os.environ["TORCH_NCCL_USE_COMM_NONBLOCKING"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

print(f"torch {torch.__version__}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}", flush=True)
device = torch.device("cuda:0")
values = torch.arange((256 << 20) // 4, device=device, dtype=torch.float32).remainder(977.0)
buffer = values.clone()
if mode == "process-group":
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    reduce = lambda: dist.all_reduce(buffer)  # noqa: E731
else:
    reduce = lambda: torch.cuda.nccl.all_reduce([buffer])  # noqa: E731
reduce()
torch.cuda.synchronize()
assert torch.equal(buffer, values), "a one-rank all-reduce changed the values"
t0 = time.perf_counter()
for _ in range(20):
    reduce()
torch.cuda.synchronize()
ms = (time.perf_counter() - t0) / 20 * 1e3
print(f"{mode}{' (non-blocking)' if '--non-blocking' in sys.argv else ''}: all-reduce of 256 MiB ok, {ms:.3f} ms per call")
if mode == "process-group":
    dist.destroy_process_group()
