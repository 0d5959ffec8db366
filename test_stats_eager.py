"""Eager stats collection against the real Docker Engine.

By default (``ECS_LOCAL_STATS=eager``) the server starts a stats collector for
every running container it sees, at start-up and when Docker reports a start,
and stops it when the container stops. So the first stats request for a
container is answered from samples taken *before* it was made: the ``read``
time of the answer predates the request, and ``precpu_stats`` is a real
sample. ``ECS_LOCAL_STATS=on-demand`` starts a collector only on the first
request, whose sample is then taken after the request was sent.

``/health`` reports ``statsCollectors`` (running collectors) and ``statsReady``
(collectors holding two real samples); the tests count them before and after,
since other running containers of the shared engine get collectors too, and read
the count only once the server has a collector for every one of them (a
contributor's engine may already run a hundred, whose collectors take a while to start).
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timezone

from testlib import wait_for

COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
SLEEP = ("sleep", "3600")


def get_json(server, path: str) -> dict:
    status, _, body = server.get(path)
    assert status == 200, f"GET {path}: {status} {body[:500]!r}"
    return json.loads(body)


def health(server) -> dict:
    return get_json(server, "/health")


def docker_time(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text)


def assert_two_real_samples(stats: dict, container_id: str) -> None:
    assert stats["id"] == container_id
    assert stats["cpu_stats"]["cpu_usage"]["total_usage"] > 0
    assert stats["precpu_stats"]["cpu_usage"]["total_usage"] > 0
    assert stats["precpu_stats"]["system_cpu_usage"] > 0
    assert docker_time(stats["preread"]) < docker_time(stats["read"])


def run_project(containers, image: str, count: int) -> tuple[list[str], list[str]]:
    """count sleeping containers labelled as one compose project: (names, ids)."""
    project = f"le-eager-{secrets.token_hex(3)}"
    names = [f"{project}-app{i}-1" for i in range(count)]
    ids = [containers.run("--name", name, "--label", f"{COMPOSE_PROJECT}={project}",
                          "--label", f"{COMPOSE_SERVICE}=app{i}", "--init", image, *SLEEP)
           for i, name in enumerate(names)]
    return names, ids


def all_ready(server) -> bool:
    h = health(server)
    return h["statsReady"] == h["statsCollectors"]


def running_containers(engine) -> int:
    return len(engine.cli("ps", "-q").stdout.split())


def settled_collectors(server, engine) -> int:
    """The server's collector count once it has one for every running container of the engine."""
    assert wait_for(lambda: health(server)["statsCollectors"] == running_containers(engine),
                    10 + running_containers(engine) / 5), (running_containers(engine), health(server))
    return health(server)["statsCollectors"]


def ready_timeout(server) -> float:
    """Time for every collector to hold two samples: Docker sends one a second per stream, and
    a busy engine with many streams sends them later."""
    return 10 + health(server)["statsCollectors"] / 5


def test_container_started_after_the_server_gets_a_collector(start_server, docker_engine, containers,
                                                             busybox_image):
    server = start_server(env={"DOCKER_HOST": docker_engine.host})
    assert wait_for(lambda: health(server)["docker"]["reachable"], 10)
    before = settled_collectors(server, docker_engine)
    name = containers.name("le-eager")
    cid = containers.run("--name", name, "--init", busybox_image, *SLEEP)

    assert wait_for(lambda: health(server)["statsCollectors"] == before + 1, 10), health(server)
    assert wait_for(lambda: all_ready(server), ready_timeout(server)), health(server)
    asked = datetime.now(timezone.utc)
    stats = get_json(server, f"/v4/{name}/stats")
    assert_two_real_samples(stats, cid)
    assert docker_time(stats["read"]) < asked, "the first answer was not collected before it was asked for"
    assert set(stats["network_rate_stats"]) == {"rx_bytes_per_sec", "tx_bytes_per_sec"}


def test_first_task_stats_after_start_up_are_complete(start_server, docker_engine, containers, busybox_image):
    """Containers running before the server starts: its first task stats answer has every one."""
    names, ids = run_project(containers, busybox_image, 4)
    server = start_server(env={"DOCKER_HOST": docker_engine.host})
    settled_collectors(server, docker_engine)
    assert wait_for(lambda: all_ready(server), ready_timeout(server)), health(server)
    asked = datetime.now(timezone.utc)
    task_stats = get_json(server, f"/v4/{names[0]}/task/stats")
    assert set(task_stats) == set(ids)
    for cid in ids:
        assert_two_real_samples(task_stats[cid], cid)
        assert docker_time(task_stats[cid]["read"]) < asked
    v3 = get_json(server, f"/v3/{names[1]}/task/stats")
    assert all(v3[cid] and v3[cid]["id"] == cid for cid in ids)


def test_stopped_container_loses_its_collector(start_server, docker_engine, containers, busybox_image):
    names, ids = run_project(containers, busybox_image, 2)
    server = start_server(env={"DOCKER_HOST": docker_engine.host})
    count = settled_collectors(server, docker_engine)
    docker_engine.cli("stop", "-t", "0", ids[1])
    assert wait_for(lambda: health(server)["statsCollectors"] == count - 1, 10), health(server)
    assert wait_for(lambda: get_json(server, f"/v4/{names[0]}/task/stats")[ids[1]] == {}, 5)
    docker_engine.cli("start", ids[1])
    assert wait_for(lambda: health(server)["statsCollectors"] == count, 10), health(server)


def test_on_demand_collects_from_the_first_request(start_server, docker_engine, containers, busybox_image):
    names, ids = run_project(containers, busybox_image, 2)
    server = start_server(env={"DOCKER_HOST": docker_engine.host, "ECS_LOCAL_STATS": "on-demand"})
    assert wait_for(lambda: health(server)["docker"]["reachable"], 10)
    late = containers.run("--name", containers.name("le-on-demand"), "--init", busybox_image, *SLEEP)
    assert wait_for(lambda: server.get(f"/v4/{late}")[0] == 200, 10)   # the view saw it start
    assert health(server)["statsCollectors"] == 0

    asked = datetime.now(timezone.utc)
    stats = get_json(server, f"/v4/{names[0]}/stats")   # waits for Docker's first complete sample
    assert_two_real_samples(stats, ids[0])
    assert docker_time(stats["read"]) > asked
    assert health(server)["statsCollectors"] == 1
    task_stats = get_json(server, f"/v4/{names[0]}/task/stats")   # starts the second collector
    assert health(server)["statsCollectors"] == 2
    # Its first sample may take longer than a request waits on a busy engine ({} until then).
    assert wait_for(lambda: all(get_json(server, f"/v4/{names[0]}/task/stats")[cid].get("id") == cid
                                for cid in ids), 30), task_stats


def test_stats_setting_is_checked(start_server):
    server = start_server(env={"ECS_LOCAL_STATS": "lazy"}, wait=False)
    assert server.proc.wait(20) == 2
    assert "ECS_LOCAL_STATS: 'lazy' is not one of EAGER, ON-DEMAND" in server.log()
