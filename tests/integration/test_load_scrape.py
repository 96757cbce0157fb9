"""Scraping real `arks sim` processes: simulated load -> EngineLoad -> weights; a dead engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import pytest

from arks.adapters.scrape import Scraper, scrape
from arks.engine_metrics import EngineLoad, Observation, ScrapeFailure
from controller.load.weights import WeightSettings, WeightTracker
from launcher.procs import Child, Supervisor, free_port, wait_http

MODEL = "m1"


@dataclass
class Sim:
    name: str
    port: int
    style: str
    child: Child

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_load(self, **load: float) -> None:
        resp = httpx.put(f"{self.url}/sim/load", json=load, timeout=5.0)
        assert resp.status_code == 200, resp.text


def start_sim(sup: Supervisor, name: str, style: str, port: int | None = None) -> Sim:
    port = port or free_port()
    child = sup.python(
        name, "launcher.sim", "--port", str(port), "--model", MODEL, "--name", name,
        "--metrics-style", style,
    )  # fmt: skip
    wait_http(child, f"http://127.0.0.1:{port}/health")
    return Sim(name, port, style, child)


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[tuple[Supervisor, dict[str, Sim]]]:
    with Supervisor(log_dir=tmp_path) as sup:
        started = {
            name: start_sim(sup, name, style)
            for name, style in (("a", "vllm"), ("b", "vllm"), ("c", "sglang"))
        }
        yield sup, started


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def targets(sims: dict[str, Sim]) -> dict[str, str]:
    return {name: f"{sim.url}/metrics" for name, sim in sims.items()}


async def test_engine_load_reflects_simulated_load(
    sims: tuple[Supervisor, dict[str, Sim]], session: aiohttp.ClientSession
) -> None:
    _, running = sims
    running["a"].set_load(waiting=12, running=3, kv_cache_usage=0.7)
    running["c"].set_load(waiting=5, running=9, kv_cache_usage=0.25)
    scraper: Scraper[str] = Scraper(session, targets(running), timeout_s=2.0)
    observed = await scraper.scrape_once()
    a, b, c = observed["a"], observed["b"], observed["c"]
    assert isinstance(a, EngineLoad) and isinstance(b, EngineLoad) and isinstance(c, EngineLoad)
    assert (a.runtime, a.waiting, a.running) == ("vllm", 12, 3)
    assert a.kv_cache_usage == pytest.approx(0.7)
    assert (b.runtime, b.waiting, b.running, b.kv_cache_usage) == ("vllm", 0, 0, 0)
    assert (c.runtime, c.waiting, c.running) == ("sglang", 5, 9)
    assert c.kv_cache_usage == pytest.approx(0.25)
    assert a.requests_total == 0 and c.requests_total == 0
    states = scraper.states()
    assert all(s.consecutive_failures == 0 and s.last_success is not None for s in states.values())
    assert states["a"].load == a


async def test_raising_one_queue_shifts_weight_away(
    sims: tuple[Supervisor, dict[str, Sim]], session: aiohttp.ClientSession
) -> None:
    _, running = sims
    for sim in running.values():
        sim.set_load(waiting=2, running=4, kv_cache_usage=0.3)
    scraper: Scraper[str] = Scraper(session, targets(running), timeout_s=2.0)
    tracker: WeightTracker[str] = WeightTracker()
    for _ in range(15):
        weights = tracker.update(await scraper.scrape_once())
    assert weights == {"a": 100, "b": 100, "c": 100}  # same load, vLLM- or SGLang-named
    running["b"].set_load(waiting=12, running=4, kv_cache_usage=0.3)
    for _ in range(15):
        weights = tracker.update(await scraper.scrape_once())
    assert weights["a"] == weights["c"] == 100
    assert weights["b"] < 50


async def test_killed_sim_becomes_failures_then_drained_then_returns(
    sims: tuple[Supervisor, dict[str, Sim]], session: aiohttp.ClientSession
) -> None:
    sup, running = sims
    settings = WeightSettings(failures_to_drain=3, recovery_steps=4)
    scraper: Scraper[str] = Scraper(session, targets(running), timeout_s=1.0)
    tracker: WeightTracker[str] = WeightTracker(settings)
    for _ in range(3):
        tracker.update(await scraper.scrape_once())
    before = scraper.states()["b"]
    running["b"].child.stop()
    rounds: list[dict[str, Observation]] = []
    weights: list[dict[str, int]] = []
    for _ in range(3):
        rounds.append(await scraper.scrape_once())
        weights.append(tracker.update(rounds[-1]))
    assert all(isinstance(r["b"], ScrapeFailure) for r in rounds)
    assert all(isinstance(r["a"], EngineLoad) for r in rounds)
    assert [w["b"] > 0 for w in weights] == [True, True, False]  # drained on the 3rd failure
    assert weights[-1]["a"] == weights[-1]["c"] == 100
    state = scraper.states()["b"]
    assert state.consecutive_failures == 3
    assert state.last_success == before.last_success  # the last good scrape is kept ...
    assert state.load == before.load  # ... with its load

    # the engine comes back on the same port: weight returns over recovery_steps rounds
    running["b"] = start_sim(sup, "b2", "vllm", port=running["b"].port)
    ramp = [tracker.update(await scraper.scrape_once())["b"] for _ in range(5)]
    assert ramp[0] == 25 and ramp[-1] == 100 and ramp == sorted(ramp), ramp
    assert scraper.states()["b"].consecutive_failures == 0


async def test_all_engines_down_all_drained(
    sims: tuple[Supervisor, dict[str, Sim]], session: aiohttp.ClientSession
) -> None:
    sup, running = sims
    scraper: Scraper[str] = Scraper(session, targets(running), timeout_s=1.0)
    tracker: WeightTracker[str] = WeightTracker(WeightSettings(failures_to_drain=2))
    tracker.update(await scraper.scrape_once())
    sup.close()
    for _ in range(2):
        weights = tracker.update(await scraper.scrape_once())
    assert weights == {"a": 0, "b": 0, "c": 0}


async def test_scrape_reports_failures_as_data(session: aiohttp.ClientSession) -> None:
    refused = await scrape(session, f"http://127.0.0.1:{free_port()}/metrics", 1.0)
    assert not refused.ok and refused.error and refused.text is None

    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await done.wait()  # accepts, never answers
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        hung = await scrape(session, f"http://127.0.0.1:{port}/metrics", 0.2)
    finally:
        done.set()
        server.close()
    assert not hung.ok and hung.error == "timed out after 0.2s"
    assert 0.2 <= hung.elapsed_s < 2.0

    bad = await scrape(session, "not a url", 1.0)
    assert not bad.ok and bad.error


async def test_scrape_non_200_and_garbage_are_failures(
    sims: tuple[Supervisor, dict[str, Sim]], session: aiohttp.ClientSession
) -> None:
    _, running = sims
    missing = await scrape(session, f"{running['a'].url}/nope", 2.0)
    assert (missing.ok, missing.status, missing.error) == (False, 404, "HTTP 404")
    # /v1/models answers 200 with JSON: not an exposition, so the scraper sees a failure
    scraper: Scraper[str] = Scraper(session, {"json": f"{running['a'].url}/v1/models"})
    observed = (await scraper.scrape_once())["json"]
    assert isinstance(observed, ScrapeFailure) and "bad exposition" in observed.reason


async def test_run_loop_survives_failures_and_a_failing_listener(
    sims: tuple[Supervisor, dict[str, Sim]], session: aiohttp.ClientSession
) -> None:
    _, running = sims
    seen: list[dict[str, Observation]] = []

    def listener(round_: Mapping[str, Observation]) -> None:
        seen.append(dict(round_))
        if len(seen) == 2:
            raise RuntimeError("listener bug")

    dead = f"http://127.0.0.1:{free_port()}/metrics"
    scraper: Scraper[str] = Scraper(
        session, {"a": f"{running['a'].url}/metrics", "dead": dead}, interval_s=0.05,
        timeout_s=0.5, listener=listener,
    )  # fmt: skip
    task = asyncio.create_task(scraper.run())
    try:
        while len(seen) < 5:
            await asyncio.sleep(0.02)
            assert not task.done(), task
        scraper.set_targets({"a": f"{running['a'].url}/metrics"})  # the next round drops "dead"
        count = len(seen)
        while len(seen) < count + 2:
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert all(isinstance(r["a"], EngineLoad) for r in seen)
    assert all(isinstance(r["dead"], ScrapeFailure) for r in seen[:5])
    assert set(seen[-1]) == {"a"}
    assert scraper.states()["a"].consecutive_failures == 0
