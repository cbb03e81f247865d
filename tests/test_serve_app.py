"""The service's queueing, batching and HTTP behaviour in one process: the real Batcher, app and engine loop,
with a stand-in engine whose calls take a set time (so queue-full, timeouts, disconnects and a failing
batch happen on cue). The real pipeline runs in test_batched_seed_matches_alone_in_float."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402

from serve_utils import metric_value  # noqa: E402
from xdit_fx.serve.batcher import Batcher, Job, QueueFull, run_batch_with_retry  # noqa: E402
from xdit_fx.serve.engine import BatchSpec, Capabilities, EngineDead, GenerationError, StepOutcome  # noqa: E402

CAPS = Capabilities(model_id="fake", text_arg="class_labels", sizes=(16, 16), default_size=(16, 16),
                    size_multiple=1, accepts_negative_prompt=False, default_steps=4, default_guidance=2.0,
                    video=False, labels=tuple(str(i) for i in range(10)))


# ---- the batcher alone --------------------------------------------------------------------------------

def _job(key, n=1, arrival=None):
    job = Job(key=key, n=n, payload=None)
    if arrival is not None:
        job.arrival = arrival
    return job


def test_batches_merge_same_key_in_arrival_order_up_to_max_batch():
    b = Batcher(max_batch=4, window_s=0.0, max_queue=10)
    jobs = [_job("a", 1), _job("b", 1), _job("a", 2), _job("a", 2), _job("a", 1)]
    for j in jobs:
        b.submit(j)
    first = b.next_batch(0.1)
    assert first == [jobs[0], jobs[2], jobs[4]]  # jobs[3] would make 5 > 4 images; jobs[4] fits
    assert b.next_batch(0.1) == [jobs[1]]        # the oldest remaining goes first, alone (other key)
    assert b.next_batch(0.1) == [jobs[3]]
    assert b.next_batch(0.01) == []


def test_window_waits_for_more_requests_and_a_full_batch_goes_at_once():
    b = Batcher(max_batch=2, window_s=0.3, max_queue=10)
    b.submit(_job("a"))
    threading.Timer(0.05, lambda: b.submit(_job("a"))).start()
    t0 = time.monotonic()
    batch = b.next_batch(1.0)
    assert len(batch) == 2 and time.monotonic() - t0 < 0.25  # full before the window closed
    b.submit(_job("a"))
    t0 = time.monotonic()
    assert len(b.next_batch(1.0)) == 1 and time.monotonic() - t0 >= 0.25  # alone: waited for the window


def test_queue_full_and_cancel():
    b = Batcher(max_batch=1, window_s=0.0, max_queue=2)
    j1, j2 = _job("a"), _job("a")
    b.submit(j1), b.submit(j2)
    with pytest.raises(QueueFull) as e:
        b.submit(_job("a"))
    assert e.value.retry_after_s >= 1
    assert b.cancel(j1) and j1.status == "cancelled"
    assert not b.cancel(j1)
    assert b.next_batch(0.1) == [j2]


def test_failed_batch_is_retried_request_by_request():
    jobs = [Job(key="a", n=1, payload=t) for t in ("1", "bad", "2")]
    calls = []

    def run(batch):
        calls.append([j.payload for j in batch])
        if any(j.payload == "bad" for j in batch):
            raise GenerationError("bad input", bad_input=True)
        return [[j.payload] for j in batch]

    retried = []
    run_batch_with_retry(jobs, run, on_retry=retried.append)
    assert calls == [["1", "bad", "2"], ["1"], ["bad"], ["2"]]
    assert [j.status for j in jobs] == ["done", "failed", "done"]
    assert jobs[0].result == ["1"] and isinstance(jobs[1].error, GenerationError) and len(retried) == 1


# ---- the app with a stand-in engine ---------------------------------------------------------------------

class FakeEngine:
    """Takes `delay` s per call; a batch holding prompt '9' raises like a pipeline refusing an input."""

    def __init__(self, delay: float, dead: bool = False) -> None:
        self.delay, self.dead, self.calls, self.busy_since = delay, dead, [], None

    def run(self, spec: BatchSpec, ids):
        self.calls.append(list(spec.seeds))
        time.sleep(self.delay)
        if self.dead:
            raise EngineDead("rank 1 stopped answering")
        if "9" in spec.texts:
            raise GenerationError("ValueError: nine is refused", bad_input=True)
        return [Image.new("L", (16, 16), int(t) * 20) for t in spec.texts]

    def heartbeat(self):
        pass

    def stop(self):
        pass


class AppServer:
    def __init__(self, engine, max_batch=8, window_ms=0, max_queue=16, timeout_s=30.0):
        from xdit_fx.serve.app import Limits, Service, build_app
        from xdit_fx.serve.server import engine_loop

        self.engine = engine
        self.batcher = Batcher(max_batch, window_ms / 1000, max_queue)
        self.service = Service(CAPS, self.batcher, Limits(request_timeout_s=timeout_s), 1, "")
        self.service.step_batching = getattr(engine, "stepwise", False)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(build_app(self.service), log_level="warning", lifespan="off"))
        self.http = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.http.start()
        self.stop_flag = {"signal": None}
        self.exit_code = None

        def loop():
            self.exit_code = engine_loop(engine, self.service, self.batcher, self.stop_flag, 5.0)

        self.loop = threading.Thread(target=loop, daemon=True)
        self.loop.start()
        while not self.server.started:
            time.sleep(0.01)

    def close(self):
        self.stop_flag["signal"] = 15
        self.loop.join(10)
        self.server.should_exit = True
        self.http.join(10)

    def metrics(self):
        return httpx.get(self.url + "/metrics").text


@pytest.fixture
def app_server():
    servers = []

    def make(*args, **kwargs):
        servers.append(AppServer(*args, **kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


async def _many(url, bodies, timeout=30.0, stagger=0.0):
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        tasks = []
        for b in bodies:
            tasks.append(asyncio.ensure_future(client.post("/v1/images/generations", json=b)))
            await asyncio.sleep(stagger)
        return await asyncio.gather(*tasks, return_exceptions=True)


def test_full_queue_answers_429_with_retry_after(app_server):
    srv = app_server(FakeEngine(delay=0.5), max_batch=1, max_queue=2)
    responses = asyncio.run(_many(srv.url, [{"prompt": "1", "seed": i} for i in range(6)], stagger=0.02))
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429} and codes.count(429) >= 2, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
    assert len(srv.engine.calls) == codes.count(200)  # rejected requests never ran


def test_request_timeout_answers_504_and_drops_queued_work(app_server):
    srv = app_server(FakeEngine(delay=1.0), max_batch=1, timeout_s=0.4)
    responses = asyncio.run(_many(srv.url, [{"prompt": "1", "seed": 1}, {"prompt": "2", "seed": 2}], stagger=0.05))
    assert [r.status_code for r in responses] == [504, 504]
    assert responses[0].json()["error"]["code"] == "timeout"
    time.sleep(1.2)
    assert srv.engine.calls == [[1]]  # the second request timed out in the queue and never ran


def test_client_disconnect_cancels_its_queued_request(app_server):
    srv = app_server(FakeEngine(delay=1.0), max_batch=1)

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            first = asyncio.ensure_future(client.post("/v1/images/generations", json={"prompt": "1", "seed": 1}))
            await asyncio.sleep(0.2)
            async with httpx.AsyncClient(base_url=srv.url, timeout=0.3) as impatient:
                with pytest.raises(httpx.ReadTimeout):
                    await impatient.post("/v1/images/generations", json={"prompt": "2", "seed": 2})
            return await first

    assert asyncio.run(scenario()).status_code == 200
    time.sleep(0.3)
    assert srv.engine.calls == [[1]]
    assert metric_value(srv.metrics(), "xdit_fx_requests_total", 'status="499"') == 1
    assert srv.batcher.depth() == 0


def test_a_failing_request_does_not_fail_the_batch_it_was_merged_into(app_server):
    srv = app_server(FakeEngine(delay=0.05), max_batch=8, window_ms=300)
    bodies = [{"prompt": p, "seed": i} for i, p in enumerate(["1", "9", "2", "3"])]
    responses = asyncio.run(_many(srv.url, bodies))
    assert [r.status_code for r in responses] == [200, 400, 200, 200]
    assert "nine is refused" in responses[1].json()["error"]["message"]
    assert srv.engine.calls[0] == [0, 1, 2, 3]  # merged first, then each alone
    assert sorted(srv.engine.calls[1:]) == [[0], [1], [2], [3]]
    assert metric_value(srv.metrics(), "xdit_fx_batch_retries_total") == 1


def test_dead_engine_answers_503_and_health_503(app_server):
    srv = app_server(FakeEngine(delay=0.3, dead=True), max_batch=1)
    responses = asyncio.run(_many(srv.url, [{"prompt": "1", "seed": i} for i in range(3)], stagger=0.02))
    assert [r.status_code for r in responses] == [503, 503, 503]
    assert all(r.json()["error"]["code"] == "engine_unavailable" for r in responses)
    health = httpx.get(srv.url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "dead"
    assert httpx.post(srv.url + "/v1/images/generations", json={"prompt": "1"}).status_code == 503
    srv.loop.join(5)
    assert srv.exit_code == 3


def test_health_reports_a_wedged_engine_and_draining():
    from xdit_fx.serve.app import Limits, Service

    service = Service(CAPS, Batcher(1, 0.0, 4), Limits(), 2, "cfg=2", wedged_after_s=5.0)
    assert service.health()[0] == 200
    service.busy_since = lambda: time.monotonic() - 1.0   # a call running for 1 s: fine
    assert service.health()[0] == 200
    service.busy_since = lambda: time.monotonic() - 6.0   # past wedged_after_s
    status, body = service.health()
    assert status == 503 and body["status"] == "wedged"
    service.busy_since = lambda: None
    service.draining = True
    assert service.health() == (503, {"status": "draining"})


# ---- the real pipeline: batched vs alone -----------------------------------------------------------------

def test_batched_seed_matches_alone_in_float():
    """The service gives every image its own generator, so batching changes only the float summation order
    of the batched GEMMs. Measured here (fp32, CPU, 8 images, 10 steps): worst |batched - alone| = 5.1e-7
    on [0, 1] images; the bound is 4x that."""
    import torch

    from xdit_fx.digits import load_pipeline
    from xdit_fx.serve.engine import Engine

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    engine = Engine(pipe, world_size=1, rank=0)
    texts, seeds = [str(i % 10) for i in range(8)], [100 + i for i in range(8)]

    def images(spec):
        kwargs = engine.call_kwargs(spec)
        kwargs["output_type"] = "pt"
        with torch.no_grad():
            return pipe(**kwargs).images

    batched = images(BatchSpec(texts=texts, seeds=seeds, steps=10, guidance=2.0, size=None, negative_prompt=None))
    alone = torch.cat([images(BatchSpec(texts=[t], seeds=[s], steps=10, guidance=2.0, size=None,
                                        negative_prompt=None)) for t, s in zip(texts, seeds)])
    worst = (batched - alone).abs().max().item()
    print(f"worst |batched - alone| = {worst:.2e}")
    assert worst <= 2e-6, worst


# ---- step-level batching ------------------------------------------------------------------------------------

def test_take_joinable_admits_in_order_and_stops_at_the_first_job_that_cannot_join():
    b = Batcher(max_batch=8, window_s=0.0, max_queue=10)
    jobs = [_job("a", 1), _job("a", 2), _job("b", 1), _job("a", 1)]
    for j in jobs:
        b.submit(j)
    assert b.take_joinable("a", capacity=2) == [jobs[0]]       # jobs[1] (2 images) does not fit: stop there
    assert b.take_joinable("a", capacity=4) == [jobs[1]]       # jobs[2] has another key: jobs[3] may not overtake it
    assert jobs[1].status == "running" and b.depth() == 2
    assert b.next_batch(0.1) == [jobs[2]]                      # it goes first once the running batch drained
    assert b.take_joinable("a", capacity=4) == [jobs[3]]


class FakeStepEngine:
    """Step-level stand-in: `step_s` per denoising step; a running set holding prompt '9' fails its step, and a
    request for '8' is refused when it starts (like a pipeline refusing an input)."""

    stepwise = True

    def __init__(self, step_s: float = 0.01) -> None:
        self.step_s, self.active, self.calls, self.busy_since = step_s, {}, [], None

    def step(self, admit):
        out = StepOutcome()
        for job_id, spec in admit:
            if "8" in spec.texts:
                out.refused[job_id] = GenerationError("ValueError: eight is refused", bad_input=True)
            else:
                self.active[job_id] = [spec, 0]
        if not self.active:
            return out
        self.calls.append([s.seeds[0] for s, _ in self.active.values()])
        time.sleep(self.step_s)
        out.images = sum(len(s.texts) for s, _ in self.active.values())
        if any("9" in s.texts for s, _ in self.active.values()):
            out.failed, out.error = list(self.active), GenerationError("ValueError: nine is refused", bad_input=True)
            self.active = {}
            return out
        for job_id, entry in list(self.active.items()):
            entry[1] += 1
            if entry[1] == entry[0].steps:
                out.finished[job_id] = [Image.new("L", (16, 16), int(t) * 20) for t in entry[0].texts]
                del self.active[job_id]
        return out

    def heartbeat(self):
        pass

    def stop(self):
        pass


def test_step_level_failed_step_retries_each_request_alone(app_server):
    srv = app_server(FakeStepEngine(step_s=0.02), max_batch=8)
    bodies = [{"prompt": p, "seed": i} for i, p in enumerate(["1", "9", "2", "8"])]
    blocker = {"prompt": "5", "seed": 50, "guidance_scale": 3.0, "num_inference_steps": 40}

    async def scenario():  # the four queue behind a running request they cannot join, then start together
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            first = asyncio.ensure_future(client.post("/v1/images/generations", json=blocker))
            while not srv.engine.active:
                await asyncio.sleep(0.005)
            responses = await asyncio.gather(*(client.post("/v1/images/generations", json=b) for b in bodies))
            return await first, responses

    first, responses = asyncio.run(scenario())
    assert first.status_code == 200
    assert [r.status_code for r in responses] == [200, 400, 200, 400]
    assert "nine is refused" in responses[1].json()["error"]["message"]
    assert "eight is refused" in responses[3].json()["error"]["message"]  # refused alone at its start
    calls = [c for c in srv.engine.calls if c != [50]]
    assert calls[0] == [0, 1, 2]                      # merged; its first step fails
    assert sorted(c[0] for c in calls[1:]) == [0] * 4 + [1] + [2] * 4  # then each alone: 4 steps, 1 failed step
    assert all(len(c) == 1 for c in calls[1:])        # nothing joins a request retried alone
    assert metric_value(srv.metrics(), "xdit_fx_batch_retries_total") == 1
    assert [int(r.headers["x-batch-images"]) for r in (responses[0], responses[2])] == [1, 1]


def test_assign_replicas_balances_running_images_in_admission_order():
    from xdit_fx.serve.engine import assign_replicas

    loads = [0, 0]
    assert assign_replicas(loads, [1]) == [0]              # alone: replica 0
    assert assign_replicas(loads, [1, 1, 2]) == [1, 0, 1]  # each joins the least loaded; ties go to the lowest
    assert loads == [2, 3]
    assert assign_replicas([4, 1, 1], [3, 1]) == [1, 2]


def test_replica_count_only_for_a_dp_only_plan():
    from types import SimpleNamespace

    from xdit_fx.plan import Plan
    from xdit_fx.serve.engine import replica_count

    def pipe(text):
        return SimpleNamespace(plan=Plan.from_string(text))

    assert replica_count(pipe("dp=2"), 2) == 2
    assert replica_count(pipe("cfg=2"), 2) == 1            # cfg shares each call over its ranks
    assert replica_count(pipe("dp=2,ulysses=2"), 4) == 1
    assert replica_count(SimpleNamespace(), 1) == 1        # one rank, no plan


def test_listen_socket_connections_have_tcp_nodelay():
    """Without TCP_NODELAY each answer waited ~40 ms for the client's delayed ACK (uvicorn writes the headers
    and the body separately)."""
    from xdit_fx.serve.server import listen_socket

    sock = listen_socket("127.0.0.1", 0)
    seen = {}

    async def scenario():
        def connected(reader, writer):
            seen["nodelay"] = writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            writer.close()

        server = await asyncio.start_server(connected, sock=sock)
        async with server:
            reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            await reader.read()
            writer.close()

    asyncio.run(scenario())
    assert seen["nodelay"] != 0


@pytest.mark.parametrize("replicas", [1, 2])
def test_step_level_max_batch_bounds_each_replica(app_server, replicas):
    """--max-batch 1: one rank runs one request at a time; two dp replicas run two."""
    engine = FakeStepEngine(step_s=0.02)
    engine.replicas = replicas
    srv = app_server(engine, max_batch=1)

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            first = asyncio.ensure_future(client.post("/v1/images/generations",
                                                      json={"prompt": "1", "seed": 1, "num_inference_steps": 10}))
            while not engine.active:
                await asyncio.sleep(0.005)
            second = await client.post("/v1/images/generations", json={"prompt": "2", "seed": 2})
            return await first, second

    first, second = asyncio.run(scenario())
    assert first.status_code == second.status_code == 200
    assert ([1, 2] in engine.calls) == (replicas == 2)
    assert max(len(c) for c in engine.calls) == replicas


def test_next_batch_window_override():
    b = Batcher(max_batch=8, window_s=5.0, max_queue=10)
    jobs = [_job("a"), _job("a"), _job("b")]
    for j in jobs:
        b.submit(j)
    t0 = time.monotonic()
    assert b.next_batch(1.0, window_s=0.0) == jobs[:2]   # what is queued and compatible, without the window
    assert time.monotonic() - t0 < 1.0


def test_step_level_idle_engine_starts_a_request_at_once_and_the_next_joins_at_a_step(app_server):
    """Under step-level batching the batch window is not waited for: a request that finds the engine idle
    starts at once, and one arriving just after joins the running set at the next step boundary."""
    srv = app_server(FakeStepEngine(step_s=0.02), max_batch=8, window_ms=3000)

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            t0 = time.monotonic()
            first = asyncio.ensure_future(client.post("/v1/images/generations",
                                                      json={"prompt": "1", "seed": 1, "num_inference_steps": 20}))
            while not srv.engine.active:
                await asyncio.sleep(0.005)
            second = await client.post("/v1/images/generations", json={"prompt": "2", "seed": 2})
            return await first, second, time.monotonic() - t0

    first, second, took = asyncio.run(scenario())
    assert first.status_code == second.status_code == 200
    assert took < 2.5, took                               # neither waited for the 3 s window
    calls = srv.engine.calls
    assert calls[0] == [1]                                 # the first started alone
    assert [1, 2] in calls                                 # the second joined it at a step boundary
    assert second.headers["x-batch-images"] == "2"


def test_step_level_request_joins_at_the_next_step_and_leaves_when_its_steps_end(app_server):
    srv = app_server(FakeStepEngine(step_s=0.02), max_batch=8)

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            long = asyncio.ensure_future(client.post("/v1/images/generations",
                                                     json={"prompt": "1", "seed": 1, "num_inference_steps": 40}))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            short = await client.post("/v1/images/generations", json={"prompt": "2", "seed": 2,
                                                                      "num_inference_steps": 4})
            took, long_done = time.monotonic() - t0, long.done()
            return await long, short, took, long_done

    long, short, took, long_done = asyncio.run(scenario())
    assert long.status_code == short.status_code == 200
    assert took < 0.5 and not long_done                # it did not wait for the 40-step request
    assert short.headers["x-batch-images"] == long.headers["x-batch-images"] == "2"
    joined = [c for c in srv.engine.calls if len(c) == 2]
    assert len(joined) == 4 and srv.engine.calls[0] == [1]  # 4 shared steps, then the long one went on alone


def _digits_engine():
    from xdit_fx.digits import load_pipeline
    from xdit_fx.serve.engine import Engine

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    engine = Engine(pipe, world_size=1, rank=0)
    assert engine.stepwise
    return pipe, engine


def test_step_level_joins_match_solo_in_float():
    """Requests that join a running set at different steps, with other step counts and n, give the images
    they give alone (the pipeline's own __call__) up to batched-GEMM reassociation: measured 4.2e-7 on [0, 1]
    (fp32, CPU); the bound is the one of test_batched_seed_matches_alone_in_float."""
    import torch

    pipe, engine = _digits_engine()
    engine.output_type = "pt"

    def spec(texts, seeds, steps):
        return BatchSpec(texts=texts, seeds=seeds, steps=steps, guidance=2.0, size=None, negative_prompt=None)

    specs = {1: spec(["3"], [100], 12), 2: spec(["seven"], [101], 6), 3: spec(["1", "4"], [102, 103], 8)}
    joins = {0: 1, 4: 2, 5: 3}                      # step boundary -> the request joining there
    outputs, order, images = {}, [], []
    for boundary in range(40):
        admit = [(joins[boundary], specs[joins[boundary]])] if boundary in joins else []
        outcome = engine.step(admit)
        images.append(outcome.images)
        for job_id, items in outcome.finished.items():
            outputs[job_id] = torch.stack(items)
            order.append(job_id)
        if not engine._active and boundary > 5:
            break
    assert images[:7] == [1, 1, 1, 1, 2, 4, 4]      # each joined at its boundary
    assert order == [2, 1, 3]                       # and left when its own steps ended
    worst = 0.0
    for job_id, s in specs.items():
        kwargs = engine.call_kwargs(s)
        kwargs["output_type"] = "pt"
        alone = pipe(**kwargs).images
        worst = max(worst, (outputs[job_id] - alone).abs().max().item())
    print(f"worst |joined - alone| = {worst:.2e}")
    assert worst <= 2e-6, worst


def test_request_arriving_mid_batch_joins_and_matches_its_solo_image(app_server):
    """Over HTTP with the real digits pipeline: a request sent while a 60-step one runs joins it at a step
    boundary, is answered before it, and its PNG equals the one it gets alone within one 8-bit level."""
    import numpy as np

    from serve_utils import decode_png

    _, engine = _digits_engine()
    srv = app_server(engine, max_batch=8)

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            first = asyncio.ensure_future(client.post("/v1/images/generations",
                                                      json={"prompt": "5", "seed": 7, "num_inference_steps": 60}))
            while not engine._active or engine._active[0][1].step < 3:  # the first request is mid-batch
                await asyncio.sleep(0.005)
            second = await client.post("/v1/images/generations",
                                       json={"prompt": "2", "seed": 8, "num_inference_steps": 10})
            return await first, second

    first, second = asyncio.run(scenario())
    assert first.status_code == second.status_code == 200
    assert second.headers["x-batch-images"] == first.headers["x-batch-images"] == "2"
    for body, joined in (({"prompt": "2", "seed": 8, "num_inference_steps": 10}, second),
                         ({"prompt": "5", "seed": 7, "num_inference_steps": 60}, first)):
        alone = httpx.post(srv.url + "/v1/images/generations", json=body, timeout=120)
        assert alone.headers["x-batch-images"] == "1"
        a, b = (decode_png(r.json()["data"][0]["b64_json"]).astype(int) for r in (alone, joined))
        assert np.abs(a - b).max() <= 1


def test_encode_mp4_decodes_to_its_frames():
    av = pytest.importorskip("av")
    from xdit_fx.serve.app import encode_mp4

    for size in ((32, 32), (17, 9)):
        frames = [Image.new("RGB", size, (i * 40, 100, 200 - i * 30)) for i in range(5)]
        with av.open(io.BytesIO(encode_mp4(frames))) as container:
            decoded = list(container.decode(video=0))
            assert container.streams.video[0].codec_context.name == "h264"
        assert len(decoded) == 5
        assert (decoded[0].width, decoded[0].height) == (size[0] + size[0] % 2, size[1] + size[1] % 2)


# ---- the command's checks, before any process starts ------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--plan", "cfg=2", "--nproc", "3"], "world_size(3)"),
    (["--plan", "ulysses=two"], "ulysses"),
    (["--model", "/nonexistent/folder"], "not a diffusers pipeline folder"),
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--size", "big"], "--size must be WIDTHxHEIGHT"),
    (["--nnodes", "2", "--nproc", "1", "--plan", "cfg=2"], "--rdzv-endpoint"),
    (["--request-timeout", "0"], "--request-timeout"),
])
def test_serve_refuses_bad_flags_before_starting(args, message, capsys):
    from xdit_fx.cli import main

    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert "xdit-fx serve: error:" in err and message in err, err


def test_serve_refuses_a_port_in_use(capsys):
    from xdit_fx.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", "--port", str(s.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
