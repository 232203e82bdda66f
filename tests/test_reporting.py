"""reporting: what a run shows people (metrics.jsonl here)."""

import json

import pytest

from kdqa.reporting import MetricsLog


def test_a_torn_last_metrics_line_is_dropped_and_a_damaged_one_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    log = MetricsLog(str(path), resume=True)
    assert [r["step"] for r in log.records] == [1, 2]
    log.truncate_after(2)
    log.write({"step": 3, "loss": 1.0})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    path.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a JSON record"):
        MetricsLog(str(path), resume=True)
