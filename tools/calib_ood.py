#!/usr/bin/env python3
"""Where calibrated quantization's error goes off its calibration text: for the block linears of some layers, the
relative output error ||W X - Q X|| / ||W X|| on the calibration sequences and on other texts, for several Hessian
shrinkages (docs/calibrate.md). A proxy of the perplexity on other text that takes minutes where a conversion and an
evaluation take ten; docs/quality.md compares the two.

    python tools/calib_ood.py F32_MODEL --calibrate-self 64 --text FILE [--text FILE ...] \\
        [--scheme lut4 --group-size 1] [--layers 0,4,10,16,22,28] [--shrink 0.1,0.2,0.3]

F32_MODEL is a tinybit model with float block linears (`tools/convert.py SRC F32_MODEL --scheme f32`). Every input X
is the float model's own activation (no earlier layer quantized), so each linear is judged alone. Each --text gives
its first 8 windows of 512 tokens (the start token, then 511 of the text). Each --shrink value is an a of
calibrate.shrunk, in every block, as `tools/convert.py --shrink` applies it. Prints, per group of linears that share
inputs, the mean error of each shrinkage on each text, then the means over all the linears.
"""
import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import calibrate  # noqa: E402
import convert  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinybit import io, linear  # noqa: E402
from tinybit import model as tbmodel  # noqa: E402

WINDOWS, LENGTH = 8, 512  # of each --text


def text_windows(tok, path, bos):
    """(WINDOWS, LENGTH) ids: each window the start token and the next LENGTH - 1 tokens of the file."""
    try:
        with open(path, encoding="utf-8") as f:
            ids = tok.encode(f.read(), add_special_tokens=False).ids
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"calib_ood.py: error: --text {path}: not a readable UTF-8 text file ({e})")
    if len(ids) < WINDOWS * (LENGTH - 1):
        sys.exit(f"calib_ood.py: error: {path}: {len(ids)} tokens, fewer than {WINDOWS} x {LENGTH - 1}")
    return np.array([[bos] + ids[k * (LENGTH - 1):(k + 1) * (LENGTH - 1)] for k in range(WINDOWS)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--calibrate-self", type=int, required=True, metavar="N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", action="append", required=True, metavar="FILE")
    ap.add_argument("--scheme", default="lut4")
    ap.add_argument("--group-size", type=int, default=1)
    ap.add_argument("--layers", default="0,4,10,16,22,28")
    ap.add_argument("--shrink", default=f"0,{calibrate.SHRINK}", help="comma-separated values of a")
    args = ap.parse_args()
    config = io.load_config(args.model)
    tensors = io.read_safetensors(os.path.join(args.model, "model.safetensors"))
    tok = io.load_tokenizer(args.model)
    if tok is None:
        sys.exit(f"calib_ood.py: error: {args.model}: no tokenizer.json (--calibrate-self needs the model's tokenizer)")
    spec = convert.parse_scheme(args.scheme, args.group_size)[0]
    unit = linear.scheme(spec).unit  # columns per GPTQ unit (2 for 2-D VQ)
    layers = [int(x) for x in args.layers.split(",")]
    settings = [float(a) for a in args.shrink.split(",")]
    texts = {os.path.basename(p): text_windows(tok, p, config.bos_token_id) for p in args.text}  # read before writing
    sets = {"calibration": calibrate.self_samples(config, tensors, tok.to_str(), args.calibrate_self, LENGTH,
                                                  args.seed), **texts}
    model = tbmodel.Model(config, tensors)
    X = {k: model.embed_rows(v.reshape(-1)).astype(np.float32).reshape(*v.shape, -1) for k, v in sets.items()}

    def lin(name, x):
        return x @ tensors[name + ".weight"].T
    errs = {s: {k: [] for k in sets} for s in settings}
    for i in range(max(layers) + 1):
        hess = {}  # (set, names) -> H of the float inputs
        for k in sets:
            X[k] = calibrate.block_pass(model, i, X[k], lin, (lambda names, H, k=k: hess.__setitem__(
                (k, tuple(names)), H)) if i in layers else None)
        for names in [n for s, n in hess if s == "calibration"]:
            grids = {name: calibrate.initial_grid(tensors[name + ".weight"], spec) for name in names}  # need no H
            for s in settings:
                H = calibrate.shrunk(hess[("calibration", names)], s)
                prep = calibrate.prepare(H, d=unit) if H.shape[0] % unit == 0 else None  # shared by the group
                for name in names:
                    w = tensors[name + ".weight"]
                    stored, _ = calibrate.quantize_calibrated(w, H, spec, prep=prep, grid=grids[name])
                    delta = linear.dequantize(linear.make(spec, stored, *w.shape)) - w
                    for k in sets:
                        Ht = hess[(k, names)]
                        errs[s][k].append(math.sqrt(calibrate.output_error(delta, Ht) / calibrate.output_error(w, Ht)))
            print(f"{', '.join(names)}: " + "; ".join(
                f"a={s} " + " ".join(f"{np.mean(errs[s][k][-len(names):]):.4f}" for k in sets) for s in settings),
                flush=True)
    print(f"mean over {len(errs[settings[0]]['calibration'])} linears ({', '.join(sets)}):")
    for s in settings:
        print(f"  a={s}: " + " ".join(f"{np.mean(errs[s][k]):.5f}" for k in sets))


if __name__ == "__main__":
    main()
