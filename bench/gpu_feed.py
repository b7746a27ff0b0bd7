"""GPU check of the tokenizing feed (embray/models/gpu.py): the sentence-transformers backend on CUDA, fed by
`tokenizers` in a background thread, against the path it replaces and plain ``encode``, and against the ceiling.

Two steps. Here, on a CPU (uses bench/gpu_check.py's ``prepare``: MiniLM stored as fp16 safetensors to fit the
device machine's 64 MiB transfer limit, STS-B, the CPU fp32 reference vectors), plus this machine's man pages:

    .venv/bin/python bench/gpu_feed.py prepare --data .gpu     # also copies embray/ and these scripts into .gpu

Then on the device machine (pydantic travels as wheels in .gpu/whl; its image has torch, sentence-transformers):

    cd .gpu && PYTHONPATH=.:/tmp/site python3 gpu_feed.py gpu --data .   # JSON to stdout and $OUT/gpu_feed.json

Per precision it loads ``ModelSpec(device="cuda", precision=...)`` and measures STS-B and the cosine of the fed
vectors to the CPU fp32 reference and to sentence-transformers' ``encode`` on the same model; then throughput on
three inputs (texts/s, and tokens/s counting each text's real tokens after truncation to 256): **fed** (embray's
``embed_documents`` now), **encode** (what embray ran before: ``encode(convert_to_tensor=True)``, one copy to the
host at the end) and **plain** (``encode``'s defaults), same model object, same batch size; warm-up, then 3
interleaved rounds, ``torch.cuda.synchronize`` around each, median. Inputs: *short* the STS-B sentences 8 times
over; *long* 8,192 documents of 24 random STS-B sentences (~1,400 characters, ~330 tokens); *man* this machine's
man pages (mean ~8,700 characters, most past the limit) 4 times over. Also: the tokenizer alone (the feed's
`tokenizers` path vs transformers' wrapper), the forward pass alone, and the ceiling (gpu_check.py's FLOPs/token).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # gpu_check, beside this file (in bench/ here, in the data folder there)

from gpu_check import (  # noqa: E402
    Timer,
    card_info,
    cos_stats,
    flops_per_token,
    gemm_tflops,
    long_docs,
    read_stsb,
    spearman_of,
    unique_sentences,
    versions,
)

MAN_REPEAT = 4
SHORT_REPEAT = 8
LONG_N = 8192


def prepare(data: Path, stsb: Path, man: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from gpu_check import prepare as prepare_model

    root = HERE.parent
    sys.path.insert(0, str(root))
    from tests.helpers import man_pages

    out = prepare_model(data, stsb)
    pages = [p[2] for p in man_pages(man)]
    pq.write_table(pa.table({"text": pages}), data / "man.parquet", compression="zstd")
    shutil.rmtree(data / "embray", ignore_errors=True)
    shutil.copytree(root / "embray", data / "embray", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("gpu_check.py", "gpu_feed.py"):
        shutil.copy(HERE / name, data / name)
    out["man_pages"] = len(pages)
    out["man_chars_mean"] = round(sum(map(len, pages)) / len(pages))
    return out


def gpu(data: Path, out_path: Path, budget_s: float, device: str) -> dict:

    import pyarrow.parquet as pq
    import torch

    from embray.models import ModelSpec, load_embedder

    t0 = time.monotonic()
    out: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), **versions()}

    def save() -> None:
        out["elapsed_s"] = round(time.monotonic() - t0, 1)
        out_path.write_text(json.dumps(out, indent=2))

    def left_s() -> float:
        return budget_s - (time.monotonic() - t0)

    cuda = device == "cuda"
    os.environ["EMBRAY_GPU_FEED"] = "1"  # opt-in until this check has run on a GPU (embray/models/gpu.py)
    if not cuda:  # a dry run on a CPU: take the path a GPU takes (the CPU's own is the fused graph)
        import embray.models.sentence_transformers as st

        st._on_cpu = lambda spec: False
    props, peaks, out["card"] = card_info(torch, device)
    gemms = {}
    if cuda:
        for label, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            gemms[f"{label}_8192^3"] = gemm_tflops(torch, dtype, 8192, 8192, 8192, reps=10)
    out["gemm_tflops"] = gemms
    print(json.dumps({"card": out["card"], "gemms": gemms}), flush=True)

    gold, left, right = read_stsb(data / "sts-test.csv")
    sentences = unique_sentences(left, right)
    index = {t: i for i, t in enumerate(sentences)}
    ref = np.load(data / "ref-fp32.npy")
    scale = 1 if cuda else 0  # a dry run on a CPU: small inputs
    man = pq.read_table(data / "man.parquet").column("text").to_pylist()
    inputs = {
        "short": (left + right) * SHORT_REPEAT if scale else (left + right)[:300],
        "long": long_docs(sentences, LONG_N if scale else 64),
        "man": man * MAN_REPEAT if scale else man[:40],
    }
    model_dir = str((data / "minilm").resolve())
    timer = Timer(torch)
    out["runs"] = runs = {}
    plan = {"fp16": (1024, 256), "bf16": (1024,), "fp32": ()}  # batch sizes measured per precision, in this order
    for precision, sizes in plan.items():
        if left_s() < 20:
            out.setdefault("skipped", []).append(precision)
            continue
        t = time.perf_counter()
        e = load_embedder(ModelSpec(name=model_dir, device=device, precision=precision, batch_size=256))
        timer.sync()
        r: dict = {"load_s": round(time.perf_counter() - t, 2), "fed": e.fed is not None}
        runs[precision] = r
        assert e.fed is not None, "the fed path was not taken: see the log"
        model = e.model
        vecs = e.embed_documents(sentences)
        enc = model.encode(sentences, batch_size=256, convert_to_tensor=True).float().cpu().numpy()
        r["stsb_spearman_fed"] = round(spearman_of(vecs, index, gold, left, right), 5)
        r["stsb_spearman_encode"] = round(spearman_of(enc, index, gold, left, right), 5)
        r["cosine_fed_vs_cpu_fp32_original"] = cos_stats(vecs, ref)
        r["cosine_fed_vs_encode"] = cos_stats(vecs, enc)
        if "tokens" not in out:  # per input: real tokens, and the tokenizer alone on this machine's CPUs
            out["tokens"], out["tokenize_only"] = {}, {}
            for name, texts in inputs.items():
                lengths = np.array([len(x.ids) for x in e.fed.tokens.encodings(texts)])
                out["tokens"][name] = {
                    "texts": len(texts),
                    "chars_mean": round(sum(map(len, texts)) / len(texts)),
                    "real_tokens": int(lengths.sum()),
                    "token_weighted_L": round(float((lengths**2).sum() / lengths.sum()), 1),
                }
                ts = {"feed": [], "wrapper": []}
                for _ in range(2):
                    t = time.perf_counter()
                    for i in range(0, len(texts), 1024):
                        e.fed.tokens.tensors(e.fed.tokens.encodings(texts[i : i + 1024]), 8)
                    ts["feed"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    for i in range(0, len(texts), 1024):
                        model.tokenizer(
                            texts[i : i + 1024], padding=True, truncation=True, max_length=256, return_tensors="pt"
                        )
                    ts["wrapper"].append(time.perf_counter() - t)
                out["tokenize_only"][name] = {k: round(int(lengths.sum()) / min(v)) for k, v in ts.items()}
            print(json.dumps({"tokens": out["tokens"], "tokenize_only_tokens_per_s": out["tokenize_only"]}), flush=True)
        print(json.dumps({precision: r}), flush=True)
        save()
        for bs in sizes:
            for name, texts in inputs.items():
                if left_s() < 25:
                    out.setdefault("skipped", []).append(f"{precision}/{name}/bs{bs}")
                    continue
                e.spec = e.spec.model_copy(update={"batch_size": bs})
                fns = {
                    "fed": lambda texts=texts, e=e: e.embed_documents(texts),
                    "encode": lambda texts=texts, bs=bs, model=model: (
                        model.encode(texts, batch_size=bs, convert_to_tensor=True, show_progress_bar=False)
                        .float()
                        .cpu()
                        .numpy()
                    ),
                    "plain": lambda texts=texts, bs=bs, model=model: model.encode(
                        texts, batch_size=bs, show_progress_bar=False
                    ),
                }
                for fn in fns.values():
                    fn()
                times = {k: [] for k in fns}
                for _ in range(3):
                    for k, fn in fns.items():
                        times[k].append(timer(fn))
                n_tok = out["tokens"][name]["real_tokens"]
                cell = {}
                for k, ts in times.items():
                    s = statistics.median(ts)
                    cell[k] = {"s": round(s, 3), "texts_per_s": round(len(texts) / s), "tokens_per_s": round(n_tok / s)}
                    cell[k]["rounds_s"] = [round(x, 3) for x in ts]
                cell["fed_vs_plain"] = round(cell["plain"]["s"] / cell["fed"]["s"], 2)
                cell["fed_vs_encode"] = round(cell["encode"]["s"] / cell["fed"]["s"], 2)
                r[f"{name}_bs{bs}"] = cell
                print(json.dumps({precision: {f"{name}_bs{bs}": cell}}), flush=True)
                save()
        if precision == "fp16" and left_s() > 25:  # the forward pass alone on pre-tokenised batches on the GPU
            for name in ("long", "man"):
                texts = inputs[name]
                encs = e.fed.tokens.encodings(texts)
                order = np.argsort([-len(x.ids) for x in encs], kind="stable")
                batches = []
                for i in range(0, len(texts), 1024):
                    ids, mask, _ = e.fed.tokens.tensors([encs[j] for j in order[i : i + 1024]], 8)
                    batches.append((ids.to(device), mask.to(device)))

                def forward(batches=batches, transformer=e.fed.transformer):
                    with torch.inference_mode():
                        for ids, mask in batches:
                            transformer(input_ids=ids, attention_mask=mask)

                forward()
                s = statistics.median(timer(forward) for _ in range(3))
                r[f"forward_only_{name}_bs1024"] = {
                    "s": round(s, 3),
                    "tokens_per_s": round(out["tokens"][name]["real_tokens"] / s),
                }
                del batches
            print(json.dumps({k: v for k, v in r.items() if k.startswith("forward")}), flush=True)
        e = model = None  # the next precision's model alone on the card
        if cuda:
            torch.cuda.empty_cache()
        save()

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    ceiling = {}
    for name, tok in out.get("tokens", {}).items():
        f = flops_per_token(config, tok["token_weighted_L"])
        c = {"flops_per_token": f["total"]}
        for label, tflops in {"spec_fp16": peaks.get("fp16"), "measured_fp16": gemms.get("fp16_8192^3")}.items():
            if tflops:
                cap = tflops * 1e12 / f["total"]
                c[label] = {"tflops": tflops, "tokens_per_s": round(cap)}
                for precision, r in runs.items():
                    for cell_name, cell in r.items():
                        if cell_name.startswith(name + "_bs"):
                            c[label][f"{precision}_{cell_name}_fed"] = round(cell["fed"]["tokens_per_s"] / cap, 4)
                        if cell_name == f"forward_only_{name}_bs1024":
                            c[label][f"{precision}_{cell_name}"] = round(cell["tokens_per_s"] / cap, 4)
        ceiling[name] = c
    out["ceiling"] = ceiling
    out["done"] = True
    save()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["prepare", "gpu"])
    p.add_argument("--data", default=".gpu")
    p.add_argument("--stsb", default="../shared/data/stsb/sts-test.csv")
    p.add_argument("--man", type=int, default=2000, help="prepare: man pages to carry")
    p.add_argument("--budget-s", type=float, default=300, help="gpu: stop measuring after this long")
    p.add_argument("--device", default="cuda", help="gpu: 'cpu' for a dry run with small inputs")
    args = p.parse_args()
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    if args.step == "prepare":
        print(json.dumps(prepare(data, Path(args.stsb), args.man), indent=2))
        return
    random.seed(0)
    out_path = Path(os.environ.get("OUT", ".")) / "gpu_feed.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps(gpu(data, out_path, args.budget_s, args.device)))


if __name__ == "__main__":
    main()
