"""How fast the synthetic world runs on one core: stories, oracle checks, task items, labeler rankings.

    python benchmarks/world_throughput.py [--seconds 2]

Prints a table; the target is >= 50,000 stories a minute on one core.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Callable

from tinygpt.world import oracle
from tinygpt.world.labeler import Labeler, synthetic_completions
from tinygpt.world.stories import generate_story
from tinygpt.world.tasks import FAMILIES


def rate(fn: Callable[[int], object], seconds: float) -> tuple[float, int]:
    """Calls of ``fn(k)`` per second over at least ``seconds`` (and at least 20 calls)."""
    start, k = time.perf_counter(), 0
    while True:
        fn(k)
        k += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and k >= 20:
            return k / elapsed, k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per row")
    args = parser.parse_args()

    rng = random.Random(0)
    stories = [generate_story(rng) for _ in range(500)]
    metas = [s.to_dict() for s in stories]
    items = {f: [FAMILIES[f].item(i) for i in range(1, 51)] for f in FAMILIES}
    labeler = Labeler(seed=0)
    sets = [(it.meta, synthetic_completions(it, random.Random(i), 4))
            for i, it in enumerate(it for f in FAMILIES for it in items[f][:10])]

    rows = [
        ("generate_story", "story", lambda k: generate_story(rng)),
        ("oracle.grammar_score", "story", lambda k: oracle.grammar_score(stories[k % 500].text)),
        ("oracle.consistency_score", "story", lambda k: oracle.consistency_score(stories[k % 500].text, metas[k % 500])),
        ("oracle.is_rude", "story", lambda k: oracle.is_rude(stories[k % 500].text)),
    ]
    rows += [(f"tasks {f}.item", "item", (lambda f: lambda k: FAMILIES[f].item(k))(f)) for f in FAMILIES]
    rows.append(("Labeler.rank (K=4)", "prompt", lambda k: labeler.rank(*sets[k % len(sets)])))

    print(f"{'what':<28} {'unit':<7} {'per second':>12} {'per minute':>12}")
    for name, unit, fn in rows:
        per_s, _ = rate(fn, args.seconds)
        print(f"{name:<28} {unit:<7} {per_s:>12,.0f} {per_s * 60:>12,.0f}")


if __name__ == "__main__":
    main()
