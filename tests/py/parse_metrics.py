"""Parses Prometheus text files with the reference parser (prometheus_client) and prints, as JSON, every
sample as {"name{label=value,...}": value}. Fails on anything the parser refuses."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

out = {}
for path in sys.argv[1:]:
    samples = {}
    with open(path) as f:
        text = f.read()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    if not samples:
        sys.exit(f"{path}: no samples")
    out[path] = samples
print(json.dumps(out))
