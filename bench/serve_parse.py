#!/usr/bin/env python3
"""The cost of trainyard's request checks: reading an inference body, side by side with the
least any server does with it.

For bodies of N rows of 30 numbers (the MLP's input), flat and nested, over the OIP route
(``parse_json`` + ``oip_to_raw``: UTF-8 and JSON checked, every value a number, within its
datatype's range, filling the shape) and the plain JSON route (``raw_from_json``), against
the baseline ``np.asarray(json.loads(body)[...], dtype=float32)``, which refuses nothing (it
takes "1" and true as numbers). CPU time of this process (``time.process_time``), the best
of ``--repeat`` runs, so other load on a shared machine moves the figures less.

    .venv/bin/python bench/serve_parse.py [--rows 4,1024,8192] [--repeat 7]

Prints ms per body for each and the ratio trainyard / baseline.
"""

import argparse
import json
import time
import timeit

import numpy as np

from trainyard.serve.protocol import ModelSignature, oip_to_raw, parse_json, raw_from_json


def best_ms(func, repeat: int, budget_s: float = 0.3) -> float:
    timer = timeit.Timer(func, timer=time.process_time)
    number, _ = timer.autorange()
    number = max(1, int(number * budget_s / 0.2))
    return min(timer.repeat(number=number, repeat=repeat)) / number * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="4,1024,8192")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    sig = ModelSignature("tabular", [30], "classification", ["a", "b"])
    rng = np.random.default_rng(0)
    print(f"{'body':<26}{'size':>9}{'baseline ms':>13}{'trainyard ms':>14}{'ratio':>8}")
    for n in (int(r) for r in args.rows.split(",")):
        x = rng.normal(size=(n, 30)).astype(np.float32)
        cases = []
        for nested in (False, True):
            data = x.tolist() if nested else x.reshape(-1).tolist()
            raw = json.dumps({"inputs": [{"name": "input-0", "shape": [n, 30], "datatype": "FP32",
                                          "data": data}]}).encode()
            cases.append((f"infer {n}x30 {'nested' if nested else 'flat'}", raw,
                          lambda raw=raw: np.asarray(json.loads(raw)["inputs"][0]["data"], dtype=np.float32),
                          lambda raw=raw: oip_to_raw(parse_json(raw), sig, 10**6)))
        raw = json.dumps({"inputs": x.tolist()}).encode()
        cases.append((f"predict {n}x30", raw, lambda raw=raw: np.asarray(json.loads(raw)["inputs"], dtype=np.float32),
                      lambda raw=raw: raw_from_json(parse_json(raw), sig, 10**6)))
        for label, raw, baseline, ours in cases:
            assert np.allclose(np.asarray(baseline()).reshape(n, 30), ours())
            base, mine = best_ms(baseline, args.repeat), best_ms(ours, args.repeat)
            print(f"{label:<26}{len(raw) / 1e6:>7.2f}MB{base:>13.3f}{mine:>14.3f}{mine / base:>8.2f}")


if __name__ == "__main__":
    main()
