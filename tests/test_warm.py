"""Warm models for small jobs (embed.keep_warm_s): a detached actor per fingerprint keeps the model loaded.

Real local Ray (2 CPUs), hash backend. The actor's own counters (``info()``: pid, loads, calls) show which
jobs went through it; a job that went to a plain task leaves them unchanged.
"""

from __future__ import annotations

import threading
import time

import pytest

from embray import Collection
from embray.models import fingerprint
from embray.pipeline.embed import ONE_WORKER_S, one_worker
from embray.pipeline.warm import NAMESPACE, WarmEmbedder, release_warm, warm_actors, warm_name
from embray.storage.store import Store

from .helpers import assert_same_content, content, make_config, mutate, write_corpus, write_rows

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(autouse=True)
def _no_warm_actors(ray_local):
    """Each test starts and ends with no warm actor on the session's Ray."""
    release_warm("test isolation")
    _wait_gone()
    _wait_cpus(lambda free, total: free >= total, timeout=20)  # their CPUs back (best effort, never fails)
    yield
    release_warm("test isolation")


def _wait_gone(timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while warm_actors() and time.monotonic() < deadline:
        time.sleep(0.1)


def _wait_cpus(ok, timeout: float) -> bool:
    import ray

    deadline = time.monotonic() + timeout
    while not ok(ray.available_resources().get("CPU", 0), ray.cluster_resources().get("CPU", 0)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _actor(cfg):
    import ray

    return ray.get_actor(warm_name(cfg.model, fingerprint(cfg.model), cfg.embed), namespace=NAMESPACE)


def _info(cfg) -> dict:
    import ray

    return ray.get(_actor(cfg).info.remote(), timeout=30)


def test_back_to_back_refreshes_reuse_the_loaded_model_and_equal_a_cold_build(tmp_path):
    rows = write_corpus(tmp_path / "corpus", files=3, rows=100)
    cfg = make_config(tmp_path, embed={"keep_warm_s": 60})
    col = Collection(cfg)
    col.backfill()  # 300 rows <= 4 batches of 128: a small job, so it makes the warm actor
    first = _info(cfg)
    assert (first["loads"], first["calls"], first["fingerprint"]) == (1, 1, fingerprint(cfg.model))

    embedded = 0
    for step in range(2):
        rows, *_ = mutate(rows, n_insert=5 + step, n_update=4, n_delete=2)
        write_rows(tmp_path / "corpus", rows)
        res = col.refresh()
        assert res.counts.embedded > 0
        embedded += res.counts.embedded
    info = _info(cfg)
    # The same process, model loaded once, every job through it.
    assert (info["pid"], info["created"], info["loads"]) == (first["pid"], first["created"], 1)
    assert info["calls"] == 3 and info["rows"] == first["rows"] + embedded

    # The same ids, content hashes and vectors as a build with no warm model, in a fresh store.
    cold_cfg = make_config(tmp_path, store={"uri": str(tmp_path / "cold")}, embed={"keep_warm_s": 0})
    cold = Collection(cold_cfg).backfill()
    assert_same_content(content(cfg, res.version), content(cold_cfg, cold.version))
    assert _info(cfg)["calls"] == 3  # the cold build did not use it


def test_a_changed_fingerprint_never_reuses_the_warm_actor(tmp_path):
    import ray

    write_corpus(tmp_path / "corpus", files=2, rows=50)
    a = make_config(tmp_path, embed={"keep_warm_s": 60})
    Collection(a).backfill()
    a_name = warm_name(a.model, fingerprint(a.model), a.embed)
    assert warm_actors() == [a_name]

    b = make_config(tmp_path, store={"uri": str(tmp_path / "b")}, model={"seed": 7}, embed={"keep_warm_s": 60})
    fp_b = fingerprint(b.model)
    assert fp_b != fingerprint(a.model)
    Collection(b).backfill()
    b_name = warm_name(b.model, fp_b, b.embed)
    assert fp_b in b_name and b_name != a_name and b_name in warm_actors()
    assert (_info(b)["fingerprint"], _info(b)["calls"]) == (fp_b, 1)
    # On 2 CPUs the new actor needed a's CPU: a gave way rather than leave the tasks none.
    assert a_name not in warm_actors()

    # And the actor itself refuses a spec of another space.
    with pytest.raises(Exception, match="refused, never another vector space"):
        ray.get(_actor(b).embed.remote(a.model, fingerprint(a.model), Store(a.store.uri), [], [], 60))
    with pytest.raises(Exception, match="refused"):  # even when the caller claims the actor's fingerprint
        ray.get(_actor(b).embed.remote(a.model, fp_b, Store(a.store.uri), [], [], 60))


def test_an_actor_that_refuses_is_bypassed_for_a_plain_task(tmp_path):
    import ray

    write_corpus(tmp_path / "corpus", files=2, rows=50)
    cfg = make_config(tmp_path, embed={"keep_warm_s": 60})
    other = cfg.model.model_copy(update={"seed": 3})
    # An actor under cfg's name that holds another space (as after a name clash): it must never be used.
    impostor = (
        ray.remote(WarmEmbedder)
        .options(name=warm_name(cfg.model, fingerprint(cfg.model), cfg.embed), namespace=NAMESPACE, lifetime="detached")
        .remote(other, fingerprint(other), None, Store(cfg.store.uri), 60)
    )
    res = Collection(cfg).backfill()
    assert ray.get(impostor.info.remote())["calls"] == 0
    fresh = make_config(tmp_path, store={"uri": str(tmp_path / "fresh")}, embed={"keep_warm_s": 0})
    assert_same_content(content(cfg, res.version), content(fresh, Collection(fresh).backfill().version))


def test_the_warm_actor_exits_keep_warm_s_after_its_last_use(tmp_path):
    rows = write_corpus(tmp_path / "corpus", files=2, rows=50)
    # keep_warm_s well above what the refresh does after its embed stage (shards, commit, MLflow) on a busy
    # machine: with 2 s the actor could expire before the refresh returned and the test asked it anything.
    keep = 8.0
    cfg = make_config(tmp_path, embed={"keep_warm_s": keep})
    col = Collection(cfg)
    col.backfill()
    rows, *_ = mutate(rows, n_insert=3, n_update=2, n_delete=1)
    write_rows(tmp_path / "corpus", rows)
    started = time.monotonic()
    col.refresh()  # its last use of the actor ends after `started`
    returned = time.monotonic()
    assert warm_actors() and _info(cfg)["calls"] == 2
    _wait_gone(timeout=30)
    assert warm_actors() == []
    # Not before keep_warm_s after its last use; and soon after (the watchdog wakes at least every 0.2 s).
    assert time.monotonic() - started >= keep
    assert time.monotonic() - returned < keep + 15


def test_keep_warm_s_0_uses_a_plain_task(tmp_path):
    rows = write_corpus(tmp_path / "corpus", files=2, rows=50)
    cfg = make_config(tmp_path, embed={"keep_warm_s": 0})
    col = Collection(cfg)
    col.backfill()
    rows, *_ = mutate(rows, n_insert=3, n_update=2, n_delete=1)
    write_rows(tmp_path / "corpus", rows)
    assert col.refresh().counts.embedded == 5
    assert warm_actors() == []


def test_one_worker_rule(tmp_path):
    ec = make_config(tmp_path, embed={"batch_size": 100, "actors": 2}).embed
    assert one_worker(ec, 400, None)  # up to 4 batches: always
    assert not one_worker(ec, 401, None)  # more, and no earlier build to say how fast: the pool
    # Earlier builds' rate (texts/s of the whole pool) x the pool's actors: one worker's seconds.
    assert one_worker(ec, 10_000, 10_000 / ONE_WORKER_S * 2)
    assert not one_worker(ec, 10_000, 10_000 / ONE_WORKER_S * 1.9)


def test_a_job_that_earlier_builds_say_is_quick_goes_to_one_worker_not_a_pool(tmp_path):
    rows = write_corpus(tmp_path / "corpus", files=3, rows=200)
    cfg = make_config(tmp_path, embed={"batch_size": 16, "keep_warm_s": 60})
    col = Collection(cfg)
    col.backfill()  # 600 texts, past 4 batches of 16, no earlier build: the actor pool, no warm actor
    assert warm_actors() == []
    rows, *_ = mutate(rows, n_insert=60, n_update=40, n_delete=5)
    write_rows(tmp_path / "corpus", rows)
    res = col.refresh()  # 100 texts, past 4 batches too, but the backfill's rate says well under a second
    assert res.counts.embedded == 100
    assert (_info(cfg)["calls"], _info(cfg)["rows"]) == (1, 100)  # all of them in the warm actor

    # With keep_warm_s 0 the same job is one plain Ray task (a streaming one: a chunk at a time).
    cold = make_config(tmp_path, embed={"batch_size": 16, "keep_warm_s": 0})
    rows.update({i: rows[i] + " second pass" for i in sorted(rows)[:100]})
    write_rows(tmp_path / "corpus", rows)
    res = Collection(cold).refresh()
    assert res.counts.embedded == 100 and col.verify(res.version).problems == []
    assert _info(cfg)["calls"] == 1  # not through the warm actor
    cold_cfg = make_config(tmp_path, store={"uri": str(tmp_path / "cold")}, embed={"keep_warm_s": 0})
    assert_same_content(content(cfg, res.version), content(cold_cfg, Collection(cold_cfg).backfill().version))


def _backfill_within(cfg, seconds: float):
    out: dict = {}

    def run():
        try:
            out["result"] = Collection(cfg).backfill()
        except Exception as e:  # noqa: BLE001 - reported below
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"the build hung beside the warm actors {warm_actors()}"
    assert "error" not in out, out.get("error")
    return out["result"]


def test_builds_complete_beside_warm_actors_that_hold_the_cpus(tmp_path):
    import ray

    write_corpus(tmp_path / "small" / "corpus", files=2, rows=50)
    small = make_config(tmp_path / "small", embed={"keep_warm_s": 60})
    Collection(small).backfill()
    name = warm_name(small.model, fingerprint(small.model), small.embed)
    assert warm_actors() == [name]

    # One warm actor holds 1 of the 2 CPUs: a bulk build (an actor pool of 1 CPU) fits beside it.
    write_corpus(tmp_path / "big" / "corpus", files=4, rows=300)
    big = make_config(tmp_path / "big", embed={"batch_size": 50, "keep_warm_s": 60})
    assert _backfill_within(big, 120).counts.embedded == 1200
    assert name in warm_actors()

    # Two warm actors hold both CPUs (another fingerprint's, made by hand): the scan tasks would never run;
    # the build releases them first.
    other = small.model.model_copy(update={"seed": 5})
    hog = (
        ray.remote(WarmEmbedder)
        .options(
            name=warm_name(other, fingerprint(other), small.embed), namespace=NAMESPACE, lifetime="detached", num_cpus=1
        )
        .remote(other, fingerprint(other), None, Store(small.store.uri), 60)
    )
    ray.get(hog.info.remote())
    assert _wait_cpus(lambda free, total: free == 0, timeout=10)
    write_corpus(tmp_path / "third" / "corpus", files=2, rows=50)
    third = make_config(tmp_path / "third", embed={"keep_warm_s": 60})
    assert _backfill_within(third, 120).counts.embedded == 100


@pytest.mark.slow
def test_minilm_vectors_from_the_warm_actor_equal_the_plain_task_s_byte_for_byte(tmp_path):
    orig = write_corpus(tmp_path / "corpus", files=2, rows=20)
    rows, *_ = mutate(orig, n_insert=3, n_update=2, n_delete=1)
    minilm = {"backend": "sentence-transformers", "name": "all-MiniLM-L6-v2", "dims": None}
    built = {}
    for keep in (60, 0):  # warm first (the backfill makes the actor, the refresh reuses it), then plain tasks
        cfg = make_config(tmp_path, store={"uri": str(tmp_path / f"store-{keep}")}, model=minilm)
        cfg = cfg.model_copy(update={"embed": cfg.embed.model_copy(update={"keep_warm_s": keep})})
        col = Collection(cfg)
        write_rows(tmp_path / "corpus", orig, files=2)
        col.backfill()
        write_rows(tmp_path / "corpus", rows, files=2)
        built[keep] = (cfg, col.refresh())
        assert _info(built[60][0])["calls"] == 2  # both warm jobs went through it, the plain ones did not
    (warm_cfg, warm), (cold_cfg, cold) = built[60], built[0]
    assert warm.counts.embedded == cold.counts.embedded == 5
    # both ran the fused CPU graph, and say so (the path, the dtype and why) in the build's record
    for got in (warm, cold):
        (how,) = got.embed_compute
        assert how.startswith("cpu-graph fp32 (model.precision fp32; CPU ")
        assert how.endswith(("graph from the local cache)", "graph traced and checked now, saved in the local cache)"))
        assert 200 < got.embed_worker_peak_rss_mib < 3000
    assert_same_content(content(warm_cfg, warm.version), content(cold_cfg, cold.version))
