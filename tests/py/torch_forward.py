"""Loads a cellfleet weight file with the `safetensors` package into the plain-PyTorch model of
bench/train_baseline.py (strict: every tensor name and shape must match) and prints the [CLS] states of a
fixed token batch (or of the token batch in TOKENS_JSON: {"genes": [[...]], "bins": [[...]]}, e.g. real cells
tokenized by cellfleet's loader), so the test can compare them with cellfleet's own forward pass.

usage: torch_forward.py MODEL_DIR [TOKENS_JSON]    (prints JSON {"parameters": N, "cls": [[...], ...]})
"""
import importlib.util
import json
import pathlib
import sys

import torch
from safetensors.torch import load_file

root = pathlib.Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("train_baseline", root / "bench" / "train_baseline.py")
baseline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(baseline)

model_dir = pathlib.Path(sys.argv[1])
config = json.loads((model_dir / "model.json").read_text())["config"]
model = baseline.CellModel(config)
state = load_file(str(model_dir / "model.safetensors"))
model.load_state_dict(state, strict=True)
model.eval()

if len(sys.argv) > 2:
    tokens = json.loads(pathlib.Path(sys.argv[2]).read_text())
    genes, bins = torch.tensor(tokens["genes"]), torch.tensor(tokens["bins"])
else:
    batch, length, n_bins = 3, config["n_genes"] + 1, config["n_bins"]
    genes = torch.arange(length).repeat(batch, 1)
    bins = torch.tensor([[(7 * i + 3 * j) % n_bins for j in range(length)] for i in range(batch)])
    bins[:, 0] = n_bins + 1
with torch.no_grad():
    hidden, _ = model(genes, bins)
print(json.dumps({"parameters": sum(t.numel() for t in state.values()), "cls": hidden[:, 0].tolist()}))
