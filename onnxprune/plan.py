"""The pruning plan as data: which channels of which group go, and why.

A plan is made from per-group importance scores and a policy (uniform ratio,
per-layer ratios, ignored layers, global ranking, channel rounding), and it
can be written to JSON and replayed on the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import OnnxPruneError, unknown_name
from .groups import ACTIVATION, WEIGHT_IN, WEIGHT_OUT, Analysis, Group


@dataclass
class Policy:
    ratio: float = 0.3                                  # fraction of each group's channels removed
    ratio_for: dict[str, float] = field(default_factory=dict)   # layer/tensor name -> ratio
    ignore: list[str] = field(default_factory=list)     # layer/tensor names whose groups are left alone
    round_to: int | None = None                         # keep channel counts multiples of this
    global_ranking: bool = False                        # rank channels across groups (normalised scores)
    max_ratio: float = 0.9                              # cap per group with global ranking
    balance: bool = True                                # uniform: each layer of a group loses about the ratio

    def check(self) -> None:
        for name, r in [("--ratio", self.ratio), ("--max-ratio", self.max_ratio), *self.ratio_for.items()]:
            if not (isinstance(r, (int, float)) and not math.isnan(r) and 0.0 <= r < 1.0):
                raise OnnxPruneError(f"{name} {r}: a ratio must be in [0, 1)")
        if self.round_to is not None and self.round_to < 1:
            raise OnnxPruneError(f"--round-to {self.round_to}: must be a positive integer")


@dataclass
class Plan:
    removed: dict[int, np.ndarray]        # group id -> removed channel indices (sorted)
    ratios: dict[int, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    policy: Policy | None = field(default=None, repr=False, compare=False)   # what made it (None: a replay)

    def to_json(self, analysis: Analysis) -> dict:
        return {"groups": [{"group": gid, "label": analysis.groups[gid].label, "size": analysis.groups[gid].size,
                            "removed": r.tolist()} for gid, r in sorted(self.removed.items()) if len(r)],
                "notes": self.notes}

    @classmethod
    def from_json(cls, data: dict, analysis: Analysis) -> "Plan":
        removed = {}
        for entry in plan_entries(data):
            gid = entry["group"]
            if gid >= len(analysis.groups) or analysis.groups[gid].label != entry.get("label"):
                raise OnnxPruneError(f"plan group {gid} ('{entry.get('label')}') does not match this model")
            g = analysis.groups[gid]
            r = np.asarray(entry["removed"], dtype=np.int64)
            if g.frozen or (len(r) and (r.min() < 0 or r.max() >= g.size)) or len(set(r.tolist())) >= g.size:
                raise OnnxPruneError(f"plan group {gid} ('{g.label}'): removal does not fit the group")
            removed[gid] = np.sort(r)
        return cls(removed)

    def count(self) -> int:
        return sum(1 for r in self.removed.values() if len(r))


def plan_entries(data) -> list[dict]:
    """The ``groups`` of a plan, checked against the schema ``{"groups": [{"group": int, "label": str,
    "removed": [int, ...]}, ...], "notes": [...]}`` that ``Plan.to_json`` writes."""
    def bad(why: str):
        return OnnxPruneError(f"not a pruning plan: {why} (write one with --save-plan)")
    if not isinstance(data, dict):
        raise bad(f"a JSON {type(data).__name__} instead of an object with 'groups'")
    groups = data.get("groups", [])
    if not isinstance(groups, list):
        raise bad(f"'groups' is a {type(groups).__name__}, expected a list")
    for i, entry in enumerate(groups):
        if not isinstance(entry, dict) or not {"group", "removed"} <= set(entry):
            raise bad(f"groups[{i}] is not an object with 'group' and 'removed'")
        ints = [entry["group"]] + (entry["removed"] if isinstance(entry["removed"], list) else [None])
        wrong = next((v for v in ints if not isinstance(v, int) or isinstance(v, bool) or v < 0), "")
        if wrong != "":
            raise bad(f"groups[{i}]: {wrong!r} is not a channel or group index (non-negative integers only)")
    return groups


def check_names(analysis: Analysis, names, what: str) -> None:
    """Every layer or weight name given (to ignore, or with its own ratio) names something in this model's
    channel groups; a typo is an error listing the closest names, never silently nothing."""
    known = {n for g in analysis.groups for n in (g.label, *g.layers,
                                                 *(m.tensor for m in g.members if m.kind != ACTIVATION))}
    for name in names:
        if name not in known:
            raise unknown_name(what, name, known)


def matches(group: Group, names: list[str]) -> bool:
    if not names:
        return False
    mine = {group.label, *group.layers, *(m.tensor for m in group.members if m.kind != ACTIVATION)}
    return any(n in mine for n in names)


def group_ratio(group: Group, policy: Policy) -> float:
    for name, r in policy.ratio_for.items():
        if matches(group, [name]):
            return r
    return policy.ratio


def _rounded_keep(size: int, keep: int, round_to: int | None) -> int:
    keep = max(1, keep)
    if round_to and round_to > 1 and size >= round_to:   # a group of exactly N stays N, never below
        keep = min(size, max(round_to, int(round(keep / round_to)) * round_to))
    return keep


def make_plan(analysis: Analysis, scores: dict[int, np.ndarray], policy: Policy) -> Plan:
    """Remove the lowest-scoring channels of every prunable group according to ``policy``."""
    policy.check()
    check_names(analysis, policy.ignore, "ignore")
    check_names(analysis, policy.ratio_for, "ratio_for")
    candidates = [g for g in analysis.prunable if not matches(g, policy.ignore) and g.id in scores]
    keep: dict[int, int] = {}
    if policy.global_ranking:
        keep = _global_keep(candidates, scores, policy)
    else:
        for g in candidates:
            keep[g.id] = g.size - int(math.floor(g.size * group_ratio(g, policy) + 1e-9))
    removed, ratios = {}, {}
    balance = policy.balance and not policy.global_ranking
    for g in candidates:
        k = _rounded_keep(g.size, keep[g.id], policy.round_to)
        s = np.asarray(scores[g.id], dtype=np.float64)
        removed[g.id] = balanced_removal(g, s, g.size - k) if balance else \
            np.sort(np.argsort(-s, kind="stable")[k:]).astype(np.int64)
        ratios[g.id] = (g.size - k) / g.size
    plan = Plan(removed, ratios)
    _keep_every_tensor_alive(analysis, plan, scores)
    return plan


def structure_classes(group: Group) -> np.ndarray:
    """Class of every channel: channels in the same class occupy the same number of positions in
    every layer of the group, so removing either costs every layer the same."""
    layers = group.of_kind(WEIGHT_OUT, WEIGHT_IN) or group.members
    counts = np.stack([np.bincount(m.index[m.index >= 0], minlength=group.size) for m in layers], axis=1)
    return np.unique(counts, axis=0, return_inverse=True)[1].reshape(-1)


def balanced_removal(group: Group, scores: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` lowest-scoring channels, taken in proportion from every structure class.

    A group can span layers that hold different subsets of its channels (a channel shuffle
    pairs two layers' halves; a dual-path block appends each unit's own channels to a shared
    residual part). Ranking all channels together can take every removal from the channels
    of a few layers and leave the rest whole; taking ``n / size`` of each class (largest
    remainders first, ties to the lowest next score) makes every layer lose about the ratio.
    With one class this is plain ranking."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    cls = structure_classes(group)
    members = [np.nonzero(cls == c)[0] for c in range(int(cls.max()) + 1)]
    members = [m[np.argsort(scores[m], kind="stable")] for m in members]   # lowest score first
    quota = np.array([len(m) * n / group.size for m in members])
    take = np.floor(quota + 1e-9).astype(int)
    extra = n - int(take.sum())
    if extra > 0:
        nxt = [scores[m[t]] if t < len(m) else np.inf for m, t in zip(members, take)]
        rank = sorted(range(len(members)), key=lambda c: (-(quota[c] - take[c]), nxt[c]))
        for c in rank[:extra]:
            take[c] += 1
    return np.sort(np.concatenate([m[:t] for m, t in zip(members, take)])).astype(np.int64)


def _global_keep(groups: list[Group], scores: dict[int, np.ndarray], policy: Policy) -> dict[int, int]:
    entries = []
    total = 0
    for g in groups:
        s = np.asarray(scores[g.id], dtype=np.float64)
        s = s / (np.abs(s).mean() + 1e-12)
        total += g.size
        entries += [(v, g.id) for v in s.tolist()]
    budget = int(math.floor(total * policy.ratio + 1e-9))
    cap = {g.id: int(math.floor(g.size * min(policy.max_ratio, 1.0) + 1e-9)) for g in groups}
    cap = {gid: min(c, next(g.size for g in groups if g.id == gid) - 1) for gid, c in cap.items()}
    taken = {g.id: 0 for g in groups}
    for v, gid in sorted(entries):
        if budget <= 0:
            break
        if taken[gid] < cap[gid]:
            taken[gid] += 1
            budget -= 1
    return {g.id: g.size - taken[g.id] for g in groups}


def _keep_every_tensor_alive(analysis: Analysis, plan: Plan, scores: dict[int, np.ndarray]) -> None:
    """A Split/Slice output may hold only some of a group's channels: never remove all of them."""
    for _ in range(16):
        gone: dict[str, np.ndarray] = {}
        holders: dict[str, tuple[Group, object]] = {}
        for g in analysis.groups:
            r = plan.removed.get(g.id)
            if r is None or len(r) == 0:
                continue
            for m in g.members:
                if m.kind == ACTIVATION:
                    hit = np.isin(m.index, r) & (m.index >= 0)
                    gone[m.tensor] = gone.get(m.tensor, np.zeros(len(m.index), bool)) | hit
                    holders.setdefault(m.tensor, (g, m))
        empty = [t for t, mask in gone.items() if mask.all()]
        if not empty:
            return
        g, m = holders[empty[0]]
        present = np.unique(m.index[m.index >= 0])
        best = int(present[np.argmax(np.asarray(scores.get(g.id, np.zeros(g.size)))[present])])
        plan.removed[g.id] = plan.removed[g.id][plan.removed[g.id] != best]
        plan.notes.append(f"kept channel {best} of group {g.id} so '{empty[0]}' is not emptied")


def removal_summary(analysis: Analysis, plan: Plan, policy: Policy) -> dict:
    """What ``plan`` removes against what ``policy`` asked (rounding to ``round_to`` changes it): the asked and
    removed fraction of every group the policy applies to, the total, and the groups left whole although a
    ratio was asked (JSON-ready; ``asked`` is None under global ranking, which has no per-group ratio)."""
    groups, left_whole = [], []
    size_total = removed_total = 0
    for g in analysis.prunable:
        if matches(g, policy.ignore):
            continue
        asked = None if policy.global_ranking else group_ratio(g, policy)
        removed = len(plan.removed.get(g.id, ()))
        size_total += g.size
        removed_total += removed
        groups.append({"group": g.id, "label": g.label, "size": g.size, "asked_ratio": asked,
                       "removed_ratio": removed / g.size})
        if asked and not removed:
            why = (f"rounding to multiples of {policy.round_to}" if policy.round_to and policy.round_to > 1
                   else f"{asked:g} of {g.size} channels is less than one")
            left_whole.append({"group": g.id, "label": g.label, "size": g.size, "why": why})
    return {"round_to": policy.round_to or 1, "asked_ratio": None if policy.global_ranking else policy.ratio,
            "removed_ratio": removed_total / size_total if size_total else 0.0, "groups": groups,
            "left_whole": left_whole}


def nothing_removed(summary: dict, policy: Policy) -> str:
    """Why a plan removes nothing, in one sentence with the way out."""
    asked = [g for g in summary["groups"] if g["asked_ratio"]]
    if not asked and not policy.global_ranking:
        return "every group's ratio is 0 (--ratio 0, or --ratios-from suggested 0 everywhere): nothing to remove"
    if policy.round_to and policy.round_to > 1 and summary["left_whole"]:
        return (f"rounding channel counts to multiples of {policy.round_to} left every group whole "
                "(ask for a larger ratio, or --round-to 1 for exact ratios)")
    return "the ratios asked are below one channel in every group; ask for a larger ratio"
