"""A demo corpus that needs no network: docstrings of the Python standard library.

Each document is one module, class, function or method docstring; its id is
the dotted name (``json.loads``). The set depends only on the Python version,
so every machine with the same Python builds the same corpus.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import io
import pkgutil
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

# Modules that do something when imported (open a browser, print, need a display) or are private.
_SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "__main__",
    "pydoc_data",
    "lib2to3",
    "ensurepip",
    "venv",
    "test",
    "xxlimited",
    "xxlimited_35",
    "xxsubtype",
    "msilib",
    "winreg",
    "winsound",
    "_msi",
    "nt",
    "msvcrt",
    "_winapi",
    "_overlapped",
    "asyncio.windows_events",
    "encodings",
}
MIN_CHARS = 30
MAX_CHARS = 2000


def _docs_of(modname: str) -> dict[str, str]:
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            mod = importlib.import_module(modname)
        except BaseException:  # noqa: BLE001 - any module that fails to import is simply left out
            return {}
    out: dict[str, str] = {}

    def add(name: str, obj: object) -> None:
        doc = inspect.getdoc(obj)
        if doc and len(doc) >= MIN_CHARS:
            out[name] = doc[:MAX_CHARS]

    add(modname, mod)
    for name, obj in vars(mod).items():
        home = getattr(obj, "__module__", None)
        if name.startswith("_") or home not in (modname, "_" + modname.rsplit(".", 1)[-1]):
            continue
        if inspect.isclass(obj):
            add(f"{modname}.{name}", obj)
            for mname, member in vars(obj).items():
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if not mname.startswith("_") and (inspect.isroutine(member) or isinstance(member, property)):
                    add(f"{modname}.{name}.{mname}", member)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            add(f"{modname}.{name}", obj)
    return out


def _stdlib_modules() -> list[str]:
    """Top-level stdlib modules and the submodules of its packages, minus the ones in _SKIP."""
    names = []
    for top in sorted(sys.stdlib_module_names):
        if top in _SKIP or top.startswith("_"):
            continue
        names.append(top)
        spec = importlib.util.find_spec(top) if top not in sys.modules else sys.modules[top].__spec__
        if spec is None or not spec.submodule_search_locations:
            continue
        for info in pkgutil.walk_packages(spec.submodule_search_locations, prefix=f"{top}."):
            parts = info.name.split(".")
            if not any(p.startswith("_") or p in ("test", "tests") for p in parts[1:]) and info.name not in _SKIP:
                names.append(info.name)
    return names


def collect(docs: int) -> dict[str, str]:
    """Up to ``docs`` stdlib docstrings, chosen by a hash of their id (a stable, even spread)."""
    found: dict[str, str] = {}
    for modname in _stdlib_modules():
        found.update(_docs_of(modname))
    chosen = sorted(found, key=lambda k: hashlib.sha256(k.encode()).hexdigest())[:docs]
    return {k: found[k] for k in sorted(chosen)}


def write_demo(out: str | Path, docs: int = 6000, files: int = 8) -> tuple[Path, int]:
    """Write ``out/corpus/part-*.parquet`` and ``out/embray.yaml``; returns the config path and doc count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for old in corpus.glob("part-*.parquet"):
        old.unlink()
    texts = collect(docs)
    ids = list(texts)
    for f in range(files):
        part = ids[f::files]
        pq.write_table(pa.table({"id": part, "text": [texts[i] for i in part]}), corpus / f"part-{f:05d}.parquet")
    config = out / "embray.yaml"
    if not config.exists():
        config.write_text(
            "# embray demo: stdlib docstrings, MiniLM on CPU, local store + sqlite MLflow, local Ray\n"
            "collection: stdlib-docs\n"
            "source: {uri: ./corpus, id_column: id, text_column: text}\n"
            "store: {uri: ./store}\n"
            "# precision bf16: 2-3x fp32's speed on a CPU with AMX / AVX512-BF16, same fingerprint, same quality;\n"
            "# elsewhere it runs in fp32 with a warning (README, Backends)\n"
            "model: {backend: sentence-transformers, name: all-MiniLM-L6-v2, precision: bf16}\n"
            "index: {metric: cos, dtype: f16, shards: 4}\n"
            "# a docstring longer than the model's window (256 tokens) is cut into passages, a vector each\n"
            "chunk: {tokens: null, overlap: 32}\n"
            "# actors null: one single-threaded actor per core, leaving a core for the other tasks (README, step 4)\n"
            "embed: {batch_size: 512, actors: null}\n"
            "mlflow: {tracking_uri: null}\n"
            "ray: {address: null}\n"
        )
    return config, len(ids)
