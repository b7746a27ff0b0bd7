"""Cross-process determinism: one sha256 over every chunker's (start, end, text) lists for the first 30 docs.
Run twice with different PYTHONHASHSEED values and compare the printed digests.
Also shows what the libraries do with the tokenizer.json exactly as shipped (padding/truncation at 128 left on)."""

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chunkers as C
from tokenizers import Tokenizer

docs = [json.loads(line) for line in open(sys.argv[1])][:30]
tok = C.load_tokenizer()
for name, fn in C.all_chunkers(tok).items():
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps(fn(d["text"])).encode())
    print(f"{name}: {h.hexdigest()[:16]}")
raw = Tokenizer.from_file(C.TOKENIZER_JSON)  # as shipped: pads to and truncates at 128
t = docs[0]["text"]
print(
    "raw tokenizer ids for the whole first doc:",
    len(raw.encode(t).ids),
    "| with no_truncation:",
    len(tok.encode(t).ids),
)
print("semchunk with raw tokenizer: chunks =", len(C.semchunk_fn(raw, overlap=None)(t)))
print("chonkie Recursive with raw tokenizer: chunks =", len(C.chonkie_recursive(raw)(t)))
