"""End-to-end tuning of the lut/vq tables (tools/tune.py, convert.py --tune-epochs).

- the torch student computes what tinybit's Model computes, for lut and vq linears, tables per tensor and per group;
- a table's gradient is the gather's: the sum of ∂loss/∂W over the weights coded with the entry;
- tuning lowers KL(float || quantized) on the sequences it trained on, changes the tables and nothing else, and is
  deterministic under its seed.
"""
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tinybit import io, linear, model, pack, quant  # noqa: E402
from tinybit.errors import UsageError  # noqa: E402
from tinybit.eval import log_softmax  # noqa: E402

from util import load_tool, quantize_tensors, random_float_tensors, tiny_config  # noqa: E402

tune = load_tool("tune")

SPECS = {"lut3": {"scheme": "lut", "bits": 3}, "lut4-g8": {"scheme": "lut", "bits": 4, "group_rows": 8},
         "vq2-row": {"scheme": "vq", "bits": 2, "group_rows": 1}}


def quantized(spec, seed=0, **overrides):
    """(float config, float tensors, quantized config, its tensors): a tiny random model and its data-free quantization
    as spec (the block linears), the embedding int8_block as a converted GGUF's where dim allows."""
    dim = overrides.get("dim", 48)
    embed = {"scheme": "int8_block", "block": 16} if dim % 16 == 0 else {"scheme": "f32"}
    fc = tiny_config(embed_quant=embed, **overrides)
    ft = quantize_tensors(fc, random_float_tensors(fc, seed))
    qc = dataclasses.replace(fc, quant=spec)
    blocks = [name for name, _, _ in model.linear_shapes(qc) if name != "head"]
    qt = {k: v for k, v in ft.items() if k.rsplit(".", 1)[0] not in blocks}
    for name in blocks:
        qt.update({f"{name}.{s}": t for s, t in linear.quantize(ft[name + ".weight"], spec).items()})
    return fc, ft, qc, qt


def kl(float_model, quant_model, ids):
    """Mean KL(float || quantized) per token of tinybit's models over the sequences ids (n, length)."""
    total = 0.0
    for seq in ids:
        lp, lq = (log_softmax(m.logits(seq)) for m in (float_model, quant_model))
        total += (np.exp(lp) * (lp - lq)).sum(1).mean()
    return total / len(ids)


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("tied", [True, False])
def test_student_computes_the_model(name, tied):
    _, _, qc, qt = quantized(SPECS[name], tie_embeddings=tied, dim=49 if name.startswith("vq") else 48)  # 49: odd n_in
    net, tables = tune.torch_model(qc, qt, tune=True)
    assert sorted(tables) == sorted(n for n, _, _ in model.linear_shapes(qc) if n != "head")
    ids = np.arange(3, 23)
    with torch.no_grad():
        got = net(torch.from_numpy(ids[None]))[0].numpy()
    want = model.Model(qc, qt, ref=True).logits(ids)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("spec, n_in", [({"scheme": "lut", "bits": 3, "group_rows": 4}, 20),
                                         ({"scheme": "vq", "bits": 2, "group_rows": 4}, 21)])  # 21: a pair cut
def test_table_gradient_is_the_sum_over_its_codes(spec, n_in):
    w = np.random.default_rng(0).standard_normal((8, n_in))
    layer = linear.make(spec, linear.quantize(w, spec), 8, n_in)
    t = tune.TableLinear(layer)
    x, r = (torch.from_numpy(np.random.default_rng(s).standard_normal(shape).astype(np.float32))
            for s, shape in ((1, (5, n_in)), (2, (5, 8))))
    (t(x) * r).sum().backward()
    unit = linear.scheme(spec).unit  # weights a code stands for
    n_codes = pack.ceil_div(n_in, unit)
    grad_w = np.zeros((8, n_codes * unit))
    grad_w[:, :n_in] = (r.T @ x).numpy()  # ∂/∂W of sum(r ⊙ x Wᵀ); the cut weight of the last pair has none
    idx = pack.unpack_indices(layer["w_idx"], n_codes, unit * spec["bits"])  # (8, n_codes)
    want = np.zeros(t.table.shape).reshape(2, -1, unit)  # (groups, k, unit)
    np.add.at(want, (quant.row_groups(8, 4)[:, None], idx), grad_w.reshape(8, n_codes, unit))
    assert np.allclose(t.table.grad.numpy().reshape(want.shape), want, atol=1e-5)


@pytest.mark.parametrize("name", ["lut3", "vq2-row"])
def test_tuning_lowers_the_kl_and_changes_only_the_tables(name):
    fc, ft, qc, qt = quantized(SPECS[name], seed=3)
    ids = np.random.default_rng(4).integers(3, fc.vocab_size, (8, 24))
    tuned, lines = tune.tune_tables(qc, fc, ft, qt, ids, epochs=4, seed=5, batch=2)
    fm, before, after = (model.Model(c, t, ref=True) for c, t in ((fc, ft), (qc, qt), (qc, tuned)))
    assert kl(fm, after, ids) < 0.9 * kl(fm, before, ids)
    key = linear.scheme(SPECS[name]).table
    changed = {k for k in qt if not np.array_equal(qt[k], tuned[k])}
    assert changed and all(k.endswith("." + key) for k in changed) and tuned.keys() == qt.keys()
    assert all(tuned[k].dtype == np.float32 and tuned[k].shape == qt[k].shape for k in changed)
    assert lines[0].startswith(f"tuned {7 * qc.n_layers} tables end to end on 8 x 24 tokens, 16 steps")
    again, _ = tune.tune_tables(qc, fc, ft, qt, ids, epochs=4, seed=5, batch=2)
    other, _ = tune.tune_tables(qc, fc, ft, qt, ids, epochs=4, seed=6, batch=2)
    assert all(np.array_equal(again[k], tuned[k]) for k in changed)
    assert any(not np.array_equal(other[k], tuned[k]) for k in changed)
    io.check_tensors(tuned, model.expected_tensors(qc), "tuned")


def test_nothing_to_tune_returns_the_tensors():
    fc, ft, qc, qt = quantized({"scheme": "ternary"})
    ids = np.zeros((2, 8), np.int64)
    out, lines = tune.tune_tables(qc, fc, ft, qt, ids, epochs=1)
    assert out is qt and lines == []


def test_check_memory_refuses_what_does_not_fit(monkeypatch):
    c = tiny_config(vocab_size=49152, dim=576, ffn_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64)
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 8 * 2**18}  # 8 GiB
    monkeypatch.setattr(tune.os, "sysconf", pages.get)
    tune.check_memory(c, 64, 512)  # SmolLM2-135M, 64 sequences of 512 tokens, 4 a step: about 6.1 GiB
    pages["SC_PHYS_PAGES"] = 4 * 2**18
    with pytest.raises(UsageError, match=r"--tune-epochs: tuning the tables needs about 6\.1 GiB, more than this "
                                         r"machine's 4\.0 GiB"):
        tune.check_memory(c, 64, 512)
