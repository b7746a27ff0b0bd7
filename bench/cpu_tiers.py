"""embray's CPU embedder vs plain SentenceTransformer.encode under an instruction-set cap, side by side, one process.

    taskset -c 1 .venv/bin/python bench/cpu_tiers.py [--isa avx2|avx512|native] [--long 500] [--short 2000]
                                                     [--reps 3] [--runs plain,fp32,bf16] [--threads 1]
                                                     [--fuse-from N] [--batch-tokens N] [--narrow-tokens N]

--isa caps what the libraries use before torch loads (``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``): avx2
is an AVX2-only CPU, avx512 one without bf16 (AVX512_CORE), native the machine as it is. Each run is loaded
once and warmed on 64 texts; then the runs take turns, rep by rep, on the same texts (long: man pages cut to
10,000 characters; short: stdlib docstrings of 50-300 characters). Prints medians, ratios to plain, the cosine
of each run's vectors to plain's (min over texts) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ISA = {  # --isa: (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY)
    "avx2": ("AVX2", "avx2"),
    "avx512": ("AVX512_CORE", "avx512"),
    "native": (None, None),
}
ROOT = Path(__file__).resolve().parents[1]


def corpora(n_long: int, n_short: int) -> dict[str, list[str]]:
    sys.path.insert(0, str(ROOT))
    from embray.demo import collect
    from tests.helpers import man_pages

    long = [body[:10_000] for _, _, body in man_pages(n_long, min_chars=3000)]
    short = [d for d in collect(100_000).values() if 50 <= len(d) <= 300][:n_short]
    return {"long": long, "short": short}


def flags() -> str:
    try:
        words = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "?"
    return " ".join(sorted({w for w in words if w.startswith(("avx", "amx"))}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", choices=list(ISA), default="native")
    ap.add_argument("--long", type=int, default=500)
    ap.add_argument("--short", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runs", default="plain,fp32,bf16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fuse-from", type=int, default=None, help="override cpu_graph.FUSE_FROM (A/B runs)")
    ap.add_argument("--batch-tokens", type=int, default=None, help="override cpu_graph.BATCH_TOKENS (A/B runs)")
    ap.add_argument("--narrow-tokens", type=int, default=None, help="override cpu_graph.NARROW_TOKENS (A/B runs)")
    args = ap.parse_args()
    onednn, aten = ISA[args.isa]
    for var, value in (("ONEDNN_MAX_CPU_ISA", onednn), ("ATEN_CPU_CAPABILITY", aten)):
        if value:
            os.environ[var] = value
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from embray.models import ModelSpec, cpu_graph, load_embedder, resolve_model_path
    from embray.models.sentence_transformers import cpu_has_bf16

    if args.fuse_from is not None:
        cpu_graph.FUSE_FROM = args.fuse_from
    if args.batch_tokens is not None:
        cpu_graph.BATCH_TOKENS = args.batch_tokens
    if args.narrow_tokens is not None:
        cpu_graph.NARROW_TOKENS = args.narrow_tokens

    texts = corpora(args.long, args.short)
    print(f"CPU flags: {flags()}")
    print(
        f"--isa {args.isa}: torch {torch.__version__} capability {torch.backends.cpu.get_cpu_capability()}, "
        f"embray cpu_has_bf16() {cpu_has_bf16()}, {args.threads} thread(s); "
        + ", ".join(f"{k} {len(v)} texts (mean {statistics.mean(map(len, v)):.0f} chars)" for k, v in texts.items())
    )
    runs = {}
    for name in args.runs.split(","):
        if name == "plain":
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(resolve_model_path(ModelSpec())), device="cpu", local_files_only=True)
            runs[name] = lambda t, m=model: m.encode(t, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
        else:
            emb = load_embedder(ModelSpec(device="cpu", precision=name))
            path = "fused graph" if getattr(emb, "fused", None) is not None else "encode"
            print(f"{name}: computes in {emb.dtype}, {path}")
            runs[name] = emb.embed_documents
    secs: dict[tuple[str, str], list[float]] = {}
    vecs: dict[tuple[str, str], np.ndarray] = {}
    for corpus, batch in texts.items():
        for fn in runs.values():
            fn(batch[:64])  # warm: first shapes compiled, pages touched
        for _ in range(args.reps):
            for name, fn in runs.items():
                t = time.perf_counter()
                v = np.asarray(fn(batch), dtype=np.float32)
                secs.setdefault((corpus, name), []).append(time.perf_counter() - t)
                vecs[(corpus, name)] = v / np.linalg.norm(v, axis=1, keepdims=True)
            print(corpus, {k[1]: round(v[-1], 2) for k, v in secs.items() if k[0] == corpus}, flush=True)
    print()
    print("| isa | corpus | run | texts | seconds (median) | texts/s | vs plain | min cosine to plain |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for corpus, batch in texts.items():
        base = statistics.median(secs[(corpus, "plain")]) if "plain" in runs else None
        for name in runs:
            s = statistics.median(secs[(corpus, name)])
            ratio = f"{base / s:.2f}x" if base else ""
            cos = ""
            if base:
                cos = f"{float(np.sum(vecs[(corpus, name)] * vecs[(corpus, 'plain')], axis=1).min()):.6f}"
            rate = len(batch) / s
            print(f"| {args.isa} | {corpus} | {name} | {len(batch)} | {s:.2f} | {rate:.1f} | {ratio} | {cos} |")
    import resource

    status = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("Vm")
    )
    print(
        f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; "
        f"VmHWM {status['VmHWM'].strip()}, VmRSS {status['VmRSS'].strip()}"
    )


if __name__ == "__main__":
    main()
