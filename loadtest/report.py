"""The load test's report: Markdown with PNG plots (no plotting library; see model/plot.py)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from model.plot import BLUE, GREY, INK, ORANGE, PAPER, write_png

WIDTH, HEIGHT, MARGIN = 480, 240, 24


def line_plot(series: list[tuple[list[float], list[float], tuple[int, int, int]]],
              x_max: float, y_max: float) -> np.ndarray:
    """Lines (x, y, colour) on axes from 0 to x_max / y_max; a grey grid line at each tenth."""
    image = np.full((HEIGHT + 2 * MARGIN, WIDTH + 2 * MARGIN, 3), PAPER, dtype=np.uint8)
    for i in range(11):
        image[MARGIN + i * HEIGHT // 10, MARGIN : MARGIN + WIDTH] = GREY
        image[MARGIN : MARGIN + HEIGHT, MARGIN + i * WIDTH // 10] = GREY
    image[MARGIN + HEIGHT, MARGIN : MARGIN + WIDTH] = INK
    image[MARGIN : MARGIN + HEIGHT, MARGIN] = INK

    def pixel(x: float, y: float) -> tuple[int, int]:
        return (MARGIN + HEIGHT - int(np.clip(y / y_max, 0, 1) * (HEIGHT - 1)),
                MARGIN + int(np.clip(x / x_max, 0, 1) * (WIDTH - 1)))

    for xs, ys, colour in series:
        points = [pixel(x, y) for x, y in zip(xs, ys, strict=True)]
        for (r0, c0), (r1, c1) in itertools.pairwise(points):
            steps = max(abs(r1 - r0), abs(c1 - c0), 1)
            for t in np.linspace(0, 1, steps + 1):
                r, c = round(r0 + t * (r1 - r0)), round(c0 + t * (c1 - c0))
                image[max(r - 1, 0) : r + 1, max(c - 1, 0) : c + 1] = colour
    return image


def cdf(values: list[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    return ordered, [(i + 1) / len(ordered) for i in range(len(ordered))]


def write_report(result: dict[str, Any], runs: list[dict[str, Any]], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"# Load test: {result['peers']} peers, {result['engine']} engine", "",
             f"Server {result['url']}, {result['seconds']:.0f} s scripts, {result['workers']} generator processes.", ""]
    samples = result.get("samples", {})
    plots = []
    added, v2v = samples.get("server_added_ms", []), samples.get("voice_to_voice_ms", [])
    if added or v2v:
        x_max = max([*added, *v2v, 1.0]) * 1.05
        series = [(*cdf(added), BLUE)] if added else []
        series += [(*cdf(v2v), ORANGE)] if v2v else []
        write_png(line_plot(series, x_max, 1.0), directory / "latency_cdf.png")
        plots.append(f"![latency CDF](latency_cdf.png)  \nLatency CDF, 0–{x_max:.0f} ms: server-added (blue), "
                     "voice-to-voice (orange).")
    if len(runs) > 1:
        peers = [float(r["peers"]) for r in runs]
        cpu = [r["server_cpu_pct"] or 0.0 for r in runs]
        p99 = [r["server_added_ms_p99"] or 0.0 for r in runs]
        write_png(line_plot([(peers, cpu, BLUE)], max(peers), max([*cpu, 1.0]) * 1.1), directory / "cpu_by_peers.png")
        write_png(line_plot([(peers, p99, ORANGE)], max(peers), max([*p99, 1.0]) * 1.1),
                  directory / "latency_by_peers.png")
        plots.append(f"![CPU](cpu_by_peers.png)  \nServer CPU % (0–{max(cpu) * 1.1:.0f}) against peers "
                     f"(0–{max(peers):.0f}).")
        plots.append(f"![p99](latency_by_peers.png)  \np99 server-added latency (0–{max(p99) * 1.1:.0f} ms) "
                     f"against peers.")
    keys = ["peers", "peers_ok", "connect_ms_p50", "server_added_ms_p50", "server_added_ms_p99",
            "voice_to_voice_ms_p50", "underruns", "concealed_frames", "deadline_miss_rate", "server_cpu_pct",
            "server_cpu_pct_per_session", "generator_cpu_pct"]
    lines += ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k)) for k in keys) + " |" for r in runs]
    if "capacity" in result:
        lines += ["", f"**Capacity: {result['capacity']} sessions** ({result['capacity_rule']})."]
    if result.get("interaction"):
        lines += ["", "Interaction, measured through the stack (model/evaluate.py's definitions):", "",
                  "```", str({k: v for k, v in result["interaction"].items()}), "```"]
    if result.get("errors"):
        lines += ["", "Errors: " + "; ".join(result["errors"])]
    lines += ["", *plots, ""]
    path = directory / "report.md"
    path.write_text("\n".join(lines))
    return path
