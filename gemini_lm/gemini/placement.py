"""Checkpoint placement: which machines hold a copy of each machine's checkpoint.

`m` (replicas) is the total number of copies of a machine's checkpoint: its own plus
`m-1` on peers, i.e. `m` failure domains. Strategies (GEMINI §3.2):

  group  machines split into N/m groups of consecutive machines; each member sends to
         the other m-1 members. Optimal when m divides N.
  ring   machine i sends to machines i+1 .. i+m-1 (mod N).
  mixed  (m does not divide N) the first floor(N/m)-1 groups use group placement, the
         remaining N - m*(floor(N/m)-1) machines (between m+1 and 2m-1 of them) form a ring.
  auto   group when m | N, else mixed.

When m >= N every machine holds every checkpoint (m is clamped to N, noted in `.notes`).
Everything here is pure and deterministic: every rank computes the same plan from the
same machine list (the order of `machines` is the ring/group order).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

STRATEGIES = ("group", "ring", "mixed", "auto")


@dataclass(frozen=True)
class Placement:
    """Holder sets for every machine.

    `groups` lists the closed units of the plan, each in placement order: for "group"
    the N/m groups; for "ring" a single entry, the whole ring; for "mixed" the groups
    followed by the ring as the last entry. `ring` is the ring's members ([] for group).
    """
    strategy: str                       # resolved: "group", "ring" or "mixed"
    replicas: int                       # m after clamping to N
    machines: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]
    ring: tuple[str, ...]
    notes: tuple[str, ...] = ()
    _peers: Mapping[str, tuple[str, ...]] = field(default_factory=dict, repr=False, compare=False)

    def peers(self, machine: str) -> list[str]:
        """The m-1 machines `machine` sends its checkpoint to, in send-preference order."""
        try:
            return list(self._peers[machine])
        except KeyError:
            raise ValueError(f"machine {machine!r} is not in this placement") from None

    def holders(self, machine: str) -> list[str]:
        """All m failure domains holding `machine`'s checkpoint: itself, then its peers."""
        return [machine] + self.peers(machine)

    def holder_sets(self) -> dict[str, list[str]]:
        return {mach: self.holders(mach) for mach in self.machines}


def resolve_strategy(num_machines: int, replicas: int, strategy: str = "auto") -> tuple[str, int, list[str]]:
    """Validate (N, m, strategy); return (resolved strategy, clamped m, notes)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown placement strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if num_machines < 1:
        raise ValueError("placement needs at least one machine")
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1 (got {replicas})")
    notes = []
    if replicas > num_machines:
        notes.append(f"replicas {replicas} > machines {num_machines}: clamped to {num_machines} "
                     "(every machine holds every checkpoint)")
        replicas = num_machines
    divides = num_machines % replicas == 0
    if strategy == "auto":
        strategy = "group" if divides else "mixed"
        notes.append(f"auto -> {strategy}: m={replicas} {'divides' if divides else 'does not divide'} "
                     f"N={num_machines}")
    elif strategy == "group" and not divides:
        raise ValueError(f"group placement needs replicas ({replicas}) to divide machines "
                         f"({num_machines}); use mixed or auto")
    return strategy, replicas, notes


def _rotations(unit: list[str], nsend: int) -> dict[str, tuple[str, ...]]:
    """Member at position q sends to the next `nsend` members of `unit`, cyclically.

    For a group (nsend = len-1) this is "all other members", rotated so that every
    member's first-choice peer differs, which spreads the first send of each machine.
    """
    n = len(unit)
    return {unit[q]: tuple(unit[(q + d) % n] for d in range(1, nsend + 1)) for q in range(n)}


def plan_placement(machines: list[str], replicas: int, strategy: str = "auto") -> Placement:
    """Holder sets for `machines` (in this order) with `replicas` copies per checkpoint."""
    machines = [str(mach) for mach in machines]
    if len(set(machines)) != len(machines):
        raise ValueError("machine ids must be unique")
    strategy, m, notes = resolve_strategy(len(machines), replicas, strategy)
    n = len(machines)
    num_groups = {"group": n // m, "ring": 0, "mixed": n // m - 1}[strategy]
    groups = [machines[g * m:(g + 1) * m] for g in range(num_groups)]
    ring = machines[num_groups * m:]
    if strategy == "mixed" and n % m == 0:
        notes.append(f"mixed with m | N: the ring of {len(ring)} machines is just one more group")
    units = groups + ([ring] if ring else [])
    peers: dict[str, tuple[str, ...]] = {}
    for unit in units:
        peers.update(_rotations(unit, m - 1))
    return Placement(strategy, m, tuple(machines), tuple(tuple(u) for u in units), tuple(ring),
                     tuple(notes), peers)


def recoverable(placement_or_holders: Placement | Mapping[str, Iterable[str]], failed: set[str]) -> bool:
    """True when every checkpoint still has a live holder after `failed` machines die.

    Accepts a Placement (each machine's checkpoint is held by `holders(machine)`) or any
    mapping checkpoint -> holder machines, e.g. shard -> machines after replication.
    """
    if isinstance(placement_or_holders, Placement):
        holder_sets = placement_or_holders.holder_sets()
    else:
        holder_sets = placement_or_holders
    return all(any(h not in failed for h in holders) for holders in holder_sets.values())


def replication_plan(shard_machines: Mapping[str, list[str]], placement: Placement
                     ) -> dict[str, list[tuple[str, str]]]:
    """Sends (src, dst) per shard so that every shard lives on min(m, N) machines.

    `shard_machines[shard]` are the machines that natively hold an identical copy of the
    shard (its data-parallel replicas). Each unique shard needs m failure domains, not m
    sends: native copies count. Destinations are placement peers of the shard's native
    holders; ties go to the machine that receives least so far, so load spreads across
    shards, and the source is the native holder whose peer the destination is. Shards
    are planned in sorted order: every rank computes the same plan independently.
    """
    order = {mach: i for i, mach in enumerate(placement.machines)}
    target = placement.replicas
    recv_load = dict.fromkeys(placement.machines, 0)
    send_load = dict.fromkeys(placement.machines, 0)
    plan: dict[str, list[tuple[str, str]]] = {}
    for shard in sorted(shard_machines):
        natives = list(dict.fromkeys(str(mach) for mach in shard_machines[shard]))
        if not natives:
            raise ValueError(f"shard {shard!r} has no native holder")
        unknown = [mach for mach in natives if mach not in order]
        if unknown:
            raise ValueError(f"shard {shard!r}: machines {unknown} are not in the placement")
        held = set(natives)
        sends: list[tuple[str, str]] = []
        while len(held) < target:
            # a peer of some native holder: least-loaded receiver, then earliest in its
            # sender's peer list, then least-loaded sender, then machine order
            options = [(recv_load[dst], pos, send_load[src], order[dst], order[src], src, dst)
                       for src in natives for pos, dst in enumerate(placement.peers(src))
                       if dst not in held]
            # never empty: a native holder plus its m-1 peers are m > len(held) machines
            *_, src, dst = min(options)
            sends.append((src, dst))
            held.add(dst)
            recv_load[dst] += 1
            send_load[src] += 1
        plan[shard] = sends
    return plan
