#!/usr/bin/env python3
"""Plot bits per weight vs perplexity (log scale) from the tables of docs/quality.md: the data-free rows
tools/quality.py wrote, and the calibrated rows (flags with --calibrate) in a second series:

    pip install -e ".[plot]"
    python tools/plot_quality.py [--table docs/quality.md] [--out docs/quality.png]
"""
import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_table(path):
    """[(row, bits/weight, perplexity, calibrated)] from the markdown tables' | row | flags | bpw | size | ppl |
    rows; a perplexity cell may go on after its number ("22.58 (1.12×)"); calibrated: --calibrate in the flags."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.split("|")[1:-1]]
            if len(cells) >= 5 and cells[0] not in ("row", "---"):
                try:
                    rows.append((cells[0], float(cells[2]), float(cells[4].split()[0]), "--calibrate" in cells[1]))
                except (ValueError, IndexError):
                    continue
    if not rows:
        sys.exit(f"plot_quality.py: error: {path}: no table rows found (run tools/quality.py first)")
    return rows


def main():
    ap = argparse.ArgumentParser(description="bits/weight vs perplexity plot of docs/quality.md")
    ap.add_argument("--table", default=os.path.join(ROOT, "docs", "quality.md"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "quality.png"))
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_table(args.table)
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    for calibrated, color, marker, label, dy in ((False, "tab:blue", "o", "data-free (round to nearest)", -6),
                                                 (True, "tab:orange", "^", "calibrated (--calibrate, GPTQ/GPTVQ)", 2)):
        points = []  # [(bits, ppl, names)]: rows at the same bits and within 10% perplexity share one label
        for name, b, p, cal in sorted((r for r in rows if r[3] == calibrated), key=lambda r: (r[1], r[2])):
            if points and b == points[-1][0] and p / points[-1][1] < 1.1:
                points[-1][2].append(name.replace(" calibrated", ""))
            else:
                points.append((b, p, [name.replace(" calibrated", "")]))
        ax.scatter([b for b, _, _ in points], [p for _, p, _ in points], color=color, marker=marker, zorder=3,
                   label=label)
        left = False
        for j, (b, p, names) in enumerate(points):
            # label right of the point; left when the next point is at about the same bits (not twice in a row)
            left = not left and j + 1 < len(points) and math.log2(points[j + 1][0] / b) < 0.2
            ax.annotate(" = ".join(names) if not calibrated else ", ".join(names), (b, p), textcoords="offset points",
                        xytext=(-7 if left else 7, dy), ha="right" if left else "left", fontsize=8, color=color)
    f32 = [p for name, _, p, _ in rows if name == "f32"]
    if f32:
        ax.axhline(f32[0], color="gray", linestyle="--", linewidth=0.8, zorder=1)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlim(0.8, 40)
    ax.set_xticks([1, 2, 4, 8, 16, 32])
    ax.set_xticklabels(["1", "2", "4", "8", "16", "32"])
    ax.set_xlabel("bits per weight of the block linears (scales and tables included)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("SmolLM2-135M-Instruct, post-training quantization (no QAT); dashed: f32")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
