"""Baseline for `cellfleet bench steer`: the same Metropolis-Hastings steering sampler written in plain
PyTorch (vectorised over chains), on the same weights, start states, clamps and settings.

Per iteration and chain: a block of `block` unclamped genes chosen uniformly (random keys, the smallest
`block` among the free genes), one forward pass with the block masked giving the tempered conditionals
softmax(logits / tau) from which the block is redrawn, then `target_groups` forward passes scoring the
proposal's pseudo-log-likelihood (gene j in pass j mod M, with that pass's genes masked), and the
acceptance min(1, pi(x') q(x_b) / (pi(x) q(x'_b))). Every forward runs in chunks of `batch_rows` rows,
as cellfleet's does. The model is bench/train_baseline.py's `CellModel` loaded strictly from the exported
safetensors file; the token layout is the full one ([CLS] = gene 0, bin n_bins + 1, then every gene).

usage: steer_baseline.py JOB_JSON

JOB_JSON (written by `cellfleet bench steer`): model_dir, states_file (uint8, rows x genes: each chain's
start state, clamps applied), free_file (uint8, rows x genes: 1 where the gene may move), temperature,
block, target_groups, batch_rows, iterations, threads. Prints one JSON line: {chain_iterations, seconds,
chain_iterations_per_second, forwards, acceptance}.
"""
import json
import pathlib
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from screen_baseline import load_baseline_model  # noqa: E402


def main():
    job = json.loads(pathlib.Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(job["threads"]))
    torch.manual_seed(0)
    model, config = load_baseline_model(pathlib.Path(job["model_dir"]))
    n_genes, n_bins = config["n_genes"], config["n_bins"]
    mask_bin, cls_bin = n_bins, n_bins + 1
    read = lambda key: torch.frombuffer(bytearray(pathlib.Path(job[key]).read_bytes()), dtype=torch.uint8)
    states = read("states_file").view(-1, n_genes).long()
    free = read("free_file").view(-1, n_genes).bool()
    rows = states.shape[0]
    tau, block = float(job["temperature"]), int(job["block"])
    groups, batch_rows = int(job["target_groups"]), int(job["batch_rows"])
    ids = torch.arange(n_genes + 1)
    cls = torch.full((rows, 1), cls_bin)
    group_of = torch.arange(n_genes) % groups
    forwards = 0

    def log_conditionals(bins, temperature):
        """[rows, genes, bins] log-probabilities of the full-layout rows `bins` ([rows, genes])."""
        nonlocal forwards
        out = []
        for chunk in bins.split(batch_rows):
            tokens = torch.cat([cls[: chunk.shape[0]], chunk], 1)
            hidden, _ = model(ids.expand(chunk.shape[0], -1), tokens)
            out.append(torch.log_softmax(model.bin_head(hidden[:, 1:]).float() / temperature, -1))
            forwards += chunk.shape[0]
        return torch.cat(out)

    def log_target(x):
        total = torch.zeros(x.shape[0], dtype=torch.float64)
        for m in range(groups):
            scored = group_of == m
            lp = log_conditionals(x.masked_fill(scored, mask_bin), 1.0)
            picked = lp.gather(2, x.unsqueeze(2)).squeeze(2)
            total += (picked * scored).sum(1).double()
        return total

    k = min(block, int(free.sum(1).min()))
    accepted = 0
    start = time.perf_counter()
    with torch.no_grad():
        current = log_target(states)
        for _ in range(int(job["iterations"])):
            keys = torch.rand(rows, n_genes).masked_fill(~free, 2.0)
            chosen = keys.argsort(1)[:, :k]
            masked = torch.zeros(rows, n_genes, dtype=torch.bool).scatter_(1, chosen, True)
            lq = log_conditionals(states.masked_fill(masked, mask_bin), tau)
            lq_block = lq.gather(1, chosen.unsqueeze(2).expand(-1, -1, n_bins))
            drawn = torch.multinomial(lq_block.exp().view(-1, n_bins), 1).view(rows, k)
            forward = lq_block.gather(2, drawn.unsqueeze(2)).sum((1, 2)).double()
            reverse = lq_block.gather(2, states.gather(1, chosen).unsqueeze(2)).sum((1, 2)).double()
            proposed = states.scatter(1, chosen, drawn)
            proposed_target = log_target(proposed)
            ratio = proposed_target - current + reverse - forward
            accept = torch.rand(rows, dtype=torch.float64).log() < ratio
            states = torch.where(accept.unsqueeze(1), proposed, states)
            current = torch.where(accept, proposed_target, current)
            accepted += int(accept.sum())
    seconds = time.perf_counter() - start
    iterations = rows * int(job["iterations"])
    print(json.dumps({
        "chain_iterations": iterations,
        "seconds": seconds,
        "chain_iterations_per_second": iterations / seconds,
        "forwards": forwards,
        "acceptance": accepted / iterations,
    }))


if __name__ == "__main__":
    main()
