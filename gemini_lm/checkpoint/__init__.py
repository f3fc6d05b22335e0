"""The checkpoint format, in memory and on disk: the one package every other depends on.

    snapshot.py     a rank's state as one safetensors buffer with a fixed layout
    checksum.py     xxh3-64 of snapshot bytes
    naming.py       shard ids, iteration directories, file names, the format tag
    files.py        durable atomic writes, safetensors reads of persisted files
    persistent.py   the persistent checkpoint directory: shards, manifest, tracker
    protocol.py     the Checkpointer face the training loop and failure handler use

It imports nothing of ours but `gemini_lm.errors`, so `training`, `gemini`,
`resilience`, `inference` and the tools can all build on it without cycles.
"""
