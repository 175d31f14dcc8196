"""Random ids drawn in blocks (dtmf_service/ids.py): the forms of uuid4 and token_hex, never one handed
out twice, threads and forked children never share a block."""

import os
import re
import threading
import uuid

from dtmf_service.ids import hex_id, random_bytes, uuid4


def test_forms():
    value = uuid4()
    parsed = uuid.UUID(value)
    assert str(parsed) == value and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert re.fullmatch(r"[0-9a-f]{32}", hex_id(16)) and re.fullmatch(r"[0-9a-f]{16}", hex_id(8))


def test_never_the_same_bytes_twice_across_blocks_and_threads():
    seen: list[bytes] = []
    lock = threading.Lock()

    def draw():
        mine = [random_bytes(16) for _ in range(600)]  # more than two blocks of 4 KiB
        with lock:
            seen.extend(mine)

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == len(seen) == 2400


def test_a_forked_child_draws_other_bytes_than_its_parent():
    random_bytes(16)  # the parent holds a block
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, then out at once
        os.write(write, random_bytes(16))
        os._exit(0)
    os.close(write)
    child = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 16 and child != random_bytes(16)
