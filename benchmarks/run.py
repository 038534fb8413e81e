"""Benchmarks of iopfl_lightning against straightforward baselines written here.

Measures in one run:
  (a) federated round throughput (images/s; client switches, aggregation, EMA and per-round
      evaluation included): Lightning engine (FederatedTrainer) vs a plain PyTorch loop;
  (b) the routed test-time step (images/s): batched routed net vs a per-sample loop;
  (c) client switch and aggregation cost (ms), timed on the callback's own methods;
  (d) peak memory (CUDA max_memory_allocated on a GPU, sampled peak RSS on the CPU);
  (e) what a round waits for its checkpoint: ours vs Lightning's stock ModelCheckpoint setup;
  (f) outside personalization end to end (a RoutingModule fit in online mode with TENT), images/s
      per pass: batched routed net vs the per-sample loop.
Prints a table with ratios and writes JSON (``--out``). ``--sweep`` adds round time and
memory vs clients / image size, and routed step time vs number of experts.

Examples:
  python benchmarks/run.py --out bench.json                      # CPU default, ~1 min
  python benchmarks/run.py --preset paper --device cuda --out gpu.json
  python benchmarks/run.py --preset tiny --out t.json            # seconds (used by the tests)
  python benchmarks/run.py --sweep --out sweep.json              # CPU scaling sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from checkpoint_bench import checkpoint_bench
from common import PRECISIONS, release_memory
from federated_bench import FedConfig, lightning_rounds, make_datamodule, plain_rounds
from loader_bench import loader_bench
from outside_bench import outside_bench
from routing_bench import routed_bench

PRESETS = {
    # name: federated settings, routed settings
    "tiny": dict(clients=2, size=32, batch=4, features=4, rounds=2, train_cases=1, val_cases=1,
                 slices=4, experts=3, routed_size=32, routed_batch=4, steps=2, loop_steps=1),
    "cpu": dict(clients=3, size=64, batch=8, features=16, rounds=4, train_cases=2, val_cases=1,
                slices=8, experts=4, routed_size=64, routed_batch=8, steps=3, loop_steps=2),
    # paper: UNet features 32, 384x384, batch 16, 5 clients; routed step with 6 experts
    "paper": dict(clients=5, size=384, batch=16, features=32, rounds=4, train_cases=2,
                  val_cases=1, slices=32, experts=6, routed_size=384, routed_batch=16, steps=10,
                  loop_steps=3),
}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    for name in ("clients", "size", "batch", "features", "rounds", "train_cases", "val_cases",
                 "slices", "experts", "routed_size", "routed_batch", "steps", "loop_steps"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (both engines)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help="default: bf16-mixed on CUDA, 32-true on CPU")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on for CUDA, off for CPU")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the net (both federated engines; for the routed step, "
                        "an extra compiled variant)")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs)")
    p.add_argument("--compile-eval", action=argparse.BooleanOptionalAction, default=True,
                   help="with --compile, the engine's evaluation compiled too (SegmentationModule"
                        "(compile_eval=...); the plain loop evaluates eagerly either way)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on CPU: steadier on a shared machine)")
    p.add_argument("--fp32-engine", action="store_true",
                   help="also run the Lightning engine in fp32 without channels_last (same data)")
    p.add_argument("--fp16-engine", action="store_true",
                   help="also run the engine and the routed step in 16-mixed (fp16 with a loss "
                        "scaler; PyTorch runs BatchNorm through cuDNN for fp16 inputs but "
                        "natively for bf16). On a CPU Lightning runs 16-mixed as bf16-mixed")
    p.add_argument("--format-engine", action="store_true",
                   help="also run the engine in the other memory format (channels_last flipped)")
    p.add_argument("--device-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="the engine's data finished once and kept on the device "
                        "(data.device_cache); default: on for CUDA, off for CPU")
    p.add_argument("--per-tensor-engine", action="store_true",
                   help="also run the engine with per-tensor state ops (flat_state=False)")
    p.add_argument("--loader-engine", action="store_true",
                   help="with --device-cache, also run the engine through ordinary DataLoaders")
    p.add_argument("--only", nargs="+", default=None,
                   choices=["federated", "routed", "loader", "checkpoint", "outside"],
                   help="run only these parts (one or more)")
    p.add_argument("--sweep", action="store_true", help="scaling sweep (clients, size, experts)")
    p.add_argument("--profile", action="store_true",
                   help="Lightning SimpleProfiler on the engine's rounds: host time per hook")
    p.add_argument("--torch-profile", action="store_true",
                   help="torch.profiler over the engine's last round: ops by host and device time")
    p.add_argument("--switch-parts", action="store_true",
                   help="also time the calls inside a client switch (optimizer reset, NaN/inf "
                        "check, loading, accumulating): where its host time goes")
    p.add_argument("--routed-profile", action="store_true",
                   help="torch.profiler over one routed step (after its timings): ops by host "
                        "and device time")
    p.add_argument("--routed-only-compiled", action="store_true",
                   help="with --compile: the routed step eager (mixing kernels) and compiled "
                        "only, without the other mixes, formats, precisions and the per-sample "
                        "loop (the GPU check's compile run: its main run measured those)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    if args.routed_only_compiled and not args.compile:
        p.error("--routed-only-compiled needs --compile")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    args.device_cache = cuda if args.device_cache is None else args.device_cache
    return args


def fed_config(args, **overrides) -> FedConfig:
    fields = {f.name for f in dataclasses.fields(FedConfig)}
    kwargs = {k: v for k, v in vars(args).items() if k in fields}
    kwargs["pin_memory"] = args.device.startswith("cuda")
    kwargs.update(overrides)
    return FedConfig(**kwargs)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def batchnorm_backends(device: torch.device, channels_last: bool) -> dict[str, str]:
    """Which kernel PyTorch picks for a training BatchNorm on this device, by input dtype
    (fp32 affine weights, as under autocast): explains why bf16 and fp16 rounds differ."""
    select = getattr(torch._C, "_select_batch_norm_backend", None)
    if select is None:  # not in every torch version
        return {}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    stats = [torch.ones(32, device=device) for _ in range(4)]
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        x = torch.ones(16, 32, 8, 8, device=device, dtype=dtype).contiguous(memory_format=fmt)
        out[name] = select(x, *stats, True, 1e-5).name
    return out


def run_federated(args, device) -> dict:
    cfg = fed_config(args)
    start = time.perf_counter()
    dm = make_datamodule(cfg)  # generated once, used by every engine
    data_s = time.perf_counter() - start
    engine = lightning_rounds(cfg, device, dm)
    _release(dm, device)  # the engine's device cache is not the plain loop's memory
    plain = plain_rounds(cfg, device, dm)  # its own DataLoaders over the same datasets
    variants = {  # key: (asked for, the engine's settings)
        "lightning_fp32": (args.fp32_engine, dict(precision="32-true", channels_last=False,
                                                  compile=False)),
        "lightning_fp16": (args.fp16_engine and cfg.precision != "16-mixed",
                           dict(precision="16-mixed")),
        "lightning_other_format": (args.format_engine,
                                   dict(channels_last=not cfg.channels_last)),
        "lightning_per_tensor": (args.per_tensor_engine, dict(flat_state=False)),
        "lightning_loaders": (args.loader_engine and cfg.device_cache, dict(device_cache=False)),
    }
    extra, errors = {}, {}
    for key, (wanted, settings) in variants.items():
        if not wanted:
            continue
        _release(dm, device)
        dm.device_cache = settings.get("device_cache", cfg.device_cache)
        try:  # a comparison that fails is recorded; the run's other figures are kept
            extra[key] = lightning_rounds(dataclasses.replace(cfg, **settings), device, dm)
        except Exception as err:  # noqa: BLE001 - any failure of an optional comparison
            traceback.print_exc()
            errors[key] = f"{type(err).__name__}: {err}"
        finally:
            dm.device_cache = cfg.device_cache
    return {
        **extra,
        "errors": errors,
        "config": dataclasses.asdict(cfg),
        "data_generation_s": data_s,
        "lightning": engine,
        "plain": plain,
        "engine_over_plain_time_pct": 100.0 * (plain["images_per_s"] / engine["images_per_s"] - 1),
        "engine_over_plain_time_pct_median":
            100.0 * (plain["images_per_s_median"] / engine["images_per_s_median"] - 1),
    }


def _release(dm, device: torch.device) -> None:
    dm.release_device_cache()
    release_memory(device)


def run_routed(args, device) -> dict:
    out = routed_bench(args.features, args.routed_size, args.routed_batch, args.experts, device,
                       args.precision, args.channels_last, args.steps, args.loop_steps,
                       compile_mode=args.compile_mode if args.compile else None,
                       fp16=args.fp16_engine, profile=args.routed_profile,
                       only_compiled=args.routed_only_compiled)
    out["config"] = {"features": args.features, "size": args.routed_size,
                     "batch": args.routed_batch, "experts": args.experts,
                     "precision": args.precision, "channels_last": args.channels_last}
    return out


def run_loader(args) -> dict:
    """Loading of one site's slices at the benchmark size: batch-at-once vs per slice."""
    return loader_bench(args.size, args.batch, args.slices, cases=max(2, args.train_cases))


def run_checkpoint(args, device) -> dict:
    """Per-round checkpoint cost at the preset's net and clients; tiny data (the checkpoint's
    size and cost do not depend on the images)."""
    cfg = fed_config(args, size=32, slices=4, train_cases=1, val_cases=1, workers=0,
                     device_cache=False, compile=False)
    return {"config": dataclasses.asdict(cfg), **checkpoint_bench(cfg, device)}


def run_outside(args, device) -> dict:
    """The routing fit on 2 generated cases of the outside site at the routed step's size."""
    out = outside_bench(args.features, args.routed_size, args.routed_batch, args.experts,
                        args.slices, device, args.precision, args.channels_last)
    out["config"] = {"features": args.features, "size": args.routed_size,
                     "batch": args.routed_batch, "experts": args.experts,
                     "images_per_pass": out["ours"]["images_per_pass"]}
    return out


def run_sweep(args, device) -> dict:
    """Round time / memory vs clients and image size; routed step vs experts."""
    rows: dict[str, list] = {"clients": [], "size": [], "experts": []}
    for clients in (2, 3, 4, 5, 6):
        r = lightning_rounds(fed_config(args, clients=clients), device)
        rows["clients"].append({"clients": clients, "round_s": r["round_s"]["min"],
                                "images_per_round": r["images_per_round"],
                                "peak_mb": r["peak_mb"], "peak_delta_mb": r["peak_delta_mb"],
                                "switch_agg_pct_of_round": r["switch_agg_pct_of_round"]})
    for size in (32, 64, 96, 128):
        r = lightning_rounds(fed_config(args, size=size), device)
        rows["size"].append({"size": size, "round_s": r["round_s"]["min"],
                             "images_per_round": r["images_per_round"],
                             "peak_mb": r["peak_mb"], "peak_delta_mb": r["peak_delta_mb"]})
    for experts in (2, 4, 6, 8):
        r = routed_bench(args.features, args.routed_size, args.routed_batch, experts, device,
                         args.precision, args.channels_last, args.steps, 1)
        rows["experts"].append({"experts": experts, "step_s": r["batched"]["step_s"]["min"],
                                "peak_mb": r["batched"]["peak_mb"],
                                "peak_delta_mb": r["batched"]["peak_delta_mb"],
                                "loop_step_s": r["loop_fp32"]["step_s"]["min"]})
    return rows


def mix_choice_table(choice: dict[str, dict]) -> str:
    """Per routed convolution: forward + backward ms mixing kernels vs outputs, and the pick."""
    lines = ["routed layer, forward + backward ms: kernels / outputs -> chosen"]
    lines += [f"  {name:40s} {row['kernels'] * 1e3:8.2f} {row['outputs'] * 1e3:8.2f} -> "
              f"{row['chosen']}" for name, row in choice.items()]
    return "\n".join(lines)


def _fmt(x: float, nd: int = 1) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def table(results: dict) -> str:
    lines = [f"device: {results['device']}  precision: {results['precision']}  "
             f"channels_last: {results['channels_last']}  compile: {results['compile']} "
             f"({results.get('compile_mode', 'default')})  "
             f"device_cache: {results.get('device_cache')}",
             f"{'measure':44s} {'ours':>12s} {'baseline':>12s} {'ratio':>8s}"]

    def row(name, ours, base, nd=1, ratio=True):
        r = _fmt(ours / base, 2) + "x" if ratio and base else ""
        lines.append(f"{name:44s} {_fmt(ours, nd):>12s} {_fmt(base, nd):>12s} {r:>8s}")

    fed = results.get("federated")
    if fed:
        e, p, cl = fed["lightning"], fed["plain"], results["channels_last"]
        row("round throughput, img/s (best round)", e["images_per_s"], p["images_per_s"])
        row("round throughput, img/s (median round)", e["images_per_s_median"],
            p["images_per_s_median"])
        row("round time, s (median)", e["round_s"]["median"], p["round_s"]["median"], 3)
        row("round CPU time, s (median, process_time)", e["round_cpu_s"]["median"],
            p["round_cpu_s"]["median"], 3)
        row("client switch, ms (median)", e["client_switch_ms"]["median"],
            p["client_switch_ms"]["median"], 2)
        row("aggregation, ms (median)", e["aggregation_ms"]["median"],
            p["aggregation_ms"]["median"], 2)
        row("switches + aggregation, % of round", e["switch_agg_pct_of_round"],
            p["switch_agg_pct_of_round"], 2, ratio=False)
        row("peak memory, MB", e["peak_mb"], p["peak_mb"], 0)
        if "lightning_fp32" in fed:
            row("round img/s: ours vs ours fp32 (no ch.-last)", e["images_per_s"],
                fed["lightning_fp32"]["images_per_s"])
        if "lightning_fp16" in fed:
            fp16 = fed["lightning_fp16"]  # Lightning runs 16-mixed as bf16 on a CPU
            row(f"round img/s: ours vs ours in {fp16.get('precision', '16-mixed')}",
                e["images_per_s"], fp16["images_per_s"])
        if "lightning_other_format" in fed:
            row(f"round img/s: ours vs ours {'without' if cl else 'with'} ch.-last",
                e["images_per_s"], fed["lightning_other_format"]["images_per_s"])
        if "lightning_loaders" in fed:
            row("round img/s: device cache vs DataLoaders", e["images_per_s"],
                fed["lightning_loaders"]["images_per_s"])
        if "lightning_per_tensor" in fed:
            pt = fed["lightning_per_tensor"]
            row("round img/s: flat vs per-tensor state ops", e["images_per_s"], pt["images_per_s"])
            row("client switch, ms: flat vs per-tensor", e["client_switch_ms"]["median"],
                pt["client_switch_ms"]["median"], 2)
            row("aggregation, ms: flat vs per-tensor", e["aggregation_ms"]["median"],
                pt["aggregation_ms"]["median"], 2)
        for label, ms in e.get("switch_parts_ms", {}).items():
            lines.append(f"  inside a switch: {label:28s} {ms['median']:.3f} ms median "
                         f"({ms['n']} calls)")
        for key, err in fed.get("errors", {}).items():
            lines.append(f"{key} FAILED: {err}")
        lines.append(f"engine time over plain loop: {_fmt(fed['engine_over_plain_time_pct'])}% "
                     f"(best rounds), {_fmt(fed['engine_over_plain_time_pct_median'])}% (median)")
    rt = results.get("routed")
    if rt and rt.get("only_compiled"):
        row(f"routed step, img/s, compiled ({rt['compiled']['mode']}) vs eager",
            rt["compiled"]["images_per_s"], rt["batched"]["images_per_s"])
    elif rt:
        b, lp = rt["batched"], rt["loop_fp32"]
        row(f"routed step, img/s (E={rt['config']['experts']}; loop fp32)", b["images_per_s"],
            lp["images_per_s"])
        row("routed step, img/s, mixing outputs (dense convs)",
            rt["batched_outputs"]["images_per_s"], lp["images_per_s"])
        row("routed step peak memory, MB, mixing outputs", rt["batched_outputs"]["peak_mb"],
            lp["peak_mb"], 0)
        if "batched_fp16" in rt:
            row("routed step 16-mixed batched vs loop, img/s", rt["batched_fp16"]["images_per_s"],
                lp["images_per_s"])
        if "batched_auto" in rt:
            auto = rt["batched_auto"]
            outputs = sum(v["chosen"] == "outputs" for v in auto["choice"].values())
            row(f"routed step, img/s, mix auto ({outputs}/{len(auto['choice'])} outputs)",
                auto["images_per_s"], lp["images_per_s"])
        if "batched_fp32" in rt:
            row("routed step fp32 batched vs loop, img/s", rt["batched_fp32"]["images_per_s"],
                lp["images_per_s"])
        row("routed step, s (min)", b["step_s"]["min"], lp["step_s"]["min"], 3)
        row("routed step peak memory, MB", b["peak_mb"], lp["peak_mb"], 0)
        if "compiled" in rt:
            row(f"routed step, img/s, compiled ({rt['compiled']['mode']})",
                rt["compiled"]["images_per_s"], lp["images_per_s"])
        lines.append("routed step img/s by mix x memory format: " + ", ".join(
            f"{name} {v['images_per_s']:.1f}" for name, v in rt.get("variants", {}).items()))
        for key, err in rt.get("errors", {}).items():
            lines.append(f"routed {key} FAILED: {err}")
        lines.append(f"routed batched vs loop max |diff| (fp32 logits): "
                     f"{rt['loop_vs_batched_max_abs_diff']:.2e}; mixing kernels vs outputs: "
                     f"{rt['kernels_vs_outputs_max_abs_diff']:.2e}")
    ld = results.get("loader")
    if ld:
        row(f"loading, img/s ({ld['config']['size']}px, z-score; per-slice loader)",
            ld["batched"]["images_per_s"], ld["plain"]["images_per_s"])
        row("loading, img/s, device cache gather (per-slice)", ld["cached"]["images_per_s"],
            ld["plain"]["images_per_s"], 0)
    ck = results.get("checkpoint")
    if ck:
        st, one, ours = ck["stock"], ck["one_file"], ck["ours"]
        row("checkpoint wait per round, ms (Lightning stock)", ours["wait_ms_per_round"]["median"],
            st["wait_ms_per_round"]["median"])
        row("checkpoint wait, ms: one file, synchronous", one["wait_ms_per_round"]["median"],
            st["wait_ms_per_round"]["median"])
        row("checkpoint MB written per round", ours["mb_written_per_round"],
            st["mb_written_per_round"], 0)
        row("fit wall time with checkpoints, s", ours["fit_s"], st["fit_s"], 2)
    od = results.get("outside")
    if od:
        row("outside adaptation, img/s per pass (loop fp32)", od["ours"]["images_per_s"],
            od["loop_fp32"]["images_per_s"])
    sweep = results.get("sweep")
    if sweep:
        lines.append("sweep (Lightning engine; round = best measured round):")
        for axis, key in (("clients", "round_s"), ("size", "round_s"), ("experts", "step_s")):
            for r in sweep[axis]:
                lines.append(f"  {axis}={r[axis]:<4d} {key}={r[key]:.3f}  peak_mb={r['peak_mb']:.0f}"
                             f"  delta_mb={r['peak_delta_mb']:.0f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": device_name(device),
        "torch": torch.__version__,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
        "device_cache": args.device_cache,
        "preset": args.preset,
        "batchnorm_backend": batchnorm_backends(device, args.channels_last),
    }
    start = time.perf_counter()
    sections = {
        "federated": lambda: run_federated(args, device),
        "routed": lambda: run_routed(args, device),
        "loader": lambda: run_loader(args),
        "checkpoint": lambda: run_checkpoint(args, device),
        "outside": lambda: run_outside(args, device),
        "sweep": lambda: run_sweep(args, device),
    }
    results["section_s"] = {}  # what each part took: how a GPU session plans its device time
    for name, run in sections.items():
        wanted = args.sweep if name == "sweep" else args.only is None or name in args.only
        if wanted:
            began = time.perf_counter()
            results[name] = run()
            release_memory(device)  # each section's peak memory is its own
            results["section_s"][name] = round(time.perf_counter() - began, 1)
            _write(args.out, results)  # a run stopped later keeps the parts it finished
    results["total_s"] = time.perf_counter() - start
    print(table(results), flush=True)
    engine = results.get("federated", {}).get("lightning", {})
    for key in ("profile", "torch_profile"):
        if engine.get(key):
            print(engine[key], flush=True)
    choice = results.get("routed", {}).get("batched_auto", {}).get("choice")
    if choice:
        print(mix_choice_table(choice), flush=True)
    if results.get("routed", {}).get("torch_profile"):
        print("routed step, one step profiled:\n" + results["routed"]["torch_profile"], flush=True)
    print(f"total {results['total_s']:.1f} s", flush=True)
    results["complete"] = True
    _write(args.out, results)
    return results


def _write(path: Path | None, results: dict) -> None:
    """The results so far as JSON (``complete`` is true once every part ran); written to a
    temporary file and renamed, so a stop mid-write never leaves half a file."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"complete": False, **results}, indent=2))
    tmp.replace(path)


if __name__ == "__main__":
    main()
