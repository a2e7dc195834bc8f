"""The pipeline's report: ``report.json`` (every figure) and ``report.html`` (one page a
person reads: the variants table, the accuracy-versus-escalation curve with the operating
point, the reliability diagrams before and after temperature scaling). Charts are PNGs made
with matplotlib and embedded in the page, so it is one file that opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
from itertools import pairwise
from pathlib import Path
from typing import Any


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _charts(report: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = {}
    routing = report["routing"]
    curve = routing["curve_test"]
    op = routing["operating_point"]["test"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(
        [100 * p["escalation"] for p in curve],
        [100 * p["accuracy"] for p in curve],
        lw=2,
        label="hybrid (edge + cloud)",
    )
    ax.axhline(100 * routing["cloud_test_accuracy"], color="tab:green", ls="--", label="cloud only")
    ax.axhline(100 * routing["edge_test_accuracy"], color="tab:gray", ls=":", label="edge only")
    ax.scatter(
        [100 * op["escalation"]],
        [100 * op["accuracy"]],
        color="tab:red",
        zorder=5,
        s=60,
        label=f"operating point (threshold {op['threshold']:.3f})",
    )
    ax.set_xlabel("escalated to the cloud (%)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Accuracy versus escalation, held-out split")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    charts["curve"] = _png(fig)
    plt.close(fig)

    cal = report["calibration"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.0), sharey=True)
    for ax, key, title in (
        (axes[0], "reliability_before", "before (T = 1)"),
        (axes[1], "reliability_after", f"after (T = {cal['temperature']:.2f})"),
    ):
        rel = cal[key]
        edges = rel["bin_edges"]
        mids = [(a + b) / 2 for a, b in pairwise(edges)]
        acc = [a if a is not None else 0.0 for a in rel["accuracy"]]
        ax.bar(mids, acc, width=edges[1] - edges[0], edgecolor="black", alpha=0.7, label="accuracy")
        for x, a, n in zip(mids, acc, rel["counts"], strict=True):
            if n:  # how many samples each bar stands for: a bar of 3 says little
                ax.annotate(f"n={n}", (x, a), ha="center", va="bottom", fontsize=7)
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_title(f"{title}: ECE {100 * rel['ece']:.2f}%")
        ax.set_xlabel("confidence (max probability)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy in bin")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Reliability of {cal['variant']}, held-out split")
    charts["reliability"] = _png(fig)
    plt.close(fig)

    edge = [v for v in report["variants"] if v["role"] == "edge"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, v in enumerate(sorted(edge, key=lambda v: v["bytes"])):
        ax.scatter(v["bytes"] / 1024, 100 * v["accuracy"], s=40)
        ax.annotate(  # staggered: variants of one size sit on top of each other
            v["name"].removeprefix("edge-"),
            (v["bytes"] / 1024, 100 * v["accuracy"]),
            fontsize=7,
            xytext=(4, -12 + 10 * (i % 4)),
            textcoords="offset points",
        )
    ax.set_xlabel("size on disk (KiB)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Edge variants: size and accuracy")
    ax.grid(alpha=0.3)
    charts["variants"] = _png(fig)
    plt.close(fig)
    return charts


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def render_html(report: dict[str, Any]) -> str:
    charts = _charts(report)
    rows = "\n".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(c))}</td>"
            for c in (
                v["name"],
                v["runtime"],
                f"{v['bytes'] / 1024:.1f}",
                f"{v['gzip_bytes'] / 1024:.1f}",
                _pct(v["accuracy"]),
                _pct(v["agreement"]),
                f"{v['latency_ms']:.3f}",
                v["note"],
            )
        )
        + "</tr>"
        for v in report["variants"]
    )
    d = report["distillation"]
    cal = report["calibration"]
    r = report["routing"]
    op = r["operating_point"]
    findings = "".join(f"<li>{html.escape(f)}</li>" for f in report.get("findings", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tandem model pipeline report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; width: 100%; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }}
td:first-child, td:nth-child(2), td:last-child {{ text-align: left; }}
img {{ max-width: 100%; }} .pair {{ display: flex; gap: 1em; flex-wrap: wrap; }}
</style></head><body>
<h1>Model pipeline report: {html.escape(report["settings"]["model"])}</h1>
<p>Split: {report["split"]["train"]} train, {report["split"]["calib"]} calibration,
{report["split"]["test"]} held-out. Every figure is measured on the held-out split in the runtime
that runs the variant; latency is the median of single-sample calls on the machine that ran the
pipeline.</p>
<h2>Findings</h2><ul>{findings}</ul>
<h2>Variants</h2>
<table><tr><th>variant</th><th>runtime</th><th>KiB</th><th>KiB gzip</th><th>accuracy</th>
<th>agreement with float</th><th>median ms</th><th>what</th></tr>
{rows}</table>
<div class="pair">
<img alt="size and accuracy" src="data:image/png;base64,{charts["variants"]}"></div>
<h2>Distillation</h2>
<p>Same architecture, temperature {d["temperature"]}, {d["alpha"]:.0%} teacher: distilled
{_pct(d["distilled_test_accuracy"])} against {_pct(d["labels_test_accuracy"])} on labels alone
(held-out, TFLite float32). Shipped: the <b>{d["chosen"]}</b> model (better on the
calibration split).</p>
<h2>Calibration and routing</h2>
<p>Temperature {cal["temperature"]:.3f} fitted on the calibration split for
<code>{cal["variant"]}</code>:
held-out NLL {cal["nll_before"]:.4f} → {cal["nll_after"]:.4f}, ECE
{_pct(cal["reliability_before"]["ece"])} → {_pct(cal["reliability_after"]["ece"])}.</p>
<p>Target: at most {op["max_escalation"]} escalated, at least {op["min_relative_accuracy"]} of
the cloud model's accuracy ({"met" if op["met_on_calib"] else "NOT met"} on the calibration
split).
Threshold {op["threshold"]:.4f} (max probability after the temperature):
calibration {_pct(op["calib"]["accuracy"])} at {_pct(op["calib"]["escalation"])} escalated;
held-out {_pct(op["test"]["accuracy"])} at {_pct(op["test"]["escalation"])} escalated, which is
{_pct(r["relative_accuracy"])} of the cloud model's {_pct(r["cloud_test_accuracy"])}
(edge alone {_pct(r["edge_test_accuracy"])}).</p>
{_guarantee_html(r)}
<img alt="accuracy versus escalation" src="data:image/png;base64,{charts["curve"]}">
<img alt="reliability diagrams" src="data:image/png;base64,{charts["reliability"]}">
<h2>Bundle</h2><p><code>{html.escape(report["bundle"])}</code>: publish with
<code>tandem-cloud model package --edge {html.escape(report["bundle"])}/model.tflite --template
{html.escape(report["bundle"])} --registry REGISTRY --key KEY</code>.</p>
</body></html>
"""


def _guarantee_html(routing: dict[str, Any]) -> str:
    """The guaranteed threshold's paragraph (``--epsilon``), or nothing."""
    g = routing.get("guarantee")
    if g is None:
        return ""
    test = g.get("test") or {}
    verdict = (
        f"met at threshold {g['threshold']:.4f}: {_pct(g['coverage'])} answered at the edge "
        f"on the calibration split, {_pct(g['error'])} of them wrong (upper bound "
        f"{_pct(g['bound'])}); held-out: {_pct(test.get('coverage', 0.0))} answered, "
        f"{_pct(test.get('error', 0.0))} wrong"
        if g["met"]
        else "NOT met by any threshold: everything escalates (threshold 1.0)"
    )
    return (
        f"<p>Guarantee (reference: {html.escape(str(g.get('reference')))}): the edge's own "
        f"answers wrong at most {_pct(g['epsilon'])} with probability "
        f"{_pct(1 - g['delta'])}, {verdict}. Shipped: the <b>{routing['chosen_by']}</b> "
        f"threshold; the budget's would be {routing['budget_threshold']:.4f}.</p>"
    )


def findings(report: dict[str, Any]) -> list[str]:
    """The sentences an operator needs, each with its numbers, including the unflattering."""
    v = {x["name"]: x for x in report["variants"]}
    chosen = report["distillation"]["chosen"]
    ref = v[f"edge-{chosen}-float32"]
    out = []
    for name, x in v.items():
        if x["role"] != "edge" or name == ref["name"] or "pruned" in name:
            continue
        out.append(
            f"{name}: {x['bytes'] / ref['bytes']:.0%} of the float32 size, accuracy "
            f"{100 * (x['accuracy'] - ref['accuracy']):+.2f} points, median latency "
            f"{x['latency_ms']:.3f} ms against {ref['latency_ms']:.3f} ms."
        )
    params = report["edge_parameters"]
    f32_weights = 4 * (params["kernel"] + params["bias"])
    int8_weights = params["kernel"] + 4 * params["bias"]  # int8 kernels, int32 biases
    int8 = v.get(f"edge-{chosen}-int8")
    if int8 is not None:
        file_ratio = int8["bytes"] / ref["bytes"]
        rest = (int8["bytes"] - int8_weights) / 1024
        out.append(
            f"The weights alone go from {f32_weights / 1024:.1f} KiB (float32) to "
            f"{int8_weights / 1024:.1f} KiB (int8 kernels, int32 biases): "
            f"{int8_weights / f32_weights:.0%}. The int8 file is {file_ratio:.0%} of the "
            f"float32 one because the rest ({rest:.1f} KiB: graph, tensor names, per-channel "
            "quantization parameters) does not shrink; the larger the model, the closer the "
            "file ratio comes to the weights' ratio."
        )
    for name, x in v.items():
        if "pruned" in name:
            base = v[f"edge-{chosen}-{name.rsplit('-', 1)[1]}"]
            out.append(
                f"{name} ({x['note']}): {x['bytes'] / base['bytes']:.0%} of the unpruned size on "
                f"disk, {x['gzip_bytes'] / base['gzip_bytes']:.0%} compressed; latency "
                f"{x['latency_ms']:.3f} ms against {base['latency_ms']:.3f} ms; accuracy "
                f"{100 * (x['accuracy'] - base['accuracy']):+.2f} points. TFLite stores and "
                "runs zeros as dense weights: sparsity pays only after compression."
            )
    d = report["distillation"]
    gap = d["distilled_test_accuracy"] - d["labels_test_accuracy"]
    verdict = (
        "at least as accurate"
        if gap >= 0
        else "less accurate; the model shipped is the one better on the calibration split"
    )
    out.append(f"Distillation: {100 * gap:+.2f} points over the same model on labels ({verdict}).")
    cal = report["calibration"]
    nll_b, nll_a = cal["nll_before"], cal["nll_after"]
    ece_b, ece_a = cal["reliability_before"]["ece"], cal["reliability_after"]["ece"]
    helped = nll_a <= nll_b
    out.append(
        f"Temperature {cal['temperature']:.2f} (fitted on the calibration split): held-out NLL "
        f"{nll_b:.4f} -> {nll_a:.4f}, ECE {100 * ece_b:.2f}% -> {100 * ece_a:.2f}%"
        + (
            "."
            if helped
            else ": it did not carry over to the held-out split (a small calibration split "
            "with few errors fits the temperature loosely); the threshold was chosen on the "
            "same calibrated scale, so routing is consistent either way."
        )
    )
    for name in ("cloud-dynamic-int8", "cloud-static-int8"):
        if name in v:
            x, base = v[name], v["cloud-float32"]
            out.append(
                f"{name}: {x['bytes'] / base['bytes']:.0%} of the size, accuracy "
                f"{100 * (x['accuracy'] - base['accuracy']):+.2f} points, agreement "
                f"{100 * x['agreement']:.1f}%, latency {x['latency_ms']:.3f} ms against "
                f"{base['latency_ms']:.3f} ms."
            )
    return out


def write_report(report: dict[str, Any], out: Path) -> None:
    report["findings"] = findings(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.html").write_text(render_html(report))
