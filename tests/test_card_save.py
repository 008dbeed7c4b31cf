"""CacheCard.save is atomic: SIGKILL mid-write never leaves a partial card.

A writer subprocess saves two different multi-MB cards to the same path in a
loop; the test kills it at random moments. After every kill the path either
does not exist yet or loads as one of the two complete cards. Temp files
(``.<name>.<random>.tmp``, written by ``save`` next to the target) may remain
after a SIGKILL; ``load`` only ever opens the path it is given, so they are
never mistaken for cards, and the next ``save`` is unaffected by them.
"""

import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qkvshare_mlx.card import CacheCard
from qkvshare_mlx.testing import mutations as F

WRITER = """
import sys
from qkvshare_mlx.card import CacheCard
a, b, target = sys.argv[1:4]
cards = [CacheCard.load(a), CacheCard.load(b)]
print("ready", flush=True)
i = 0
while True:
    cards[i % 2].save(target)
    i += 1
"""


@pytest.fixture(scope="module")
def two_cards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cards")
    paths = []
    for seed in (1, 2):
        data = F.small_card_bytes(seed, n_tokens=4096, n_layers=10)
        path = folder / f"src{seed}.card"
        path.write_bytes(data)
        paths.append(path)
    return paths


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_sigkill_during_save_never_leaves_a_partial_card(two_cards, tmp_path):
    a, b = two_cards
    assert a.stat().st_size > 4_000_000  # big enough that a write takes a while
    complete = {_digest(a.read_bytes()), _digest(b.read_bytes())}
    target = tmp_path / "shared.card"
    rng = np.random.default_rng(0)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    loaded = 0
    deadline = time.monotonic() + 45
    for _ in range(20):
        if time.monotonic() > deadline:
            break
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(a), str(b), str(target)],
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(float(rng.uniform(0.0, 0.4)))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        # 1. the path is absent or holds one complete card, byte for byte
        if target.exists():
            card = CacheCard.load(target)
            assert _digest(card.to_bytes()) in complete
            loaded += 1
        # 2. everything else in the folder is a save() temp file, never a card name
        for other in tmp_path.iterdir():
            if other != target:
                assert other.name.startswith(f".{target.name}.")
                assert other.name.endswith(".tmp")
    assert loaded >= 5  # most kills landed after at least one completed save
