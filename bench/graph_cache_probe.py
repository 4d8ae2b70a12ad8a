"""Does MLX's CUDA graph cache refuse new graphs once a process has met many (session 43)?

MLX's CUDA CommandEncoder keeps its instantiated graphs in an LRU cache keyed by the graph's shape (node
types and dependencies, not sizes), ``MLX_CUDA_GRAPH_CACHE_SIZE`` entries (default 400). In MLX's source
(lru_cache.h) each new key counts a miss, the count never falls, and past twice the size every new key
raises "Cache thrashing is happening" (``MLX_ENABLE_CACHE_THRASHING_CHECK=0`` turns the check off). A long
test process meets many graph shapes; session 43's parity run lost a process to an abort after 133 tests.

This evaluates graphs of distinct shapes one after another (``m`` independent chains of ``n`` additions)
and prints one JSON line: how many distinct shapes it evaluated, and the first error (its text and at
which shape), or none.

    python3 bench/graph_cache_probe.py [MAX_SHAPES]     (default 1200)
"""
import json
import sys

import mlx.core as mx


def main() -> None:
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 1200
    x = mx.ones((8,))
    mx.eval(x)
    done, error = 0, None
    for m in range(1, 41):
        for n in range(1, 41):
            if done >= limit:
                break
            outs = []
            for j in range(m):
                y = x + j
                for _ in range(n - 1):
                    y = y + 1
                outs.append(y)
            try:
                mx.eval(outs)
            except Exception as e:  # noqa: BLE001 - what MLX raises is the finding
                error = {"at": done + 1, "m": m, "n": n, "type": type(e).__name__, "text": str(e)[:300]}
                break
            done += 1
        if error or done >= limit:
            break
    print(json.dumps({"device": str(mx.default_device()), "mlx": mx.__version__, "shapes": done, "error": error}))


if __name__ == "__main__":
    main()
