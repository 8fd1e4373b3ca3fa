"""tools/distill.py: a float teacher distilled into a tinybit student (issue #28, the machinery).

The teacher is a tiny random transformers LlamaForCausalLM (untied head) saved with save_pretrained,
with a small byte-level BPE tokenizer; the text is a repeated paragraph. Checked:
  - the torch teacher (tools/train.py's block, convert.py's tensors) gives transformers' logits;
  - --steps 0 exports the scheme's data-free quantizer: the same tensors tools/convert.py --scheme writes;
  - after a few steps, for each scheme, tinybit's logits on the exported model equal the torch student's
    eval-mode logits (max|diff| <= 1e-4 max|logit|), on the window whose int8 inputs lie farthest from a
    rounding boundary (tests/test_train.py's rule);
  - the loss falls on the repetitive text; a run interrupted after a checkpoint and resumed with --resume
    ends with the weights of an uninterrupted run;
  - bad input: exit status 2 and one line `distill.py: error: ...`.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the `convert` extra
transformers = pytest.importorskip("transformers")

import tinybit  # noqa: E402
from tinybit import io  # noqa: E402
from util import byte_bpe, llama_quantize, load_tool, write_random_gguf  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire, "
        "and the bird sings a song about the river that runs to the sea. ") * 12
SCHEMES = ("ternary", "ternary-row", "binary", "onebit", "lut2")


distill = load_tool("distill")
convert = distill.convert


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(HF directory, text file) of a tiny random float LLaMA: untied head, weights ~ N(0, 0.1)."""
    d = tmp_path_factory.mktemp("teacher")
    tk = byte_bpe(TEXT)
    cfg = transformers.LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.1,
                                   tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).float().save_pretrained(d, safe_serialization=True)
    (d / "tokenizer.json").write_text(tk.to_str())
    text = d / "text.txt"
    text.write_text(TEXT)
    return d, text


def run(teacher, out, *extra, steps=2, workdir=None):
    d, text = teacher
    argv = [str(d), str(out), "--text", str(text), "--steps", str(steps), "--seq", "16", "--batch", "2",
            "--lr", "3e-3", "--log-every", "1", "--threads", "1", *map(str, extra)]
    if workdir is not None:
        argv += ["--workdir", str(workdir)]
    return distill.main(argv)


def student_of(teacher, scheme, ckpt, subln=False):
    """The torch student of scheme with the checkpoint's weights, in eval mode."""
    config, _, load = distill.read_teacher(str(teacher[0]))
    student = distill.student_model(config, load(), dict(convert.SCHEME_SPECS[scheme][0]), subln)
    student.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    return config, student.eval()


def rounding_margins(student, windows):
    """Per window, the smallest distance of any int8 input x * s_x from a rounding boundary k + 0.5,
    relative to max(|x s_x|, 1) (tools/train.py's rounding_margins for the student's linears)."""
    margins = torch.full((len(windows),), float("inf"), dtype=torch.float64)

    def hook(module, inputs):
        x = inputs[0]
        v = x * (127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5))
        dist = ((v - v.floor() - 0.5).abs() / v.abs().clamp(min=1.0)).flatten(1).amin(dim=1)
        margins.copy_(torch.minimum(margins, dist.double()))

    hooks = [m.register_forward_pre_hook(hook) for m in student.modules()
             if isinstance(m, distill.StudentLinear) and m.kind != "onebit"]
    with torch.no_grad():
        student(windows)
    for h in hooks:
        h.remove()
    return margins


def test_teacher_equals_transformers(teacher):
    config, _, load = distill.read_teacher(str(teacher[0]))
    ids = torch.arange(3, 40)[None]
    hf = transformers.LlamaForCausalLM.from_pretrained(teacher[0]).float().eval()
    with torch.no_grad():
        want = hf(ids).logits[0].numpy()
        got = distill.teacher_model(config, load())(ids)[0].numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_step_zero_is_the_data_free_quantizer(teacher, tmp_path, scheme):
    assert run(teacher, tmp_path / "d", "--scheme", scheme, steps=0) == 0
    convert.convert([str(teacher[0]), str(tmp_path / "c"), "--scheme", scheme])
    got, want = (io.read_safetensors(str(tmp_path / n / "model.safetensors")) for n in ("d", "c"))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("scheme, subln", [(s, False) for s in SCHEMES] + [("ternary", True), ("lut2", True)])
def test_tinybit_equals_the_torch_student(teacher, tmp_path, scheme, subln):
    """Also with --subln (BitDistill's SubLN): the exported model has the sub-norms the student trained."""
    assert run(teacher, tmp_path / "out", "--scheme", scheme, *["--subln"] * subln, workdir=tmp_path / "w") == 0
    config, student = student_of(teacher, scheme, tmp_path / "w" / "ckpt.pt", subln)
    tb = tinybit.load(str(tmp_path / "out"))
    assert tb.config.quant == convert.SCHEME_SPECS[scheme][0] and not tb.config.tie_embeddings
    assert tb.config.sub_norms == subln
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(teacher[0] / "tokenizer.json")).encode(TEXT).ids
    windows = torch.tensor([ids[s:s + 24] for s in range(0, 240, 8)])
    margins = rounding_margins(student, windows)
    best = int(margins.argmax())
    assert margins[best] > 1e-6  # 10x float32's relative error from any boundary: no int8 code can flip
    with torch.no_grad():
        want = student(windows[best:best + 1])[0].numpy()
    got = tb.logits(windows[best].numpy())
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def losses(stderr):
    return [float(line.split(" loss ")[1].split()[0]) for line in stderr.splitlines() if " loss " in line]


def test_loss_falls_and_resume_equals_an_uninterrupted_run(teacher, tmp_path, capsys, monkeypatch):
    common = ("--scheme", "ternary", "--ckpt-every", "3")
    assert run(teacher, tmp_path / "a", *common, steps=6, workdir=tmp_path / "wa") == 0
    loss = losses(capsys.readouterr().err)
    assert len(loss) == 6 and loss[-1] < loss[0]
    # the same run, interrupted (Ctrl-C) right after its step-3 checkpoint, then resumed
    save = distill.save_checkpoint

    def save_then_stop(path, student, opt, step, args):
        save(path, student, opt, step, args)
        if step == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(distill, "save_checkpoint", save_then_stop)
    assert run(teacher, tmp_path / "b", *common, steps=6, workdir=tmp_path / "wb") == 130
    assert torch.load(tmp_path / "wb" / "ckpt.pt", weights_only=True)["step"] == 3
    assert not (tmp_path / "b").exists()
    monkeypatch.setattr(distill, "save_checkpoint", save)
    assert run(teacher, tmp_path / "b", *common, "--resume", steps=6, workdir=tmp_path / "wb") == 0
    assert "resumed at step 3" in capsys.readouterr().err
    a, b = (torch.load(tmp_path / w / "ckpt.pt", weights_only=True) for w in ("wa", "wb"))
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    # a checkpoint is not overwritten without --resume
    assert run(teacher, tmp_path / "c", *common, steps=6, workdir=tmp_path / "wb") == 2
    assert "pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize("case, needle", [
    ("no-teacher", "no such file or directory"),
    ("not-a-checkpoint", "config.json: not found"),
    ("short-text", "fewer than one --seq window"),
    ("unknown-scheme", "invalid choice: 'ternary3'"),
])
def test_bad_input_is_one_line_and_exit_2(teacher, tmp_path, capsys, case, needle):
    d, text = teacher
    (tmp_path / "empty").mkdir()
    (tmp_path / "short.txt").write_text("The quick brown fox")
    src, txt, scheme = {"no-teacher": (tmp_path / "missing", text, "ternary"),
                        "not-a-checkpoint": (tmp_path / "empty", text, "ternary"),
                        "short-text": (d, tmp_path / "short.txt", "ternary"),
                        "unknown-scheme": (d, text, "ternary3")}[case]
    rc = distill.main([str(src), str(tmp_path / "out"), "--scheme", scheme, "--text", str(txt), "--seq", "16"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("distill.py: error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_a_gguf_teacher_in_a_1bit_type_is_read_as_floats(tmp_path):
    """A teacher GGUF whose linears are Q1_0 (llama.cpp's quantizer): the teacher is its float weights (convert.py
    with --scheme f32), not the exact 1-bit tensors convert.py keeps without a scheme."""
    llama_cpp = pytest.importorskip("llama_cpp")
    f32, q = tmp_path / "f32.gguf", tmp_path / "q1_0.gguf"
    write_random_gguf(f32, "llama", False, 256, 256, 4, 2, 64, layers=1, vocab=256)
    llama_quantize(f32, q, llama_cpp.LLAMA_FTYPE_MOSTLY_Q1_0, 41)
    config, _, load = distill.read_teacher(str(q))
    tensors = load()
    assert config.quant == {"scheme": "f32"} and config.embed_quant == {"scheme": "f32"}
    assert tensors["layers.0.up.weight"].dtype == np.float32 and tensors["layers.0.up.weight"].shape == (256, 256)
    assert len(np.unique(np.abs(tensors["layers.0.up.weight"][0, :128]))) == 1  # one Q1_0 block: +-d
