"""The replica's batcher (trainyard.serve.app.Batcher): pure asyncio, no Ray."""

import asyncio
import time

import pytest

from trainyard.serve.app import Batcher
from trainyard.serve.protocol import RequestError


class Model:
    """A forward pass that takes ``seconds`` and answers each input doubled; records the
    batches it ran."""

    def __init__(self, seconds: float = 0.0, fail: set | None = None):
        self.seconds, self.fail = seconds, fail or set()
        self.batches: list[list] = []

    async def __call__(self, inputs: list) -> list:
        self.batches.append(list(inputs))
        if self.seconds:
            await asyncio.sleep(self.seconds)
        if self.fail & set(inputs):
            raise RuntimeError("the model broke")
        return [RequestError("bad input", 422) if x < 0 else x * 2 for x in inputs]


class Recorder:
    """Takes each pass's report, as BatchMetrics does."""

    def __init__(self):
        self.passes = []

    def observe(self, size, wait_ms, run_ms, queued):
        self.passes.append((size, wait_ms, run_ms, queued))


def run(coro):
    return asyncio.run(coro)


def test_a_lone_request_runs_at_once_without_waiting_for_company():
    async def main():
        model = Model()
        batcher = Batcher(model, max_batch_size=32, wait_s=0.0)
        started = time.perf_counter()
        assert await batcher.submit(3) == 6
        return time.perf_counter() - started, model.batches

    elapsed, batches = run(main())
    assert batches == [[3]]
    assert elapsed < 0.05


def test_requests_arriving_during_a_pass_share_the_next_one_up_to_the_batch_size():
    async def main():
        model = Model(seconds=0.05)
        recorder = Recorder()
        batcher = Batcher(model, max_batch_size=8, wait_s=0.0, metrics=recorder)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)  # the first pass is running
        later = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 12)]
        answers = await asyncio.gather(first, *later)
        return answers, model.batches, batcher, recorder

    answers, batches, batcher, recorder = run(main())
    assert answers == [i * 2 for i in range(12)]
    # The first alone; the 11 that came while it ran in two passes of at most 8, in order.
    assert batches == [[0], list(range(1, 9)), [9, 10, 11]]
    passes = [size for size, *_ in recorder.passes]
    assert (len(passes), sum(passes)) == (3, 12)
    assert batcher.task is None and not batcher.queue


def test_with_a_wait_a_pass_waits_for_company_but_not_past_the_wait_nor_when_full():
    async def main(wait_s: float, max_batch_size: int, gap_s: float, count: int):
        model = Model()
        batcher = Batcher(model, max_batch_size=max_batch_size, wait_s=wait_s)
        started = time.perf_counter()
        futures = []
        for i in range(count):
            futures.append(asyncio.ensure_future(batcher.submit(i)))
            await asyncio.sleep(gap_s)
        await asyncio.gather(*futures)
        return model.batches, time.perf_counter() - started

    batches, _ = run(main(wait_s=0.5, max_batch_size=8, gap_s=0.02, count=3))
    assert batches == [[0, 1, 2]]  # 40 ms apart, all within the wait
    batches, _ = run(main(wait_s=0.0, max_batch_size=8, gap_s=0.02, count=3))
    assert batches == [[0], [1], [2]]  # no wait: each ran as it came
    batches, elapsed = run(main(wait_s=10.0, max_batch_size=4, gap_s=0.0, count=4))
    assert batches == [[0, 1, 2, 3]] and elapsed < 5  # a full batch does not wait
    batches, elapsed = run(main(wait_s=0.1, max_batch_size=8, gap_s=0.0, count=2))
    assert batches == [[0, 1]] and 0.08 < elapsed < 5  # waited out its 100 ms, no more


def test_a_request_error_answers_its_own_request_and_a_broken_pass_each_of_its_requests():
    async def main():
        model = Model(seconds=0.02, fail={99})
        batcher = Batcher(model, max_batch_size=8)
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.005)
        same = [asyncio.ensure_future(batcher.submit(x)) for x in (2, -1, 99)]
        results = await asyncio.gather(first, *same, return_exceptions=True)
        after = await batcher.submit(5)  # the batcher goes on after a broken pass
        return results, after

    results, after = run(main())
    assert results[0] == 2
    assert all(isinstance(r, RuntimeError) and "broke" in str(r) for r in results[1:])
    assert after == 10

    async def request_error():
        batcher = Batcher(Model(seconds=0.02), max_batch_size=8)
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.005)
        return await asyncio.gather(first, batcher.submit(-1), batcher.submit(4))

    one, bad, four = run(request_error())
    assert (one, four) == (2, 8)
    assert isinstance(bad, RequestError) and bad.status == 422  # a result, not raised


def test_a_request_cancelled_in_its_pass_leaves_the_others_answered():
    async def main():
        model = Model(seconds=0.05)
        batcher = Batcher(model, max_batch_size=8)
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher.submit(2))
        kept = asyncio.ensure_future(batcher.submit(3))
        await asyncio.sleep(0.06)  # both are in the second pass now
        gone.cancel()
        answers = await asyncio.gather(first, kept)
        # A request cancelled before its pass starts is left out of it.
        blocker = asyncio.ensure_future(batcher.submit(4))
        await asyncio.sleep(0.01)
        dropped = asyncio.ensure_future(batcher.submit(5))
        await asyncio.sleep(0)
        dropped.cancel()
        assert await batcher.submit(6) == 12
        await blocker
        return answers, model.batches, gone.cancelled()

    answers, batches, cancelled = run(main())
    assert answers == [2, 6] and cancelled
    assert [2, 3] in batches and 5 not in [x for b in batches for x in b]


@pytest.mark.parametrize("size", [0, -3])
def test_a_batch_size_below_one_runs_requests_one_at_a_time(size):
    async def main():
        model = Model(seconds=0.02)
        batcher = Batcher(model, max_batch_size=size)
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.005)
        await asyncio.gather(first, batcher.submit(2), batcher.submit(3))
        return model.batches

    assert run(main()) == [[1], [2], [3]]


def test_each_pass_is_reported_with_its_size_wait_time_and_what_is_left_queued():
    async def main():
        recorder = Recorder()
        batcher = Batcher(Model(seconds=0.05), max_batch_size=4, metrics=recorder)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)
        await asyncio.gather(first, *(batcher.submit(i) for i in range(1, 7)))
        return recorder.passes

    passes = run(main())
    # Queued: the requests waiting as each pass ended (all 6 came during the first).
    assert [(size, queued) for size, _, _, queued in passes] == [(1, 6), (4, 2), (2, 0)]
    first, second, third = passes
    assert first[1] < 20 and first[2] >= 45  # ran at once; the pass took its 50 ms
    assert second[1] >= 30  # queued during the first pass (40 ms of its 50)
    assert third[1] >= second[1] + 40  # and waited a pass longer


def test_a_wait_is_skipped_when_no_other_request_is_on_its_way():
    async def main(in_flight):
        model = Model()
        batcher = Batcher(model, max_batch_size=8, wait_s=5.0, in_flight=in_flight)
        started = time.perf_counter()
        assert await batcher.submit(1) == 2
        return time.perf_counter() - started

    # Only the queued request in the replica: it runs at once despite the 5 s wait.
    assert run(main(lambda: 1)) < 1
    # Another on its way: the pass waits for it (here in vain, out to the wait).
    async def company():
        batcher = Batcher(Model(), max_batch_size=8, wait_s=0.2, in_flight=lambda: 2)
        started = time.perf_counter()
        await batcher.submit(1)
        return time.perf_counter() - started

    assert run(company()) >= 0.18
