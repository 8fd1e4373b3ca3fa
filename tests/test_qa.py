"""`python -m tinybit.eval --qa FILE.jsonl`: the question goes through the model's chat template, the answer is
greedy over the KV cache, and an answer counts when its regular expression matches (ignoring case). Held against
an independent greedy loop over Model.logits on the template rendered by jinja2 directly; the shipped set
data/qa.jsonl is well formed, large enough, and none of its questions is a --calibrate-self instruction."""
import json
import os
import re

import jinja2
import numpy as np
import pytest

from tinybit import eval as tbeval
from tinybit import model
from tinybit.errors import UsageError

from util import byte_bpe, load_tool, save_random_model, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QA = os.path.join(ROOT, "data", "qa.jsonl")
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}" \
           "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
TEXT = "the user asks and the assistant answers: paris, rome, tokyo, 42, 81, def, for, true, false. " * 8


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    tk = byte_bpe(TEXT)
    c = tiny_config(vocab_size=tk.get_vocab_size(), bos_token_id=0, eos_token_ids=[1], add_bos=False,
                    chat_template=TEMPLATE, max_seq_len=128)
    path = tmp_path_factory.mktemp("qa") / "m"
    save_random_model(path, c, seed=3, tokenizer_json=tk.to_str())
    return path


def greedy_answer(m, question, n):
    """The model's greedy answer, independently: the template rendered by jinja2, the whole sequence each step."""
    text = jinja2.Template(TEMPLATE).render(messages=[{"role": "user", "content": question}],
                                            add_generation_prompt=True)
    ids = m.tokenizer.encode(text, add_special_tokens=False).ids
    new = []
    for _ in range(n):
        t = int(np.argmax(m.logits(ids + new)[-1]))
        if t in m.config.eos_token_ids:
            break
        new.append(t)
    return m.tokenizer.decode(new)


def test_scorer_counts_matches_and_reports_misses(chat_model, tmp_path, capsys):
    m = model.load(str(chat_model))
    questions = ["What is the capital of France?", "What is 9 times 9?", "Which keyword defines a function?"]
    said = [greedy_answer(m, q, 12) for q in questions]
    assert all(said), said
    items = [(questions[0], re.escape(said[0][:3].upper())),  # matches, case ignored
             (questions[1], "^" + re.escape(said[1]) + "$"),  # the whole answer
             (questions[2], "zzz-never-said")]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in items) + "\n\n")
    results = tbeval.answer_questions(m, tbeval.read_qa(str(qa)), max_new_tokens=12)
    assert [(text, ok) for _, _, text, ok in results] == [(said[0], True), (said[1], True), (said[2], False)]
    assert tbeval.main(["--model", str(chat_model), "--qa", str(qa), "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"miss: {questions[2]}" and out[1] == f"  expected /zzz-never-said/, said: {said[2]!r}"
    assert out[2].startswith(f"qa: 2/3 correct | {qa} | greedy, 12 tokens")


@pytest.mark.parametrize("line, words", [
    ("{not json", "line 2: expected"), ('{"question": "q"}', "line 2: expected"),
    ('{"question": "", "answer": "a"}', "line 2: expected"), ('{"question": "q", "answer": 3}', "line 2: expected"),
    ('{"question": "q", "answer": "(unclosed"}', "line 2: bad regular expression")])
def test_bad_qa_lines_are_named(tmp_path, line, words):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "ok?", "answer": "yes"}\n' + line + "\n")
    with pytest.raises(UsageError, match=re.escape(f"--qa {qa}: {words}")):
        tbeval.read_qa(str(qa))


def test_qa_needs_a_chat_template(capsys):
    shipped = os.path.join(ROOT, "models", "stdlib-b158")  # no chat template
    assert tbeval.main(["--model", shipped, "--qa", QA]) == 2
    assert "--qa: the model needs a tokenizer.json and a chat template" in capsys.readouterr().err


def test_shipped_set():
    """At least 60 questions of the four kinds; no question is a --calibrate-self instruction."""
    items = tbeval.read_qa(QA)
    questions = [q for q, _ in items]
    assert len(items) >= 60 and len(set(questions)) == len(questions)
    kinds = {"read": sum(q.startswith("Read this:") for q in questions),
             "code": sum("Python" in q or "HTML" in q for q in questions),
             "arithmetic": sum(bool(re.search(r"\d", q)) and not q.startswith(("Read", "In Python")) for q in questions)}
    assert min(kinds.values()) >= 10, kinds
    instructions = load_tool("calibrate").SELF_INSTRUCTIONS
    assert not set(questions) & set(instructions)
