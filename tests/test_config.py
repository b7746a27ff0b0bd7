import pytest

from embray.config import load_config, parse_config, redact
from embray.errors import ConfigError

MINIMAL = {"collection": "docs", "source": {"uri": "./corpus"}}


def test_minimal_config_gets_documented_defaults(tmp_path):
    cfg = parse_config(MINIMAL, base_dir=tmp_path)
    assert cfg.source.uri == str(tmp_path / "corpus")  # relative to the config file's directory
    assert cfg.store.uri == str(tmp_path / ".embray")
    assert cfg.model.backend == "sentence-transformers"
    assert (cfg.index.metric, cfg.index.dtype, cfg.index.shards) == ("cos", "f16", 4)
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path / '.embray' / 'mlflow.db'}"
    assert cfg.registered_model == "embray.docs"


def test_yaml_file_with_every_documented_key(tmp_path):
    path = tmp_path / "conf" / "embray.yaml"
    path.parent.mkdir()
    path.write_text(
        """
collection: docs
source: {uri: ./corpus, id_column: doc_id, text_column: body, storage_options: {}}
store: {uri: s3://bucket/embray, storage_options: {client_kwargs: {endpoint_url: http://127.0.0.1:5000}}}
model: {backend: sentence-transformers, name: all-MiniLM-L6-v2}
index: {metric: cos, dtype: f16, shards: 4}
mlflow: {tracking_uri: http://mlflow:5000}
ray: {address: null}
"""
    )
    cfg = load_config(path)
    assert cfg.source.uri == str(tmp_path / "conf" / "corpus")
    assert cfg.source.id_column == "doc_id"
    assert cfg.store.uri == "s3://bucket/embray"
    assert cfg.tracking_uri() == "http://mlflow:5000"


@pytest.mark.parametrize(
    "data,match",
    [
        ({"source": {"uri": "x"}}, r"collection: required key is missing"),
        ({"collection": "docs"}, r"source: required key is missing"),
        ({**MINIMAL, "sorce": {}}, r"sorce: unknown key"),
        ({**MINIMAL, "index": {"shards": 0}}, r"index\.shards: .*greater than or equal to 1"),
        ({**MINIMAL, "index": {"metric": "cosine"}}, r"index\.metric: .*'cos', 'ip' or 'l2sq'"),
        ({**MINIMAL, "model": {"backend": "openai"}}, r"model\.backend"),
        ({**MINIMAL, "model": {"backend": "hash"}}, r"'hash' backend needs dims"),
        ({**MINIMAL, "collection": "My Docs"}, r"not a valid collection name"),
        ([1, 2], r"expected a mapping"),
    ],
)
def test_bad_config_names_the_key_and_the_fix(tmp_path, data, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(data, base_dir=tmp_path)


def test_remote_store_needs_a_tracking_uri(tmp_path):
    cfg = parse_config({**MINIMAL, "store": {"uri": "s3://b/x"}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"mlflow\.tracking_uri: the store s3://b/x is remote"):
        cfg.tracking_uri()


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist; pass --config"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("collection: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(bad)


def test_secrets_are_redacted():
    opts = {"key": "AKIA", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://x", "aws_session_token": "t"}}
    assert redact(opts) == {
        "key": "***",
        "secret": "***",
        "client_kwargs": {"endpoint_url": "http://x", "aws_session_token": "***"},
    }


def test_the_demo_writes_a_config_with_the_recommended_cpu_model(tmp_path):
    # The quickstart builds with what the README recommends on a CPU: MiniLM computing in bf16 (fp32 where the
    # CPU has no native bf16), a compute setting that keeps MiniLM's fingerprint.
    from embray.demo import write_demo
    from embray.models import ModelSpec, fingerprint

    path, rows = write_demo(tmp_path / "demo", docs=40, files=2)
    cfg = load_config(path)
    assert rows == 40 and len(list((tmp_path / "demo" / "corpus").glob("part-*.parquet"))) == 2
    assert (cfg.model.backend, cfg.model.name, cfg.model.precision) == (
        "sentence-transformers",
        "all-MiniLM-L6-v2",
        "bf16",
    )
    assert fingerprint(cfg.model) == fingerprint(ModelSpec())
    assert cfg.chunk.tokens is None and cfg.chunk.overlap == 32  # long docstrings: passages sized to the model


@pytest.mark.parametrize(
    "resources, message",
    [
        ({"GPU": 1}, "GPU is not a custom resource: use embed.num_cpus / embed.num_gpus instead"),
        ({"accelerator": 0}, "resource accelerator: 0.0 must be > 0"),
    ],
)
def test_embed_resources_are_custom_and_positive(tmp_path, resources, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({**MINIMAL, "embed": {"resources": resources}}, base_dir=tmp_path)
    cfg = parse_config({**MINIMAL, "embed": {"resources": {"accelerator": 1}}}, base_dir=tmp_path)
    assert cfg.embed.resources == {"accelerator": 1.0} and cfg.embed.placement_timeout_s == 120
