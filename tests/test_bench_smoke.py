"""Smoke test of the benchmark suite's machinery on the tiny seed case, in-process.

It checks that a run produces every field the table, the JSON and the
summary promise; the figures themselves are the benchmark's business.
PyTorch and ONNX Runtime are used when installed, and their parts skipped
when not.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("rich")

# bench/ is a directory of the repository, not part of the installed
# distribution: make it importable under plain `pytest` too (appended, so an
# installed tconv still wins over the source tree).
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

import tconv  # noqa: E402
from bench import layers, report  # noqa: E402
from bench.__main__ import main  # noqa: E402
from bench.suite import Options, run_suite  # noqa: E402

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


@pytest.fixture(scope="module")
def document():
    options = Options(layers=["seed"], threads=[1], repeat=2, gemm_size=256)
    return run_suite(options)


def test_layer_shapes_agree_with_tconv_shape():
    for layer in layers.LAYERS:
        if layer.transposed:
            want = tconv.shape.conv_transpose_output_size(
                layer.size, (layer.kernel,) * 2, layer.stride, layer.padding, layer.output_padding
            )
        else:
            want = tconv.shape.conv_output_size(layer.size, (layer.kernel,) * 2, layer.stride, layer.padding)
        assert tuple(want) == layer.out_size, layer.name


def test_flops_formula():
    layer = next(l for l in layers.LAYERS if l.name == "dcgan.b64.512-256")
    assert layer.flops == 2 * 64 * 512 * 4 * 4 * 256 * 4 * 4


def test_document_fields(document):
    machine = document["machine"]
    for key in ("cpu_model", "cores", "blas", "blas_libraries", "gemm_peak", "load_average"):
        assert key in machine
    assert machine["gemm_peak"]["1"]["gflops"] > 0
    assert document["default_backend"] in document["backends"]
    (record,) = document["results"]
    assert record["case"] == "seed" and record["threads"] == 1 and record["flops"] == 2 * 9 * 4
    assert record["tconv"], "no tconv backend ran"
    for name, result in record["tconv"].items():
        assert result["check"]["ok"], (name, result["check"])
        assert result["check"]["worked_example_error"] == 0
        for key in ("median_s", "gflops", "peak_fraction", "timing", "memory"):
            assert key in result, (name, key)
        assert len(result["timing"]["samples_s"]) == 2
        assert result["memory"]["extra_mib"] is not None
    (summary,) = [s for s in document["summary"] if s["default"]]
    for key in ("geomean_speedup", "dcgan_peak_fraction", "seed_us", "meets", "blas_threads_mismatch"):
        assert key in summary


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch not installed")
def test_torch_peer(document):
    (record,) = document["results"]
    torch = record["peers"]["torch"]
    assert torch["median_s"] > 0
    assert record["reference"] == "torch"
    for result in record["tconv"].values():
        assert result["speedup"]["torch"] > 0 and "best" in result["speedup"]
    assert "seed_time_over_torch" in document["summary"][0]


@pytest.mark.skipif(not HAS_ORT, reason="ONNX Runtime not installed")
def test_ort_peer(document):
    (record,) = document["results"]
    ort = record["peers"]["ort"]
    assert ort["median_s"] > 0
    if record["reference"] != "ort":
        assert ort["error_vs_reference"] <= 1e-4


def test_peers_missing_are_noted_not_faked(document):
    for name, info in document["peers"].items():
        if not info["available"]:
            assert "skipped" in info["note"]
            assert all(name not in r["peers"] or "median_s" not in r["peers"][name] for r in document["results"])


def test_table_json_and_plot(document, tmp_path):
    out = io.StringIO()
    report.print_report(document, report.Console(file=out, width=220, color_system=None))
    text = out.getvalue()
    for header in ("case", "backend", "GFLOP/s", "% peak", "x best", "extra MiB", "Summary", "geomean"):
        assert header in text
    # (a run of some cases only says that the targets are set over the whole suite)
    assert "a subset of the cases" in text
    whole = {**document, "options": {**document["options"], "layers": None, "quick": False}}
    out = io.StringIO()
    report.print_report(whole, report.Console(file=out, width=220, color_system=None))
    assert "a subset of the cases" not in out.getvalue()
    path = tmp_path / "bench.json"
    report.write_json(document, str(path))
    assert json.loads(path.read_text())["results"][0]["case"] == "seed"
    if importlib.util.find_spec("matplotlib") is not None:
        png = tmp_path / "bench.png"
        report.write_plot(document, str(png))
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_list_and_bad_filter(capsys):
    assert main(["--list", "--layers", "dcgan.b64"]) == 0
    assert "dcgan.b64.512-256" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--layers", "no-such-layer"])
