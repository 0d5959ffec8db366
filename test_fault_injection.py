"""Fault injection at $ECS_AGENT_URI/fault/v1/ (the ECS agent's ecs-agent/tmds/handlers/fault/v1).

In process: the request bodies decoded and validated as the agent's Go code does, with its
messages in its order; the agent's exact iptables and tc command lines; the answers (200, 400,
404, 405, 409, 429, 500) of FaultInjector with its commands run by a fake that plays iptables
and tc.  Against a real Docker Engine: a task started by `run` with enableFaultInjection in
awsvpc mode, and a compose container that opts in with its label, each with a TCP port
blackholed for real in its network namespace (nsenter, iptables): a connection from inside
times out while another port and the endpoints still answer; stop restores it; the status is
read from the namespace before, during and after, even by a server that did not start the fault.
This kernel has no sch_prio/sch_netem, so latency and packet loss are applied for real only
where the kernel has them (skipped here, saying so), and a server here answers 500 naming them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import local_endpoints as le
import testlib
from testlib import SERVER_SCRIPT, SESSION_ID, nsenter_net, server_env, wait_for

BLACKHOLE = "network-blackhole-port"
LATENCY = "network-latency"
LOSS = "network-packet-loss"
ARN = "arn:aws:ecs:us-west-2:111111111111:task/ecs-local-cluster/0123456789abcdef0123456789abcdef"
NETNS = "/proc/4242/ns/net"
PRIOMAP = "priomap 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2"
EGRESS_80 = {"Port": 80, "Protocol": "tcp", "TrafficType": "egress"}


def body(document) -> bytes:
    return json.dumps(document).encode()


# =============================================================================
# Decoding and validation: the agent's messages, in its order
# =============================================================================

@pytest.mark.parametrize("fault, raw, message", [
    (BLACKHOLE, b"", "required request body is missing"),
    (BLACKHOLE, b" \n\t", "required request body is missing"),
    (LATENCY, b"", "required request body is missing"),
    (BLACKHOLE, b"hello", "invalid character 'h' looking for beginning of value"),
    (BLACKHOLE, b'{"Port": 80', "unexpected EOF"),
    (BLACKHOLE, b'{"Port": 80,}', "invalid character '}' looking for beginning of object key string"),
    (BLACKHOLE, b'{"Port" 80}', "invalid character '8' after object key"),
    (BLACKHOLE, b'{"Port": 80 "Protocol": "tcp"}', "invalid character '\"' after object key:value pair"),
    (LATENCY, b'{"Sources": ["10.0.0.1" "10.0.0.2"]}', "invalid character '\"' after array element"),
    (BLACKHOLE, b"[]", "json: cannot unmarshal array into Go value of type types.NetworkBlackholePortRequest"),
    (LOSS, b'"x"', "json: cannot unmarshal string into Go value of type types.NetworkPacketLossRequest"),
    # The agent's own test case, and Go's other type errors.
    (BLACKHOLE, b'{"Port": "80", "Protocol": "tcp", "TrafficType": "egress"}',
     "json: cannot unmarshal string into Go struct field NetworkBlackholePortRequest.Port of type uint16"),
    (BLACKHOLE, b'{"Port": 70000}',
     "json: cannot unmarshal number 70000 into Go struct field NetworkBlackholePortRequest.Port of type uint16"),
    (BLACKHOLE, b'{"Port": -1}',
     "json: cannot unmarshal number -1 into Go struct field NetworkBlackholePortRequest.Port of type uint16"),
    (BLACKHOLE, b'{"Port": 80.0}',
     "json: cannot unmarshal number 80.0 into Go struct field NetworkBlackholePortRequest.Port of type uint16"),
    (BLACKHOLE, b'{"Protocol": 6}',
     "json: cannot unmarshal number into Go struct field NetworkBlackholePortRequest.Protocol of type string"),
    (BLACKHOLE, b'{"SourcesToFilter": "10.0.0.1"}', "json: cannot unmarshal string into Go struct field "
                                                    "NetworkBlackholePortRequest.SourcesToFilter of type []*string"),
    (LATENCY, b'{"Sources": [1]}',
     "json: cannot unmarshal number into Go struct field NetworkLatencyRequest.Sources of type string"),
    (LATENCY, b'{"FlowsPercent": true}',
     "json: cannot unmarshal bool into Go struct field NetworkLatencyRequest.FlowsPercent of type int"),
    # The first type error is the one answered, and Go reads on past it.
    (BLACKHOLE, b'{"Port": "a", "Protocol": 1}',
     "json: cannot unmarshal string into Go struct field NetworkBlackholePortRequest.Port of type uint16"),
])
def test_bodies_the_agent_cannot_decode(fault, raw, message):
    with pytest.raises(le.FaultError) as caught:
        le.decode_fault_request(fault, raw)
    response = caught.value.response()
    assert (response.status, response.content_type) == (400, "application/json")
    assert response.body == json.dumps({"Error": message}, separators=(",", ":")).encode()


def test_go_decodes_case_insensitively_ignores_unknown_keys_and_reads_one_value():
    assert le.decode_fault_request(BLACKHOLE, b'{"port": 443, "PROTOCOL": "udp", "trafficType": "ingress", '
                                              b'"Extra": {"a": [1]}} trailing') == {
        "Port": 443, "Protocol": "udp", "TrafficType": "ingress"}
    assert le.decode_fault_request(BLACKHOLE, b'{"Port": 1, "port": null}') == {}   # the last one wins
    assert le.decode_fault_request(LOSS, b"null") == {}


@pytest.mark.parametrize("fault, document, message", [
    (BLACKHOLE, {}, "required parameter Port is missing"),
    (BLACKHOLE, {"Port": 80}, "required parameter Protocol is missing"),
    (BLACKHOLE, {"Port": 80, "Protocol": "", "TrafficType": "x"}, "required parameter Protocol is missing"),
    (BLACKHOLE, {"Port": 80, "Protocol": "tcp"}, "required parameter TrafficType is missing"),
    (BLACKHOLE, {"Port": 80, "Protocol": "icmp", "TrafficType": "both"}, "invalid value icmp for parameter Protocol"),
    (BLACKHOLE, {"Port": 80, "Protocol": "tcp", "TrafficType": "both"}, "invalid value both for parameter TrafficType"),
    (BLACKHOLE, {**EGRESS_80, "SourcesToFilter": ["10.0.0.0/8", "example.com"]},
     "invalid value example.com for parameter SourcesToFilter"),
    (BLACKHOLE, {**EGRESS_80, "SourcesToFilter": [None]}, "invalid value  for parameter SourcesToFilter"),
    (LATENCY, {}, "required parameter DelayMilliseconds is missing"),
    (LATENCY, {"DelayMilliseconds": 10}, "required parameter JitterMilliseconds is missing"),
    (LATENCY, {"DelayMilliseconds": 0, "JitterMilliseconds": 0, "Sources": ["x"]},
     "required either DelayMilliseconds or JitterMilliseconds to be non-zero"),
    (LATENCY, {"DelayMilliseconds": 10, "JitterMilliseconds": 0}, "required parameter Sources is missing"),
    (LATENCY, {"DelayMilliseconds": 10, "JitterMilliseconds": 0, "Sources": []}, "required parameter Sources is missing"),
    (LATENCY, {"DelayMilliseconds": 10, "JitterMilliseconds": 0, "Sources": ["10.0.0.300"]},
     "invalid value 10.0.0.300 for parameter Sources"),
    (LATENCY, {"DelayMilliseconds": 10, "JitterMilliseconds": 0, "Sources": ["10.0.0.1"], "SourcesToFilter": ["fe80::1%eth0"]},
     "invalid value fe80::1%eth0 for parameter SourcesToFilter"),
    (LATENCY, {"DelayMilliseconds": 10, "JitterMilliseconds": 0, "Sources": ["10.0.0.0/255.0.0.0"]},
     "invalid value 10.0.0.0/255.0.0.0 for parameter Sources"),
    (LATENCY, {"DelayMilliseconds": 10, "JitterMilliseconds": 0, "Sources": ["10.0.0.1"], "FlowsPercent": 0},
     "invalid value 0 for parameter flowsPercent"),
    (LOSS, {}, "required parameter LossPercent is missing"),
    (LOSS, {"LossPercent": 0, "Sources": []}, "invalid value 0 for parameter LossPercent"),
    (LOSS, {"LossPercent": 101}, "invalid value 101 for parameter LossPercent"),
    (LOSS, {"LossPercent": 18446744073709551615}, "invalid value -1 for parameter LossPercent"),   # Go's int()
    (LOSS, {"LossPercent": 5}, "required parameter Sources is missing"),
    (LOSS, {"LossPercent": 5, "Sources": ["::/0"], "FlowsPercent": 101}, "invalid value 101 for parameter flowsPercent"),
])
def test_validation_answers_the_agents_first_failed_check(fault, document, message):
    with pytest.raises(le.FaultError) as caught:
        le.validate_fault_request(fault, le.decode_fault_request(fault, body(document)))
    assert (caught.value.status, caught.value.message) == (400, message)


def test_valid_requests_pass():
    for fault, document in ((BLACKHOLE, {"Port": 0, "Protocol": "udp", "TrafficType": "ingress",
                                         "SourcesToFilter": ["::ffff:10.0.0.1", "2001:db8::/32", "10.1.2.3/24"]}),
                            (LATENCY, {"DelayMilliseconds": 0, "JitterMilliseconds": 5, "Sources": ["0.0.0.0/0"]}),
                            (LOSS, {"LossPercent": 100, "Sources": ["10.0.0.1"], "FlowsPercent": 1})):
        le.validate_fault_request(fault, le.decode_fault_request(fault, body(document)))


# =============================================================================
# The agent's command lines
# =============================================================================

def test_blackhole_command_lines_are_the_agents():
    prefix = f"nsenter --net={NETNS} "
    assert le.blackhole_check_command(NETNS, "tcp", 1234, "egress-tcp-1234") == \
        prefix + "iptables -w 5 -C egress-tcp-1234 -p tcp --dport 1234 -j DROP"
    assert le.blackhole_start_commands(NETNS, "tcp", 1234, ["1.2.3.4", "2001:db8::/32", "10.0.0.0/8"],
                                       "egress-tcp-1234", "OUTPUT") == [
        (prefix + "iptables -w 5 -N egress-tcp-1234", False),
        (prefix + "iptables -w 5 -A egress-tcp-1234 -p tcp -d 1.2.3.4 --dport 1234 -j ACCEPT", False),
        (prefix + "iptables -w 5 -A egress-tcp-1234 -p tcp -d 10.0.0.0/8 --dport 1234 -j ACCEPT", False),
        (prefix + "iptables -w 5 -A egress-tcp-1234 -p tcp -d 0.0.0.0/0 --dport 1234 -j DROP", False),
        (prefix + "iptables -w 5 -I OUTPUT -j egress-tcp-1234", False),
        (prefix + "ip6tables -w 5 -N egress-tcp-1234", True),
        (prefix + "ip6tables -w 5 -A egress-tcp-1234 -p tcp -d 2001:db8::/32 --dport 1234 -j ACCEPT", True),
        (prefix + "ip6tables -w 5 -A egress-tcp-1234 -p tcp -d ::/0 --dport 1234 -j DROP", True),
        (prefix + "ip6tables -w 5 -I OUTPUT -j egress-tcp-1234", True)]
    # Host mode: no prefix.
    assert le.blackhole_stop_commands(None, "ingress-udp-53", "INPUT") == [
        ("iptables -w 5 -F ingress-udp-53", False), ("iptables -w 5 -D INPUT -j ingress-udp-53", False),
        ("iptables -w 5 -X ingress-udp-53", False), ("ip6tables -w 5 -F ingress-udp-53", True),
        ("ip6tables -w 5 -D INPUT -j ingress-udp-53", True), ("ip6tables -w 5 -X ingress-udp-53", True)]
    assert le.blackhole_chain({"TrafficType": "ingress", "Protocol": "udp", "Port": 53}) == ("ingress-udp-53", "INPUT")


def test_tc_command_lines_are_the_agents():
    prefix = f"nsenter --net={NETNS} "
    commands = le.tc_start_commands(NETNS, "eth0", "delay 123ms 456ms", 12, ["10.0.0.1", "2001:db8::1"],
                                    ["169.254.170.2"])
    assert all(c.startswith(prefix) for c in commands)
    lines = [c[len(prefix):] for c in commands]
    assert lines[:12] == [f"tc qdisc add dev eth0 root handle 1: prio {PRIOMAP}",
                          f"tc qdisc add dev eth0 parent 1:1 handle 10: prio bands 10 {PRIOMAP}"] + [
        f"tc qdisc add dev eth0 parent 10:{parent} handle {handle}: prio bands 10 {PRIOMAP}"
        for parent, handle in zip("123456789a", range(100, 110))]
    assert lines[12:24] == [f"tc qdisc add dev eth0 parent 100:{c} handle {200 + i}: netem delay 123ms 456ms"
                            for i, c in enumerate("123456789a")] + [
        "tc qdisc add dev eth0 parent 101:1 handle 210: netem delay 123ms 456ms",
        "tc qdisc add dev eth0 parent 101:2 handle 211: netem delay 123ms 456ms"]
    assert lines[24:27] == [
        "tc filter add dev eth0 protocol all parent 1:0 prio 1 u32 match ip dst 169.254.170.2 flowid 1:3",
        "tc filter add dev eth0 protocol all parent 1:0 prio 2 u32 match ip dst 10.0.0.1 flowid 1:1",
        "tc filter add dev eth0 protocol all parent 1:0 prio 2 u32 match ip6 dst 2001:db8::1 flowid 1:1"]
    assert lines[27:] == [
        "tc filter add dev eth0 protocol all parent 10: handle 1 prio 2 flow hash keys "
        "src,dst,proto,proto-src,proto-dst divisor 10 baseclass 10:1"] + [
        f"tc filter add dev eth0 protocol all parent {100 + i}: handle {i + 1} prio 2 flow hash keys "
        f"src,dst,proto,proto-src,proto-dst divisor 10 baseclass {100 + i}:1" for i in range(10)]
    full = le.tc_start_commands(None, "eth1", "loss 6%", 100, ["10.0.0.1"], [])
    assert full[12 + 99] == "tc qdisc add dev eth1 parent 109:a handle 299: netem loss 6%"
    assert le.tc_check_command(NETNS, "eth0") == prefix + "tc -j q show dev eth0 parent 100:1"
    assert le.tc_stop_commands(None, "eth0") == ["tc qdisc del dev eth0 parent 1:1 handle 10:",
                                                 "tc qdisc del dev eth0 root handle 1: prio"]
    assert le.netem_arguments(LATENCY, {"DelayMilliseconds": 0, "JitterMilliseconds": 5}) == "delay 0ms 5ms"
    assert le.netem_arguments(LOSS, {"LossPercent": 6}) == "loss 6%"


# The agent's test outputs of `tc -j q show` (handlers_test.go).
TC_LATENCY = ('[{"kind":"netem","handle":"10:","parent":"1:1","options":{"limit":1000,"delay":{"delay":123456789,'
              '"jitter":4567,"correlation":0},"ecn":false,"gap":0}}]')
TC_ZERO_DELAY = '[{"kind":"netem","handle":"10:","parent":"1:1","options":{"limit":1000,"ecn":false,"gap":0}}]'
TC_LOSS = ('[{"kind":"netem","handle":"10:","dev":"eth0","parent":"1:1","options":{"limit":1000,"loss-random":'
           '{"loss":0.06,"correlation":0},"ecn":false,"gap":0}}]')


def test_tc_status_is_read_as_the_agent_reads_it():
    assert le.tc_faults("[]") == (False, False)
    assert le.tc_faults(TC_LATENCY) == (True, False)
    assert le.tc_faults(TC_ZERO_DELAY) == (True, False)
    assert le.tc_faults(TC_LOSS) == (False, True)


def test_devices_are_those_of_the_default_routes():
    route = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
             "eth0\t00000000\t010011AC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
             "eth0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
             "eth1\t000012AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n")
    ipv6 = ("00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
            "00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n"
            "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
            "fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth2\n")
    assert le.default_route_devices(route, ipv6) == ("eth0", "eth2")
    assert le.default_route_devices(route.splitlines()[0], "") == ()


def test_kernel_modules_are_read_from_the_kernel_configuration():
    config = "CONFIG_NET_SCH_PRIO=m\n# CONFIG_NET_SCH_NETEM is not set\nCONFIG_NET_CLS_U32=y\n"
    assert le.kernel_lacks(config) == ["sch_netem", "cls_flow"]
    assert le.kernel_lacks(None) == []


def test_what_the_server_lacks_is_said_with_what_to_grant():
    assert le.fault_means(lambda tool: f"/usr/sbin/{tool}", (1 << 12) | (1 << 21)) is None
    message = le.fault_means(lambda tool: None if tool == "tc" else tool, 1 << 12)
    assert "tc not on PATH" in message and "CAP_SYS_ADMIN" in message and "--cap-add SYS_ADMIN" in message


def test_the_nine_routes_are_guarded_posts_with_a_body():
    faults = [r for r in le.ROUTES if "/fault/v1/" in r.rule]
    assert len(faults) == 3   # one rule per operation, for the three faults
    assert all(r.method == "POST" and r.guard is le.Guard.TOKEN and r.body for r in faults)
    for fault in (BLACKHOLE, LATENCY, LOSS):
        for operation, handler in (("start", le.AgentApiRoutes.start_fault), ("stop", le.AgentApiRoutes.stop_fault),
                                   ("status", le.AgentApiRoutes.fault_status)):
            for path in (f"/api/abc/fault/v1/{fault}/{operation}", f"/api/fault/v1/{fault}/{operation}"):
                chosen, params = le.resolve("POST", path)
                assert chosen.handler is handler and params["fault"] == fault, path


def test_other_methods_get_the_agents_empty_405():
    for method in ("GET", "PUT", "HEAD", "DELETE"):
        with pytest.raises(le.ApiError) as caught:
            le.resolve(method, f"/api/abc/fault/v1/{LATENCY}/start")
        response = caught.value.response()
        assert (response.status, response.body) == (405, b"")


# =============================================================================
# FaultInjector's answers, its commands run by a fake iptables and tc
# =============================================================================

class FakeNamespace:
    """Plays iptables -C and tc -j q show from what the fake has been told to run."""

    def __init__(self, tc_output: str = "[]", fail: str | None = None, slow: float = 0.0):
        self.commands: list[str] = []
        self.chains: set[str] = set()
        self.tc_output = tc_output
        self.fail = fail       # output of a failure for commands containing it
        self.slow = slow

    def __call__(self, argv: list[str], timeout: float) -> tuple[int, str]:
        command = " ".join(argv)
        self.commands.append(command)
        if self.slow:
            time.sleep(min(self.slow, timeout))
            if self.slow >= timeout:
                raise le.FaultTimedOut()
        if self.fail and self.fail in command:
            return 2, "Error: Specified qdisc kind is unknown."
        words = argv[argv.index("iptables") if "iptables" in argv else 0:]
        if words[:1] == ["iptables"]:
            chain = words[4]
            if words[3] == "-C":
                return (0, "") if chain in self.chains else (1, "iptables: Bad rule")
            if words[3] == "-N":
                self.chains.add(chain)
            if words[3] == "-X":
                self.chains.discard(chain)
        if "-j" in argv and "show" in argv:
            return 0, self.tc_output
        return 0, ""


class Injector(le.FaultInjector):
    def __init__(self, namespace: FakeNamespace, target: le.FaultTarget | le.FaultError | None = None,
                 lacking: str | None = None, kernel: str | None = None):
        self.clock = [1000.0]
        super().__init__(namespace, clock=lambda: self.clock[0], means=lacking, kernel_config=kernel)
        self._target = target or le.FaultTarget(ARN, "awsvpc", NETNS, ("eth0",), (1, 1))

    def target(self, endpoints, request, ident):
        if isinstance(self._target, le.FaultError):
            raise self._target
        return self._target

    def call(self, fault: str, operation: str, document=None, raw: bytes | None = None, caller: str = "10.0.0.9"):
        self.clock[0] += 5   # past the rate limit
        request = le.Request({"fault": fault, "ident": "abc"}, le.plain_ip(caller), None, 0.0,
                             raw if raw is not None else (b"" if document is None else body(document)))
        try:
            answer = self.answer(None, request, operation)
        except le.FaultError as exc:
            response = exc.response()
            return response.status, response.body.decode()
        return 200, answer.decode()


KERNEL_WITH_TC = "CONFIG_NET_SCH_PRIO=y\nCONFIG_NET_SCH_NETEM=m\nCONFIG_NET_CLS_U32=y\nCONFIG_NET_CLS_FLOW=m\n"


def test_blackhole_start_status_stop_and_the_audit_trail(caplog):
    namespace = FakeNamespace()
    injector = Injector(namespace)
    with caplog.at_level(logging.INFO, logger="local_endpoints.audit"):
        assert injector.call(BLACKHOLE, "status", EGRESS_80) == (200, '{"Status":"not-running"}')
        assert injector.call(BLACKHOLE, "start", EGRESS_80) == (200, '{"Status":"running"}')
        assert injector.call(BLACKHOLE, "start", EGRESS_80) == (200, '{"Status":"running"}')   # already: no command
        assert injector.call(BLACKHOLE, "status", EGRESS_80) == (200, '{"Status":"running"}')
        assert injector.call(BLACKHOLE, "stop", EGRESS_80) == (200, '{"Status":"stopped"}')
        assert injector.call(BLACKHOLE, "stop", EGRESS_80) == (200, '{"Status":"stopped"}')
    prefix = f"nsenter --net={NETNS} "
    check = prefix + "iptables -w 5 -C egress-tcp-80 -p tcp --dport 80 -j DROP"
    # Egress on port 80: the endpoints' address stays reachable, as the agent makes sure.
    assert namespace.commands == [check, check] + [c for c, _ in le.blackhole_start_commands(
        NETNS, "tcp", 80, ["169.254.170.2"], "egress-tcp-80", "OUTPUT")] + [check, check, check] + [
        c for c, _ in le.blackhole_stop_commands(NETNS, "egress-tcp-80", "OUTPUT")] + [check]
    lines = [r.getMessage() for r in caplog.records if r.name == "local_endpoints.audit"]
    assert len(lines) == 4   # starts and stops, not statuses
    assert lines[0] == (f"fault start {BLACKHOLE} task={ARN} caller=10.0.0.9 parameters={{\"Port\":80,\"Protocol\":"
                        f"\"tcp\",\"TrafficType\":\"egress\",\"SourcesToFilter\":[\"169.254.170.2\"]}} outcome=running")


def test_latency_and_loss_one_at_a_time_409():
    latency = {"DelayMilliseconds": 100, "JitterMilliseconds": 0, "Sources": ["10.0.0.1"]}
    loss = {"LossPercent": 5, "Sources": ["10.0.0.1"]}
    running_latency = Injector(FakeNamespace(TC_LATENCY), kernel=KERNEL_WITH_TC)
    assert running_latency.call(LATENCY, "start", latency) == (
        409, '{"Error":"There is already one network latency fault running"}')
    assert running_latency.call(LOSS, "start", loss) == (
        409, '{"Error":"There is already one network latency fault running"}')
    assert running_latency.call(LATENCY, "status") == (200, '{"Status":"running"}')
    assert running_latency.call(LOSS, "status") == (200, '{"Status":"not-running"}')
    running_loss = Injector(FakeNamespace(TC_LOSS), kernel=KERNEL_WITH_TC)
    assert running_loss.call(LATENCY, "start", latency) == (
        409, '{"Error":"There is already one network packet loss fault running"}')
    assert running_loss.call(LATENCY, "stop") == (200, '{"Status":"stopped"}')   # not this type: nothing removed
    assert not any(" del " in c for c in running_loss.execute.commands)
    assert running_loss.call(LOSS, "stop", raw=b"not even JSON") == (200, '{"Status":"stopped"}')   # no body read
    assert running_loss.execute.commands[-2:] == le.tc_stop_commands(NETNS, "eth0")


def test_latency_start_runs_the_tree_on_every_device():
    namespace = FakeNamespace()
    injector = Injector(namespace, le.FaultTarget(ARN, "awsvpc", NETNS, ("eth0", "eth1"), (1, 1)),
                        kernel=KERNEL_WITH_TC)
    document = {"DelayMilliseconds": 50, "JitterMilliseconds": 10, "Sources": ["10.0.0.0/8"], "FlowsPercent": 50}
    assert injector.call(LATENCY, "start", document) == (200, '{"Status":"running"}')
    expected = [le.tc_check_command(NETNS, "eth0"), le.tc_check_command(NETNS, "eth1")]
    for device in ("eth0", "eth1"):
        expected += le.tc_start_commands(NETNS, device, "delay 50ms 10ms", 50, ["10.0.0.0/8"], [])
    assert namespace.commands == expected


def test_a_kernel_without_netem_gets_a_500_naming_the_modules():
    document = {"LossPercent": 5, "Sources": ["10.0.0.1"]}
    known = Injector(FakeNamespace(), kernel="CONFIG_NET_SCH_PRIO=y\nCONFIG_NET_CLS_U32=y\n")
    status, answer = known.call(LOSS, "start", document)
    message = json.loads(answer)["Error"]
    assert status == 500 and "sch_netem" in message and "cls_flow" in message and "modprobe" in message
    assert not any("qdisc add" in c for c in known.execute.commands)   # nothing tried
    # The configuration unreadable: tc's refusal names the module, and nothing half made is left.
    namespace = FakeNamespace(fail="netem")
    unknown = Injector(namespace, kernel=None)
    status, answer = unknown.call(LOSS, "start", document)
    assert status == 500 and "sch_netem" in json.loads(answer)["Error"]
    assert namespace.commands[-1] == le.tc_stop_commands(NETNS, "eth0")[1]


def test_the_agents_404_400_and_500_for_the_task_come_after_the_body_checks():
    not_found = le.FaultError(404, "unable to get task arn from request: unable to get task Arn from v3 endpoint "
                                   "ID: abc")
    injector = Injector(FakeNamespace(), not_found)
    assert injector.call(BLACKHOLE, "start", {}) == (400, '{"Error":"required parameter Port is missing"}')
    assert injector.call(BLACKHOLE, "start", EGRESS_80) == (404, json.dumps({"Error": not_found.message},
                                                                            separators=(",", ":")))
    assert injector.call(LATENCY, "status") == (404, json.dumps({"Error": not_found.message}, separators=(",", ":")))
    lacking = Injector(FakeNamespace(), lacking="this server cannot inject faults: no CAP_NET_ADMIN: it needs root")
    assert lacking.call(BLACKHOLE, "status", EGRESS_80) == (
        500, '{"Error":"internal error: this server cannot inject faults: no CAP_NET_ADMIN: it needs root"}')
    assert lacking.execute.commands == []


def test_a_refused_start_is_an_audit_line_naming_the_task(caplog):
    refused = Injector(FakeNamespace(), le.FaultError(400, f"enableFaultInjection is not enabled for task: {ARN}",
                                                      task=ARN))
    with caplog.at_level(logging.INFO, logger="local_endpoints.audit"):
        assert refused.call(BLACKHOLE, "start", EGRESS_80)[0] == 400
        assert refused.call(BLACKHOLE, "status", EGRESS_80)[0] == 400   # statuses are not audited
    [line] = [r.getMessage() for r in caplog.records if r.name == "local_endpoints.audit"]
    assert line.startswith(f"fault start {BLACKHOLE} task={ARN} caller=10.0.0.9 parameters=")
    assert line.endswith(f"outcome=400 enableFaultInjection is not enabled for task: {ARN}")


def test_commands_share_the_agents_five_seconds():
    slow = Injector(FakeNamespace(slow=6))
    assert slow.call(BLACKHOLE, "status", EGRESS_80) == (
        500, '{"Error":"check status network-blackhole-port: request timed out"}')


def test_the_rate_limit_per_caller_and_path():
    injector = Injector(FakeNamespace())
    assert injector.call(BLACKHOLE, "status", EGRESS_80)[0] == 200
    injector.clock[0] -= 4   # one second after: the same path is refused, another path or caller is not
    request = le.Request({"fault": BLACKHOLE, "ident": "abc"}, le.plain_ip("10.0.0.9"), None, 0.0, body(EGRESS_80))
    with pytest.raises(le.FaultError) as caught:
        injector.answer(None, request, "status")
    response = caught.value.response()
    assert (response.status, response.body, response.content_type) == (
        429, b"You have reached maximum request limit", "text/plain; charset=utf-8")
    assert response.headers["X-Rate-Limit-Limit"] == "0.20"
    other_caller = le.Request(request.params, le.plain_ip("10.0.0.10"), None, 0.0, request.body)
    assert injector.answer(None, other_caller, "status") == b'{"Status":"not-running"}'
    other_path = le.Request({"fault": BLACKHOLE}, le.plain_ip("10.0.0.9"), None, 0.0, request.body)
    assert injector.answer(None, other_path, "status") == b'{"Status":"not-running"}'
    limiter = le.RateLimiter(0.2, 1, clock=lambda: 0.0)
    assert limiter.allow("a") and not limiter.allow("a") and limiter.allow("b")


def test_the_task_checks_in_the_agents_order():
    class Task:
        def __init__(self, caller, error=None):
            self.caller, self.error, self.task_run = caller, error, None

        def locate(self, request):
            if self.error:
                raise self.error
            return None, self.caller, None

        def identity_of(self, caller):
            return le.TaskIdentity(cluster="c", arn=ARN, family="f", revision="1", region="us-west-2",
                                   account="111111111111", task_id="0123", launch_type="EC2",
                                   availability_zone="us-west-2a", service_name=None)

    injector = le.FaultInjector(FakeNamespace(), means=None, kernel_config=None)
    request = le.Request({"fault": BLACKHOLE, "ident": "web"}, le.plain_ip("127.0.0.1"), None, 0.0)
    me = {"Config": {"Labels": {le.FAULT_LABEL: "true"}}, "HostConfig": {"NetworkMode": "bridge"},
          "State": {"Running": True, "Pid": os.getpid()}}

    def refusal(task):
        with pytest.raises(le.FaultError) as caught:
            injector.target(task, request, "web")
        return caught.value.status, caught.value.message

    assert refusal(Task(me, le.ApiError(404, "ContainerNotFound", "none"))) == (
        404, "unable to get task arn from request: unable to get task Arn from v3 endpoint ID: web")
    assert refusal(Task(me, le.ApiError(503, "DockerUnavailable", "down"))) == (
        500, "failed to get task metadata due to internal server error for container: web")
    assert refusal(Task({**me, "Config": {"Labels": {}}})) == (400, f"enableFaultInjection is not enabled for task: {ARN}")
    assert refusal(Task({**me, "State": {"Running": False, "Pid": 0}})) == (
        500, "failed to get task metadata due to internal server error for container: web")
    if not le.default_route_devices(Path("/proc/self/net/route").read_text(), ""):
        pytest.skip("this process's namespace has no default route")
    target = injector.target(Task(me), request, "web")
    assert (target.arn, target.mode, target.netns) == (ARN, "awsvpc", f"/proc/{os.getpid()}/ns/net")
    host = injector.target(Task({**me, "HostConfig": {"NetworkMode": "host"}}), request, "web")
    assert (host.mode, host.netns) == ("host", None)   # the agent's host mode: no nsenter


# =============================================================================
# Against a real Docker Engine
# =============================================================================

PROBE = """
import http.client, json, socket, sys
found = {}
for where in sys.argv[1:]:
    host, port = where.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            found[where] = "open"
    except socket.timeout:
        found[where] = "timeout"
    except OSError as exc:
        found[where] = exc.strerror or str(exc)
print(json.dumps(found))
"""

CALL = """
import http.client, json, sys
connection = http.client.HTTPConnection("169.254.170.2", 80, timeout=10)
connection.request("POST", sys.argv[1], body=sys.argv[2].encode())
answer = connection.getresponse()
print(json.dumps([answer.status, answer.read().decode()]))
"""


def in_namespace(pid: int, code: str, *args: str) -> str:
    """Python code run in process pid's network namespace (a client inside the task); its output."""
    done = subprocess.run([*nsenter_net(pid), sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=60, env={"PATH": os.environ["PATH"], "no_proxy": "*"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def probe(pid: int, *addresses: str) -> dict[str, str]:
    return json.loads(in_namespace(pid, PROBE, *addresses))


def chains(pid: int) -> str:
    return subprocess.run([*nsenter_net(pid), "iptables", "-S"], capture_output=True, text=True, check=True).stdout


def peer_with_two_ports(containers, busybox_image) -> str:
    """A busybox httpd on ports 80 and 8081 on the default bridge; its address."""
    peer = containers.run(busybox_image, "sh", "-c", "mkdir -p /www && echo peer > /www/index.html && "
                                                     "httpd -p 80 -h /www && httpd -p 8081 -h /www && exec sleep 600")
    address = containers.engine.inspect(peer)["NetworkSettings"]["IPAddress"]
    assert wait_for(lambda: containers.engine.cli("exec", peer, "sh", "-c", "netstat -ltn | grep -q :8081",
                                                  check=False).returncode == 0, 10)
    return address


@pytest.fixture
def run_fault_task(docker_engine, busybox_image, tmp_path, request):
    """`run` of an awsvpc task with enableFaultInjection and one container that sleeps; ended and
    checked for leftovers at the end."""
    pause = testlib.pause_image(docker_engine)
    family = f"le-fault-{request.node.name[:30]}-{SESSION_ID}".replace("_", "-")
    definition = {"family": family, "networkMode": "awsvpc", "enableFaultInjection": True, "memory": "256",
                  "containerDefinitions": [{"name": "app", "image": busybox_image, "command": ["sleep", "600"],
                                            "stopTimeout": 1, "linuxParameters": {"initProcessEnabled": True}}]}
    path = tmp_path / "taskdef.json"
    path.write_text(json.dumps(definition))
    err = tmp_path / "run.err"
    home = tmp_path / "home"
    home.mkdir()
    env = server_env(home, {**testlib.DUMMY_AWS_ENV, "DOCKER_HOST": docker_engine.host})
    with open(err, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), "run", str(path), "--pause-image", pause],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    progress = lambda: err.read_text(errors="replace")   # noqa: E731
    try:
        if not wait_for(lambda: "task RUNNING" in progress() or proc.poll() is not None, 90):
            pytest.fail(f"the task did not start:\n{progress()}")
        assert proc.poll() is None, progress()
        ids = docker_engine.cli("ps", "-q", "--filter", f"label=com.amazonaws.ecs.task-definition-family={family}",
                                "--filter", "label=com.amazonaws.ecs.container-name=app").stdout.split()
        app = docker_engine.inspect(ids[0])
        yield app, progress, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
        left = docker_engine.cli("ps", "-aq", "--filter",
                                 f"label=com.amazonaws.ecs.task-definition-family={family}").stdout.split()
        if left:
            docker_engine.cli("rm", "-f", *left, check=False)
        assert not left, progress()


def test_a_run_task_blackholes_a_port_and_keeps_its_endpoints(run_fault_task, containers, busybox_image):
    app, progress, proc = run_fault_task
    pid = app["State"]["Pid"]
    peer = peer_with_two_ports(containers, busybox_image)
    agent_uri = dict(e.split("=", 1) for e in app["Config"]["Env"])["ECS_AGENT_URI"][len("http://169.254.170.2"):]
    fault = json.dumps({"Port": 80, "Protocol": "tcp", "TrafficType": "egress"})

    def call(operation: str) -> tuple[int, str]:
        return tuple(json.loads(in_namespace(pid, CALL, f"{agent_uri}/fault/v1/{BLACKHOLE}/{operation}", fault)))

    metadata = json.loads(in_namespace(pid, GET, "/v4/task"))
    assert metadata["FaultInjectionEnabled"] is True
    before = time.monotonic()
    assert call("status") == (200, '{"Status":"not-running"}')
    assert call("status") == (429, "You have reached maximum request limit")
    assert probe(pid, f"{peer}:80", f"{peer}:8081") == {f"{peer}:80": "open", f"{peer}:8081": "open"}
    assert call("start") == (200, '{"Status":"running"}')
    assert "-A egress-tcp-80 -d 169.254.170.2/32 -p tcp -m tcp --dport 80 -j ACCEPT" in chains(pid)
    assert probe(pid, f"{peer}:80", f"{peer}:8081", "169.254.170.2:80") == {
        f"{peer}:80": "timeout", f"{peer}:8081": "open", "169.254.170.2:80": "open"}
    assert json.loads(in_namespace(pid, GET, "/v4/task"))["TaskARN"] == metadata["TaskARN"]   # endpoints answer
    time.sleep(max(0.0, before + 5.2 - time.monotonic()))
    assert call("status") == (200, '{"Status":"running"}')
    assert call("stop") == (200, '{"Status":"stopped"}')
    assert "egress-tcp-80" not in chains(pid)
    assert probe(pid, f"{peer}:80", f"{peer}:8081") == {f"{peer}:80": "open", f"{peer}:8081": "open"}
    time.sleep(max(0.0, before + 10.4 - time.monotonic()))
    assert call("status") == (200, '{"Status":"not-running"}')
    # A fault left running when the task stops is taken away with it.
    assert call("start") == (200, '{"Status":"running"}')
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    log = progress()
    assert f"fault stop {BLACKHOLE} task={metadata['TaskARN']}" in log and "outcome=stopped (the task stopped)" in log
    assert "fault injection ready" in log
    assert f"fault start {BLACKHOLE} task={metadata['TaskARN']}" in log and "outcome=running" in log
    assert f"fault stop {BLACKHOLE} task={metadata['TaskARN']}" in log and "outcome=stopped" in log


GET = """
import http.client, sys
connection = http.client.HTTPConnection("169.254.170.2", 80, timeout=10)
connection.request("GET", sys.argv[1])
print(connection.getresponse().read().decode())
"""


def test_a_compose_container_that_opts_in(start_server, docker_engine, containers, busybox_image):
    project = f"le-fault-{SESSION_ID}"
    labels = ["--label", f"com.docker.compose.project={project}"]
    opted = containers.run("--name", containers.name("le-fault-app"), *labels, "--label",
                           "com.docker.compose.service=app", "--label", f"{le.FAULT_LABEL}=true",
                           busybox_image, "sleep", "600")
    other = containers.run("--name", containers.name("le-fault-other"), *labels, "--label",
                           "com.docker.compose.service=other", busybox_image, "sleep", "600")
    pid = docker_engine.inspect(opted)["State"]["Pid"]
    peer = peer_with_two_ports(containers, busybox_image)
    fault = json.dumps({"Port": 80, "Protocol": "tcp", "TrafficType": "egress"}).encode()
    first = start_server(env={"DOCKER_HOST": docker_engine.host})
    assert "fault injection ready" in first.log()

    def call(server, operation: str, container: str = opted, kind: str = BLACKHOLE, payload: bytes = fault):
        status, _, answer = server.request("POST", f"/api/{container[:12]}/fault/v1/{kind}/{operation}",
                                           body=payload)
        return status, answer.decode()

    task = json.loads(first.get(f"/v4/{opted[:12]}/task")[2])
    assert task["FaultInjectionEnabled"] is True
    assert json.loads(first.get(f"/v4/{other[:12]}/task")[2])["FaultInjectionEnabled"] is False
    assert call(first, "start", other) == (400, json.dumps(
        {"Error": f"enableFaultInjection is not enabled for task: {task['TaskARN']}"}, separators=(",", ":")))
    assert call(first, "start", "no-such-container") == (404, '{"Error":"unable to get task arn from request: '
                                                              'unable to get task Arn from v3 endpoint ID: no-such-cont"}')
    assert call(first, "status") == (200, '{"Status":"not-running"}')
    assert call(first, "start") == (200, '{"Status":"running"}')
    assert probe(pid, f"{peer}:80", f"{peer}:8081") == {f"{peer}:80": "timeout", f"{peer}:8081": "open"}
    status, _, _ = first.request("GET", f"/api/{opted[:12]}/fault/v1/{BLACKHOLE}/start")
    assert status == 405

    # The status is the namespace's: a server that did not start the fault (the first one killed
    # without a chance to clean up) reads it there, and stops it.
    first.proc.kill()
    first.proc.wait()
    second = start_server(env={"DOCKER_HOST": docker_engine.host})
    assert call(second, "status") == (200, '{"Status":"running"}')
    assert call(second, "stop") == (200, '{"Status":"stopped"}')
    assert probe(pid, f"{peer}:80", f"{peer}:8081") == {f"{peer}:80": "open", f"{peer}:8081": "open"}
    assert f"fault stop {BLACKHOLE} task={task['TaskARN']} caller=127.0.0.1" in second.log()

    # A server that stops takes away the faults it started.
    ingress = json.dumps({"Port": 8081, "Protocol": "tcp", "TrafficType": "ingress"}).encode()
    assert call(second, "start", payload=ingress) == (200, '{"Status":"running"}')
    assert "ingress-tcp-8081" in chains(pid)
    if le.kernel_lacks(le.read_kernel_config()):   # here: a clear 500 naming the modules
        status, answer = call(second, "start", kind=LATENCY, payload=json.dumps(
            {"DelayMilliseconds": 100, "JitterMilliseconds": 0, "Sources": [peer]}).encode())
        assert status == 500 and "sch_netem" in json.loads(answer)["Error"], answer
    second.stop()
    assert "ingress-tcp-8081" not in chains(pid)
    assert "outcome=stopped (the server stopped)" in second.log()


@pytest.mark.skipif(bool(le.kernel_lacks(le.read_kernel_config())),
                    reason=f"this kernel has no {', '.join(le.kernel_lacks(le.read_kernel_config()))} "
                           "(zgrep NETEM /proc/config.gz): latency and packet loss cannot be applied here")
def test_latency_and_packet_loss_for_real(start_server, docker_engine, containers, busybox_image):
    opted = containers.run("--label", f"{le.FAULT_LABEL}=true", "--label", f"com.docker.compose.project=le-{SESSION_ID}",
                           busybox_image, "sleep", "600")
    pid = docker_engine.inspect(opted)["State"]["Pid"]
    peer = peer_with_two_ports(containers, busybox_image)
    server = start_server(env={"DOCKER_HOST": docker_engine.host})

    def call(kind: str, operation: str, document=None) -> tuple[int, str]:
        status, _, answer = server.request("POST", f"/api/{opted[:12]}/fault/v1/{kind}/{operation}",
                                           body=json.dumps(document or {}).encode())
        return status, answer.decode()

    def connect_seconds() -> float:
        started = time.monotonic()
        assert probe(pid, f"{peer}:8081")[f"{peer}:8081"] == "open"
        return time.monotonic() - started

    baseline = connect_seconds()
    assert call(LATENCY, "start", {"DelayMilliseconds": 400, "JitterMilliseconds": 0, "Sources": [peer]}) == (
        200, '{"Status":"running"}')
    assert connect_seconds() >= baseline + 0.35
    assert call(LOSS, "start", {"LossPercent": 5, "Sources": [peer]}) == (
        409, '{"Error":"There is already one network latency fault running"}')
    assert call(LATENCY, "status") == (200, '{"Status":"running"}')
    assert call(LATENCY, "stop") == (200, '{"Status":"stopped"}')
    assert connect_seconds() < baseline + 0.3


# =============================================================================
# The server in its image: what it needs granted, and that it is enough
# =============================================================================

IMAGE_BASE = "local-endpoints-test/python-base:bookworm-1"   # test_image.py's stand-in for python:3.12-slim


@pytest.fixture(scope="module")
def endpoints_image(docker_engine):
    if not docker_engine.has_image(IMAGE_BASE):
        testlib.unavailable(f"no {IMAGE_BASE} on the engine: test_image.py builds it (debootstrap)")
    tag = docker_engine.created_image(f"local-endpoints-test/fault-endpoints:{SESSION_ID}")
    docker_engine.cli("build", "-q", "--build-arg", f"PYTHON_IMAGE={IMAGE_BASE}", "--label", docker_engine.label,
                      "-t", tag, str(testlib.REPO_ROOT), timeout=900)
    try:
        yield tag
    finally:
        docker_engine.cli("rmi", "-f", tag, check=False)


def test_the_server_in_its_image_with_the_capabilities_it_names(docker_engine, containers, busybox_image,
                                                                endpoints_image):
    opted = containers.run("--label", f"{le.FAULT_LABEL}=true", busybox_image, "sleep", "600")
    pid = docker_engine.inspect(opted)["State"]["Pid"]
    peer = peer_with_two_ports(containers, busybox_image)
    fault = json.dumps({"Port": 80, "Protocol": "tcp", "TrafficType": "egress"}).encode()
    socket_mount = ["-v", f"{docker_engine.socket}:/var/run/docker.sock"]

    def server(*grants: str) -> tuple[str, str]:
        port = testlib.free_port()
        container = containers.run("-p", f"127.0.0.1:{port}:80", *socket_mount, *grants, endpoints_image)
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _answers(url), 30), docker_engine.cli("logs", container).stderr
        return container, url

    def call(url: str, operation: str) -> tuple[int, str]:
        status, _, answer = testlib.http_request(url, "POST", f"/api/{opted[:12]}/fault/v1/{BLACKHOLE}/{operation}",
                                                 body=fault)
        return status, answer.decode()

    # Without the capabilities: the start-up line and the 500 say what to grant.
    bare, url = server()
    assert "fault injection off" in docker_engine.cli("logs", bare).stderr
    status, answer = call(url, "start")
    assert status == 500 and "--cap-add SYS_ADMIN --cap-add NET_ADMIN --pid host" in json.loads(answer)["Error"]
    # With them, the fault is real.
    granted, url = server("--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN", "--pid", "host")
    assert "fault injection ready" in docker_engine.cli("logs", granted).stderr
    assert call(url, "start") == (200, '{"Status":"running"}')
    assert probe(pid, f"{peer}:80", f"{peer}:8081") == {f"{peer}:80": "timeout", f"{peer}:8081": "open"}
    assert call(url, "stop") == (200, '{"Status":"stopped"}')
    assert probe(pid, f"{peer}:80")[f"{peer}:80"] == "open"


def _answers(url: str) -> bool:
    try:
        return testlib.http_request(url, path="/health", timeout=2)[0] == 200
    except OSError:
        return False
