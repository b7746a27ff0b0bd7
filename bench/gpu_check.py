"""GPU check of the sentence-transformers backend: STS-B fidelity and throughput on CUDA vs plain encode.

Run on a GPU node from the repository root, with the MiniLM weights at .gpu/minilm and the STS-B test
split at .gpu/sts-test.csv (copy ../shared/data/stsb/sts-test.csv; on the lent device machine the
weights were carried as fp16 safetensors, 45 MB, to fit its 64 MiB transfer limit):

    python3 bench/gpu_check.py          # prints JSON; writes $OUT/gpu_check.json when OUT is set
"""

import csv
import json
import os
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, os.getcwd())
from embray.models import ModelSpec, fingerprint, load_embedder

out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
gold, left, right = [], [], []
for row in csv.reader(open(".gpu/sts-test.csv", encoding="utf-8"), delimiter="\t", quoting=csv.QUOTE_NONE):
    if len(row) >= 7:
        gold.append(float(row[4]))
        left.append(row[5])
        right.append(row[6])
for dev, bs in (("cuda", 256), ("cpu", 64)):
    spec = ModelSpec(name=os.path.abspath(".gpu/minilm"), device=dev, batch_size=bs)
    t = time.perf_counter()
    e = load_embedder(spec)
    load_s = time.perf_counter() - t
    a, b = e.embed_documents(left), e.embed_documents(right)
    rho = spearmanr(np.sum(a * b, axis=1), gold).statistic
    res = {
        "load_s": round(load_s, 2),
        "spearman": round(float(rho), 4),
        "fingerprint": fingerprint(spec),
        "norms_ok": bool(np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-4)),
        "dtype": str(a.dtype),
    }
    if dev == "cuda":
        texts = (left + right) * 15  # ~41k texts
        e.embed_documents(texts[:2048])
        torch.cuda.synchronize()
        t = time.perf_counter()
        e.embed_documents(texts)
        torch.cuda.synchronize()
        s = time.perf_counter() - t
        res["embray_texts_per_s"] = round(len(texts) / s)
        t = time.perf_counter()
        e.model.encode(texts, batch_size=bs, convert_to_numpy=True, show_progress_bar=False)
        torch.cuda.synchronize()
        s2 = time.perf_counter() - t
        res["plain_encode_texts_per_s"] = round(len(texts) / s2)
        res["texts"] = len(texts)
        gpu_vecs = a
    else:
        res["max_abs_diff_vs_cuda"] = float(np.abs(a - gpu_vecs).max())
    out[dev] = res
    print(json.dumps({dev: res}), flush=True)
print(json.dumps(out))
open(os.path.join(os.environ.get("OUT", "."), "gpu_check.json"), "w").write(json.dumps(out, indent=2))
