"""Markdown tables (and a bar chart) from pytest-benchmark JSON files written by the suites here.

    .venv/bin/python benchmarks/summarize.py results/*.json [--plot out.png]

One table row per measured variant: median time per call, the derived TB/s or TFLOP/s with its
share of the ceiling measured in the same run, and the speed-up over the eager reference
(and, for attention, over the best SDPA backend) of the same case. Training-step results
(bench_pretrain.py: ``extra_info`` with ``flops_per_image``) get a table of their own: images/s,
model TFLOP/s, MFU, peak memory and the speed-up over fb/mae eager.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def _case_key(bench: dict) -> tuple:
    info = bench["extra_info"]
    return (bench["name"].split("[")[0].removeprefix("test_"), info["device"],
            str(info.get("shape")), info.get("dtype"), info.get("passes", "-"))


def _variant(bench: dict) -> str:
    param = bench["params"]
    return param.get("variant") or param.get("backend_name")


def _is_training_step(info: dict) -> bool:
    return "flops_per_image" in info


def rows(paths) -> list[dict]:
    cases: dict[tuple, dict[str, dict]] = defaultdict(dict)
    machines = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for bench in data["benchmarks"]:
            if "median_s_per_call" in bench["extra_info"] and not _is_training_step(
                    bench["extra_info"]):
                cases[_case_key(bench)][_variant(bench)] = bench["extra_info"]
                machines[_case_key(bench)] = data["machine_info"].get("device", "?")
    out = []
    for key, variants in sorted(cases.items()):
        eager = variants.get("eager", {}).get("median_s_per_call")
        sdpa = [v["median_s_per_call"] for name, v in variants.items() if name.startswith("sdpa")]
        for name, info in sorted(variants.items(), key=lambda kv: kv[1]["median_s_per_call"]):
            t = info["median_s_per_call"]
            rate = (f"{info['tb_s'] * 1e3:.1f} GB/s ({info['frac_of_copy']:.0%} of copy)" if "tb_s" in info
                    else f"{info['tflop_s']:.2f} TFLOP/s ({info['frac_of_gemm']:.0%} of GEMM)")
            out.append({"op": key[0], "device": machines[key], "shape": key[2], "dtype": key[3],
                        "passes": key[4], "variant": name, "ms": t * 1e3, "rate": rate,
                        "vs_eager": eager / t if eager else None,
                        "vs_best_sdpa": min(sdpa) / t if sdpa else None})
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| op | device | shape | dtype | pass | variant | ms/call | rate | x eager | x best SDPA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        ratio = lambda v: f"{v:.2f}" if v else "-"  # noqa: E731
        lines.append(f"| {r['op']} | {r['device']} | {r['shape']} | {r['dtype']} | {r['passes']} "
                     f"| {r['variant']} | {r['ms']:.3f} | {r['rate']} | {ratio(r['vs_eager'])} "
                     f"| {ratio(r['vs_best_sdpa'])} |")
    return "\n".join(lines)


def training_rows(paths, reference: str = "fbmae-eager") -> list[dict]:
    """One row per training-step variant, with its speed-up over ``reference`` measured in the
    same run on the same device, batch and model."""
    cases: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for path in paths:
        data = json.loads(Path(path).read_text())
        device = data["machine_info"].get("device", "?")
        for bench in data["benchmarks"]:
            info = bench["extra_info"]
            if _is_training_step(info):
                key = (device, info["device"], info["batch"], json.dumps(info["model"],
                                                                         sort_keys=True))
                cases[key][_variant(bench)] = info
    out = []
    for (machine, _, batch, _), variants in sorted(cases.items()):
        ref = variants.get(reference, {}).get("images_per_s")
        for name, info in sorted(variants.items(), key=lambda kv: -kv[1]["images_per_s"]):
            memory = info.get("peak_memory_bytes")
            out.append({"device": machine, "batch": batch, "variant": name,
                        "dtype": info["dtype"], "images_per_s": info["images_per_s"],
                        "tflop_s": info["tflop_s"], "frac_of_gemm": info["frac_of_gemm"],
                        "mfu": info.get("mfu"),
                        "memory_gib": memory / 2 ** 30 if memory else None,
                        "memory_kind": info.get("peak_memory_kind", ""),
                        "vs_reference": info["images_per_s"] / ref if ref else None})
    return out


def training_markdown(table: list[dict], reference: str = "fbmae-eager") -> str:
    lines = ["| device | batch | variant | dtype | images/s | model TFLOP/s | MFU "
             f"| peak memory GiB | x {reference} |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        memory = f"{r['memory_gib']:.2f} ({r['memory_kind']})" if r["memory_gib"] else "-"
        ratio = f"{r['vs_reference']:.2f}" if r["vs_reference"] else "-"
        lines.append(f"| {r['device']} | {r['batch']} | {r['variant']} | {r['dtype']} "
                     f"| {r['images_per_s']:.4g} | {r['tflop_s']:.4g} ({r['frac_of_gemm']:.0%} of GEMM) "
                     f"| {mfu} | {memory} "
                     f"| {ratio} |")
    return "\n".join(lines)


def plot(table: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in table:
        if r["vs_eager"]:
            groups[f"{r['op']} {r['shape']} {r['passes']}"].append((r["variant"], r["vs_eager"]))
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.2 + 0.35 * sum(map(len, groups.values()))),
                             squeeze=False)
    for ax, (title, bars) in zip(axes[:, 0], groups.items()):
        names, values = zip(*sorted(bars, key=lambda b: b[1]))
        ax.barh(names, values, color="tab:blue")
        ax.axvline(1.0, color="grey", lw=1)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel("speed-up over the eager reference (same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+")
    parser.add_argument("--plot", help="write a bar chart of the speed-ups here")
    args = parser.parse_args(argv)
    table = rows(args.json)
    training = training_rows(args.json)
    if table or not training:
        print(markdown(table))
    if training:
        print(("\n" if table else "") + training_markdown(training))
    if args.plot and table:
        plot(table, args.plot)


if __name__ == "__main__":
    main()
