"""tools/train.py: the training model is tinybit's model under tinybit's names.

A tiny run (random, seeded weights; a small byte-level BPE tokenizer; random held-out tokens) is
written as a work directory the way train() writes one, exported with --export to a transformers
BitNet directory (--arch llama: a float LLaMA one), converted with tools/convert.py and loaded with tinybit.load:
  - tinybit's logits equal the torch model's eval-mode (quantized) logits: max|diff| <= 1e-4 max|logit|,
    on the held-out window export picks by rounding margin (tests/test_shipped_model.py's check);
  - the torch model's state_dict keys are the canonical tensor names of the float model
    (model.expected_tensors), and the converted model's config is the run's config.
"""
import argparse
import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the `convert` extra

import tinybit  # noqa: E402
from tinybit import model as tbmodel  # noqa: E402
from util import load_tool  # noqa: E402

train = load_tool("train")
convert = load_tool("convert")

RUN = dict(dim=64, layers=2, heads=4, kv_heads=2, ffn_dim=96, ctx=64)
VOCAB = 300


def small_tokenizer():
    """A byte-level BPE with <|endoftext|> as its one special token (id 0), as stdlib_corpus makes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["def hello(world): return the quick brown fox 12345"] * 4,
                           trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[train.EOT],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


def random_model(config, seed=0):
    """BitNetLM of config, every matrix ~ N(0, 0.2), every norm weight ~ 1 + N(0, 0.2): logits not flat."""
    torch.manual_seed(seed)
    m = train.make_model(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            noise = 0.2 * torch.randn(p.shape, generator=g)
            p.copy_(1 + noise if p.ndim == 1 else noise)
    return m.eval()


@pytest.fixture(scope="module", params=["bitnet", "llama"])
def run(tmp_path_factory, request):
    """(config, torch model, converted tinybit model, export dir) of a tiny trained-looking work directory."""
    tmp = tmp_path_factory.mktemp("train")
    work, hf, out = tmp / "run", tmp / "hf", tmp / "model"
    work.mkdir()
    tok = small_tokenizer()
    config = train.run_config(argparse.Namespace(**RUN, arch=request.param), VOCAB, tok.token_to_id(train.EOT))
    model = random_model(config)
    # the work directory as train() leaves it
    tok.save(str(work / "tokenizer.json"))
    (work / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    torch.save({"model": model.state_dict(), "opt": {}, "step": 1}, work / "ckpt.pt")
    np.save(work / "heldout.npy", np.random.default_rng(0).integers(0, tok.get_vocab_size(), 2048).astype(np.int32))
    train.main(["--workdir", str(work), "--export", str(hf), "--threads", "1"])
    assert convert.main([str(hf), str(out)]) in (None, 0)
    return config, model, tinybit.load(str(out)), hf


def test_state_dict_keys_are_canonical_tensor_names(run):
    config, model, _, _ = run
    float_config = dataclasses.replace(config, quant={"scheme": "f32"})
    assert set(model.state_dict()) == set(tbmodel.expected_tensors(float_config))
    assert set(train.HF_BLOCK_NAMES) == set(tbmodel.BLOCK_LINEARS + tbmodel.BLOCK_NORMS)


def test_export_converts_to_the_run_config(run):
    config, _, tb, hf = run
    assert json.loads((hf / "config.json").read_text()) == train.hf_config(config)
    assert dataclasses.replace(tb.config, family="") == config


def test_tinybit_logits_equal_the_torch_model(run):
    """The exported fixture (the window with the largest rounding margin) and a fresh torch forward on
    it in eval mode: the converted ternary model gives the same logits."""
    _, model, tb, hf = run
    ref = np.load(hf / "reference_logits.npz")
    ids = ref["ids"].astype(np.int64)
    with torch.no_grad():
        want = model(torch.from_numpy(ids)[None])[0].numpy()
    np.testing.assert_array_equal(want, ref["logits"])
    # every x * s_x is 10x float32's relative error from a rounding boundary: no code can flip
    assert ref["margin"] > 1e-6
    got = tb.logits(ids)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
