"""Latency benchmark: sane numbers, interleaved rounds, batch handling, and argument checks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.errors import GraphPruneError
from graphprune.runtime import bench as bench_module
from graphprune.runtime.bench import LatencyResult, bench, bench_many


def _save_conv(path, batch_dim: int | str) -> str:
    weight = numpy_helper.from_array(np.ones((16, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 16, 16, 16])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def test_bench_returns_sane_numbers(tmp_path) -> None:
    path = _save_conv(tmp_path / "conv.onnx", "batch")
    result = bench(path, batch=4, threads=1, provider="cpu", warmup=2, runs=15)
    assert isinstance(result, LatencyResult)
    assert 0 < result.median_ms <= result.p90_ms < 1000
    assert result.throughput_per_s == pytest.approx(4 / (result.median_ms / 1e3))
    assert (result.batch, result.threads, result.provider, result.model) == (4, 1, "cpu", path)


def test_bench_many_covers_every_model_and_batch(tmp_path) -> None:
    paths = [_save_conv(tmp_path / f"m{i}.onnx", "N") for i in range(2)]
    results = bench_many(paths, [1, 2], threads=1, provider="cpu", warmup=0, runs=3)
    assert [(r.model, r.batch) for r in results] == [(p, b) for p in paths for b in (1, 2)]
    assert all(r.median_ms > 0 and r.p90_ms >= r.median_ms for r in results)


def test_fixed_batch_model_refuses_other_batches(tmp_path) -> None:
    path = _save_conv(tmp_path / "fixed.onnx", 1)
    assert bench(path, batch=1, threads=1, warmup=0, runs=2).batch == 1
    with pytest.raises(GraphPruneError, match="fixed batch size of 1"):
        bench(path, batch=8, threads=1, warmup=0, runs=2)


@pytest.mark.parametrize(
    ("batch", "warmup", "runs", "rounds"), [(0, 1, 1, 1), (1, -1, 1, 1), (1, 0, 0, 1), (1, 0, 1, 0)]
)
def test_invalid_counts_are_refused(tmp_path, batch: int, warmup: int, runs: int, rounds: int) -> None:
    path = _save_conv(tmp_path / "conv.onnx", "batch")
    with pytest.raises(GraphPruneError, match="invalid"):
        bench(path, batch=batch, threads=1, warmup=warmup, runs=runs, rounds=rounds)


def test_median_and_p90_are_computed_from_the_timed_runs(tmp_path, monkeypatch) -> None:
    """Known durations through a fake clock: the median is neither the minimum nor the mean."""
    durations = [0.009, 0.001, 0.008, 0.002, 0.007, 0.003, 0.006, 0.004, 0.005, 0.050]
    ticks = iter(np.cumsum([0.0, *(t for d in durations for t in (d, 1.0))]))
    monkeypatch.setattr(bench_module.time, "perf_counter", lambda: float(next(ticks)))
    result = bench(_save_conv(tmp_path / "conv.onnx", "batch"), batch=2, threads=1, warmup=3, runs=10)
    assert result.median_ms == pytest.approx(5.5)  # mean 9.5, minimum 1
    assert result.p90_ms == pytest.approx(13.1)  # between 9 and 50, linear interpolation
    assert result.throughput_per_s == pytest.approx(2 / 0.0055)


def test_rounds_interleave_models_in_fresh_sessions_with_warmup_each(tmp_path, monkeypatch) -> None:
    """Round-major order (a busy spell slows every model's round, not one model), a new session per
    model and round, and the warm-up shared out (at least 2 per round) before each round's timed runs."""
    import gc
    import weakref

    paths = [_save_conv(tmp_path / f"m{i}.onnx", "N") for i in range(2)]
    opened, calls, alive = [], [], []

    def counting_session(path, **kwargs):  # noqa: ANN001, ANN202
        if len(opened) >= len(paths):  # after the first round's: every session timed before is let go
            gc.collect()
            assert all(ref() is None for ref in alive), "a timed session is still held"
        opened.append(path)
        session = make_session(path, **kwargs)
        counted = type("Counted", (), {"run": lambda self, *a: calls.append(path) or session.run(*a)})()
        alive.append(weakref.ref(counted))
        return counted

    make_session = bench_module.make_session
    monkeypatch.setattr(bench_module, "make_session", counting_session)
    results = bench_many(paths, [1], threads=1, warmup=10, runs=9, rounds=3, show_progress=False)
    assert opened == paths * 3
    # per round and model: max(2, 10 / 3 rounded up) = 4 warm-up runs, 9 / 3 = 3 timed
    assert calls == [p for _ in range(3) for p in paths for _ in range(4 + 3)]
    assert [r.rounds for r in results] == [3, 3]
    calls.clear()
    bench_many(paths[:1], [1], threads=1, warmup=0, runs=4, rounds=2, show_progress=False)
    assert len(calls) == 4  # no warm-up asked for, none made


def test_median_is_the_fastest_rounds_and_spread_says_how_far_apart_they_lay(tmp_path, monkeypatch) -> None:
    """Two rounds of two runs through a fake clock: round medians 6 and 2 ms, so 2 ms (a busy round
    only reads slow), spread 6 / 2 - 1; p90 over all four runs."""
    durations = [0.005, 0.007, 0.001, 0.003]
    ticks = iter(np.cumsum([0.0, *(t for d in durations for t in (d, 1.0))]))
    monkeypatch.setattr(bench_module.time, "perf_counter", lambda: float(next(ticks)))
    path = _save_conv(tmp_path / "conv.onnx", "batch")
    result = bench(path, batch=1, threads=1, warmup=0, runs=4, rounds=2, show_progress=False)
    assert result.median_ms == pytest.approx(2.0)
    assert result.spread == pytest.approx(2.0)
    assert result.p90_ms == pytest.approx(6.4)  # of 1, 3, 5, 7
    assert result.throughput_per_s == pytest.approx(1 / 0.002)


def test_cli_bench_says_when_the_machine_was_busy(tmp_path, monkeypatch, capsys) -> None:
    """The table's spread column, the JSON's rounds and spread, and one note naming the model whose
    rounds lay furthest apart once that passes BUSY_SPREAD (none below it)."""
    import json

    from graphprune.cli.main import main

    paths = [_save_conv(tmp_path / f"m{i}.onnx", "N") for i in range(2)]

    def fake(spreads):  # noqa: ANN001, ANN202
        def bench_many_stub(models, batches, **settings):  # noqa: ANN001, ANN003, ANN202
            assert settings["rounds"] == 4
            return [
                LatencyResult(2.0 / (i + 1), 3.0, 500.0, 1, None, "cpu", model, 4, spread)
                for i, (model, spread) in enumerate(zip(models, spreads, strict=True))
            ]

        return bench_many_stub

    monkeypatch.setattr(bench_module, "bench_many", fake([0.1, 0.6]))
    assert main(["bench", *paths, "--rounds", "4"]) == 0
    captured = capsys.readouterr()
    assert "spread" in captured.out and "60%" in captured.out and "2.00x" in captured.out
    note = " ".join(captured.err.split())
    assert "round medians of m1.onnx lay 60% apart: the machine was busy" in note
    assert main(["bench", *paths, "--rounds", "4", "--json"]) == 0
    captured = capsys.readouterr()
    assert [(r["rounds"], r["spread"]) for r in json.loads(captured.out)] == [(4, 0.1), (4, 0.6)]
    assert "the machine was busy" in " ".join(captured.err.split())  # stderr: the JSON stays clean
    monkeypatch.setattr(bench_module, "bench_many", fake([0.1, bench_module.BUSY_SPREAD]))
    assert main(["bench", *paths, "--rounds", "4"]) == 0
    assert "busy" not in capsys.readouterr().err


def test_a_corrupt_file_is_named_unreadable_not_an_unknown_op(tmp_path) -> None:
    path = tmp_path / "cut.onnx"
    path.write_bytes(open(_save_conv(tmp_path / "conv.onnx", "N"), "rb").read()[:100])
    with pytest.raises(GraphPruneError, match="cut.onnx: not a readable ONNX model") as caught:
        bench_many([_save_conv(tmp_path / "ok.onnx", "N"), path], [1], threads=1, warmup=0, runs=1)
    assert "custom domain" not in str(caught.value)
