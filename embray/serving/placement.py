"""Will the Serve application fit this Ray? What it reserves, against what the Ray's nodes offer.

The application reserves, per replica, ``serve.num_cpus`` for each of ``serve.replicas`` ingress replicas and
``serve.group_num_cpus`` for each of ``serve.group_replicas`` replicas of each of ``serve.shard_groups`` groups
(GPUs and custom resources the same way, where a replica asks for them). Ray places a replica only on one
node that offers all of it; one that fits nowhere waits for ever (Serve logs "taken more than 30s to be
scheduled" every 30 s). :func:`shortfall` says, before anything is deployed, whether the replicas can be
placed on the nodes as they are: their totals, and every replica on some node (first fit, largest first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from embray.config import ServeConfig

_EPS = 1e-9
_NAMES = {"CPU": "CPUs", "GPU": "GPUs"}


@dataclass(frozen=True)
class Part:
    """Replicas of one kind that the application reserves: ``count`` of them, each ``need``."""

    what: str  # "ingress" or "shard group"
    count: int
    need: dict[str, float] = field(default_factory=dict)
    groups: int = 1  # shard groups (the count is groups x replicas of each)
    keys: tuple[str, ...] = ()  # the config keys that size it


def parts(s: ServeConfig) -> list[Part]:
    """What the application of ``s`` reserves: the ingress replicas and, with shard groups, every group's."""
    out = [Part("ingress", s.replicas, _positive({"CPU": s.num_cpus}), 1, ("serve.num_cpus", "serve.replicas"))]
    if s.shard_groups > 1:
        out.append(
            Part(
                "shard group",
                s.shard_groups * s.group_replicas,
                _positive({"CPU": s.group_num_cpus}),
                s.shard_groups,
                ("serve.group_num_cpus", "serve.group_replicas"),
            )
        )
    return out


def _positive(need: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in need.items() if v > 0}


def _amount(name: str, x: float) -> str:
    unit = _NAMES.get(name, f"of resource {name}")
    return f"{x:g} {unit}" if name in _NAMES or x != 1 else f"1 {name}"


def _term(p: Part, name: str) -> str:
    each = p.need.get(name, 0.0)
    if p.what == "ingress":
        return f"ingress {each:g}" if p.count == 1 else f"{p.count} ingress replicas x {each:g}"
    per_group = p.count // max(p.groups, 1)
    reps = "" if per_group == 1 else f" x {per_group} replicas"
    return f"{p.groups} shard groups{reps} x {each:g}"


def _keys(ps: list[Part], name: str) -> str:
    """The config keys that lower what ``ps`` reserve of ``name``."""
    if name != "CPU":
        return "lower what the replicas reserve"
    keys = [k for p in ps if p.need.get(name) for k in p.keys[: 2 if p.count > p.groups else 1]]
    return "lower " + " / ".join(keys) if keys else "lower what the replicas reserve"


def shortfall(ps: list[Part], nodes: list[dict[str, float]], *, local: bool) -> str | None:
    """Why the replicas of ``ps`` cannot all be placed on ``nodes`` (each node's total resources), or None.

    One line that names the shortfall and the keys to change, e.g. "needs 3 CPUs (ingress 1 + 2 shard groups
    x 1); this Ray has 2: lower serve.num_cpus / serve.group_num_cpus or add nodes". ``local``: a Ray of this
    process alone (no node will join it), whose logical CPUs ``ray.num_cpus`` sets.
    """
    grow = "raise ray.num_cpus (Ray counts reservations, not cores)" if local else "add nodes"
    names = sorted({k for p in ps for k in p.need}, key=lambda k: (k not in _NAMES, k))
    for name in names:
        need = sum(p.count * p.need.get(name, 0.0) for p in ps)
        have = sum(n.get(name, 0.0) for n in nodes)
        if need > have + _EPS:
            terms = " + ".join(_term(p, name) for p in ps if p.need.get(name))
            return f"needs {_amount(name, need)} ({terms}); this Ray has {have:g}: {_keys(ps, name)} or {grow}"
    for p in ps:  # every replica must fit on one node
        for name, each in p.need.items():
            most = max((n.get(name, 0.0) for n in nodes), default=0.0)
            if each > most + _EPS:
                return (
                    f"each {p.what} replica needs {_amount(name, each)}, and no node of this Ray offers more than "
                    f"{most:g}: {_keys([p], name)} or {grow}"
                )
    if not _packs(ps, nodes):
        sizes = " + ".join(f"{n.get('CPU', 0.0):g}" for n in nodes)
        terms = " + ".join(_term(p, "CPU") for p in ps if p.need.get("CPU"))
        return (
            f"cannot place every replica ({terms} CPUs) on this Ray's {len(nodes)} nodes ({sizes} CPUs): each "
            f"replica takes its whole share from one node; {_keys(ps, 'CPU')} or {grow}"
        )
    return None


def _packs(ps: list[Part], nodes: list[dict[str, float]]) -> bool:
    """First fit, largest replica first: can every replica be given its share of one node?"""
    free = [dict(n) for n in nodes]
    replicas = sorted((p.need for p in ps for _ in range(p.count)), key=lambda d: -sum(d.values()))
    for need in replicas:
        for node in free:
            if all(node.get(k, 0.0) + _EPS >= v for k, v in need.items()):
                for k, v in need.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return False
    return True


def ray_nodes() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected Ray."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
