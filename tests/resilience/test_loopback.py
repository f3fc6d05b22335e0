"""Issue 13, item 3: while a local cluster trains, every socket its processes listen on is
bound to loopback — the cluster's rendezvous store, the job store, gloo's pairs, torchrun's
own stores. Read from /proc: each process's socket inodes, matched in /proc/net/tcp{,6}."""
from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys

import pytest

from gemini_lm.resilience import procs
from tests.e2e import ROOT, read_losses, tiny_gpt_args
from tests.resilience.cluster import assert_nothing_left, cluster_state, killed_at_exit, wait_for
from tests.resilience.test_local_cluster import CLUSTER

pytestmark = pytest.mark.slow   # spawns a cluster

LISTEN = "0A"


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))   # four host-order words
    ip = ipaddress.IPv6Address(words)
    return ip.ipv4_mapped or ip


def listening(pids) -> list[tuple[int, str, int]]:
    """(pid, local address, port) of every TCP socket in LISTEN state that one of `pids` holds."""
    owner = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    owner[target[8:-1]] = pid
        except OSError:
            continue   # gone meanwhile
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == LISTEN and inode in owner:
                addr, port = local.split(":")
                out.append((owner[inode], str(_address(addr)), int(port, 16)))
    return out


def test_every_listening_socket_of_a_cluster_is_loopback(byte_corpus, tmp_path):
    log_dir = str(tmp_path / "logs")
    cmd = [sys.executable, CLUSTER, "--machines", "2", "--", "pretrain_gpt.py",
           *tiny_gpt_args(byte_corpus, log_dir, "--train-iters", "100000")]
    cluster = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with killed_at_exit(cluster):
        wait_for(lambda: os.path.exists(os.path.join(log_dir, "metrics.jsonl")) and len(read_losses(log_dir)) > 3,
                  120, "training to run")
        pids = [cluster.pid, *procs.cluster_processes(cluster_state(log_dir)["cluster_id"])]
        sockets = listening(pids)
        assert sockets, "no listening socket found: the /proc reading is broken"
        exposed = [s for s in sockets if not ipaddress.ip_address(s[1]).is_loopback]
        assert exposed == [], [(pid, procs.comm(pid), addr, port) for pid, addr, port in exposed]
        cluster.send_signal(signal.SIGINT)
        assert cluster.wait(timeout=60) == 130
    assert_nothing_left(log_dir, finished=False)   # interrupted: no process is left
    assert not os.path.exists(cluster_state(log_dir)["store_root"])   # and its store root (marker too) is gone
