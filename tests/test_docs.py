"""The examples of docs/python-api.md run as written (hash model, a small corpus, local disk)."""

from __future__ import annotations

import json
import re

import pytest

from .helpers import REPO, add_columns, make_config, write_corpus

pytestmark = pytest.mark.usefixtures("ray_local")


def test_python_api_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "python-api.md").read_text(), re.S)
    assert len(blocks) >= 5
    write_corpus(tmp_path / "corpus", files=3, rows=100)
    add_columns(tmp_path / "corpus")
    cfg = make_config(tmp_path, source={"columns": ["tenant", "n"]}, index={"keywords": True})
    (tmp_path / "embray.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for n, code in enumerate(blocks):
        exec(compile(code, f"docs/python-api.md block {n + 1}", "exec"), namespace)
    assert namespace["status"].ok and namespace["audit"].ok
    assert namespace["scored"].count() == 300
