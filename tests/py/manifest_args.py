"""Prints, as JSON, every container of the Kubernetes manifests given: {"file/kind/name/container": {"image":
..., "command": [...], "args": [...]}}, so a test can check each command line against the real binaries."""
import json
import sys

import yaml

out = {}
for path in sys.argv[1:]:
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if not doc:
                continue
            spec = doc.get("spec", {})
            pod = spec.get("template", {}).get("spec", {})
            for container in pod.get("containers", []):
                key = f"{path}/{doc['kind']}/{doc['metadata']['name']}/{container['name']}"
                out[key] = {
                    "image": container.get("image", ""),
                    "command": container.get("command", []),
                    "args": container.get("args", []),
                }
print(json.dumps(out))
