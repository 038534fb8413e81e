"""The benchmark runs at a tiny size and its JSON holds every figure, positive and finite."""

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import eager_compiles

ROOT = Path(__file__).resolve().parents[1]

POSITIVE = [
    ("federated", "lightning", "images_per_s"),
    ("federated", "lightning", "images_per_s_median"),
    ("federated", "lightning", "round_s", "median"),
    ("federated", "lightning", "client_switch_ms", "median"),
    ("federated", "lightning", "aggregation_ms", "median"),
    ("federated", "lightning", "switch_agg_pct_of_round"),
    ("federated", "lightning", "peak_mb"),
    ("federated", "plain", "images_per_s"),
    ("federated", "plain", "round_s", "median"),
    ("federated", "plain", "client_switch_ms", "median"),
    ("federated", "plain", "aggregation_ms", "median"),
    ("federated", "plain", "peak_mb"),
    ("routed", "batched", "images_per_s"),
    ("routed", "batched", "step_s", "min"),
    ("routed", "batched", "peak_mb"),
    ("routed", "batched_outputs", "images_per_s"),
    ("routed", "loop_fp32", "images_per_s"),
    ("routed", "loop_fp32", "peak_mb"),
    ("routed", "speedup"),
    ("loader", "batched", "images_per_s"),
    ("loader", "plain", "images_per_s"),
    ("loader", "cached", "images_per_s"),
    ("checkpoint", "stock", "wait_ms_per_round", "median"),
    ("checkpoint", "one_file", "wait_ms_per_round", "median"),
    ("checkpoint", "ours", "wait_ms_per_round", "median"),
    ("checkpoint", "ours", "mb_written_per_round"),
    ("checkpoint", "ours", "fit_s"),
    ("outside", "ours", "images_per_s"),
    ("outside", "loop_fp32", "images_per_s"),
    ("outside", "ours", "pass_s", "median"),
]
FINITE = [("federated", "engine_over_plain_time_pct"), ("total_s",)]


def _get(data, path):
    for key in path:
        data = data[key]
    return data


def _run(tmp_path, *args):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--preset", "tiny",
           "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "round throughput" in proc.stdout and "routed step" in proc.stdout
    return json.loads(out.read_text())


def _check(data):
    for path in POSITIVE:
        value = _get(data, path)
        assert isinstance(value, float | int) and math.isfinite(value) and value > 0, (path, value)
    for path in FINITE:
        assert math.isfinite(_get(data, path)), path
    assert _get(data, ("routed", "loop_vs_batched_max_abs_diff")) < 1e-3
    assert _get(data, ("routed", "kernels_vs_outputs_max_abs_diff")) < 1e-3
    assert _get(data, ("loader", "first_batch_max_abs_diff")) < 1e-5
    assert data["device"] and data["date"] and data["command"].startswith("python benchmarks/")
    ck = data["checkpoint"]
    assert len(ck["stock"]["files"]) == 2 and "last.ckpt" in ck["stock"]["files"]
    assert ck["one_file"]["files"] == ck["ours"]["files"] == ["last.ckpt"]
    # one copy instead of two, without the optimizer moments
    assert ck["ours"]["mb_written_per_round"] < 0.5 * ck["stock"]["mb_written_per_round"]
    od = data["outside"]  # both fits adapted on the same outside images
    assert od["ours"]["images_per_pass"] == od["loop_fp32"]["images_per_pass"] > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``benchmarks/gpu_check.sh`` run whole on the CPU (tiny preset): every step of the GPU
    check works before scarce device time is spent on it. Returns its output folder."""
    if os.environ.get("GPU_CHECK_DRY_RUN"):  # already inside the script: never recurse
        pytest.skip("inside a gpu_check.sh dry run")
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "status 0" in proc.stdout
    return out


def test_every_benchmark_command_of_the_gpu_check_parses(monkeypatch):
    """The dry run skips the GPU-only steps (the compile run): their command lines are at
    least parsed here, so a wrong flag cannot waste device time."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import run

    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text().replace("\\\n", " ")
    marker = 'benchmarks/run.py "${SETTING[@]}"'
    commands = [line.split(marker, 1)[1].split("||")[0] for line in script.splitlines()
                if marker in line]
    assert len(commands) >= 3  # main, compile and profiled runs
    for command in commands:
        tokens = shlex.split(command.replace('"$OUT/', '"/tmp/'))
        args = run.parse(["--preset", "paper", "--device", "cuda", "--workers", "4", *tokens])
        assert args.out is not None, command
    compile_run = next(c for c in commands if "--compile" in c)
    assert "--routed-only-compiled" in compile_run


def test_device_check_dry_run_benchmark_json_is_complete(dry_run):
    data = json.loads((dry_run / "paper.json").read_text())
    _check(data)
    assert data["precision"] == "32-true" and data["device_cache"] is True
    for engine in ("lightning_fp16", "lightning_other_format", "lightning_per_tensor"):
        assert data["federated"][engine]["images_per_s"] > 0, engine
    assert data["routed"]["batched_fp16"]["images_per_s"] > 0
    assert "aten::convolution_backward" in data["routed"]["torch_profile"]
    auto = data["routed"]["batched_auto"]
    assert auto["images_per_s"] > 0 and auto["choice"]
    assert {row["chosen"] for row in auto["choice"].values()} <= {"kernels", "outputs"}
    assert set(data["section_s"]) == {"federated", "routed", "loader", "checkpoint", "outside"}
    assert data["batchnorm_backend"] == {"fp32": "Native", "bf16": "Native", "fp16": "Native"}
    assert "round throughput" in (dry_run / "log.txt").read_text()


def test_device_check_dry_run_report_and_profiles(dry_run):
    data = json.loads((dry_run / "paper.json").read_text())
    text = (dry_run / "report.md").read_text()
    assert f"| {data['federated']['lightning']['images_per_s']:.1f} |" in text
    assert "targets apply to the paper preset on a GPU" in text
    assert "| sum of the above |" in text
    assert "- routing mix + memory format:" in text and "mix auto (fastest per layer:" in text
    assert "- routing mix: " in text
    assert "- trainer flat_state:" in text and "per-tensor state ops |" in text
    assert "- trainer.precision:" in text and "- model.channels_last:" in text
    assert "- routing precision:" in text
    ck = data["checkpoint"]["ours"]["wait_ms_per_round"]["median"]
    assert f"| checkpoint wait per round, ms (ours vs Lightning stock) | {ck:.1f} |" in text
    log = (dry_run / "log.txt").read_text()
    assert "FIT Profiler Report" in log and "Self CPU time total" in log
    assert "9 skipped" in log  # the GPU-only tests, collected
    assert "elapsed" in log and log.rstrip().endswith("status 0")
    files = sorted(p.name for p in dry_run.iterdir())
    assert len(files) <= 8, files  # what the device tool brings back


def test_device_check_dry_run_state_ops_fewer_ops_equal_results(dry_run):
    rows = {row["step"]: row for row in json.loads((dry_run / "state_ops.json").read_text())["rows"]}
    assert all(row["equal"] for row in rows.values())
    for step in ("load state into net", "accumulator add", "EMA update", "mean of 5 clients",
                 "NaN/inf check"):
        assert rows[step]["ops_new"] < rows[step]["ops_old"], step
    for step in ("load state into net", "read net state", "NaN/inf check"):  # whole buffers
        assert rows[step]["ops_flat"] < rows[step]["ops_new"], step


def test_report_of_the_h200_run_checks_the_targets():
    """The committed H200 run against issue 8's targets: every figure read from the JSON."""
    results = ROOT / "benchmarks" / "results"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"),
                             str(results / "h200_paper.json"),
                             "--compiled", str(results / "h200_paper_compile.json")],
                            capture_output=True, text=True, check=True, cwd=ROOT)
    assert "Device: NVIDIA H200" in result.stdout
    # each target against the fastest option the run measured, named
    assert "| round throughput, img/s | >= 675 | 272.45 (compile default) | **no** |" in result.stdout
    assert "| routed step, img/s | >= 152 | 94.48 (kernels) | **no** |" in result.stdout
    assert "| switches + aggregation, % of round | < 1 | 5.80 (bf16-mixed) | **no** |" in result.stdout
    assert "- model.compile: **default** fastest (off 242.3, default 272.5 img/s)" in result.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_benchmark_tiny_gpu_bf16_channels_last(tmp_path):
    data = _run(tmp_path, "--device", "cuda", "--precision", "bf16-mixed", "--channels-last",
                "--fp32-engine")
    _check(data)
    assert "bf16" not in data["device"] and data["channels_last"] is True
    assert data["federated"]["lightning_fp32"]["images_per_s"] > 0
    assert data["routed"]["batched_fp32"]["images_per_s"] > 0
    # why 16-mixed is measured beside bf16: only fp16 inputs get cuDNN's BatchNorm
    assert data["batchnorm_backend"]["bf16"] == "Native"
    assert data["batchnorm_backend"]["fp16"] == "Cudnn"


def test_routed_bench_times_a_compiled_variant_and_the_report_names_it(monkeypatch):
    """``--compile`` adds the routed step through torch.compile (eager backend here: the same
    graph capture, no code generation, so the test stays fast on a CPU)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import report
    import routing_bench

    calls = eager_compiles(monkeypatch)
    out = routing_bench.routed_bench(4, 32, 2, 3, torch.device("cpu"), "32-true", False,
                                     steps=1, loop_steps=1, compile_mode="reduce-overhead")
    assert [kwargs for _, kwargs in calls] == [{"mode": "reduce-overhead"}]
    assert out["compiled"]["images_per_s"] > 0
    assert out["compiled"]["mode"] == "reduce-overhead"
    lines = report._suggestions({"routed": out}, None)
    assert any(line.startswith("- routing compile:") for line in lines)


def test_routed_only_compiled_times_the_eager_and_the_compiled_step_only(monkeypatch):
    """The GPU check's compile run: its main run measured the other routed variants, so this
    one times the default eager step and the compiled one, and the report compares those two."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import report
    import run

    calls = eager_compiles(monkeypatch)
    with pytest.raises(SystemExit):
        run.parse(["--routed-only-compiled"])
    out = run.main(["--preset", "tiny", "--only", "routed", "--compile",
                    "--routed-only-compiled"])["routed"]
    assert len(calls) == 1
    assert out["only_compiled"] and out["batched"]["images_per_s"] > 0
    assert out["compiled"]["images_per_s"] > 0
    assert not {"loop_fp32", "variants", "batched_auto", "batched_outputs"} & set(out)
    main = {"precision": "32-true", "channels_last": False,
            "routed": {**out, "batched": {**out["batched"], "images_per_s": 1.0}}}
    del main["routed"]["compiled"], main["routed"]["only_compiled"]
    lines = report._suggestions(report._with_compiled_routing(main, {"routed": out}), None)
    line = next(x for x in lines if x.startswith("- routing compile:"))
    assert f"off {out['batched']['images_per_s']:.1f}" in line  # the compile run's own eager


def test_a_failing_comparison_is_recorded_and_the_other_figures_kept(monkeypatch, tmp_path):
    """Device time is scarce: an optional engine run that fails (say fp16 on some card) must
    not take the run's other figures with it."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import report
    import run

    real = run.lightning_rounds

    def fp16_fails(cfg, device, dm=None):
        if cfg.precision == "16-mixed":
            raise RuntimeError("no fp16 here")
        return real(cfg, device, dm)

    monkeypatch.setattr(run, "lightning_rounds", fp16_fails)
    out = tmp_path / "r.json"
    data = run.main(["--preset", "tiny", "--only", "federated", "--fp16-engine",
                     "--format-engine", "--device-cache", "--loader-engine", "--out", str(out)])
    fed = data["federated"]
    assert fed["errors"] == {"lightning_fp16": "RuntimeError: no fp16 here"}
    assert "lightning_fp16" not in fed and fed["lightning_other_format"]["images_per_s"] > 0
    assert fed["lightning_loaders"]["images_per_s"] > 0  # after the failure, data as before
    assert fed["lightning"]["images_per_s"] > 0
    text = report.report(json.loads(out.read_text()))
    assert "| lightning_fp16: **failed** | RuntimeError: no fp16 here |  |" in text
    assert "- trainer.precision:" not in text and "- model.channels_last:" in text
    assert "- data.device_cache:" in text


def test_report_takes_the_compiled_routed_step_from_the_compiled_run():
    """The GPU check times the compiled routed step in its compile run (``--only federated
    routed --compile``); the report lists it beside the eager variants of the main run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    results = json.loads((ROOT / "benchmarks/results/h200_session5_paper.json").read_text())
    compiled = json.loads((ROOT / "benchmarks/results/h200_session5_paper_compile.json").read_text())
    compiled["routed"] = {"compiled": {"mode": "reduce-overhead", "images_per_s": 160.0}}
    text = report.report(results, compiled=compiled)
    assert "| routed step, img/s, compiled (reduce-overhead) | 160.0 |  |" in text
    assert "| routed step, img/s | >= 152 | 160.00 (compile reduce-overhead) | yes |" in text
    assert "- routing compile: **reduce-overhead** fastest (off 114.6, reduce-overhead 160.0" in text


def test_a_stopped_run_keeps_the_parts_it_finished(monkeypatch, tmp_path):
    """The device tool stops a call at its time limit: the JSON is written after every part,
    and the report says the run is incomplete."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import report
    import run

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # what a stop in the middle of the routed part looks like

    monkeypatch.setattr(run, "run_routed", stopped)
    out = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        run.main(["--preset", "tiny", "--only", "federated", "routed", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] is False and "routed" not in data
    assert data["federated"]["lightning"]["images_per_s"] > 0
    assert not (tmp_path / "r.json.tmp").exists()
    text = report.report(data)
    assert "**The run stopped before it finished**; parts done: federated." in text
    assert "| round throughput, img/s (best round) |" in text


def test_switch_parts_times_the_calls_inside_a_switch_and_puts_them_back(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import run

    from iopfl_lightning.federated import callback, methods_basic, personalize, state
    from iopfl_lightning.federated.aggregate import FlatAccumulator, ServerOptimizer

    add, step = FlatAccumulator.add, ServerOptimizer.step
    data = run.main(["--preset", "tiny", "--only", "federated", "--switch-parts"])
    parts = data["federated"]["lightning"]["switch_parts_ms"]
    for label in ("optimizer reset", "NaN/inf check", "load weights", "accumulator add (flat)",
                  "EMA update", "server step"):
        assert parts[label]["n"] > 0 and parts[label]["median"] > 0, label
    assert callback.reset_optimizer_state is state.reset_optimizer_state  # unwrapped after
    assert callback.all_finite is state.all_finite and FlatAccumulator.add is add
    assert methods_basic.ema_update is personalize.ema_update
    assert ServerOptimizer.step is step


def test_optim_bench_times_the_three_adams_and_checks_the_cpu_default(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import optim_bench

    rows = optim_bench.main(["--features", "2", "--steps", "3", "--out", str(tmp_path / "o.json")])
    row = rows[0]
    assert row["tensors"] > 0 and all(row[f"{n}_ms"] > 0 for n in optim_bench.IMPLEMENTATIONS)
    assert row["loop_equal"] and row["foreach_equal"]  # what modules.optim.adam relies on
    assert json.loads((tmp_path / "o.json").read_text())["rows"] == rows
