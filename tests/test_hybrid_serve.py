"""Hybrid end to end: a real exported model on the device, a real ``edgelm serve`` on loopback as the cloud.

local = stories260K int8, "cloud" = stories260K fp32 behind ``edgelm.server.BackgroundServer``. Greedy
decoding makes the cloud's answers checkable: they must equal what the fp32 model produces when run here.
"""
from __future__ import annotations

import pytest

pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import edgelm  # noqa: E402
from edgelm.cloud import CloudClient  # noqa: E402
from edgelm.hybrid import Hybrid, Router, Rule  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["Once upon a time, there was a little girl named Lily.", "Tom had a red ball.",
           "The sun was hot and the dog was thirsty.", "One day, a big bear found a tiny box in the woods.",
           "Mom said", "Sara and Ben went to the park to play with their kite."]
KEY = "sk-serve-SECRET-555"
GREEDY = dict(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def pair(stories_int8, stories_fp32):
    from edgelm.server import BackgroundServer
    local = edgelm.load(stories_int8, threads=1)
    big = edgelm.load(stories_fp32, threads=1)
    with BackgroundServer(big, api_key=KEY, workers=1) as srv:
        yield local, big, srv


def test_cloud_answers_come_from_the_served_model(pair):
    local, big, srv = pair
    cloud = CloudClient(srv.url + "/v1", api_key=KEY, timeout=30)
    hy = Hybrid(local, cloud, cloud_endpoint="completions")
    r = hy.generate(PROMPTS[0], prefer="cloud", **GREEDY)
    assert r.source == "cloud" and r.text == big.generate(PROMPTS[0], **GREEDY).text
    s = hy.stream(PROMPTS[1], prefer="cloud", **GREEDY)
    assert "".join(s) == big.generate(PROMPTS[1], **GREEDY).text and s.result.source == "cloud"
    chat = [{"role": "user", "content": "Tell me about a cat."}]
    rc = hy.chat(chat, prefer="cloud", **GREEDY)
    assert rc.source == "cloud" and rc.text == big.chat(chat, **GREEDY).text
    local_r = hy.generate(PROMPTS[0], **GREEDY)
    assert local_r.source == "local" and local_r.text == local.generate(PROMPTS[0], **GREEDY).text


def test_calibrated_cascade_routes_the_least_confident_share(pair):
    local, big, srv = pair
    cloud = CloudClient(srv.url + "/v1", api_key=KEY, timeout=30)
    router = Router(max_prompt_nats=None)  # the cascade alone
    hy = Hybrid(local, cloud, router, cloud_endpoint="completions")
    report = router.calibrate(PROMPTS, target_cloud_share=0.5, **GREEDY)
    assert report.cloud_share == pytest.approx(0.5) and report.counts == {"uncertainty": 6}
    conf = {p: local.generate(p, **GREEDY).mean_logprob for p in PROMPTS}
    results = {p: hy.generate(p, **GREEDY) for p in PROMPTS}
    to_cloud = sorted(p for p, r in results.items() if r.source == "cloud")
    assert to_cloud == sorted(sorted(PROMPTS, key=conf.get)[:3])  # the three least confident
    for p, r in results.items():
        assert r.value == pytest.approx(conf[p], abs=1e-5) and r.fallback is None
        expected = big.generate(p, **GREEDY).text if r.source == "cloud" else local.generate(p, **GREEDY).text
        assert r.text == expected


def test_wrong_key_is_a_fallback_not_a_retry_and_never_echoed(pair):
    local, big, srv = pair
    cloud = CloudClient(srv.url + "/v1", api_key="sk-WRONG-key-123", timeout=30, backoff=0.01)
    hy = Hybrid(local, cloud, Router(rules=[Rule("cloud", keywords=["bear"])]), cloud_endpoint="completions")
    r = hy.generate(PROMPTS[3], **GREEDY)
    assert (r.source, r.signal) == ("local", "rule")
    assert r.fallback.startswith("cloud HTTP 401") and "sk-WRONG-key-123" not in r.fallback
    assert r.text == local.generate(PROMPTS[3], **GREEDY).text


def test_stopped_server_falls_back_to_local(stories_int8, stories_fp32):
    from edgelm.server import BackgroundServer
    local = edgelm.load(stories_int8, threads=1)
    with BackgroundServer(edgelm.load(stories_fp32, threads=1), workers=1) as srv:
        url = srv.url + "/v1"
    hy = Hybrid(local, CloudClient(url, timeout=3, max_retries=1, backoff=0.01))
    r = hy.generate(PROMPTS[4], prefer="cloud", **GREEDY)
    assert r.source == "local" and r.fallback.startswith("cloud unreachable")
