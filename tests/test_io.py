"""lib/io's CSV writer: numbers survive the trip to disk."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from wsss.lib.io import write_csv


def test_write_csv_keeps_six_significant_digits(tmp_path: Path):
    values = [6.25e-5, 4e-7, 1.2345678e-9, 0.450803, 584.806374, 0.1234564, 0.0, math.nan]
    write_csv(tmp_path / "rows.csv", [{"step": i, "value": v} for i, v in enumerate(values)])
    with open(tmp_path / "rows.csv") as handle:
        read = [float(row["value"]) for row in csv.DictReader(handle)]
    # small rates as set (six decimal places alone wrote 6.25e-5 as 6.3e-05 and 4e-7 as 0)
    assert read[:3] == [6.25e-5, 4e-7, 1.23457e-9]
    assert read[3:7] == [0.450803, 584.806374, 0.123456, 0.0]  # six places where that is more
    assert math.isnan(read[7])
