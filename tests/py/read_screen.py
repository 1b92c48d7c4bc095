"""Reads a screen's Parquet tables the way a pandas user would and prints them as JSON
(NaN as null; list columns as lists).

usage: read_screen.py RESULTS_DIR
"""
import json
import math
import os
import sys

import pandas as pd


def plain(value):
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


out = {}
for name in ("genes", "cells", "transitions", "attribution", "attribution_pairs"):
    path = os.path.join(sys.argv[1], f"{name}.parquet")
    if os.path.exists(path):
        frame = pd.read_parquet(path)
        out[name] = {
            "columns": list(frame.columns),
            "rows": [{k: plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")],
        }
json.dump(out, sys.stdout)
