"""Markdown for docs/performance.md from a benchmark JSON: the figures and issue 8's targets.

    python benchmarks/report.py OUT/paper.json [--state-ops OUT/state_ops.json]
                                [--compiled OUT/paper_compile.json]

Targets (issue 8, paper setting on an H100/H200): round throughput >= 2.5x the reference's
fp32 local training (270 img/s), routed step >= 8x the reference's (19 img/s), client switches
plus aggregation < 1 % of a round. Every number printed comes from the JSON; nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REFERENCE_FP32_TRAINING = 270.0  # img/s, the reference's local training on an H200 (issue 8)
REFERENCE_ROUTED_STEP = 19.0  # img/s, the reference's test-time routing step (issue 8)
TARGETS = {"round": 2.5 * REFERENCE_FP32_TRAINING, "routed": 8 * REFERENCE_ROUTED_STEP,
           "switch_pct": 1.0}


def _f(x: float | None, nd: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _rows(results: dict) -> list[tuple[str, str, str]]:
    """(measure, ours, baseline) rows of whatever the JSON holds."""
    rows = []
    fed = results.get("federated") or {}
    if fed:
        e, p = fed["lightning"], fed["plain"]
        rows += [
            ("round throughput, img/s (best round)", _f(e["images_per_s"]), _f(p["images_per_s"])),
            ("round throughput, img/s (median round)", _f(e["images_per_s_median"]),
             _f(p["images_per_s_median"])),
            ("client switch, ms (median)", _f(e["client_switch_ms"]["median"], 2),
             _f(p["client_switch_ms"]["median"], 2)),
            ("aggregation, ms (median)", _f(e["aggregation_ms"]["median"], 2),
             _f(p["aggregation_ms"]["median"], 2)),
            ("switches + aggregation, % of round", _f(e["switch_agg_pct_of_round"], 2),
             _f(p["switch_agg_pct_of_round"], 2)),
            ("peak memory, MB", _f(e["peak_mb"], 0), _f(p["peak_mb"], 0)),
        ]
        fp16 = _as_run(fed.get("lightning_fp16", {}))
        fp16 += " (fp16, loss scaler)" if fp16 == "16-mixed" else ""
        for key, label in (("lightning_fp16", f"engine in {fp16}"),
                           ("lightning_other_format", "engine in the other memory format "
                            f"(channels_last {not results['channels_last']})"),
                           ("lightning_fp32", "engine in fp32, no channels_last"),
                           ("lightning_loaders", "engine through DataLoaders (no device cache)"),
                           ("lightning_per_tensor", "engine with per-tensor state ops")):
            if key in fed:
                rows.append((f"round throughput, img/s, {label}", _f(fed[key]["images_per_s"]), ""))
        if "lightning_per_tensor" in fed:
            pt = fed["lightning_per_tensor"]
            rows.append(("client switch / aggregation, ms, per-tensor state ops",
                         f"{_f(pt['client_switch_ms']['median'], 2)} / "
                         f"{_f(pt['aggregation_ms']['median'], 2)}", ""))
    routed = results.get("routed") or {}
    for key, err in {**fed.get("errors", {}), **routed.get("errors", {})}.items():
        rows.append((f"{key}: **failed**", err, ""))
    if routed:
        rows.append(("routed step, img/s (ours vs per-sample loop, fp32)",
                     _f(routed["batched"]["images_per_s"]),
                     _f(routed["loop_fp32"]["images_per_s"])))
        for name, v in (routed.get("variants") or {}).items():
            rows.append((f"routed step, img/s, {name.replace('_', ' + ', 1)}",
                         _f(v["images_per_s"]), ""))
        if "batched_auto" in routed:
            auto = routed["batched_auto"]
            outputs = sum(v["chosen"] == "outputs" for v in auto["choice"].values())
            rows.append((f"routed step, img/s, mix auto (fastest per layer: {outputs} of "
                         f"{len(auto['choice'])} mix outputs)", _f(auto["images_per_s"]), ""))
        if "batched_fp16" in routed:
            rows.append(("routed step, img/s, in 16-mixed (fp16, loss scaler)",
                         _f(routed["batched_fp16"]["images_per_s"]), ""))
        if "compiled" in routed:
            rows.append((f"routed step, img/s, compiled ({routed['compiled']['mode']})",
                         _f(routed["compiled"]["images_per_s"]), ""))
    od = results.get("outside") or {}
    if od:
        rows.append(("outside adaptation end to end, img/s per pass (online, TENT; vs per-sample "
                     "loop, fp32)", _f(od["ours"]["images_per_s"]),
                     _f(od["loop_fp32"]["images_per_s"])))
    ck = results.get("checkpoint") or {}
    if ck:
        st, ours = ck["stock"], ck["ours"]
        rows += [
            ("checkpoint wait per round, ms (ours vs Lightning stock)",
             _f(ours["wait_ms_per_round"]["median"]), _f(st["wait_ms_per_round"]["median"])),
            ("checkpoint wait per round, ms, one file written synchronously",
             _f(ck["one_file"]["wait_ms_per_round"]["median"]), ""),
            ("checkpoint MB written per round", _f(ours["mb_written_per_round"], 0),
             _f(st["mb_written_per_round"], 0)),
        ]
    return rows


def _best(options: dict[str, float]) -> tuple[float, str] | None:
    """(value, option) of the largest figure; None when nothing was measured."""
    if not options:
        return None
    name = max(options, key=options.get)
    return options[name], name


def _as_run(engine: dict) -> str:
    """The precision an engine run used: Lightning turns 16-mixed into bf16-mixed on a CPU
    (``as run`` marks that, so a CPU report never credits fp16 with a bf16 figure)."""
    ran = engine.get("precision", "16-mixed")
    return "16-mixed" if ran == "16-mixed" else f"16-mixed (as run: {ran})"


def _round_options(results: dict, compiled: dict | None) -> dict[str, float]:
    """Round img/s of every engine setting a user can choose that this run measured."""
    fed = results.get("federated") or {}
    if not fed:
        return {}
    cl = bool(results["channels_last"])
    options = {results["precision"]: fed["lightning"]["images_per_s"]}
    if "lightning_fp16" in fed:
        options[_as_run(fed["lightning_fp16"])] = fed["lightning_fp16"]["images_per_s"]
    if "lightning_other_format" in fed:
        options[f"channels_last {str(not cl).lower()}"] = fed["lightning_other_format"]["images_per_s"]
    for key, option in (("lightning_per_tensor", "flat_state false"),
                        ("lightning_loaders", "data.device_cache false")):
        if key in fed:
            options[option] = fed[key]["images_per_s"]
    if compiled and compiled.get("federated"):
        options[f"compile {compiled.get('compile_mode', 'default')}"] = (
            compiled["federated"]["lightning"]["images_per_s"])
    return options


def _routed_options(routed: dict) -> dict[str, float]:
    if not routed:
        return {}
    options = {"kernels": routed["batched"]["images_per_s"]}
    for name, v in (routed.get("variants") or {}).items():
        options[name.replace("_", " + ", 1)] = v["images_per_s"]
    if "batched_fp16" in routed:
        options["16-mixed"] = routed["batched_fp16"]["images_per_s"]
    if "batched_auto" in routed:
        options["mix auto"] = routed["batched_auto"]["images_per_s"]
    if "compiled" in routed:
        options[f"compile {routed['compiled']['mode']}"] = routed["compiled"]["images_per_s"]
    return options


NOISE = 0.03  # relative differences below this are called even (run-to-run spread seen so far)


def _pick(label: str, options: dict[str, float]) -> str:
    """``- label: fastest option (img/s of each)``, or 'even' when within NOISE of each other."""
    best = max(options, key=options.get)
    figures = ", ".join(f"{name} {value:.1f}" for name, value in options.items())
    if min(options.values()) >= (1 - NOISE) * options[best]:
        return f"- {label}: even within {NOISE:.0%} ({figures} img/s): keep the default"
    return f"- {label}: **{best}** fastest ({figures} img/s)"


def _suggestions(results: dict, compiled: dict | None) -> list[str]:
    """The fastest measured choice for each GPU option this run compared (not a decision: one
    run, one device)."""
    fed, lines = results.get("federated") or {}, []
    if "lightning_loaders" in fed:
        lines.append(_pick("data.device_cache", {
            "on": fed["lightning"]["images_per_s"],
            "off": fed["lightning_loaders"]["images_per_s"]}))
    if "lightning_fp16" in fed:
        lines.append(_pick("trainer.precision", {
            results["precision"]: fed["lightning"]["images_per_s"],
            _as_run(fed["lightning_fp16"]): fed["lightning_fp16"]["images_per_s"]}))
    if "lightning_other_format" in fed:
        cl = bool(results["channels_last"])
        lines.append(_pick("model.channels_last", {
            str(cl).lower(): fed["lightning"]["images_per_s"],
            str(not cl).lower(): fed["lightning_other_format"]["images_per_s"]}))
    if "lightning_per_tensor" in fed:
        lines.append(_pick("trainer flat_state", {
            "on": fed["lightning"]["images_per_s"],
            "off": fed["lightning_per_tensor"]["images_per_s"]}))
    variants = (results.get("routed") or {}).get("variants") or {}
    if variants:
        lines.append(_pick("routing mix + memory format", {
            name.replace("_", " + ", 1): v["images_per_s"] for name, v in variants.items()}))
    routed = results.get("routed") or {}
    if "batched_auto" in routed:
        lines.append(_pick("routing mix", {
            "kernels": routed["batched"]["images_per_s"],
            "outputs": routed["batched_outputs"]["images_per_s"],
            "auto": routed["batched_auto"]["images_per_s"]}))
    if "batched_fp16" in routed:
        lines.append(_pick("routing precision", {
            results["precision"]: routed["batched"]["images_per_s"],
            "16-mixed": routed["batched_fp16"]["images_per_s"]}))
    if "compiled" in routed:
        eager = routed.get("compiled_eager") or routed["batched"]
        lines.append(_pick("routing compile", {
            "off": eager["images_per_s"],
            routed["compiled"]["mode"]: routed["compiled"]["images_per_s"]}))
    if compiled and compiled.get("federated"):
        mode = compiled.get("compile_mode", "default")
        lines.append(_pick("model.compile", {
            "off": fed["lightning"]["images_per_s"],
            f"{mode}": compiled["federated"]["lightning"]["images_per_s"]}))
    return ["", "Fastest measured option (this run):", *lines] if lines else []


def _with_compiled_routing(results: dict, compiled: dict | None) -> dict:
    """``results`` with the compiled run's routed step (``--only federated routed --compile``)
    where the main run has none of its own."""
    routed = results.get("routed")
    their_run = (compiled or {}).get("routed") or {}
    theirs = their_run.get("compiled")
    if not routed or theirs is None or "compiled" in routed:
        return results
    extra = {"compiled": theirs}
    if their_run.get("only_compiled"):  # its eager step ran in the same process: the fairer "off"
        extra["compiled_eager"] = their_run["batched"]
    return {**results, "routed": {**routed, **extra}}


def report(results: dict, state_ops: dict | None = None, compiled: dict | None = None) -> str:
    results = _with_compiled_routing(results, compiled)
    lines = [f"- Date: {results['date']}. Device: {results['device']}, torch {results['torch']}.",
             f"- Command: `{results['command']}`; precision {results['precision']}, channels_last "
             f"{results['channels_last']}, device_cache {results.get('device_cache')}.", "",
             "| measure | ours | baseline |", "| --- | ---: | ---: |"]
    if results.get("complete") is False:  # stopped (say by a time limit) after some parts
        done = ", ".join(results.get("section_s", {})) or "none"
        lines[-2:-2] = [f"- **The run stopped before it finished**; parts done: {done}.", ""]
    lines += [f"| {m} | {o} | {b} |" for m, o, b in _rows(results)]
    fed, routed = results.get("federated") or {}, results.get("routed") or {}
    switch_pct = fed.get("lightning", {}).get("switch_agg_pct_of_round")
    measured = {
        "round": _best(_round_options(results, compiled)),
        "routed": _best(_routed_options(routed)),
        "switch_pct": None if switch_pct is None else (switch_pct, results["precision"]),
    }
    if results.get("preset") != "paper" or "cpu" in results["device"].lower():
        lines += ["", "(issue 8's targets apply to the paper preset on a GPU; none checked here)"]
    else:
        lines += _targets(measured)
    lines += _suggestions(results, compiled)
    if state_ops:
        lines += ["", "| state op | aten calls old | per-tensor | flat | ms old | per-tensor | flat |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in state_ops.get("rows", []):  # files before the flat column: "-"
            flat_ms = f"{row['ms_flat']:.3f}" if "ms_flat" in row else "-"
            lines.append(f"| {row['step']} | {row['ops_old']} | {row['ops_new']} | "
                         f"{row.get('ops_flat', '-')} | {row['ms_old']:.3f} | "
                         f"{row['ms_new']:.3f} | {flat_ms} |")
    return "\n".join(lines)


def _targets(measured: dict) -> list[str]:
    """Each target against the fastest measured option (named in the row)."""
    lines = ["", "| target | required | measured (fastest option) | met? |",
             "| --- | ---: | ---: | --- |"]
    for key, label in (("round", "round throughput, img/s"),
                       ("routed", "routed step, img/s"),
                       ("switch_pct", "switches + aggregation, % of round")):
        best, required = measured[key], TARGETS[key]
        value, option = best if best is not None else (None, "")
        met = None if value is None else (value < required if key == "switch_pct"
                                          else value >= required)
        verdict = "n/a" if met is None else ("yes" if met else "**no**")
        sign = "<" if key == "switch_pct" else ">="
        figure = _f(value, 2) + (f" ({option})" if option else "")
        lines.append(f"| {label} | {sign} {required:g} | {figure} | {verdict} |")
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="JSON written by benchmarks/run.py --out")
    parser.add_argument("--state-ops", type=Path, default=None,
                        help="JSON written by benchmarks/state_ops_bench.py --out")
    parser.add_argument("--compiled", type=Path, default=None,
                        help="JSON of the same run with --compile (skipped when missing)")
    args = parser.parse_args(argv)
    state_ops = json.loads(args.state_ops.read_text()) if args.state_ops else None
    compiled = (json.loads(args.compiled.read_text())
                if args.compiled and args.compiled.is_file() else None)
    text = report(json.loads(args.results.read_text()), state_ops, compiled)
    print(text)
    return text


if __name__ == "__main__":
    main()
