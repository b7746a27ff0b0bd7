"""GPU check of the sentence-transformers backend: fp32 / fp16 / bf16 on CUDA, against plain encode and the ceiling.

Two steps. Here, on a CPU, with the original fp32 MiniLM weights (the reference, and what the device needs):

    .venv/bin/python bench/gpu_check.py prepare --data .gpu

writes .gpu/minilm (MiniLM with its weights stored as fp16 safetensors, 45 MB, to fit the device machine's 64 MiB
transfer limit), .gpu/sts-test.csv, .gpu/ref-fp32.npy (the CPU fp32 vectors of the unique STS-B test sentences,
from the original weights) and .gpu/ref.json (their STS-B Spearman, and the same for fp32 compute from the
fp16-stored weights). Then on a CUDA machine, with embray importable (copy embray/ and this file into .gpu):

    cd .gpu && PYTHONPATH=. python3 gpu_check.py gpu --data .    # JSON to stdout and $OUT/gpu_check.json

For each precision it loads ``ModelSpec(precision=...)`` on CUDA and measures: STS-B Spearman; the cosine of
each sentence's vector to the CPU fp32 reference and to the CUDA fp32 one; and throughput (texts/s, and tokens/s
counting each text's real tokens after truncation) of embray's ``embed_documents`` against plain
``SentenceTransformer.encode`` on the same model object (same dtype, same batch size): warm-up, then 3 interleaved
rounds, ``torch.cuda.synchronize`` around each, median. Inputs: the STS-B sentences (short) and long documents
(24 random STS-B sentences each, truncated by the model to 256 tokens), at batch sizes 256 and 1024. Also:
tokenisation alone (the CPU side), the model's forward pass alone on pre-tokenised batches (the GPU side), GEMMs
at the card's peak and at MiniLM's shapes, and the ceiling: tokens/s = peak FLOP/s / FLOPs per token.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# NVIDIA's spec sheets, dense (no sparsity), TFLOP/s: fp16/bf16 tensor cores, and fp32 (no tensor cores: torch's
# default float32 matmul precision 'highest' does not use TF32).
PEAKS = {
    "H100 SXM": {"fp16": 989.4, "bf16": 989.4, "fp32": 66.9},
    "H100 PCIe": {"fp16": 756.5, "bf16": 756.5, "fp32": 51.2},
    "H200 SXM": {"fp16": 989.4, "bf16": 989.4, "fp32": 66.9},
    "H200 NVL": {"fp16": 835.5, "bf16": 835.5, "fp32": 60.3},
}
KINDS_MEASURED_BF16 = 790.0  # 8192^3 bf16 matmul measured on this workplace's H100/H200 machines (KINDS.md)
PRECISIONS = ("fp32", "fp16", "bf16")
LONG_SENTENCES = 24  # STS-B sentences per long document: ~330 tokens before truncation to 256
_IGNORED = {"README.md", "data_config.json", ".gitattributes"}


def read_stsb(path: Path) -> tuple[list[float], list[str], list[str]]:
    gold, left, right = [], [], []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) >= 7:
                gold.append(float(row[4]))
                left.append(row[5])
                right.append(row[6])
    return gold, left, right


def unique_sentences(left: list[str], right: list[str]) -> list[str]:
    return list(dict.fromkeys(left + right))


def spearman_of(vecs: np.ndarray, index: dict[str, int], gold, left, right) -> float:
    from scipy.stats import spearmanr

    a = vecs[[index[t] for t in left]]
    b = vecs[[index[t] for t in right]]
    return float(spearmanr(np.sum(a * b, axis=1), gold).statistic)


def cos_stats(a: np.ndarray, b: np.ndarray) -> dict:
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {
        "min": round(float(cos.min()), 6),
        "mean": round(float(cos.mean()), 7),
        "p01": round(float(np.quantile(cos, 0.01)), 6),
    }


def long_docs(sentences: list[str], n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(sentences) for _ in range(LONG_SENTENCES)) for _ in range(n)]


def versions() -> dict:
    import sentence_transformers
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
    }


# --- step 1: on a CPU -----------------------------------------------------------------------------------------


def prepare(data: Path, stsb: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from embray.models import ModelSpec, load_embedder, resolve_model_path

    src = resolve_model_path(ModelSpec())
    dest = data / "minilm"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, ignore=lambda d, names: [n for n in names if n in _IGNORED])
    weights = load_file(str(src / "model.safetensors"))
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    save_file(half, str(dest / "model.safetensors"), metadata={"format": "pt"})
    err = max(float((half[k].float() - v).abs().max()) for k, v in weights.items() if v.is_floating_point())
    shutil.copy(stsb, data / "sts-test.csv")

    gold, left, right = read_stsb(stsb)
    texts = unique_sentences(left, right)
    index = {t: i for i, t in enumerate(texts)}
    torch.set_num_threads(os.cpu_count() or 1)
    ref = load_embedder(ModelSpec(device="cpu")).embed_documents(texts)
    np.save(data / "ref-fp32.npy", ref.astype(np.float32))
    from_half = load_embedder(ModelSpec(name=str(dest), device="cpu")).embed_documents(texts)
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        **versions(),
        "unique_sentences": len(texts),
        "pairs": len(gold),
        "cpu_fp32_original_weights_spearman": round(spearman_of(ref, index, gold, left, right), 5),
        "cpu_fp32_fp16_stored_weights_spearman": round(spearman_of(from_half, index, gold, left, right), 5),
        "cpu_fp16_stored_vs_original_cosine": cos_stats(from_half, ref),
        "fp16_weight_rounding_max_abs": err,
    }
    (data / "ref.json").write_text(json.dumps(out, indent=2))
    return out


# --- step 2: on CUDA ------------------------------------------------------------------------------------------


class Timer:
    """Wall-clock seconds of ``fn()``, with the GPU's queue drained before and after."""

    def __init__(self, torch):
        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def __call__(self, fn) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t


def flops_per_token(config, seq_len: float) -> dict:
    """Forward FLOPs per token of a BERT encoder (MiniLM-L6: d=384, d_ff=1536, 6 layers).

    matmuls: 2 x the non-embedding weight parameters, per layer 2 * (4 d^2 + 2 d d_ff) (Q, K, V, output projection,
    two FFN matrices); attention: Q K^T and softmax(.) V, each 2 L d per token per layer, with L the length of the
    sequence the token is in. Embedding look-ups, layer norms, GELU, softmax and pooling are left out (< 1%).
    """
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    matmul = 2 * layers * (4 * d * d + 2 * d * ff)
    attention = layers * 4 * seq_len * d
    return {
        "formula": "2*layers*(4*d^2 + 2*d*d_ff) + layers*4*L*d",
        "d": d,
        "d_ff": ff,
        "layers": layers,
        "L_token_weighted": round(seq_len, 1),
        "matmul": matmul,
        "attention": round(attention),
        "total": round(matmul + attention),
    }


def card_peaks(name: str, power_limit_w: float | None) -> tuple[str, dict]:
    if "H200" in name:
        key = "H200 NVL" if power_limit_w and power_limit_w < 650 else "H200 SXM"
    elif "H100" in name:
        key = "H100 PCIe" if "PCIe" in name else "H100 SXM"
    else:
        return name, {}
    return key, PEAKS[key]


def gemm_tflops(torch, dtype, m: int, k: int, n: int, reps: int = 20) -> float:
    a = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(k, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    timer = Timer(torch)
    s = timer(lambda: [a @ b for _ in range(reps)])
    return round(2 * m * k * n * reps / s / 1e12, 1)


def ceilings(out: dict, config, peaks: dict, gemms: dict) -> dict:
    """Per input and precision: the tokens/s ceiling at each peak rate, and the fraction each measured run reached."""
    ceiling = {}
    for name, tok in out.get("tokens", {}).items():
        f = flops_per_token(config, tok["token_weighted_L"])
        c = {"flops_per_token": f}
        for precision in PRECISIONS:
            rates = {
                "spec_sheet": peaks.get(precision),
                "measured_8192^3_gemm": gemms.get(f"{precision}_8192^3"),
            }
            if precision == "bf16":
                rates["kinds_md_bf16"] = KINDS_MEASURED_BF16
            for label, tflops in rates.items():
                if not tflops:
                    continue
                cap = tflops * 1e12 / f["total"]
                entry = {"tflops": tflops, "tokens_per_s": round(cap)}
                for cell_name, cell in out.get("runs", {}).get(precision, {}).items():
                    if cell_name.startswith(name + "_bs") and isinstance(cell, dict) and "embray" in cell:
                        entry[f"embray_{cell_name}_fraction"] = round(cell["embray"]["tokens_per_s"] / cap, 4)
                        entry[f"plain_{cell_name}_fraction"] = round(cell["plain"]["tokens_per_s"] / cap, 4)
                    if name == "long" and cell_name.startswith("forward_only"):
                        entry[f"{cell_name}_fraction"] = round(cell["tokens_per_s"] / cap, 4)
                c[f"{precision}_{label}"] = entry
        ceiling[name] = c
    return ceiling


def card_info(torch, device: str) -> tuple:
    """(CUDA device properties or None, the card's spec-sheet peaks, what to record of the card and machine)."""
    import subprocess

    if device != "cuda":  # a dry run of the script on a CPU: no card, no GEMMs
        props, smi = None, ""
    else:
        props = torch.cuda.get_device_properties(0)
        try:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,power.limit,clocks.max.sm,driver_version,memory.total",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
            ).stdout.strip()
        except OSError:
            smi = ""
    try:
        power = float(smi.split(",")[1].strip().split()[0])
    except (IndexError, ValueError):
        power = None
    key, peaks = card_peaks(props.name, power) if props else (device, {})
    info = {
        "name": props.name if props else device,
        "nvidia_smi": smi,
        "sms": props.multi_processor_count if props else None,
        "spec_sheet": key,
        "spec_dense_tflops": peaks,
        "cpus": os.cpu_count(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "(unset: on)"),
    }
    return props, peaks, info


def gpu(data: Path, out_path: Path, budget_s: float, long_n: int, short_repeat: int, device: str = "cuda") -> dict:

    import torch

    from embray.models import ModelSpec, load_embedder

    t_start = time.monotonic()
    out: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), **versions()}

    def save() -> None:
        out["elapsed_s"] = round(time.monotonic() - t_start, 1)
        out_path.write_text(json.dumps(out, indent=2))

    def left_s() -> float:
        return budget_s - (time.monotonic() - t_start)

    props, peaks, out["card"] = card_info(torch, device)
    print(json.dumps(out["card"]), flush=True)

    # GEMMs: the card's measured peak, and MiniLM's own shapes (65536 tokens = 256 texts x 256 tokens).
    gemms = {}
    for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32))[: 3 * bool(props)]:
        gemms[f"{label}_8192^3"] = gemm_tflops(torch, dtype, 8192, 8192, 8192, reps=10 if label != "fp32" else 3)
        for k, n in ((384, 384), (384, 1536), (1536, 384)):
            gemms[f"{label}_65536x{k}x{n}"] = gemm_tflops(torch, dtype, 65536, k, n)
    out["gemm_tflops"] = gemms
    print(json.dumps(gemms), flush=True)
    save()

    ref_meta = json.loads((data / "ref.json").read_text())
    ref = np.load(data / "ref-fp32.npy")
    gold, left, right = read_stsb(data / "sts-test.csv")
    sentences = unique_sentences(left, right)
    index = {t: i for i, t in enumerate(sentences)}
    assert ref.shape[0] == len(sentences), "ref-fp32.npy does not match sts-test.csv: run prepare again"
    out["reference_cpu"] = ref_meta
    short = (left + right) * max(1, short_repeat) if short_repeat > 0 else (left + right)[:-short_repeat]
    inputs = {"short": short, "long": long_docs(sentences, long_n)}
    mixed = inputs["short"][: long_n // 2] + inputs["long"][: long_n // 2]
    random.Random(1).shuffle(mixed)
    model_dir = str((data / "minilm").resolve())

    timer = Timer(torch)
    runs: dict = {}
    out["runs"] = runs
    gpu_fp32 = None
    for precision in PRECISIONS:
        if left_s() < 30:
            out.setdefault("skipped", []).append(precision)
            break
        r: dict = {}
        runs[precision] = r
        t = time.perf_counter()
        e = load_embedder(ModelSpec(name=model_dir, device=device, precision=precision, batch_size=256))
        timer.sync()
        r["load_s"] = round(time.perf_counter() - t, 2)
        r["model_dtype"] = str(e.model.dtype)
        vecs = e.embed_documents(sentences)
        r["vectors_dtype"] = str(vecs.dtype)
        r["stsb_spearman"] = round(spearman_of(vecs, index, gold, left, right), 5)
        r["cosine_vs_cpu_fp32_original"] = cos_stats(vecs, ref)
        if gpu_fp32 is None:
            gpu_fp32 = vecs
        r["cosine_vs_cuda_fp32"] = cos_stats(vecs, gpu_fp32)
        model = e.model
        if precision == "fp32":  # what the tokenizer alone does on this machine's CPUs, per input
            out["tokens"] = {}
            out["tokenize_only"] = {}
            for name, texts in inputs.items():
                lengths = np.array(
                    [len(x) for x in model.tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
                )
                order = np.argsort([-len(x) for x in texts], kind="stable")  # encode's own order (characters)
                padded = {}
                for bs in (256, 1024):
                    padded[bs] = int(
                        sum(lengths[order[i : i + bs]].max() * len(order[i : i + bs]) for i in range(0, len(texts), bs))
                    )
                out["tokens"][name] = {
                    "texts": len(texts),
                    "real_tokens": int(lengths.sum()),
                    "mean_tokens": round(float(lengths.mean()), 1),
                    "token_weighted_L": round(float((lengths**2).sum() / lengths.sum()), 1),
                    "padded_tokens_bs256": padded[256],
                    "padded_tokens_bs1024": padded[1024],
                }
                sorted_texts = [texts[i] for i in order]
                for bs in (256, 1024):
                    ts = []
                    for _ in range(2):
                        t = time.perf_counter()
                        for i in range(0, len(texts), bs):
                            model.tokenizer(
                                sorted_texts[i : i + bs],
                                padding=True,
                                truncation=True,
                                max_length=256,
                                return_tensors="pt",
                            )
                        ts.append(time.perf_counter() - t)
                    s = min(ts)
                    out["tokenize_only"][f"{name}_bs{bs}"] = {
                        "texts_per_s": round(len(texts) / s),
                        "tokens_per_s": round(int(lengths.sum()) / s),
                    }
            print(json.dumps({"tokens": out["tokens"], "tokenize_only": out["tokenize_only"]}), flush=True)
        save()

        # Throughput: embray embed_documents vs plain encode, on the same model object.
        for name, texts in inputs.items():
            n_tok = out["tokens"][name]["real_tokens"]
            for bs in (256, 1024):
                if left_s() < 20:
                    out.setdefault("skipped", []).append(f"{precision}/{name}/bs{bs}")
                    continue
                e.spec = e.spec.model_copy(update={"batch_size": bs})
                fns = {
                    "embray": lambda texts=texts, e=e: e.embed_documents(texts),
                    "plain": lambda texts=texts, bs=bs, m=model: m.encode(
                        texts, batch_size=bs, show_progress_bar=False
                    ),
                }
                for fn in fns.values():  # warm-up: cuBLAS/SDPA choices for these shapes
                    fn()
                times = {k: [] for k in fns}
                for _ in range(3):
                    for k, fn in fns.items():
                        times[k].append(timer(fn))
                cell = {}
                for k, ts in times.items():
                    s = statistics.median(ts)
                    cell[k] = {
                        "s": round(s, 3),
                        "texts_per_s": round(len(texts) / s),
                        "tokens_per_s": round(n_tok / s),
                        "rounds_s": [round(x, 3) for x in ts],
                    }
                cell["embray_vs_plain"] = round(cell["plain"]["s"] / cell["embray"]["s"], 3)
                r[f"{name}_bs{bs}"] = cell
                print(json.dumps({precision: {f"{name}_bs{bs}": cell}}), flush=True)
                save()

        # The forward pass alone, on batches tokenised beforehand and already on the GPU (long documents).
        texts = inputs["long"]
        order = np.argsort([-len(x) for x in texts], kind="stable")
        for bs in (256, 1024):
            if left_s() < 15:
                break
            batches = []
            for i in range(0, len(texts), bs):
                f = model.tokenizer(
                    [texts[j] for j in order[i : i + bs]],
                    padding=True,
                    truncation=True,
                    max_length=256,
                    return_tensors="pt",
                )
                batches.append({k: v.to(device) for k, v in f.items()})

            def forward(batches=batches, model=model):
                with torch.inference_mode():
                    for b in batches:
                        model(dict(b))

            forward()
            s = statistics.median(timer(forward) for _ in range(3))
            r[f"forward_only_long_bs{bs}"] = {
                "s": round(s, 3),
                "tokens_per_s": round(out["tokens"]["long"]["real_tokens"] / s),
                "texts_per_s": round(len(texts) / s),
            }
            del batches
        print(
            json.dumps({precision: {k: v for k, v in r.items() if k.startswith(("forward", "stsb", "cosine"))}}),
            flush=True,
        )
        del e, model
        if props:
            torch.cuda.empty_cache()
        save()

    # Length sorting: encode sorts the texts of one call by length (characters) before batching. Mixed short and
    # long texts in one call, against the same texts fed to encode one batch at a time in their given order.
    if left_s() > 25:
        e = load_embedder(ModelSpec(name=model_dir, device=device, precision="fp16", batch_size=256))
        n_tok = sum(len(x) for x in e.model.tokenizer(mixed, truncation=True, max_length=256)["input_ids"])

        def unsorted():
            for i in range(0, len(mixed), 256):
                e.model.encode(mixed[i : i + 256], batch_size=256, convert_to_tensor=True, show_progress_bar=False)

        fns = {"sorted_in_one_call": lambda: e.embed_documents(mixed), "unsorted_batches": unsorted}
        cell = {"texts": len(mixed), "real_tokens": n_tok}
        for k, fn in fns.items():
            fn()
            s = statistics.median(timer(fn) for _ in range(3))
            cell[k] = {"s": round(s, 3), "tokens_per_s": round(n_tok / s)}
        out["length_sorting_fp16_bs256_mixed"] = cell
        print(json.dumps({"length_sorting": cell}), flush=True)
        del e
        save()

    # The ceiling: tokens/s = peak FLOP/s / FLOPs per token, per input (L: the token-weighted sequence length).
    from transformers import AutoConfig

    ceiling = ceilings(out, AutoConfig.from_pretrained(model_dir), peaks, gemms)
    out["ceiling"] = ceiling
    out["done"] = True
    save()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["prepare", "gpu"])
    p.add_argument("--data", default=".gpu", help="folder of the model copy, STS-B and the reference")
    p.add_argument("--stsb", default="../shared/data/stsb/sts-test.csv", help="prepare: the STS-B test split")
    p.add_argument("--budget-s", type=float, default=330, help="gpu: stop measuring after this long")
    p.add_argument("--long", type=int, default=8192, help="gpu: long documents")
    p.add_argument(
        "--short-repeat",
        type=int,
        default=8,
        help="gpu: the STS-B sentences, this many times over (-N: their first N only)",
    )
    p.add_argument("--device", default="cuda", help="gpu: 'cpu' for a dry run of the script with small inputs")
    args = p.parse_args()
    sys.path.insert(0, os.getcwd())
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    if args.step == "prepare":
        print(json.dumps(prepare(data, Path(args.stsb)), indent=2))
        return
    out_path = Path(os.environ.get("OUT", ".")) / "gpu_check.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out = gpu(data, out_path, args.budget_s, args.long, args.short_repeat, args.device)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
