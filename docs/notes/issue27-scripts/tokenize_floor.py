"""The floor: seconds to tokenise the 200 documents once (with offsets) with the MiniLM tokenizer, one thread."""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chunkers as C

docs = [json.loads(line)["text"] for line in open(sys.argv[1])]
tok = C.load_tokenizer()
tok.encode(docs[0])
t0 = time.perf_counter()
for d in docs:
    _ = tok.encode(d, add_special_tokens=False).offsets
dt = time.perf_counter() - t0
print(f"tokenize once: {dt:.2f} s for {len(docs)} docs = {len(docs) / dt:.1f} docs/s")
