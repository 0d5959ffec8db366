"""Pure ECS documents: the builders from Docker's JSON to ECS's, each with exact expected values.

No engine is needed: the inputs are docker inspect / stats JSON as Docker writes it; the
Docker-backed tests (test_metadata.py) check the same builders on a real engine's output.
clock_drift reads the host kernel (adjtimex(2), read-only) and is compared with the
kernel's own answer to ntp_adjtime(3).
"""

from __future__ import annotations

import ctypes
from datetime import datetime, timezone

import pytest

import local_endpoints as le


# -- network_rates --------------------------------------------------------------

def sample(read: str, **networks: tuple[int, int]) -> dict:
    return {"read": read, "networks": {name: {"rx_bytes": rx, "tx_bytes": tx} for name, (rx, tx) in networks.items()}}


def test_network_rates_are_bytes_per_second_summed_over_interfaces():
    before = sample("2024-05-01T10:00:00.000000Z", eth0=(1000, 400), eth1=(1000, 0))
    latest = sample("2024-05-01T10:00:02.000000Z", eth0=(3000, 1000), eth1=(1000, 0))
    assert le.network_rates(latest, before) == {"rx_bytes_per_sec": 1000.0, "tx_bytes_per_sec": 300.0}


def test_network_rates_over_a_fraction_of_a_second_and_nanosecond_times():
    before = sample("2024-05-01T10:00:00.250000000+00:00", eth0=(0, 0))
    latest = sample("2024-05-01T10:00:00.750000000+00:00", eth0=(512, 128))
    assert le.network_rates(latest, before) == {"rx_bytes_per_sec": 1024.0, "tx_bytes_per_sec": 256.0}


@pytest.mark.parametrize("previous", [
    None,                                                          # the first sample
    sample("2024-05-01T10:00:02Z", eth0=(0, 0)),                   # no time has passed
    sample("2024-05-01T10:00:03Z", eth0=(0, 0)),                   # out of order
    sample("0001-01-01T00:00:00Z", eth0=(0, 0)),                   # Docker's zero time
])
def test_network_rates_are_zero_without_an_earlier_sample(previous):
    latest = sample("2024-05-01T10:00:02Z", eth0=(5000, 5000))
    assert le.network_rates(latest, previous) == {"rx_bytes_per_sec": 0.0, "tx_bytes_per_sec": 0.0}


def test_network_rates_of_a_reset_counter_are_zero_not_negative():
    before = sample("2024-05-01T10:00:00Z", eth0=(9000, 100))
    latest = sample("2024-05-01T10:00:01Z", eth0=(10, 300))   # a restarted container's counters
    assert le.network_rates(latest, before) == {"rx_bytes_per_sec": 0.0, "tx_bytes_per_sec": 200.0}


def test_network_rates_without_networks():
    before, latest = {"read": "2024-05-01T10:00:00Z"}, {"read": "2024-05-01T10:00:01Z", "networks": None}
    assert le.network_rates(latest, before) == {"rx_bytes_per_sec": 0.0, "tx_bytes_per_sec": 0.0}


# -- clock_drift ---------------------------------------------------------------

def test_clock_drift_is_what_the_kernel_says():
    now = datetime(2024, 5, 1, 10, 0, 2, 999999, tzinfo=timezone.utc)
    drift = le.clock_drift(now)
    timex = le.Timex()
    state = ctypes.CDLL(None, use_errno=True).ntp_adjtime(ctypes.byref(timex))
    assert drift["ReferenceTimestamp"] == "2024-05-01T10:00:02Z"
    assert set(drift) == {"ReferenceTimestamp", "ClockErrorBound", "ClockSynchronizationStatus"}
    assert drift["ClockSynchronizationStatus"] == ("NOT_SYNCHRONIZED" if state == le.TIME_ERROR else "SYNCHRONIZED")
    # maxerror grows by 0.5 ms a second while unsynchronized: read a moment apart, within 1 ms.
    assert abs(drift["ClockErrorBound"] - timex.maxerror / 1000) <= 1.0
    assert isinstance(drift["ClockErrorBound"], float)


# -- health_transitions -------------------------------------------------------------

def health(status: str, *checks: tuple[int, str]) -> dict:
    return {"State": {"Health": {"Status": status, "Log": [{"ExitCode": code, "Start": end, "End": end}
                                                            for code, end in checks]}}}


def test_health_transitions_start_a_status_at_its_first_check_in_the_run():
    containers = {
        "a": health("healthy", (1, "2024-05-01T10:00:00Z"), (0, "2024-05-01T10:00:05Z"), (0, "2024-05-01T10:00:10Z")),
        "b": health("unhealthy", (0, "2024-05-01T10:00:00Z"), (1, "2024-05-01T10:00:30Z")),
        "c": {"State": {"Running": True}},   # no health check: left out
    }
    assert le.health_transitions({}, containers) == {
        "a": ("healthy", "2024-05-01T10:00:05Z"), "b": ("unhealthy", "2024-05-01T10:00:30Z")}


def test_health_transitions_remember_the_start_of_a_long_run():
    # Docker kept only the last checks: the run began before them, as the previous view knew.
    previous = {"a": ("healthy", "2024-05-01T09:00:00Z"), "b": ("healthy", "2024-05-01T09:00:00Z")}
    containers = {"a": health("healthy", (0, "2024-05-01T10:00:00Z")),
                  "b": health("unhealthy", (1, "2024-05-01T10:00:00Z"))}   # b changed: its own start
    assert le.health_transitions(previous, containers) == {
        "a": ("healthy", "2024-05-01T09:00:00Z"), "b": ("unhealthy", "2024-05-01T10:00:00Z")}


def test_health_transitions_of_a_container_still_starting():
    assert le.health_transitions({}, {"a": health("starting")}) == {"a": ("starting", None)}


# -- interface_properties ----------------------------------------------------------

def container(hostname: str = "web", domain: str = "", dns=None, search=None) -> dict:
    return {"Config": {"Hostname": hostname, "Domainname": domain},
            "HostConfig": {"Dns": dns, "DnsSearch": search}}


def test_interface_properties_of_a_user_defined_ipv4_network():
    endpoint = {"IPAddress": "172.20.0.5", "IPPrefixLen": 16, "Gateway": "172.20.0.1",
                "MacAddress": "02:42:ac:14:00:05", "GlobalIPv6Address": ""}
    assert le.interface_properties(container(search=["corp.example"]), "shop_default", endpoint, 0) == {
        "AttachmentIndex": 0,
        "IPv4SubnetCIDRBlock": "172.20.0.0/16",
        "MACAddress": "02:42:ac:14:00:05",
        "DomainNameServers": ["127.0.0.11"],          # Docker's embedded DNS on user networks
        "DomainNameSearchList": ["corp.example"],
        "PrivateDNSName": "web",
        "SubnetGatewayIpv4Address": "172.20.0.1/16",
    }


def test_interface_properties_of_an_ipv6_only_network_with_own_dns():
    endpoint = {"IPAddress": "", "GlobalIPv6Address": "fd00:1::5", "GlobalIPv6PrefixLen": 64,
                "IPv6Gateway": "fd00:1::1"}
    assert le.interface_properties(container(domain="example.com", dns=["1.1.1.1"]), "v6net", endpoint, 1) == {
        "AttachmentIndex": 1,
        "IPv6SubnetCIDRBlock": "fd00:1::/64",
        "DomainNameServers": ["1.1.1.1"],
        "PrivateDNSName": "web.example.com",
        "SubnetGatewayIpv6Address": "fd00:1::1/64",
    }


def test_interface_properties_on_the_default_bridge_without_addresses():
    assert le.interface_properties(container(hostname=""), "bridge", {}, 2) == {"AttachmentIndex": 2}


# -- match_identifier ----------------------------------------------------------

def docker_container(name: str, container_id: str, running: bool = True, service: str | None = None) -> dict:
    labels = {le.COMPOSE_SERVICE: service} if service else {}
    return {"Id": container_id, "Name": "/" + name, "State": {"Running": running}, "Config": {"Labels": labels}}


WEB = docker_container("shop-web-1", "abc123" + "0" * 58, service="web")
WEB2 = docker_container("shop-web-2", "abd456" + "0" * 58, service="web")
DB = docker_container("shop-db-1", "def789" + "0" * 58, service="db")
OLD = docker_container("old-web", "abe000" + "0" * 58, running=False)
OWN = docker_container("endpoints", "fff000" + "0" * 58)
SNAPSHOT = le.Snapshot({c["Id"]: c for c in (WEB, WEB2, DB, OLD, OWN)}, {})


@pytest.mark.parametrize("identifier, expected", [
    ("shop-web-1", [WEB]),                     # exact name
    (DB["Id"], [DB]),                          # full ID
    ("old-web", [OLD]),                        # exact names reach stopped containers
    ("web", [WEB, WEB2]),                      # compose service, before any substring
    ("abd", [WEB2]),                           # ID prefix
    ("ab", [WEB, WEB2]),                       # ID prefix: running ones only (OLD's is abe...)
    ("db-1", [DB]),                            # substring of a name
    ("old", []),                               # substrings reach running containers only
    ("endpoints", []),                         # the server's own container is left out
    ("fff", []),
    ("nothing", []),
])
def test_match_identifier_levels(identifier, expected):
    assert le.match_identifier(SNAPSHOT, identifier, OWN["Id"]) == expected


# -- deep_merge ----------------------------------------------------------------

def test_deep_merge_merges_objects_and_replaces_everything_else():
    base = {"Cluster": "c", "Limits": {"CPU": 2, "Memory": 512}, "Containers": [{"Name": "a"}], "Tags": None}
    override = {"Limits": {"Memory": 1024, "Extra": {"x": 1}}, "Containers": [{"Name": "b"}], "Tags": {"k": "v"},
                "Cluster": None}
    merged = le.deep_merge(base, override)
    assert merged == {"Cluster": None, "Limits": {"CPU": 2, "Memory": 1024, "Extra": {"x": 1}},
                      "Containers": [{"Name": "b"}], "Tags": {"k": "v"}}
    assert base == {"Cluster": "c", "Limits": {"CPU": 2, "Memory": 512}, "Containers": [{"Name": "a"}], "Tags": None}
    merged["Limits"]["Extra"]["x"] = 2   # a copy: the override file's value is not shared
    assert override["Limits"]["Extra"] == {"x": 1}


@pytest.mark.parametrize("base, override, expected", [
    ({"a": 1}, {}, {"a": 1}),
    ({}, {"a": {"b": 1}}, {"a": {"b": 1}}),
    ({"a": {"b": 1}}, {"a": 5}, {"a": 5}),
    ({"a": 5}, {"a": {"b": 1}}, {"a": {"b": 1}}),
    ([1, 2], [3], [3]),
    ("x", None, None),
])
def test_deep_merge_cases(base, override, expected):
    assert le.deep_merge(base, override) == expected
