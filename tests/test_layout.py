"""The embedding workers' layout and memory (embray.pipeline.layout): chosen for the machine, declared to Ray."""

from __future__ import annotations

import pytest

from embray import Collection
from embray.config import GIB, EmbedConfig
from embray.errors import ConfigError
from embray.lifecycle.registry import Registry
from embray.models import ModelSpec
from embray.pipeline.layout import MIB, choose, worker_memory
from embray.pipeline.warm import memory_bytes

from .helpers import make_config, write_corpus

HASH = ModelSpec(backend="hash", name="words", dims=64)


def _node(cpus: float, memory_gib: float, **extra: float) -> dict:
    return {"Alive": True, "Resources": {"CPU": cpus, "memory": memory_gib * GIB, **extra}}


def test_the_default_layout_is_one_single_threaded_actor_per_core_leaving_a_cpu_for_tasks():
    one = (GIB, "measured")
    two = choose(EmbedConfig(), HASH, [_node(2, 16)], one)
    assert (two.actors, two.num_cpus, two.threads, two.memory) == (2, 0.5, 1, GIB)
    assert "one per core" in two.why and "memory: measured" in str(two)
    eight = choose(EmbedConfig(), HASH, [_node(8, 64)], one)
    assert (eight.actors, eight.num_cpus, eight.threads) == (8, 0.875, 1)
    assert choose(EmbedConfig(), HASH, [_node(8, 64), _node(8, 64)], one).actors == 16
    # the nodes' memory bounds the actors: 3.5 GiB holds three workers of 1 GiB
    assert choose(EmbedConfig(), HASH, [_node(8, 3.5)], one).actors == 3
    # one core: one actor, as configured (the check that it leaves the tasks a CPU still applies)
    assert choose(EmbedConfig(), HASH, [_node(1, 8)], one).actors == 1
    # a dead node, or one without the custom resources asked for, offers nothing
    assert choose(EmbedConfig(), HASH, [_node(2, 16), {**_node(32, 64), "Alive": False}], one).actors == 2
    gpu_nodes = [_node(4, 16, GPU=2.0, accelerator=2.0), _node(16, 64)]
    assert choose(EmbedConfig(resources={"accelerator": 1}), HASH, gpu_nodes, one).actors == 2  # one each
    assert choose(EmbedConfig(num_gpus=1), HASH, gpu_nodes, one).actors == 2  # one per GPU
    assert choose(EmbedConfig(num_gpus=0.5), HASH, gpu_nodes, one).actors == 4
    # set by hand: kept as it is
    own = choose(EmbedConfig(actors=3, num_cpus=0.25, threads=2), HASH, [_node(2, 16)], one)
    assert (own.actors, own.num_cpus, own.threads) == (3, 0.25, 2) and own.why.startswith("embed.actors")
    assert own.apply(EmbedConfig()).memory_gib == 1.0
    # the bytes a worker declares are the layout's, to the byte, through the resolved config's GiB
    odd = choose(EmbedConfig(), HASH, [_node(2, 16)], (1_234_567_891, "measured"))
    assert memory_bytes(odd.apply(EmbedConfig())) == 1_234_567_891


def test_worker_memory_comes_from_the_config_then_measured_builds_then_the_weights():
    assert worker_memory(EmbedConfig(memory_gib=2), HASH, 500.0) == (2 * GIB, "embed.memory_gib")
    assert worker_memory(EmbedConfig(memory_gib=0), HASH, 500.0)[0] == 0  # declares none
    mem, why = worker_memory(EmbedConfig(), HASH, 800.0)
    assert mem == int(800 * MIB * 1.25) and "800 MiB peak of earlier builds" in why
    mem, why = worker_memory(EmbedConfig(), ModelSpec(), None)  # MiniLM: 91 MB of weights
    assert 1.1 * GIB < mem < 1.5 * GIB and "estimated from the weight files" in why
    assert worker_memory(EmbedConfig(), HASH, None)[0] < 0.5 * GIB


@pytest.mark.usefixtures("ray_local")
def test_a_build_sizes_its_pool_to_the_machine_and_its_memory_to_the_last_build(tmp_path):
    import ray

    write_corpus(tmp_path / "corpus", files=4, rows=300)  # 1,200 rows: past four batches, so an actor pool
    cfg = make_config(tmp_path, embed={"actors": None, "keep_warm_s": 0})
    first = Collection(cfg).backfill()
    reg = Registry(cfg)
    params = reg.client.get_run(first.manifest.mlflow_run_id).data.params
    cpus = int(ray.cluster_resources()["CPU"])
    assert params["embed.layout"].startswith(f"{cpus} actor(s) x 1 thread(s) ({(cpus - 1) / cpus:g} CPU, 0.30 GiB")
    assert "estimated from the weight files" in params["embed.layout"] and params["embed.actors"] == "auto"
    rss = first.embed_worker_peak_rss_mib
    assert rss and rss > 50
    write_corpus(tmp_path / "corpus", files=4, rows=300, start=5000)  # all new rows: embedded again
    second = Collection(cfg).refresh()
    layout = reg.client.get_run(second.manifest.mlflow_run_id).data.params["embed.layout"]
    assert f"{rss * 1.25 / 1024:.2f} GiB" in layout and f"1.25 x the {rss:.0f} MiB peak" in layout


@pytest.mark.usefixtures("ray_local")
def test_memory_no_node_has_fails_at_once_naming_the_setting(tmp_path):
    write_corpus(tmp_path / "corpus", files=2, rows=20)
    cfg = make_config(tmp_path, embed={"memory_gib": 100_000, "keep_warm_s": 0})
    with pytest.raises(ConfigError, match=r"memory: 100000\.00 GiB.*set embed\.memory_gib lower \(0: declare none\)"):
        Collection(cfg).backfill()
    assert Registry(cfg).model_versions() == []


def test_a_small_job_s_one_worker_gets_the_whole_pool_s_cpus_and_threads():
    from embray.pipeline.embed import solo

    one = solo(EmbedConfig(actors=2, num_cpus=0.5, threads=1))
    assert (one.actors, one.num_cpus, one.threads) == (1, 1.0, 2)
    assert solo(EmbedConfig(actors=3, num_cpus=1)).threads is None  # null: every core, as before
    same = EmbedConfig(actors=1, num_cpus=1, threads=2)
    assert solo(same) == same
