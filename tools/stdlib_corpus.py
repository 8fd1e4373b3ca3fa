"""The training corpus that exists on every machine: the Python standard library's own .py files.

Files are split into train / held-out by a stable hash of their path relative to the stdlib
root, so the split is the same on every machine with the same Python version.
"""
import hashlib
import os
import sysconfig

import numpy as np

HELD_OUT_PERCENT = 5
EOT = "<|endoftext|>"


def stdlib_files():
    """[(relative path, text)] of the standard library's .py files, sorted, site-packages excluded."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "__pycache__"))
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(d, f)
                with open(path, "rb") as fh:
                    text = fh.read().decode("utf-8", errors="replace")
                out.append((os.path.relpath(path, root), text))
    return out


def is_held_out(rel_path):
    """Stable split: a file is held out when md5(relative path) mod 100 < HELD_OUT_PERCENT."""
    return int(hashlib.md5(rel_path.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def split_corpus():
    files = stdlib_files()
    train = [t for p, t in files if not is_held_out(p)]
    held = [t for p, t in files if is_held_out(p)]
    return train, held


def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_corpus(tok, texts):
    """All texts as one token stream, each file followed by <|endoftext|>. -> int32 array."""
    eot = tok.token_to_id(EOT)
    ids = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.array(ids, dtype=np.int32)




def held_out_text():
    """The held-out files joined by <|endoftext|> separators (the text tinybit.eval scores)."""
    return ("\n" + EOT + "\n").join(split_corpus()[1])


if __name__ == "__main__":
    import sys
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/stdlib_corpus.py OUT.txt   (writes the held-out split)")
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        f.write(held_out_text())
