"""Prints one Parquet table's rows as JSON, the way a pandas user reads it (NaN as null).

usage: read_table.py TABLE.parquet
"""
import json
import math
import sys

import pandas as pd

frame = pd.read_parquet(sys.argv[1])
rows = [
    {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    for row in frame.to_dict(orient="records")
]
json.dump(rows, sys.stdout, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
