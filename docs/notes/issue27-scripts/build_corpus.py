"""Build ~200 long plain-text documents from the machine's man pages (man1).

Selection is deterministic: man1 pages sorted by file name, gz size 6-30 KiB,
every page rendered with `MANWIDTH=1000 man -E UTF-8 -P cat NAME | col -bx`,
kept if the cleaned text has 10,000..120,000 characters and is not identical
to an earlier kept page; first 200 kept.
Cleaning: strip each line, collapse runs of 3+ spaces to 2, collapse 3+ blank
lines to one blank line. Paragraphs therefore are single long lines separated
by blank lines (groff does not wrap at MANWIDTH=1000).
Output: JSON lines {"id": page, "text": ...}.
"""
import json
import os
import re
import subprocess
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/chunkinv/corpus.jsonl"
mandir = "/usr/share/man/man1"
names = sorted(f for f in os.listdir(mandir) if f.endswith(".gz"))
kept = []
seen = set()  # drop pages whose rendered text duplicates an earlier one (links, .so)
for f in names:
    size = os.path.getsize(os.path.join(mandir, f))
    if not (6 * 1024 <= size <= 30 * 1024):
        continue
    path = os.path.join(mandir, f)
    p = subprocess.run(f"man -E UTF-8 -P cat -l {path} 2>/dev/null | col -bx",
                       shell=True, capture_output=True, text=True,
                       env={**os.environ, "MANWIDTH": "1000"})
    lines = [re.sub(r" {3,}", "  ", ln.strip()) for ln in p.stdout.splitlines()]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"
    if 10_000 <= len(text) <= 120_000 and text not in seen:
        seen.add(text)
        kept.append({"id": f[:-3], "text": text})
    if len(kept) == 200:
        break
with open(out, "w") as fh:
    for d in kept:
        fh.write(json.dumps(d) + "\n")
n = len(kept)
tot = sum(len(d["text"]) for d in kept)
print(f"docs={n} chars_total={tot} chars_mean={tot / n:.0f} "
      f"chars_min={min(len(d['text']) for d in kept)} chars_max={max(len(d['text']) for d in kept)}")
