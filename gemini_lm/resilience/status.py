"""The status page a supervisor shares with its training child: one page of shared memory.

Written by the child without any system call or store round trip (a training step must
never wait on the network for bookkeeping), read by the supervisor every poll. Each field
is written on its own: the child's main thread and its watchdog thread write different
fields, so there is no read-modify-write of the whole record. The supervisor resets the
page before every fork, so a new child never inherits its predecessor's progress (which
would look like a hang).
"""
from __future__ import annotations

import mmap
import struct
import time

# phase of the child
STARTING, TRAINING, RECOVERING, SPARE, DONE = 0, 1, 2, 3, 4

_FIELDS = (("heartbeat", "d"),     # monotonic time of the child's last watchdog tick
           ("progress", "d"),      # monotonic time of the last completed iteration (or phase change)
           ("iteration", "q"),     # last completed iteration
           ("generation", "q"),    # the generation the child is in (or joining)
           ("phase", "q"),
           ("rank", "q"),          # training rank in that generation, -1 while a spare
           ("alarm", "q"),         # generation in which the child saw no progress for too long, or -1
           ("member", "q"))        # 1 once the child has been a training rank (its death must bump)
_OFFSET = {name: 8 * i for i, (name, _) in enumerate(_FIELDS)}
_FORMAT = dict(_FIELDS)


class StatusPage:
    def __init__(self):
        self._mm = mmap.mmap(-1, mmap.PAGESIZE)   # anonymous MAP_SHARED: shared across fork, both ways
        self.reset(generation=-1, member=0)

    def reset(self, *, generation: int, member: int) -> None:
        now = time.monotonic()
        self.set(heartbeat=now, progress=now, iteration=-1, generation=generation, phase=STARTING,
                 rank=-1, alarm=-1, member=member)

    def set(self, **fields) -> None:
        for name, value in fields.items():
            struct.pack_into("<" + _FORMAT[name], self._mm, _OFFSET[name], value)

    def get(self, name: str):
        return struct.unpack_from("<" + _FORMAT[name], self._mm, _OFFSET[name])[0]

    def snapshot(self) -> dict:
        return {name: self.get(name) for name, _ in _FIELDS}
