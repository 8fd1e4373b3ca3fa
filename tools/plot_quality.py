#!/usr/bin/env python3
"""Plot bits per weight vs perplexity (log scale) from the table tools/quality.py wrote:

    pip install -e ".[plot]"
    python tools/plot_quality.py [--table docs/quality.md] [--out docs/quality.png]
"""
import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_table(path):
    """[(row, bits/weight, perplexity)] from the markdown table's | row | flags | bpw | size | ppl | rows."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.split("|")[1:-1]]
            if len(cells) >= 5 and cells[0] not in ("row", "---"):
                try:
                    rows.append((cells[0], float(cells[2]), float(cells[4])))
                except ValueError:
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
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    points = {}  # (bits, ppl) -> names: identical rows (onebit svd and nmf) share one label
    for name, b, p in rows:
        points.setdefault((b, p), []).append(name)
    ax.scatter([b for b, _ in points], [p for _, p in points], color="tab:blue", zorder=3)
    prev_b, right = None, False
    for (b, p), names in sorted(points.items()):
        # label right of the point; a point at (almost) the same bits as the previous one flips side
        right = not right if prev_b is not None and abs(math.log2(b / prev_b)) < 0.05 else True
        ax.annotate(" = ".join(names), (b, p), textcoords="offset points", xytext=(7 if right else -7, -3),
                    ha="left" if right else "right", fontsize=8)
        prev_b = b
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([1, 2, 4, 8, 16, 32])
    ax.set_xticklabels(["1", "2", "4", "8", "16", "32"])
    ax.set_xlabel("bits per weight of the block linears (scales and tables included)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("SmolLM2-135M-Instruct, post-training quantization (no QAT)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
