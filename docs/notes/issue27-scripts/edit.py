"""Edit stability: edit one paragraph in the middle of a ~40-chunk document, re-chunk, count re-embeds.

Usage: RAYON_NUM_THREADS=1 python edit.py /tmp/chunkinv/corpus.jsonl [name-substring ...]
Documents: those of the corpus with 8,000..11,000 content tokens (about 40 chunks of 254 tokens with 32 overlap).
The edited paragraph: the first blank-line-separated paragraph of >= 200 characters starting at or after the
document's middle character. Three edits, each applied alone:
  insert  - append " This sentence was added by an edit to see how far the chunk boundaries move." to it
  word    - replace its first word of >= 5 letters by "replacement" (a length change of a few characters)
  delete  - delete its second half (from the first space after its middle to its end)
re-embed = chunks of the edited document whose text is not among the old document's chunk texts (multiset), i.e.
what a content-hash refresh would embed again. tail = share of the chunks that start after the edited paragraph
whose text changed (1.0: every later boundary moved).
"""
import json
import os
import re
import statistics
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chunkers as C

ADD = " This sentence was added by an edit to see how far the chunk boundaries move."


def pick_paragraph(t):
    mid = len(t) // 2
    for m in re.finditer(r"(?:^|\n\n)([^\n](?:.|\n(?!\n))*)", t):
        s, e = m.start(1), m.end(1)
        if s >= mid and e - s >= 200:
            return s, e
    return None


def edits(t, s, e):
    p = t[s:e]
    out = {"insert": t[:e] + ADD + t[e:]}
    w = re.search(r"\b[A-Za-z]{5,}\b", p)
    if w:
        out["word"] = t[: s + w.start()] + "replacement" + t[s + w.end():]
    h = p.find(" ", len(p) // 2)
    if h > 0:
        out["delete"] = t[: s + h] + t[e:]
    return out


def main():
    docs = [json.loads(line) for line in open(sys.argv[1])]
    only = sys.argv[2:]
    tok = C.load_tokenizer()
    sel = [d for d in docs if 8000 <= len(tok.encode(d["text"], add_special_tokens=False).ids) <= 11000]
    cases = []
    for d in sel:
        pe = pick_paragraph(d["text"])
        if pe:
            for kind, new in edits(d["text"], *pe).items():
                cases.append((d["id"], kind, d["text"], pe, new))
    print(f"docs={len(sel)} cases={len(cases)}", flush=True)
    res = {}
    for name, fn in C.all_chunkers(tok).items():
        if only and not any(o in name for o in only):
            continue
        reemb, tails, nchunks, per_kind = [], [], [], {}
        for _did, kind, old, (_ps, pe), new in cases:
            a = fn(old)
            b = fn(new)
            old_texts = Counter(c for _, _, c in a)
            changed = 0
            for _, _, c in b:
                if old_texts[c] > 0:
                    old_texts[c] -= 1
                else:
                    changed += 1
            # tail: old chunks starting after the edited paragraph end; did their text survive?
            new_set = Counter(c for _, _, c in b)
            tail = [c for s, _, c in a if s >= pe]
            tail_changed = sum(1 for c in tail if new_set[c] == 0)
            reemb.append(changed)
            tails.append(tail_changed / len(tail) if tail else 0.0)
            nchunks.append(len(a))
            per_kind.setdefault(kind, []).append(changed)
        row = dict(
            name=name, cases=len(cases), chunks_per_doc_mean=round(statistics.mean(nchunks), 1),
            reembed_mean=round(statistics.mean(reemb), 2), reembed_median=statistics.median(reemb),
            reembed_max=max(reemb), share_le_3=round(sum(r <= 3 for r in reemb) / len(reemb), 3),
            tail_changed_mean=round(statistics.mean(tails), 3),
            by_edit={k: dict(mean=round(statistics.mean(v), 2), max=max(v)) for k, v in per_kind.items()},
        )
        res[name] = row
        print(json.dumps(row), flush=True)
    json.dump(res, open(os.environ.get("EDIT_OUT", "/tmp/chunkinv/edit.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
