"""benchmarks/trace_summary.py: one replay of a graph's trace, read from a synthetic trace."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import trace_summary


def _trace(tmp_path: Path, replays: int = 2) -> Path:
    """`replays` replays of a graph: a main stream running three 'layers' of (product, norm),
    and a second stream with one kernel beside them; a CPU event the reader must skip."""
    events, t = [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 5.0}], 100.0
    for _ in range(replays):
        start = t
        for layer in range(3):
            events.append({"ph": "X", "cat": "kernel", "name": "gemm_layer", "ts": t, "dur": 8.0,
                           "args": {"stream": 7, "grid": [4, 24, 1]}})
            events.append({"ph": "X", "cat": "kernel", "name": "norm", "ts": t + 9.0, "dur": 2.0,
                           "args": {"stream": 7, "grid": [64, 1, 1]}})
            t += 12.0 + layer  # layers of 12, 13, 14 µs
        events.append({"ph": "X", "cat": "kernel", "name": "entropy", "ts": start + 1.0, "dur": 20.0,
                       "args": {"stream": 9, "grid": [8, 1, 1]}})
        t += 500.0
    path = tmp_path / "trace_x.json"
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def test_one_replay_and_its_summary(tmp_path):
    kernels = trace_summary.load_kernels(str(_trace(tmp_path)))
    assert len(kernels) == 14  # the CPU event left out
    replay = trace_summary.one_replay(kernels, 2, 1)
    assert len(replay) == 7
    assert replay[0]["ts"] == 100.0 + 39.0 + 500.0  # the second replay's first kernel
    text = trace_summary.summary(replay)
    assert "one replay: 36.0 µs" in text  # 0 to the last norm's end (12 + 13 + 9 + 2)
    assert "stream 7: 6 kernels, 0.0-36.0 µs, busy 30.0 µs" in text
    assert "stream 9: 1 kernels, 1.0-21.0 µs, busy 20.0 µs" in text
    assert text.index("gemm_layer") < text.index("entropy") < text.index("norm")  # by total time
    assert trace_summary.period(replay, "gemm") == (3, [12.0, 13.0])
    listing = trace_summary.in_order(replay).splitlines()
    assert len(listing) == 7
    assert "gap    1.0 s7 norm" in listing[2]  # 8 µs of product, the norm 1 µs later


def test_bad_traces_say_what_is_wrong(tmp_path):
    with pytest.raises(SystemExit, match="do not split into 3 equal replays"):
        trace_summary.one_replay(trace_summary.load_kernels(str(_trace(tmp_path))), 3, 0)
    with pytest.raises(SystemExit, match="not one of the 2 replays"):
        trace_summary.one_replay(trace_summary.load_kernels(str(_trace(tmp_path))), 2, 2)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"traceEvents": []}))
    with pytest.raises(SystemExit, match="holds no kernel events"):
        trace_summary.load_kernels(str(empty))
