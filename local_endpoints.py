#!/usr/bin/env python3
"""local-endpoints: Amazon ECS local container endpoints, in one readable file.

Run beside your containers so the code inside them sees what it would see on
ECS or Fargate:

* credentials at ``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`` (``/creds``,
  ``/role/{name}``, ``/role-arn/{arn}``), vended from your own AWS identity;
* the same credentials as the EC2 instance metadata service (IMDSv2, under
  ``/latest/``) gives them, for SDKs pointed at it with
  ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` from any network;
* task metadata and stats (v2, v3, v4) built from the live Docker Engine
  (or podman's Docker API);
* task scale-in protection at ``ECS_AGENT_URI`` (``/api/{id}/task-protection/v1/state``);
* ``run TASKDEF``: a task definition's containers started as the ECS agent starts
  them, with the endpoints at 169.254.170.2 in their network namespaces and their
  task role at ``/v2/credentials/{id}``.  Besides the calls below, ``run`` enters a
  task's network namespaces (``in_network_namespace``: setns(2)) to give loopback the
  endpoints' address (``add_endpoints_address``: an ioctl) and listen there.
* fault injection there too (``/api/{id}/fault/v1/...``), applied for real in the task's network
  namespace: ``FaultInjector`` runs the ECS agent's own iptables, ip6tables and tc command lines
  with nsenter (``FaultCommands``, the one place that starts other programs).

Reading guide for auditors: every route is in ``ROUTES`` near the end of the
file, written as a rule such as ``/v{version:3|4}[/{ident:container}]/task``
(``compile_rule`` says what each part means); each names one small handler
method of a route family (``CredentialRoutes``, ``ImdsRoutes``, ``MetadataRoutes``,
``AgentApiRoutes``), all built by ``build_endpoints`` from the settings and the
two outside edges.  Every outbound call is a method of one of those two
classes, marked ``@outbound`` with the call's name, given here in brackets
after each method; every public method of the two is listed, and their
protocols (``DockerApi``, ``AwsApi``), through which the rest of the module sees
them, list the same.  ``DockerClient``
(the Docker Engine API over its socket; any call may first ask GET /version,
once, to choose the API version: for the metadata ``containers``
[``docker:containers``], ``inspect`` [``docker:inspect``], ``networks``
[``docker:networks``], ``events`` [``docker:events``], ``stats``
[``docker:stats``]; for the task of run ``image`` [``docker:image``], ``pull``
[``docker:pull``], ``create`` [``docker:create``], ``start`` [``docker:start``],
``stop`` [``docker:stop``], ``remove`` [``docker:remove``], ``create_volume``
[``docker:create_volume``], ``volume`` [``docker:volume``], ``remove_volume``
[``docker:remove_volume``], ``logs`` [``docker:logs``], ``task_events``
[``docker:task_events``]; ``timeout_error`` [] only makes the error) and
``AwsIdentity`` (``resolve_at_startup``, ``source``, ``base``
[``boto3:credential-chain``]: boto3's credential chain, which may call out for
SSO, assume-role profiles or credential_process, and which the first call to
each AWS service goes through too; ``_open_mfa_session``
[``sts:GetSessionToken``]: the MFA session opened at start-up;
``check_mfa_session``, ``mfa_session_ends`` []: what is known of that session,
no call; ``get_session_token`` [``sts:GetSessionToken``],
``get_caller_identity`` [``sts:GetCallerIdentity``], ``get_role``
[``iam:GetRole``], ``assume_role`` [``sts:AssumeRole``]; for run,
``describe_task_definition`` [``ecs:DescribeTaskDefinition``], and with the
execution role's credentials when the task has one ``get_parameters``
[``ssm:GetParameters``], ``get_secret_value``
[``secretsmanager:GetSecretValue``], ``get_object`` [``s3:GetObject``],
``get_authorization_token`` [``ecr:GetAuthorizationToken``]).
Each row of ``ROUTES`` says who may call the route (its ``guard``: anyone;
an allowed network and the authorization token; IMDS's allowed network and
session token; the credentials id ``run`` gave a task), whether every answer is recorded
(``audited``), and which outbound calls its answer may make (``calls``, the
guard's and the audit record's included).  ``RequestHandler.answer`` applies the
three to every request (``Access`` the guard, ``AuditTrail`` the record), and no
handler checks a caller itself: it puts the row's calls in force on the request's
thread, and the two classes refuse any other call before making it (one ERROR
line; the answer is a 500 ``UndeclaredCall``).  Work off the request path
declares its own calls where it is started (``job``: start-up, the Docker events
watcher, the stats collectors, refresh-ahead, ``run`` and its threads); a thread
that declared nothing may call nothing.  ``CallerPolicy`` decides which networks and
token are allowed, ``RoleAllowlist`` which roles may be handed out, and
``AuditTrail`` writes the records, each before its answer is sent (a log line
is one write(2), ``LineHandler``).  Every setting is one row of ``SETTINGS``.

Sections, in file order, as data flows: settings; requests, responses and errors;
outbound calls (what routes and jobs declare); the outside edges (DockerClient,
AwsIdentity); the Docker view; credentials; access and audit; ECS documents (pure);
task definitions (pure: run's plan); background services (stats, task protection,
fault injection); run (one task's containers); handlers, by family; ROUTES; HTTP;
run (the command); main().
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import contextvars
import copy
import ctypes
import email.message
import email.utils
import enum
import errno
import fcntl
import functools
import getpass
import gzip
import hmac
import http.client
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Protocol
from urllib.parse import quote, unquote

import boto3
import botocore.config
import botocore.credentials
import botocore.exceptions
import botocore.session
import requests
import requests_unixsocket

VERSION = "0.1.0"
log = logging.getLogger("local_endpoints")
audit_log = logging.getLogger("local_endpoints.audit")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# ---------------------------------------------------------------------------
# Settings: every setting is one row of SETTINGS, its default computed there
# ---------------------------------------------------------------------------

DEFAULT_TASK_ARN = (
    "arn:aws:ecs:us-west-2:111111111111:task/ecs-local-cluster/37e873f6-37b4-42a7-af47-eac7275c6152"
)


def default_task_arn(cluster_arn: str, project: str | None) -> str:
    """TASK_ARN's default: a compose project's own stable ARN, in the region and account of
    CLUSTER_ARN when that is an ARN; outside compose the original's fixed default."""
    if not project:
        return DEFAULT_TASK_ARN
    cluster = cluster_arn.split(":")
    prefix = ":".join(cluster[:5]) if len(cluster) > 5 else DEFAULT_TASK_ARN.split(":task/")[0]
    return f"{prefix}:task/{cluster_name(cluster_arn)}/{uuid.uuid5(TASK_ID_NAMESPACE, project)}"


class ConfigError(Exception):
    """A setting that cannot be used: reported as one line at start-up."""


# Parsers of setting values: text from the environment -> value, or ValueError saying why not.

def integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def port_number(text: str) -> int:
    port = integer(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return port


def positive(text: str) -> int:
    number = integer(text)
    if number < 1:
        raise ValueError(f"{number} is not a positive number")
    return number


def boolean(text: str) -> bool:
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def choice(*words: str) -> Callable[[str], str]:
    """A parser accepting one of words, in any case."""
    def parse(text: str) -> str:
        word = text.strip().upper()
        if word not in words:
            raise ValueError(f"{text!r} is not one of {', '.join(words)}")
        return word
    parse.__name__ = "choice"
    return parse


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration ('750s', '15m', '1h30m') or a plain number."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def parse_tags(text: str) -> dict[str, str]:
    tags = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r} is not key=value")
        tags[key.strip()] = value.strip()
    return tags


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


def endpoint_url(text: str) -> str:
    """The original accepted bare host names as endpoints; boto3 wants a URL."""
    return text if "://" in text else "https://" + text


def docker_host(text: str) -> str:
    if not text.startswith(("unix://", "tcp://", "http://")):
        raise ValueError(f"{text!r}: expected unix://PATH or tcp://HOST:PORT")
    return text


def token_file(path: str) -> str:
    """A readable, non-empty file; CallerPolicy reads the token from it."""
    read_token_file(path)
    return path


def role_name_or_arn(text: str) -> str:
    """An IAM role's name or ARN (ROLE_NAME and ROLE_ARN are defined with the credentials)."""
    if not (ROLE_NAME.fullmatch(text) or ROLE_ARN.fullmatch(text)):
        raise ValueError(f"{text!r} is neither an IAM role name nor a role ARN "
                         "(arn:aws:iam::123456789012:role/NAME)")
    return text


def read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    if not token:
        raise ValueError(f"{path} is empty")
    return token


def allowed_roles(text: str) -> RoleAllowlist:
    return RoleAllowlist.parse(text)


def mfa_session_duration(text: str) -> float:
    """sts:GetSessionToken's range: 15 minutes to 36 hours."""
    seconds = parse_duration(text)
    if not 900 <= seconds <= 129600:
        raise ValueError(f"{text!r} is outside 15m..36h")
    return seconds


@dataclass(frozen=True)
class Setting:
    """One environment variable: the only definition of its default, parser and meaning.

    load_config(), --help, the command-line flags and the settings table of docs/settings.md are all
    made from SETTINGS.
    """
    name: str
    field: str | None              # the Config attribute it fills; None when read elsewhere
    default: str                   # as written in the environment; "" means unset (None)
    parse: Callable[[str], Any]
    help: str
    aliases: tuple[str, ...] = ()  # other variables read, in order, when this one is unset
    shown_default: str = ""        # what to show when the default is worked out at run time
    lenient: bool = False          # a bad value warns and the default applies, as in the original
    flag: str = ""                 # a command-line flag that overrides the variable
    origin: str = "new"            # how it relates to the original's settings
    # Defaults worked out rather than written (shown_default says how): from the environment
    # at start-up (load_config), or for each task from what task_identity() knows of it.
    default_of: Callable[[Mapping[str, str]], Any] | None = None
    task_default: Callable[..., str] | None = None

    def meaning(self) -> str:
        return self.help + (f" (also read: {', '.join(self.aliases)})" if self.aliases else "")

    def read(self, environ: Mapping[str, str], args: argparse.Namespace | None = None) -> Any:
        """This setting's value: its flag's, else the environment's, else the default's."""
        given = getattr(args, self.flag[2:].replace("-", "_"), None) if self.flag and args else None
        text = given if given is not None else next(
            (environ[n] for n in (self.name, *self.aliases) if environ.get(n)), self.default)
        if not text:
            return self.default_of(environ) if self.default_of else None
        try:
            return self.parse(text)
        except ValueError as exc:
            if not self.lenient:
                raise ConfigError(f"{self.flag if given is not None else self.name}: {exc}") from None
            log.warning("%s=%r: %s; using %s", self.name, text, exc, self.default)
            return self.parse(self.default)


IMDS_DEFAULT_ROLE = "local-endpoints"   # the role name IMDS lists for the credentials of /creds

SETTINGS: tuple[Setting, ...] = (
    Setting("ECS_LOCAL_METADATA_PORT", "port", "80", port_number, "TCP port to listen on",
            flag="--port", origin="original"),
    Setting("ECS_LOCAL_BIND_ADDRESS", "bind", "0.0.0.0", str, "address to listen on; '::' serves IPv4 and IPv6",
            flag="--bind"),
    Setting("ECS_LOCAL_LOG_LEVEL", None, "INFO", choice("DEBUG", "INFO", "WARNING", "ERROR"),
            "DEBUG, INFO, WARNING or ERROR", flag="--log-level"),
    Setting("AWS_PROFILE", None, "", str,
            "profile of ~/.aws/config and ~/.aws/credentials; the whole boto3 credential chain applies",
            origin="original (which used the Go SDK's chain)"),
    Setting("SHARED_TOKEN_EXPIRATION", "shared_token_expiration", "750s", parse_duration,
            "lifetime given to base credentials that are already temporary and carry no expiry of "
            "their own ('750s', '15m', '1h', or seconds; a bad value warns and the default applies)",
            lenient=True, origin="original"),
    Setting("STS_ENDPOINT", "sts_endpoint", "", endpoint_url, "STS endpoint URL, first set wins",
            aliases=("STS_CUSTOM_ENDPOINT", "AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL"),
            origin="original; the others are new (STS_CUSTOM_ENDPOINT appeared in the original's example)"),
    Setting("IAM_ENDPOINT", "iam_endpoint", "", endpoint_url, "IAM endpoint URL, first set wins",
            aliases=("IAM_CUSTOM_ENDPOINT", "AWS_ENDPOINT_URL_IAM", "AWS_ENDPOINT_URL"),
            origin="as STS_ENDPOINT"),
    Setting("DOCKER_HOST", "docker_host", "", docker_host,
            "the Docker Engine: unix://PATH, or tcp://HOST:PORT (plain HTTP, no TLS)",
            shown_default="the first that exists of /var/run/docker.sock, ~/.docker/run/docker.sock "
                          "(Docker Desktop), $XDG_RUNTIME_DIR/docker.sock (rootless), "
                          "~/.colima/default/docker.sock, /run/podman/podman.sock, "
                          "$XDG_RUNTIME_DIR/podman/podman.sock",
            origin="Docker's standard variable, which the original's Docker client read too",
            default_of=lambda environ: default_docker_host(environ)),   # defined with the Docker client
    Setting("CLUSTER_ARN", "cluster_arn", "ecs-local-cluster", str, "Cluster in task metadata",
            origin="original"),
    Setting("TASK_ARN", "task_arn", "", str, "TaskARN",
            shown_default="one stable ARN per compose project; outside compose the original's fixed default",
            origin="original, which used its fixed default for every task",
            task_default=default_task_arn),
    Setting("TASK_DEFINITION_FAMILY", "task_family", "", str, "Family",
            shown_default="the compose project, else ecs-local-task-definition",
            origin="original (its default was esc-local-task-definition)",
            task_default=lambda project: project or "ecs-local-task-definition"),
    Setting("TASK_DEFINITION_REVISION", "task_revision", "1", str, "Revision", origin="original"),
    Setting("LAUNCH_TYPE", "launch_type", "EC2", choice("EC2", "FARGATE", "EXTERNAL"),
            "LaunchType (v4): EC2, FARGATE or EXTERNAL"),
    Setting("AVAILABILITY_ZONE", "availability_zone", "", str, "AvailabilityZone",
            shown_default="region of the task ARN + a", task_default=lambda region: f"{region}a"),
    Setting("AVAILABILITY_ZONE_ID", "availability_zone_id", "", str,
            "AvailabilityZoneID (v4), e.g. usw2-az1; left out when unset"),
    Setting("VPC_ID", "vpc_id", "", str, "VPCID (v4, EC2 launch type only); left out when unset"),
    Setting("TASK_TAGS", "task_tags", "", parse_tags, "TaskTags on the WithTags routes, as k=v,k2=v2",
            aliases=("TASK_TAGS_VAR",), origin="TASK_TAGS_VAR is the original's name"),
    Setting("CONTAINER_INSTANCE_TAGS", "container_instance_tags", "", parse_tags,
            "ContainerInstanceTags on the WithTags routes, as k=v,k2=v2", origin="original"),
    Setting("CONTAINER_METADATA_PATH", "container_metadata_path", "", str,
            "JSON file deep-merged over every container response (the file wins; re-read when it changes)",
            origin="original"),
    Setting("TASK_METADATA_PATH", "task_metadata_path", "", str,
            "JSON file deep-merged over every task response", origin="original"),
    Setting("ECS_LOCAL_CONTAINER_ID", "own_container", "", str,
            "name or ID of the container this server runs in (left out of tasks; callers are matched "
            "on its networks)", shown_default="found from HOSTNAME or /proc"),
    Setting("HOSTNAME", "hostname", "", str,
            "set by Docker to the container's short ID: one way to find the server's own container",
            origin="Docker's"),
    Setting("ECS_LOCAL_ALLOWED_CALLERS", "allowed_callers", "", parse_networks,
            "comma-separated CIDRs allowed to fetch credentials; replaces the default",
            shown_default="loopback, link-local and the engine's bridge subnets"),
    Setting("ECS_LOCAL_AUTHORIZATION_TOKEN", "authorization_token", "", str,
            "when set, credentials routes require this Authorization header"),
    Setting("ECS_LOCAL_AUTHORIZATION_TOKEN_FILE", "authorization_token_file", "", token_file,
            "file holding that token; re-read when it changes, so a rotated token needs no restart"),
    Setting("ECS_LOCAL_ALLOWED_ROLES", "allowed_roles", "", allowed_roles,
            "comma-separated role names, role ARNs and `*` globs on ARNs (`arn:aws:iam::123456789012:role/team-*`) "
            "that /role and /role-arn may hand out; see docs/security.md", shown_default="any role"),
    Setting("ECS_LOCAL_MFA_SESSION_DURATION", "mfa_session_duration", "12h", mfa_session_duration,
            "how long the MFA code typed at start-up lasts, for a profile with mfa_serial (15m to 36h)"),
    Setting("ECS_LOCAL_AUDIT_LOG", "audit_log", "", str,
            "file to append one JSON line to for every credentials response (the audit trail)"),
    Setting("ECS_LOCAL_MAX_CONNECTIONS", "max_connections", "512", positive,
            "concurrent connections served; more get a quick 503"),
    Setting("ECS_LOCAL_IMDS", "imds", "AUTO", choice("AUTO", "ON", "OFF"),
            "the IMDSv2-compatible credentials routes (/latest/...): ON, OFF, or AUTO: on unless an "
            "authorization token is set (SDKs send IMDS none)"),
    Setting("ECS_LOCAL_IMDS_ROLE", "imds_role", "", role_name_or_arn,
            "the role whose credentials IMDS hands out, by name or ARN",
            shown_default=f"those of /creds, listed as role {IMDS_DEFAULT_ROLE}"),
    Setting("ECS_LOCAL_IMDS_V1", "imds_v1", "false", boolean,
            "let IMDS callers in without a session token (IMDSv1)"),
    Setting("ECS_LOCAL_STATS", "stats", "eager", choice("EAGER", "ON-DEMAND"),
            "eager: collect every running container's stats from its start, so the first stats request "
            "answers at once (costs per container: see docs/performance.md); on-demand: from the first "
            "request for it"),
)


@functools.cache
def setting(name: str) -> Setting:
    return next(s for s in SETTINGS if s.name == name)


@dataclass(frozen=True)
class Config:
    """The settings' values, as load_config() reads them: each default is written once, in SETTINGS."""
    port: int
    bind: str
    shared_token_expiration: float
    sts_endpoint: str | None
    iam_endpoint: str | None
    docker_host: str
    cluster_arn: str
    task_arn: str | None
    task_family: str | None
    task_revision: str
    launch_type: str
    availability_zone: str | None
    availability_zone_id: str | None
    vpc_id: str | None
    task_tags: dict[str, str] | None
    container_instance_tags: dict[str, str] | None
    container_metadata_path: str | None
    task_metadata_path: str | None
    own_container: str | None
    hostname: str | None
    allowed_callers: tuple[IPNetwork, ...] | None
    authorization_token: str | None = field(repr=False)
    authorization_token_file: str | None
    allowed_roles: RoleAllowlist | None
    mfa_session_duration: float
    audit_log: str | None
    max_connections: int
    imds: str
    imds_role: str | None
    imds_v1: bool
    stats: str   # EAGER or ON-DEMAND


def settings_help() -> str:
    width = max(len(s.name) for s in SETTINGS)
    lines = ["settings (environment variables):"]
    for s in SETTINGS:
        default = s.shown_default or s.default
        lines.append(f"  {s.name:<{width}}  {s.meaning()}" + (f" ({s.flag})" if s.flag else "")
                     + (f" [default: {default}]" if default else ""))
    return "\n".join(lines)


def settings_table() -> str:
    """The settings table of docs/settings.md (a test keeps the two equal)."""
    rows = ["| Environment variable | Flag | Default | Meaning | Compatibility |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        default = s.shown_default or (f"`{s.default}`" if s.default else "")
        rows.append(f"| `{s.name}` | {f'`{s.flag}`' if s.flag else ''} | {default} | {s.meaning()} | {s.origin} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="local_endpoints.py",
        description="Amazon ECS local container endpoints: credentials and task metadata for "
                    "containers running on your machine.",
        epilog=settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    for s in SETTINGS:
        if s.flag:
            parser.add_argument(s.flag, help=f"{s.help} ({s.name}, default {s.default})")
    parser.add_argument("--generate-token", action="store_true",
                        help="print a random token for ECS_LOCAL_AUTHORIZATION_TOKEN and exit")
    parser.add_argument("--health-check", action="store_true",
                        help="exit 0 if the server on this port answers /health (the image's HEALTHCHECK)")
    parser.add_argument("--version", action="version", version=f"local-endpoints {VERSION}")
    return parser.parse_args(argv)


def log_level(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    return setting("ECS_LOCAL_LOG_LEVEL").read(environ, args)


def load_config(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Every setting from its flag, else the environment, else its default in SETTINGS."""
    config = Config(**{s.field: s.read(environ, args) for s in SETTINGS if s.field})
    if config.authorization_token and config.authorization_token_file:
        raise ConfigError("ECS_LOCAL_AUTHORIZATION_TOKEN and ECS_LOCAL_AUTHORIZATION_TOKEN_FILE are both set: "
                          "set one (the file, to rotate the token without a restart)")
    return config


def default_config() -> Config:
    """Every setting at its default (no environment, no command line)."""
    return load_config(parse_args([]), {})


# ---------------------------------------------------------------------------
# Requests, responses and errors: what every handler takes, returns or raises
# ---------------------------------------------------------------------------

@dataclass(slots=True)   # made for every request: slots make it and its reads quicker
class Request:
    params: Mapping[str, Any]   # the route's parameters, typed (version is an int); read-only
    caller: IPAddress
    headers: email.message.Message
    received: float             # time.monotonic() when the request line arrived
    body: bytes = b""           # only routes with body=True read one
    namespace: frozenset[str] = frozenset()   # `run`: the containers of the network namespace it came from

    @property
    def authorization(self) -> str | None:
        return self.headers.get("Authorization")


@dataclass
class Response:
    """What a handler may return when a JSON body with 200 is not enough."""
    body: bytes = b""
    status: int = 200
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def text_response(text: str, headers: dict[str, str] | None = None) -> Response:
    """200 with a text/plain body, as IMDS answers everything."""
    return Response(text.encode(), content_type="text/plain", headers=headers or {})


class ApiError(Exception):
    """An answer other than 200, sent as {"code", "message", "HTTPErrorCode"}: one JSON shape
    for every error the server gives (a subclass may give a route family its own shape)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"code": self.code, "message": self.message, "HTTPErrorCode": self.status}

    def response(self) -> Response:
        return Response(json.dumps(self.body()).encode(), self.status, headers=self.headers)


# ---------------------------------------------------------------------------
# Outbound calls: what each route and each background job declares it may make
# ---------------------------------------------------------------------------

class UndeclaredCall(BaseException):
    """An outbound call that the declaration in force does not name, refused before it was made.

    Not an Exception: it is a defect of this server, and no handler of the outside's failures
    (an ``except Exception`` that answers 502 or serves a cached entry instead) may take it for one.
    """


@dataclass(frozen=True)
class Job:
    """Background work that calls out, and the calls it may make.  A thread starts with no
    declaration (each has a context of its own), so every thread that calls out names its job
    where it is started; a request thread is declared for by the route it answers."""
    name: str
    calls: frozenset[str]

    @property
    def declaration(self) -> str:
        if not self.name:
            return "this thread declared no route or job"
        return declaration(f"the job {self.name!r}", self.calls)

    @contextlib.contextmanager
    def declared(self) -> Iterator[None]:
        in_force = DECLARED_CALLS.set(self)
        try:
            yield
        finally:
            DECLARED_CALLS.reset(in_force)

    def target(self, work: Callable[..., Any]) -> Callable[..., None]:
        """work as a thread's target, under this declaration."""
        def run(*args: Any) -> None:
            with self.declared():
                work(*args)
        return run


def job(name: str, *calls: str) -> Job:
    return Job(name, frozenset(calls))


def declaration(declarer: str, calls: frozenset[str]) -> str:
    """What a refusal's log line says was declared."""
    return f"{declarer} declares {', '.join(sorted(calls)) or 'no call'}"


UNDECLARED = job("")

# The route being answered on this thread (RequestHandler.answer sets it) or the job running on it.
DECLARED_CALLS: contextvars.ContextVar[Route | Job] = contextvars.ContextVar("declared_calls", default=UNDECLARED)


def outbound(call: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The mark of each method of DockerClient and AwsIdentity that calls out, naming the call
    (an IAM action, docker:<method>, or boto3:credential-chain).  The method runs only if the
    declaration in force names the call: else one ERROR line and UndeclaredCall, and no call.
    On the hot path: one ContextVar read and one frozenset lookup."""
    def mark(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def checked(*args: Any, **kwargs: Any) -> Any:
            declared = DECLARED_CALLS.get()
            if call not in declared.calls:
                log.error("outbound call %s refused: %s", call, declared.declaration)
                raise UndeclaredCall(f"{call}: {declared.declaration}")
            return method(*args, **kwargs)
        checked.outbound = call   # type: ignore[attr-defined]  # read by the tests of the guide and the calls
        return checked
    return mark


# ---------------------------------------------------------------------------
# The outside edges: DockerClient (the Docker Engine API) and AwsIdentity (boto3),
# the only two classes that call out of the process
# ---------------------------------------------------------------------------

class DockerApi(Protocol):
    """What the rest of the module may ask of the Docker Engine: DockerClient's methods, the only
    Docker calls there are; a test may pass build_endpoints() another implementation."""
    host: str
    api_version: str | None

    def timeout_error(self) -> ApiError: ...
    def containers(self) -> list[dict]: ...
    def inspect(self, container_id: str) -> dict: ...
    def networks(self) -> list[dict]: ...
    def events(self, since: int, until: int, read_timeout: float) -> Iterator[dict]: ...
    def stats(self, container_id: str) -> Iterator[dict]: ...
    def image(self, reference: str) -> dict: ...
    def pull(self, reference: str, auth: str | None = None) -> None: ...
    def create(self, name: str, body: dict) -> str: ...
    def start(self, container_id: str) -> None: ...
    def stop(self, container_id: str, timeout: int) -> None: ...
    def remove(self, container_id: str) -> None: ...
    def create_volume(self, body: dict) -> None: ...
    def volume(self, name: str) -> dict: ...
    def remove_volume(self, name: str) -> None: ...
    def logs(self, container_id: str, tty: bool, follow: bool = True) -> Iterator[tuple[int, bytes]]: ...
    def task_events(self, task_arn: str) -> Iterator[dict]: ...


class AwsApi(Protocol):
    """What the rest of the module may ask of AWS: AwsIdentity's methods, the only AWS calls there
    are; a test may pass build_endpoints() another implementation."""
    profile: str | None
    region: str | None
    mfa: MfaProfile | None

    def resolve_at_startup(self) -> str: ...
    def mfa_session_ends(self) -> datetime | None: ...
    def check_mfa_session(self) -> None: ...
    def source(self) -> str: ...
    def base(self) -> tuple[Any, datetime | None, str]: ...
    def get_session_token(self, duration: int) -> dict: ...
    def get_caller_identity(self) -> dict: ...
    def get_role(self, name: str) -> dict: ...
    def assume_role(self, arn: str, session_name: str, duration: int, external_id: str | None = None) -> dict: ...
    def describe_task_definition(self, name: str) -> dict: ...
    def get_parameters(self, names: list[str], region: str, credentials: Credentials | None) -> dict: ...
    def get_secret_value(self, secret_id: str, version_stage: str, version_id: str, region: str,
                         credentials: Credentials | None) -> dict: ...
    def get_object(self, bucket: str, key: str, credentials: Credentials | None) -> bytes: ...
    def get_authorization_token(self, region: str, credentials: Credentials | None) -> dict: ...


DOCKER_TIMEOUT = 5.0
MAX_DOCKER_API = (1, 51)
COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
ECS_CONTAINER_NAME = "com.amazonaws.ecs.container-name"   # the agent's label: the task definition's name


def choose_api_version(server: dict) -> str:
    """The engine's API version, capped at the newest this file was written against.

    Never a pinned old version: Docker 29 refuses anything below 1.44.
    """
    def parse(text: str) -> tuple[int, int]:
        major, minor = text.split(".")[:2]
        return int(major), int(minor)

    chosen = min(parse(server["ApiVersion"]), MAX_DOCKER_API)
    if server.get("MinAPIVersion"):
        chosen = max(chosen, parse(server["MinAPIVersion"]))
    return f"{chosen[0]}.{chosen[1]}"


def default_docker_host(environ: Mapping[str, str]) -> str:
    """The first socket that exists of the usual places (DOCKER_HOST unset)."""
    home = environ.get("HOME") or os.path.expanduser("~")
    runtime = environ.get("XDG_RUNTIME_DIR")
    candidates = ["/var/run/docker.sock", f"{home}/.docker/run/docker.sock"]
    if runtime:
        candidates.append(f"{runtime}/docker.sock")
    candidates += [f"{home}/.colima/default/docker.sock", "/run/podman/podman.sock"]
    if runtime:
        candidates.append(f"{runtime}/podman/podman.sock")
    found = next((path for path in candidates if os.path.exists(path)), candidates[0])
    return "unix://" + found


def parse_docker_time(text: str | None) -> datetime | None:
    """Docker's RFC 3339 times (nanoseconds are cut to microseconds); None for its zero time."""
    if not text or text.startswith("0001-01-01"):
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def docker_stats(sample: dict) -> dict:
    """Podman's stats in Docker's words: "id" (podman: "Id"), the name with Docker's slash,
    and the network totals under eth0 (podman: "network", one total for every interface)."""
    doc = {("id" if key == "Id" else key): value for key, value in sample.items()}
    if doc.get("name") and not doc["name"].startswith("/"):
        doc["name"] = "/" + doc["name"]
    networks = doc.get("networks") or {}
    if list(networks) == ["network"]:
        doc["networks"] = {"eth0": networks["network"]}
    return doc


class DockerClient:
    """The Docker Engine API over its socket: the only class that calls Docker.

    Every call is one of the named methods below, each with a timeout, and marked @outbound
    with its name: it is made only where the route or job in force declares it.
    """

    def __init__(self, host: str):
        self.host = host
        if host.startswith("unix://"):
            self.base = "http+unix://" + quote(host[len("unix://"):], safe="")
        else:
            self.base = "http://" + host.split("://", 1)[1]
        self._session = self._new_session()
        self._session_lock = threading.Lock()   # one connection: calls on it take turns
        self.api_version: str | None = None
        self.podman: str | None = None   # podman's version, when the engine is podman

    @staticmethod
    def _new_session() -> requests.Session:
        return requests_unixsocket.Session()

    def timeout_error(self) -> ApiError:
        return ApiError(504, "DockerTimeout",
                        f"the Docker Engine at {self.host} did not answer within {DOCKER_TIMEOUT:g} s")

    def _error(self, exc: Exception) -> ApiError:
        if isinstance(exc, requests.Timeout):
            return self.timeout_error()
        return ApiError(503, "DockerUnavailable",
                        f"cannot reach the Docker Engine at {self.host}: is Docker running and the socket "
                        "mounted (-v /var/run/docker.sock:/var/run/docker.sock)? Set DOCKER_HOST to "
                        "use another socket")

    # -- the calls -----------------------------------------------------------

    def _version(self) -> dict:
        """GET /version, unversioned, on a connection of its own (no turn to wait for): how
        _negotiate() picks the API version, which any call below may begin with, so not a
        call of its own to declare."""
        with contextlib.closing(self._new_session()) as session:
            return self._call(session, self.base + "/version")

    @outbound("docker:containers")
    def containers(self) -> list[dict]:
        """Summaries of every container, stopped ones included."""
        return self._get("/containers/json", {"all": "1"})

    @outbound("docker:inspect")
    def inspect(self, container_id: str) -> dict:
        """docker inspect of one container; LookupError once it is gone."""
        container = self._get(f"/containers/{quote(container_id, safe='')}/json")
        state = container.get("State") or {}
        if "Health" in state and not (state["Health"] or {}).get("Status"):
            del state["Health"]   # podman's way of saying that there is no health check
        return container

    @outbound("docker:networks")
    def networks(self) -> list[dict]:
        return self._get("/networks")

    @outbound("docker:events")
    def events(self, since: int, until: int, read_timeout: float) -> Iterator[dict]:
        """Container and network events from since until until (Docker then ends the stream)."""
        return self._stream("/events", {"filters": json.dumps({"type": ["container", "network"]}),
                                        "since": str(since), "until": str(until)}, read_timeout)

    @outbound("docker:stats")
    def stats(self, container_id: str) -> Iterator[dict]:
        """One container's stats, a sample a second, until it stops."""
        path = f"/containers/{quote(container_id, safe='')}/stats"
        if self.api_version is None:
            self._negotiate()
        if self.podman:
            return self._podman_stats(path)
        return self._stream(path, {"stream": "1"}, DOCKER_TIMEOUT)

    # -- the calls `run` makes -------------------------------------------------

    @outbound("docker:image")
    def image(self, reference: str) -> dict:
        """docker image inspect; LookupError when the engine does not have it."""
        return self._get(f"/images/{quote(reference, safe='')}/json")

    @outbound("docker:pull")
    def pull(self, reference: str, auth: str | None = None) -> None:
        """docker pull, with a registry's credentials (X-Registry-Auth) when given, waiting for the
        end of Docker's progress stream; a failure is an ApiError with Docker's message (Docker
        reports it inside the stream, after a 200)."""
        tagged = "@" in reference or ":" in reference.rsplit("/", 1)[-1]
        for event in self._stream("/images/create", {"fromImage": reference if tagged else reference + ":latest"},
                                  read_timeout=None, method="POST",
                                  headers={"X-Registry-Auth": auth} if auth else None):
            if event.get("error"):
                raise ApiError(502, "CannotPullContainerError", str(event["error"])[:500])

    @outbound("docker:create")
    def create(self, name: str, body: dict) -> str:
        """docker create: the new container's ID."""
        return self._send("POST", "/containers/create", {"name": name}, body)["Id"]

    @outbound("docker:start")
    def start(self, container_id: str) -> None:
        self._send("POST", f"/containers/{quote(container_id, safe='')}/start")

    @outbound("docker:stop")
    def stop(self, container_id: str, timeout: int) -> None:
        """docker stop: the container's stop signal, then SIGKILL after timeout seconds."""
        self._send("POST", f"/containers/{quote(container_id, safe='')}/stop", {"t": str(timeout)},
                   read_timeout=timeout + DOCKER_TIMEOUT)

    @outbound("docker:remove")
    def remove(self, container_id: str) -> None:
        """docker rm -f -v: the container and its anonymous volumes."""
        self._send("DELETE", f"/containers/{quote(container_id, safe='')}", {"force": "1", "v": "1"})

    @outbound("docker:create_volume")
    def create_volume(self, body: dict) -> None:
        self._send("POST", "/volumes/create", body=body)

    @outbound("docker:volume")
    def volume(self, name: str) -> dict:
        """docker volume inspect; LookupError when there is none of that name."""
        return self._get(f"/volumes/{quote(name, safe='')}")

    @outbound("docker:remove_volume")
    def remove_volume(self, name: str) -> None:
        self._send("DELETE", f"/volumes/{quote(name, safe='')}")

    @outbound("docker:logs")
    def logs(self, container_id: str, tty: bool, follow: bool = True) -> Iterator[tuple[int, bytes]]:
        """A container's output from its start, followed until it stops: (1 stdout or 2 stderr, bytes).

        Docker multiplexes the two streams of a container without a TTY in frames of an 8-byte
        header (stream, 0, 0, 0, length as big-endian uint32) and the bytes.
        """
        session = self._new_session()
        path = f"/containers/{quote(container_id, safe='')}/logs"
        try:
            response = self._call(session, self._url(path), {"follow": str(int(follow)), "stdout": "1",
                                                             "stderr": "1"}, stream=True, read_timeout=None)
        except BaseException:
            session.close()
            raise
        return self._frames(session, response, tty, container_id)

    def _frames(self, session: requests.Session, response: requests.Response, tty: bool, container_id: str
                ) -> Iterator[tuple[int, bytes]]:
        try:
            raw = response.raw
            while True:
                if tty:
                    chunk = raw.read1(65536)
                    if not chunk:
                        return
                    yield 1, chunk
                    continue
                header = raw.read(8)
                if len(header) < 8:
                    return
                stream, length = header[0], int.from_bytes(header[4:], "big")
                yield stream, raw.read(length)
        except (requests.RequestException, OSError) as exc:
            log.debug("log stream of %s ended: %s", container_id[:12], exc)
        finally:
            response.close()
            session.close()

    @outbound("docker:task_events")
    def task_events(self, task_arn: str) -> Iterator[dict]:
        """Events of the containers of one task (their com.amazonaws.ecs.task-arn label), as they come."""
        return self._stream("/events", {"filters": json.dumps({"type": ["container"],
                                                               "label": [f"com.amazonaws.ecs.task-arn={task_arn}"]})},
                            read_timeout=None)

    def _podman_stats(self, path: str) -> Iterator[dict]:
        """Podman's stats as Docker streams them: a sample a second, each with the one before.

        Podman 4 streams a sample every 5 s, the first with a pre-sample taken milliseconds
        before it; so ask for one sample a second (stream=false answers at once), on a
        connection of its own, and make each the next one's pre-sample.
        """
        session = self._new_session()
        previous: dict | None = None
        try:
            while True:
                started = time.monotonic()
                sample = docker_stats(self._call(session, self._url(path), {"stream": "false"}))
                if previous is not None:
                    sample["preread"], sample["precpu_stats"] = previous["read"], previous["cpu_stats"]
                yield sample
                previous = sample
                time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        finally:
            session.close()

    # -- plumbing ------------------------------------------------------------

    def _url(self, path: str) -> str:
        if self.api_version is None:
            self._negotiate()
        return f"{self.base}/v{self.api_version}{path}"

    def _negotiate(self) -> None:
        version = self._version()
        self.api_version = choose_api_version(version)
        self.podman = next((c.get("Version", "?") for c in version.get("Components") or []
                            if c.get("Name") == "Podman Engine"), None)
        log.info("Docker Engine at %s, API version %s", self.host, self.api_version)
        if self.podman:
            log.info("podman %s: stats asked for once a second (podman streams one every 5 s), their networks "
                     "one total under eth0; health checks run only under systemd; DomainNameServers shows "
                     "Docker's 127.0.0.11", self.podman)

    def _call(self, session: requests.Session, url: str, params: dict | None = None,
              stream: bool = False, read_timeout: float | None = DOCKER_TIMEOUT, method: str = "GET",
              body: dict | None = None, headers: dict | None = None) -> Any:
        try:
            response = session.request(method, url, params=params, json=body, stream=stream, headers=headers,
                                       timeout=(DOCKER_TIMEOUT, read_timeout))
        except (requests.ConnectionError, requests.Timeout) as exc:
            self.api_version = None   # the engine may come back as another version
            raise self._error(exc) from None
        if response.status_code == 404:
            response.close()
            raise LookupError(url)
        if response.status_code >= 400:
            message = response.text[:300]
            response.close()
            raise ApiError(502, "DockerError", f"the Docker Engine answered {response.status_code}: {message}")
        if stream:
            return response
        if not response.content:
            return None   # 204: done
        try:
            return response.json()
        except ValueError:
            raise ApiError(502, "DockerError", "the Docker Engine sent a reply that is not JSON") from None

    def _get(self, path: str, params: dict | None = None) -> Any:
        """GET a JSON document; LookupError for a 404 (e.g. a container just removed)."""
        url = self._url(path)
        if not self._session_lock.acquire(timeout=DOCKER_TIMEOUT):
            raise self.timeout_error()
        try:
            return self._call(self._session, url, params)
        finally:
            self._session_lock.release()

    def _send(self, method: str, path: str, params: dict | None = None, body: dict | None = None,
              read_timeout: float = DOCKER_TIMEOUT) -> Any:
        """A call that changes something (`run`'s), on a connection of its own: a stop may take
        the container's whole stop timeout, which must not hold up the shared connection."""
        with contextlib.closing(self._new_session()) as session:
            return self._call(session, self._url(path), params, read_timeout=read_timeout, method=method, body=body)

    def _stream(self, path: str, params: dict, read_timeout: float | None, method: str = "GET",
                headers: dict | None = None) -> Iterator[dict]:
        """The JSON objects of a streaming endpoint (events, stats, pull progress), on a connection
        of its own.

        The connection is open when this returns, so nothing sent after that is missed.
        """
        session = self._new_session()
        try:
            response = self._call(session, self._url(path), params, stream=True, read_timeout=read_timeout,
                                  method=method, headers=headers)
        except BaseException:
            session.close()
            raise
        return self._objects(session, response)

    def _objects(self, session: requests.Session, response: requests.Response) -> Iterator[dict]:
        try:
            for line in response.iter_lines():
                if line:
                    yield json.loads(line)
        except (requests.RequestException, ValueError) as exc:
            raise self._error(exc) from None
        finally:
            response.close()
            session.close()


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    token: str = field(repr=False)
    expiration: datetime
    role_arn: str = ""
    account_id: str = ""

    def seconds_left(self) -> float:
        return self.expires_at - time.time()

    @functools.cached_property
    def expires_at(self) -> float:
        """expiration as a POSIX time, worked out once: every cached request asks seconds_left()."""
        return self.expiration.timestamp()

    @functools.cached_property
    def expiry_text(self) -> str:
        return self.expiration.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def response(self) -> dict:
        """The five keys, in the order the ECS agent writes them, and AccountId when known
        (botocore and the CRT-based SDKs read it for account-based endpoints)."""
        doc = {
            "RoleArn": self.role_arn,
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "Token": self.token,
            "Expiration": self.expiry_text,
        }
        if self.account_id:
            doc["AccountId"] = self.account_id
        return doc


def account_of(arn: str) -> str:
    """The account ID in an ARN (arn:PARTITION:SERVICE:REGION:ACCOUNT:...), or ''."""
    parts = arn.split(":", 5)
    return parts[4] if len(parts) > 5 else ""


@dataclass(frozen=True)
class Issued:
    """Credentials handed out, with what the audit trail says about them."""
    credentials: Credentials
    identity: str | None   # the role ARN, or the base identity's ARN for /creds (None: STS would not say)
    source: str            # "sts" (called for this request), "cache", or "passthrough" (the base
                           # identity's temporary credentials, handed on as they are)


class MfaCodeRequired(Exception):
    """A profile needs an MFA code and nobody is at a terminal to type it."""


class MfaSessionEnded(Exception):
    """The MFA session opened at start-up has ended: only a restart can ask for a new code."""


@dataclass(frozen=True)
class MfaProfile:
    """A profile whose credentials need an MFA code: the code opens one STS session (aws-vault's way),
    and every role is then assumed with that session's credentials."""
    name: str
    serial: str
    source_profile: str         # its credentials call sts:GetSessionToken
    role_arn: str | None = None
    external_id: str | None = None
    session_name: str | None = None
    duration: int | None = None

    @classmethod
    def of(cls, profiles: dict[str, dict], name: str) -> MfaProfile | None:
        """mfa_serial on the profile, or on the source_profile its role_arn chains from."""
        profile = profiles.get(name) or {}
        if "role_arn" not in profile:
            return cls(name, profile["mfa_serial"], name) if profile.get("mfa_serial") else None
        source = profile.get("source_profile")
        if not source:   # credential_source: botocore's own assume-role provider applies
            return None
        serial = profile.get("mfa_serial") or (profiles.get(source) or {}).get("mfa_serial")
        if not serial:
            return None
        duration = profile.get("duration_seconds")
        return cls(name, serial, source, profile["role_arn"], profile.get("external_id"),
                   profile.get("role_session_name"), int(duration) if duration else None)


def aws_error(exc: Exception, action: str, profile: str | None) -> ApiError:
    """Map what boto3 raised to our status and code; AWS's code and message are kept."""
    profile_arg = f" --profile {profile}" if profile else ""
    if isinstance(exc, (MfaCodeRequired, botocore.exceptions.RefreshWithMFAUnsupportedError)):
        # botocore asks for a code once per process; after that only a restart can ask again.
        return ApiError(503, "MfaRequired",
                        f"profile {profile or 'default'} needs an MFA code: restart local-endpoints in a "
                        "terminal (docker run -it / docker compose run) to type it once at start-up, "
                        "or use a profile without mfa_serial")
    if isinstance(exc, MfaSessionEnded):
        return ApiError(503, "MfaSessionExpired",
                        f"the MFA session of profile {profile or 'default'} ended at {exc}: restart "
                        "local-endpoints in a terminal and enter a new code (ECS_LOCAL_MFA_SESSION_DURATION "
                        "sets how long a code lasts, up to 36h)")
    if isinstance(exc, (botocore.exceptions.SSOError, botocore.exceptions.TokenRetrievalError)):
        return ApiError(503, "SSOSessionExpired",
                        f"the AWS SSO session has expired or was never started: run "
                        f"`aws sso login{profile_arg}` on the host, then retry")
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return ApiError(503, "NoCredentials",
                        "no AWS credentials found: mount your ~/.aws folder (at /home/.aws in the "
                        "image) and set AWS_PROFILE, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, botocore.exceptions.ProfileNotFound):
        return ApiError(503, "NoCredentials", f"{exc}: mount your ~/.aws folder (at /home/.aws in the image) "
                                              "or fix AWS_PROFILE")
    if isinstance(exc, (botocore.exceptions.CredentialRetrievalError,
                        botocore.exceptions.PartialCredentialsError, botocore.exceptions.InvalidConfigError)):
        return ApiError(503, "NoCredentials", f"cannot load AWS credentials: {exc}")
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "Unknown")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = f"{action}: {code}: {error.get('Message', '')}"
        if code == "NoSuchEntity":
            return ApiError(404, "NoSuchRole", message)
        if code in ("Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"):
            return ApiError(429, "Throttled", message)
        if status >= 500:
            return ApiError(502, "UpstreamUnavailable", message)
        if status == 403 or code.startswith("AccessDenied"):
            return ApiError(403, "AccessDenied", message)
        return ApiError(502, "UpstreamError", message)
    return ApiError(502, "UpstreamUnavailable", f"{action}: {exc.__class__.__name__}: {exc}")


class AwsIdentity:
    """The developer's identity from boto3's credential chain: the only class that calls AWS.

    Every AWS call is one of the named methods below, marked @outbound with its IAM action:
    it is made only where the route or job in force declares it.  For a profile with
    mfa_serial (MfaProfile) the identity is instead an MFA session, opened once at
    start-up with a code typed on the terminal; it lasts ECS_LOCAL_MFA_SESSION_DURATION.
    """

    def __init__(self, config: Config):
        self.config = config
        self._botocore = botocore.session.Session()
        self.profile = self._botocore.profile
        self.missing_profile: botocore.exceptions.ProfileNotFound | None = None
        self.mfa: MfaProfile | None = None
        self.mfa_session: Credentials | None = None
        self._interactive = False
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        try:
            if not self._botocore.get_config_variable("region"):
                # Also for the STS clients botocore makes itself (assume-role profiles).
                self._botocore.set_config_variable("region", "us-east-1")
            self.session = boto3.Session(botocore_session=self._botocore)
            self.region = self.session.region_name
        except botocore.exceptions.ProfileNotFound as exc:
            # Typically ~/.aws not mounted: metadata still works; credentials say why not.
            self.missing_profile, self.region = exc, "us-east-1"
            return
        resolver = self._botocore.get_component("credential_provider")
        environment = resolver.get_provider("env")
        if environment is None or environment.load() is None:   # keys in the environment come first
            self.mfa = MfaProfile.of(self._botocore.full_config.get("profiles", {}), self.profile or "default")
        # botocore asks for MFA codes with getpass: that would hang a request.
        assume_role = resolver.get_provider("assume-role")
        if assume_role is not None:
            assume_role._prompter = self._prompt_mfa

    def _prompt_mfa(self, prompt: str) -> str:
        if self._interactive:
            return getpass.getpass(prompt)
        raise MfaCodeRequired(prompt)

    @outbound("boto3:credential-chain")
    def resolve_at_startup(self) -> str:
        """Resolve credentials once, letting an MFA profile ask its code if a person is there."""
        self._interactive = sys.stdin is not None and sys.stdin.isatty()
        try:
            if self.mfa is not None and self._interactive:
                self._open_mfa_session()
            source = self.source()
        except Exception as exc:   # reported per request; start anyway
            source = f"unavailable ({aws_error(exc, 'startup', self.profile).message})"
        finally:
            self._interactive = False
        return source

    @outbound("sts:GetSessionToken")
    def _open_mfa_session(self) -> None:
        """sts:GetSessionToken with the code, on the source profile's own credentials."""
        source = botocore.session.Session(profile=self.mfa.source_profile)
        source.set_config_variable("region", self.region)
        sts = self._make_client(boto3.Session(botocore_session=source), "sts")
        for attempt in range(1, MFA_ATTEMPTS + 1):
            code = getpass.getpass(f"Enter MFA code for {self.mfa.serial}: ").strip()
            try:
                reply = sts.get_session_token(SerialNumber=self.mfa.serial, TokenCode=code,
                                              DurationSeconds=int(self.config.mfa_session_duration))["Credentials"]
                break
            except botocore.exceptions.ClientError as exc:   # a mistyped code: AccessDenied
                if attempt == MFA_ATTEMPTS or exc.response.get("Error", {}).get("Code") != "AccessDenied":
                    raise
                log.warning("the MFA code was refused (%s); try again", exc.response["Error"].get("Message"))
        self.mfa_session = Credentials(reply["AccessKeyId"], reply["SecretAccessKey"], reply["SessionToken"],
                                       reply["Expiration"])
        threading.Thread(target=self._watch_mfa_session, args=(self.mfa_session.expiration,),
                         name="mfa-session", daemon=True).start()

    def _watch_mfa_session(self, ends: datetime) -> None:
        """Say once when the session has less than an hour left, and once when it has ended."""
        def sleep_until(moment: datetime) -> None:
            while (left := (moment - datetime.now(timezone.utc)).total_seconds()) > 0:
                time.sleep(min(left, 60.0))   # by the wall clock: a laptop may sleep meanwhile
        sleep_until(ends - timedelta(seconds=MFA_WARN_SECONDS))
        if ends > datetime.now(timezone.utc):
            log.warning("the MFA session of profile %s ends at %s: restart local-endpoints and enter a new "
                        "code before then", self.mfa.name, ends.astimezone(timezone.utc).strftime("%H:%M:%S UTC"))
        sleep_until(ends)
        log.warning("the MFA session of profile %s has ended: credentials routes answer 503 until "
                    "local-endpoints is restarted and a new code entered", self.mfa.name)

    def mfa_session_ends(self) -> datetime | None:
        return self.mfa_session.expiration if self.mfa_session else None

    def check_mfa_session(self) -> None:
        """For an MFA profile: raise unless its session is open (no AWS call)."""
        if self.mfa is None:
            return
        if self.mfa_session is None:
            raise MfaCodeRequired(self.mfa.serial)
        if self.mfa_session.seconds_left() <= 0:
            raise MfaSessionEnded(self.mfa_session.expiry_text)

    @outbound("boto3:credential-chain")
    def source(self) -> str:
        return self.base()[2]

    @outbound("boto3:credential-chain")
    def base(self) -> tuple[Any, datetime | None, str]:
        """(frozen credentials, their expiry if the source knows it, source method)."""
        if self.missing_profile:
            raise self.missing_profile
        if self.mfa is not None:
            self.check_mfa_session()
            session = self.mfa_session
            return (botocore.credentials.ReadOnlyCredentials(session.access_key_id, session.secret_access_key,
                                                             session.token),
                    session.expiration, "mfa-session")
        credentials = self.session.get_credentials()
        if credentials is None:
            raise botocore.exceptions.NoCredentialsError()
        frozen = credentials.get_frozen_credentials()
        # Refreshable credentials (SSO, assume-role profiles, credential_process) know
        # their expiry; botocore keeps it in a private attribute with no public getter.
        expiry = getattr(credentials, "_expiry_time", None)
        return frozen, expiry, credentials.method

    # -- the calls -----------------------------------------------------------

    @outbound("sts:GetSessionToken")
    def get_session_token(self, duration: int) -> dict:
        """sts:GetSessionToken: the reply's Credentials."""
        return self._client("sts").get_session_token(DurationSeconds=duration)["Credentials"]

    @outbound("sts:GetCallerIdentity")
    def get_caller_identity(self) -> dict:
        """sts:GetCallerIdentity: Account, Arn, UserId."""
        return self._client("sts").get_caller_identity()

    @outbound("iam:GetRole")
    def get_role(self, name: str) -> dict:
        """iam:GetRole: the reply's Role."""
        return self._client("iam").get_role(RoleName=name)["Role"]

    @outbound("sts:AssumeRole")
    def assume_role(self, arn: str, session_name: str, duration: int, external_id: str | None = None) -> dict:
        """sts:AssumeRole: the reply's Credentials."""
        extra = {"ExternalId": external_id} if external_id else {}
        return self._client("sts").assume_role(RoleArn=arn, RoleSessionName=session_name,
                                               DurationSeconds=duration, **extra)["Credentials"]

    @outbound("ecs:DescribeTaskDefinition")
    def describe_task_definition(self, name: str) -> dict:
        """ecs:DescribeTaskDefinition with its tags: {"taskDefinition": ..., "tags": [...]}."""
        return self._client("ecs").describe_task_definition(taskDefinition=name, include=["TAGS"])

    @outbound("ssm:GetParameters")
    def get_parameters(self, names: list[str], region: str, credentials: Credentials | None) -> dict:
        """ssm:GetParameters, SecureStrings decrypted: the reply's Parameters and InvalidParameters."""
        return self._fetcher("ssm", region, credentials).get_parameters(Names=names, WithDecryption=True)

    @outbound("secretsmanager:GetSecretValue")
    def get_secret_value(self, secret_id: str, version_stage: str, version_id: str, region: str,
                         credentials: Credentials | None) -> dict:
        """secretsmanager:GetSecretValue of one version (the current one when neither is given)."""
        version = {k: v for k, v in (("VersionStage", version_stage), ("VersionId", version_id)) if v}
        return self._fetcher("secretsmanager", region, credentials).get_secret_value(SecretId=secret_id, **version)

    @outbound("s3:GetObject")
    def get_object(self, bucket: str, key: str, credentials: Credentials | None) -> bytes:
        """s3:GetObject: the object's bytes."""
        return self._fetcher("s3", self.region, credentials).get_object(Bucket=bucket, Key=key)["Body"].read()

    @outbound("ecr:GetAuthorizationToken")
    def get_authorization_token(self, region: str, credentials: Credentials | None) -> dict:
        """ecr:GetAuthorizationToken: the reply's first authorizationData (token, proxyEndpoint)."""
        return self._fetcher("ecr", region, credentials).get_authorization_token()["authorizationData"][0]

    def _fetcher(self, service: str, region: str, credentials: Credentials | None) -> Any:
        """A client for `run`'s fetches: with the execution role's credentials, else the identity's."""
        if credentials is None:
            return self._client(service, region)
        key = (service, region, credentials.access_key_id)
        with self._lock:
            if key not in self._clients:
                self._clients[key] = self._make_client(
                    self.session, service, region, aws_access_key_id=credentials.access_key_id,
                    aws_secret_access_key=credentials.secret_access_key, aws_session_token=credentials.token)
            return self._clients[key]

    def _client(self, service: str, region: str | None = None) -> Any:
        """One client per service (and region), made once credentials resolve (they may appear later)."""
        region = region or self.region
        key = service if region == self.region else (service, region)
        with self._lock:
            if key not in self._clients:
                frozen = self.base()[0]   # a client made without credentials would keep having none
                explicit = {}
                if self.mfa is not None:   # the session's keys, not the profile's chain (that would prompt)
                    explicit = dict(aws_access_key_id=frozen.access_key, aws_secret_access_key=frozen.secret_key,
                                    aws_session_token=frozen.token)
                self._clients[key] = self._make_client(self.session, service, region, **explicit)
            return self._clients[key]

    def _make_client(self, session: boto3.Session, service: str, region: str | None = None, **explicit: str) -> Any:
        # Other services take botocore's own AWS_ENDPOINT_URL_<SERVICE> and AWS_ENDPOINT_URL.
        endpoint = {"sts": self.config.sts_endpoint, "iam": self.config.iam_endpoint}.get(service)
        return session.client(
            service, region_name=region or self.region, endpoint_url=endpoint,
            config=botocore.config.Config(
                connect_timeout=0.5, read_timeout=1.5,
                retries={"total_max_attempts": 2, "mode": "standard"},
                user_agent_extra=f"local-endpoints/{VERSION}"), **explicit)


def session_name_for(arn: str) -> str:
    return f"ecs-local-{arn.rsplit('/', 1)[-1]}"[:64]


# ---------------------------------------------------------------------------
# The Docker view: the engine's containers and networks, kept current from its events
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """The engine's containers (docker inspect JSON) and networks at one moment.

    A snapshot never changes; a change in Docker makes a new one.  So responses
    built from it can be kept in memo until it is replaced.
    """
    containers: dict[str, dict]
    networks: dict[str, dict]
    health: dict[str, tuple[str, str | None]] = field(default_factory=dict)   # see health_transitions
    memo: dict[tuple, Any] = field(default_factory=dict, compare=False, repr=False)

    def running(self) -> list[dict]:
        return [c for c in self.containers.values() if c["State"].get("Running")]

    @functools.cached_property
    def bridge_subnets(self) -> tuple[IPNetwork, ...]:
        """Subnets of bridge networks: their containers may ask for credentials by default.

        Not macvlan/ipvlan: their subnet is the LAN itself.  Worked out once per snapshot.
        """
        subnets = []
        for network in self.networks.values():
            if network.get("Driver") != "bridge":
                continue
            for conf in (network.get("IPAM") or {}).get("Config") or []:
                try:
                    subnets.append(ipaddress.ip_network(conf["Subnet"], strict=False))
                except (KeyError, ValueError):
                    pass
        return tuple(subnets)


# "remove" is podman's "destroy".
WATCHED_EVENTS = frozenset({"create", "start", "restart", "die", "destroy", "remove", "rename", "pause",
                            "unpause", "update", "health_status"})


class ContainerView:
    """An in-memory copy of the engine's containers, kept current by its /events stream.

    The original listed every container on every request; here a warm request
    makes no Docker call, and a cold one (Docker just came back) one round.
    """

    RESYNC_SECONDS = 60.0
    RETRY_SECONDS = 1.0

    def __init__(self, docker: DockerApi, on_change: Callable[[Snapshot], None] = lambda snapshot: None):
        self.docker = docker
        self._on_change = on_change   # told of every new container list, in order (StatsHub.follow)
        self._snapshot = Snapshot({}, {})
        self._empty = Snapshot({}, {})   # what current() shows while Docker is unreachable
        self._synced = False
        self._first_round = threading.Event()   # set once the first sync has ended, well or not
        self._sync_started = 0.0
        self._last_failure: tuple[float, ApiError] | None = None
        self._sync_lock = threading.Lock()
        self._write_lock = threading.Lock()

    @property
    def reachable(self) -> bool:
        return self._synced

    def current(self) -> Snapshot:
        """What is known now, without calling Docker (empty while Docker is unreachable)."""
        return self._snapshot if self._synced else self._empty

    def await_first_sync(self) -> None:
        """Wait (at most DOCKER_TIMEOUT, calling nothing) for the first sync to end: a server that
        has just started, on an engine with many containers, must not judge a caller on the empty
        view it starts with."""
        self._first_round.wait(DOCKER_TIMEOUT)

    def snapshot(self) -> Snapshot:
        """The current view, synchronising first if Docker was unreachable."""
        if not self._synced:
            failure = self._last_failure
            if failure and time.monotonic() - failure[0] < self.RETRY_SECONDS:
                raise failure[1]
            return self.sync()
        return self._snapshot

    def sync(self, after: float = 0.0) -> Snapshot:
        """List and inspect every container, and list the networks: one round of calls.

        With after (a time.monotonic() moment), a sync that started since then is
        enough: concurrent lookups that missed share one round.
        """
        if not self._sync_lock.acquire(timeout=DOCKER_TIMEOUT):
            raise self.docker.timeout_error()
        try:
            if after and self._synced and self._sync_started >= after:
                return self._snapshot
            self._sync_started = time.monotonic()
            containers = {}
            for summary in self.docker.containers():
                try:
                    containers[summary["Id"]] = self.docker.inspect(summary["Id"])
                except LookupError:
                    pass   # removed between list and inspect
            networks = {n["Id"]: n for n in self.docker.networks()}
            with self._write_lock:
                self._snapshot = Snapshot(containers, networks,
                                          health_transitions(self._snapshot.health, containers))
                self._synced = True
                self._last_failure = None
                self._on_change(self._snapshot)
            return self._snapshot
        except ApiError as exc:
            self._synced = False
            self._last_failure = (time.monotonic(), exc)
            raise
        finally:
            self._first_round.set()
            self._sync_lock.release()

    def _refresh_container(self, container_id: str) -> None:
        try:
            data = self.docker.inspect(container_id)
        except LookupError:
            data = None
        with self._write_lock:
            containers = dict(self._snapshot.containers)
            if data is None:
                containers.pop(container_id, None)
            else:
                containers[container_id] = data
            self._snapshot = Snapshot(containers, self._snapshot.networks,
                                      health_transitions(self._snapshot.health, containers))
            self._on_change(self._snapshot)
        if data is not None and outside_networks(data, self._snapshot.networks):
            self._refresh_networks()

    def _refresh_networks(self) -> None:
        networks = {n["Id"]: n for n in self.docker.networks()}
        with self._write_lock:
            self._snapshot = Snapshot(self._snapshot.containers, networks, self._snapshot.health)

    def _apply(self, event: dict) -> None:
        action = event.get("Action", "").split(":")[0]
        actor = event.get("Actor") or {}
        if event.get("Type") == "container" and action in WATCHED_EVENTS:
            self._refresh_container(actor["ID"])
        elif event.get("Type") == "network":
            # Docker names the container in the attributes; podman makes it the actor.
            container_id = (actor.get("Attributes") or {}).get("container") or actor.get("ID")
            if action in ("connect", "disconnect") and container_id:
                self._refresh_container(container_id)
            if action in ("create", "destroy", "remove"):
                self._refresh_networks()

    def start(self) -> None:
        threading.Thread(target=job("Docker events", "docker:events", "docker:containers", "docker:inspect",
                                    "docker:networks").target(self._watch), name="docker-events", daemon=True).start()

    def _watch(self) -> None:
        """Follow /events for ever: reconnect when the stream breaks, resync every RESYNC_SECONDS.

        Docker ends the stream itself at `until`, which is when the loop resyncs; the read
        timeout only catches an engine that stopped answering.
        """
        while True:
            try:
                now = int(time.time())
                events = self.docker.events(since=now, until=now + int(self.RESYNC_SECONDS),
                                            read_timeout=self.RESYNC_SECONDS + 30)
                with contextlib.closing(events):
                    self.sync()   # after the stream opened, so no change falls in between
                    for event in events:
                        self._apply(event)
            except (ApiError, LookupError) as exc:
                self._synced = False
                self._first_round.set()   # Docker did not answer: nothing to wait for
                log.debug("Docker events stream: %s", exc.message if isinstance(exc, ApiError) else exc)
                time.sleep(self.RETRY_SECONDS)
            except Exception:   # never let the watcher die: metadata would go stale
                log.exception("Docker events stream failed")
                self._synced = False
                self._first_round.set()
                time.sleep(self.RETRY_SECONDS)


def container_name(container: dict) -> str:
    return container.get("Name", "").lstrip("/")


def labels_of(container: dict) -> dict[str, str]:
    return (container.get("Config") or {}).get("Labels") or {}


def container_ips(container: dict) -> dict[str, tuple[str, ...]]:
    """Network ID -> the container's addresses on it, in the canonical text form Docker writes."""
    return {endpoint.get("NetworkID", ""): tuple(endpoint[key] for key in ("IPAddress", "GlobalIPv6Address")
                                                 if endpoint.get(key))
            for endpoint in ((container.get("NetworkSettings") or {}).get("Networks") or {}).values()}


def outside_networks(container: dict, networks: dict[str, dict]) -> bool:
    """Whether the container has an address in none of the networks' subnets.

    Podman sends no events for the networks it creates or removes: a container on a
    network the view does not know yet is how the view learns that it must list them again.
    """
    subnets = []
    for network in networks.values():
        for conf in (network.get("IPAM") or {}).get("Config") or []:
            with contextlib.suppress(KeyError, ValueError):
                subnets.append(ipaddress.ip_network(conf["Subnet"], strict=False))
    return any(not any(ipaddress.ip_address(address) in subnet for subnet in subnets)
               for addresses in container_ips(container).values() for address in addresses)


def own_container_candidates(config: Config) -> list[str]:
    """What may name the container this server runs in, most explicit first."""
    candidates = []
    if config.own_container:
        candidates.append(config.own_container)
    if config.hostname and re.fullmatch(r"[0-9a-f]{12,64}", config.hostname):
        candidates.append(config.hostname)
    try:
        # Docker bind-mounts /etc/hostname from .../containers/<id>/hostname.
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4] in ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf"):
                    match = re.search(r"/containers/([0-9a-f]{64})/", fields[3])
                    if match:
                        candidates.append(match.group(1))
                        break
    except OSError:
        pass
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            match = re.search(r"(?:docker[-/])([0-9a-f]{64})", f.read())
            if match:
                candidates.append(match.group(1))
    except OSError:
        pass
    return candidates


def find_own_container(snapshot: Snapshot, candidates: list[str]) -> dict | None:
    for candidate in candidates:
        for container in snapshot.containers.values():
            if container["Id"].startswith(candidate) or container_name(container) == candidate:
                return container
    return None


def match_identifier(snapshot: Snapshot, identifier: str, exclude: str | None) -> list[dict]:
    """Containers named by identifier; the first level with any match decides.

    Levels: exact name or full ID; compose service; ID prefix; substring of a
    name (the original's rule).  Only exact names reach stopped containers.
    """
    everyone = [c for c in snapshot.containers.values() if c["Id"] != exclude]
    running = [c for c in everyone if c["State"].get("Running")]
    levels: tuple[Callable[[dict], bool], ...] = (
        lambda c: container_name(c) == identifier or c["Id"] == identifier,
        lambda c: labels_of(c).get(COMPOSE_SERVICE) == identifier,
        lambda c: c["Id"].startswith(identifier),
        lambda c: identifier in container_name(c),
    )
    for level, test in enumerate(levels):
        found = [c for c in (everyone if level == 0 else running) if test(c)]
        if found:
            return found
    return []


def match_ip(snapshot: Snapshot, caller: IPAddress, own: dict | None) -> list[dict]:
    """Running containers with the caller's address, on the server's own networks if it has any."""
    networks = set(container_ips(own)) if own else set()
    address = str(caller)
    found = []
    for container in snapshot.running():
        if own and container["Id"] == own["Id"]:
            continue
        for network_id, addresses in container_ips(container).items():
            if (not networks or network_id in networks) and address in addresses:
                found.append(container)
                break
    return found


def task_members(snapshot: Snapshot, caller: dict, own_id: str | None) -> list[dict]:
    """The caller's "task": its compose project including exited containers, as ECS lists a
    task's stopped containers; outside compose, every running container (the original's
    documented rule: "all currently running containers on your machine")."""
    project = labels_of(caller).get(COMPOSE_PROJECT)
    if project:
        members = [c for c in snapshot.containers.values() if labels_of(c).get(COMPOSE_PROJECT) == project]
    else:
        members = snapshot.running()
    members = [c for c in members if c["Id"] != own_id]
    return sorted(members, key=lambda c: (c.get("Created", ""), container_name(c)))


# ---------------------------------------------------------------------------
# Credentials: what /creds, /role and IMDS hand out, cached and refreshed ahead
# ---------------------------------------------------------------------------

CREDENTIALS_FRESH_SECONDS = 20 * 60     # reuse while more than this is left: clients get >= 15 min
CREDENTIALS_AHEAD_SECONDS = 30 * 60     # refresh in the background once less than this is left
ASSUME_ROLE_SECONDS = 3600
MFA_ATTEMPTS = 3                        # MFA codes asked at start-up before giving up (AWS refused them)
MFA_WARN_SECONDS = 3600                 # the log says once when the MFA session has less than this left
IDENTITY_RETRY_SECONDS = 300            # a failed sts:GetCallerIdentity is not retried for this long
MISSING_ROLE_SECONDS = 60               # a role IAM said does not exist is not asked for again for this long
MISSING_ROLES_KEPT = 1024               # at most this many such names remembered (any caller may send any)
ROLE_NAME = re.compile(r"[\w+=,.@-]{1,64}", re.ASCII)
ROLE_ARN = re.compile(r"arn:aws(?:-[a-z]+)*:iam::\d{12}:role/(?:[\x21-\x2e\x30-\x7e]+/){0,50}([\w+=,.@-]{1,64})",
                      re.ASCII)


def glob_pattern(glob: str) -> re.Pattern:
    """A `*` glob as a regular expression: `*` is any text, slashes included; nothing else is special."""
    return re.compile(".*".join(re.escape(part) for part in glob.split("*")), re.DOTALL)


class RoleAllowlist:
    """ECS_LOCAL_ALLOWED_ROLES: the roles containers may ask for, checked before STS is called.

    A role name allows /role/{name}.  An ARN or a `*` glob on ARNs allows /role-arn/{arn}, and
    /role/{name} when the name's ARN (read with iam:GetRole) matches it; a name that no ARN
    or glob could end in is refused without any AWS call.  Names never allow /role-arn/{arn}:
    the ARN may be of a role with that name in another account.
    """

    def __init__(self, entries: tuple[str, ...]):
        self.entries = entries
        self._names = frozenset(e for e in entries if not e.startswith("arn:"))
        globs = [e for e in entries if e.startswith("arn:")]
        self._arns = tuple(glob_pattern(g) for g in globs)
        # What a role name must look like to end an ARN a glob matches: the text after the glob's
        # last '/', or, when a '*' there may also span slashes, what follows its first '*'.
        tails = [g.rsplit("/", 1)[-1] for g in globs]
        self._tails = tuple(glob_pattern("*" + t.split("*", 1)[1] if "*" in t else t) for t in tails)

    @classmethod
    def parse(cls, text: str) -> RoleAllowlist:
        entries = tuple(part.strip() for part in text.split(",") if part.strip())
        if not entries:
            raise ValueError("lists no role (leave it unset to allow any)")
        for entry in entries:
            if entry.startswith("arn:"):
                if ":role/" not in entry:
                    raise ValueError(f"{entry!r} is not a role ARN or ARN glob (arn:aws:iam::ACCOUNT:role/NAME)")
            elif not ROLE_NAME.fullmatch(entry):
                raise ValueError(f"{entry!r} is not a role name; `*` globs apply to ARNs "
                                 "(arn:aws:iam::123456789012:role/team-*)")
        return cls(entries)

    def __str__(self) -> str:
        return ",".join(self.entries)

    def name_allowed(self, name: str) -> bool | None:
        """True: listed by name; None: only its ARN can tell; False: no entry could allow it."""
        if name in self._names:
            return True
        return None if any(tail.fullmatch(name) for tail in self._tails) else False

    def arn_allowed(self, arn: str) -> bool:
        return any(pattern.fullmatch(arn) for pattern in self._arns)

    def refusal(self, role: str) -> ApiError:
        return ApiError(403, "RoleNotAllowed",
                        f"role {role} is not in ECS_LOCAL_ALLOWED_ROLES ({self}): add its name, its ARN or "
                        "an ARN glob (arn:aws:iam::123456789012:role/team-*) there to allow it")


class KeyedLocks:
    """One lock per key, so concurrent requests for one identity make one AWS call; a key's
    lock is dropped when nobody holds or waits for it, so role names asked once leave nothing."""

    def __init__(self):
        self._locks: dict[Any, tuple[threading.Lock, int]] = {}   # key -> (its lock, holders and waiters)
        self._guard = threading.Lock()

    def __len__(self) -> int:
        return len(self._locks)

    def _join(self, key: Any) -> threading.Lock:
        with self._guard:
            lock, users = self._locks.get(key) or (threading.Lock(), 0)
            self._locks[key] = (lock, users + 1)
            return lock

    def _leave(self, key: Any) -> None:
        with self._guard:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    @contextlib.contextmanager
    def __call__(self, key: Any) -> Iterator[None]:
        lock = self._join(key)
        try:
            with lock:
                yield
        finally:
            self._leave(key)

    def try_hold(self, key: Any) -> Callable[[], None] | None:
        """key's lock if it is free, as the function that releases it; None if it is held."""
        lock = self._join(key)
        if not lock.acquire(blocking=False):
            self._leave(key)
            return None

        def release() -> None:
            lock.release()
            self._leave(key)
        return release


class CredentialVendor:
    """Credentials for /creds and the role routes, cached per identity.

    The original called STS (and IAM for /role) on every request.  Here an
    entry obtained from STS is reused while it has more than 20 minutes left,
    refreshed in the background from 30 minutes left, and served as it is if
    STS fails while it is still valid.  ECS_LOCAL_ALLOWED_ROLES is checked
    before any call is made for a role.
    """

    def __init__(self, identity: AwsApi, config: Config):
        self.identity = identity
        self.config = config
        self.allowed_roles = config.allowed_roles
        self._cache: dict[str, Credentials] = {}
        self._role_arns: dict[str, str] = {}
        self._missing_roles: dict[str, tuple[float, str]] = {}   # role name -> (when IAM said so, what it said)
        self._callers: dict[str, tuple[float, dict | None]] = {}   # access key -> (when asked, identity)
        self._last_with_account: tuple[Credentials, Credentials] | None = None
        self._locks = KeyedLocks()
        self._guard = threading.Lock()   # for the memo of missing roles

    def _call(self, action: str, function: Callable[[], Any]) -> Any:
        try:
            return function()
        except Exception as exc:
            raise aws_error(exc, action, self.identity.profile) from None

    def own(self) -> Issued:
        """/creds: GetSessionToken for long-term keys; temporary ones (an MFA session's too) are passed
        through; an MFA profile's role_arn is assumed with the session's credentials."""
        profile = self.identity.mfa
        if profile is not None and profile.role_arn:
            self._call("LoadCredentials", self.identity.check_mfa_session)
            credentials, source = self._cached("profile-role:" + profile.role_arn,
                                               functools.partial(self._assume_profile_role, profile))
            return Issued(credentials, profile.role_arn, source)
        frozen, expiry, _ = self._call("LoadCredentials", self.identity.base)
        if frozen.token:
            expiration = expiry or (datetime.now(timezone.utc)
                                    + timedelta(seconds=self.config.shared_token_expiration))
            credentials, source = Credentials(frozen.access_key, frozen.secret_key, frozen.token,
                                              expiration.replace(microsecond=0)), "passthrough"
        else:
            credentials, source = self._cached("session:" + frozen.access_key, self._get_session_token)
        caller = self._caller_identity(frozen.access_key)
        if caller is None:   # no ARN to name: botocore's credential method is not an identity
            return Issued(credentials, None, source)
        return Issued(self._with_account(credentials, caller["Account"]), caller["Arn"], source)

    def _with_account(self, credentials: Credentials, account: str) -> Credentials:
        """credentials with AccountId: a copy made once per cache entry, not once per request."""
        last = self._last_with_account
        if last is not None and last[0] is credentials and last[1].account_id == account:
            return last[1]
        stamped = replace(credentials, account_id=account)
        self._last_with_account = (credentials, stamped)
        return stamped

    def _get_session_token(self) -> Credentials:
        reply = self.identity.get_session_token(3600)
        return Credentials(reply["AccessKeyId"], reply["SecretAccessKey"], reply["SessionToken"],
                           reply["Expiration"])

    def _assume_profile_role(self, profile: MfaProfile) -> Credentials:
        """The profile's role_arn with its external_id, role_session_name and duration_seconds: what
        botocore would do, but with the MFA session's credentials, so no code is asked again.
        RoleArn stays empty in /creds, as for any profile."""
        arn = profile.role_arn
        c = self.identity.assume_role(arn, profile.session_name or session_name_for(arn),
                                      profile.duration or ASSUME_ROLE_SECONDS, profile.external_id)
        return Credentials(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"], c["Expiration"],
                           account_id=account_of(arn))

    def _caller_identity(self, access_key: str) -> dict | None:
        """The base identity's Arn and Account: one sts:GetCallerIdentity per access key.

        A failure only leaves AccountId out of /creds, and is not retried for a while.
        """
        known = self._known_caller(access_key)
        if known is not None:
            return known[1]
        with self._locks("caller:" + access_key):
            known = self._known_caller(access_key)
            if known is not None:
                return known[1]   # another request asked while we waited
            try:
                reply = self._call("GetCallerIdentity", self.identity.get_caller_identity)
                identity = {"Arn": reply["Arn"], "Account": reply["Account"]}
            except ApiError as exc:
                log.warning("%s; /creds answers without AccountId for %d s", exc.message, IDENTITY_RETRY_SECONDS)
                identity = None
            self._callers[access_key] = (time.monotonic(), identity)
            return identity

    def _known_caller(self, access_key: str) -> tuple[float, dict | None] | None:
        """What GetCallerIdentity said for access_key, unless it failed long enough ago to ask again."""
        known = self._callers.get(access_key)
        if known is None or (known[1] is None and time.monotonic() - known[0] >= IDENTITY_RETRY_SECONDS):
            return None
        return known

    def role(self, name: str) -> Issued:
        """/role/{name}: GetRole (cached) for the ARN, then AssumeRole."""
        if not ROLE_NAME.fullmatch(name):
            raise ApiError(400, "InvalidRoleName",
                           f"{name[:100]!r} is not an IAM role name (1-64 of letters, digits and +=,.@_-)")
        allowed = True if self.allowed_roles is None else self.allowed_roles.name_allowed(name)
        if allowed is False:
            raise self.allowed_roles.refusal(name)
        self._call("LoadCredentials", self.identity.check_mfa_session)
        arn = self._role_arns.get(name)
        if arn is None:
            self._check_not_missing(name)
            with self._locks("role-name:" + name):
                arn = self._role_arns.get(name)
                if arn is None:
                    self._check_not_missing(name)   # another request asked while we waited
                    try:
                        role = self._call("GetRole", lambda: self.identity.get_role(name))
                    except ApiError as exc:
                        if exc.code == "NoSuchRole":
                            self._remember_missing(name, exc.message)
                        raise
                    arn = self._role_arns[name] = role["Arn"]
        if allowed is None and not self.allowed_roles.arn_allowed(arn):
            raise self.allowed_roles.refusal(f"{name} ({arn})")
        return self._assume(arn)

    def _check_not_missing(self, name: str) -> None:
        """The error IAM gave for a role that does not exist, while it is remembered."""
        known = self._missing_roles.get(name)
        if known is not None and time.monotonic() - known[0] < MISSING_ROLE_SECONDS:
            raise ApiError(404, "NoSuchRole", f"{known[1]} (IAM said so {time.monotonic() - known[0]:.0f} s ago; "
                                              f"it is asked again {MISSING_ROLE_SECONDS} s after that)")

    def _remember_missing(self, name: str, message: str) -> None:
        now = time.monotonic()
        with self._guard:
            if len(self._missing_roles) >= MISSING_ROLES_KEPT:
                self._missing_roles = {n: known for n, known in self._missing_roles.items()
                                       if now - known[0] < MISSING_ROLE_SECONDS}
                while len(self._missing_roles) >= MISSING_ROLES_KEPT:
                    del self._missing_roles[next(iter(self._missing_roles))]   # the oldest
            self._missing_roles[name] = (now, message)

    def role_arn(self, arn: str) -> Issued:
        """/role-arn/{arn}: AssumeRole on the ARN as given (paths and partitions included)."""
        if not ROLE_ARN.fullmatch(arn):
            raise ApiError(400, "InvalidRoleArn",
                           f"{arn[:200]!r} is not an IAM role ARN (arn:aws:iam::123456789012:role/NAME)")
        if self.allowed_roles is not None and not self.allowed_roles.arn_allowed(arn):
            raise self.allowed_roles.refusal(arn)
        self._call("LoadCredentials", self.identity.check_mfa_session)
        return self._assume(arn)

    def _assume(self, arn: str) -> Issued:
        def assume() -> Credentials:
            c = self.identity.assume_role(arn, session_name_for(arn), ASSUME_ROLE_SECONDS)
            return Credentials(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"], c["Expiration"],
                               role_arn=arn, account_id=account_of(arn))
        credentials, source = self._cached("role:" + arn, assume)
        return Issued(credentials, arn, source)

    def _cached(self, key: str, fetch: Callable[[], Credentials]) -> tuple[Credentials, str]:
        """The entry for key and where it came from: "cache", or "sts" when this request called it."""
        entry = self._cache.get(key)
        left = entry.seconds_left() if entry is not None else 0
        if left > CREDENTIALS_FRESH_SECONDS:
            if left < CREDENTIALS_AHEAD_SECONDS:
                self._refresh_ahead(key, fetch)
            return entry, "cache"
        with self._locks(key):
            entry = self._cache.get(key)
            if entry is not None and entry.seconds_left() > CREDENTIALS_FRESH_SECONDS:
                return entry, "cache"   # another request refreshed it while we waited
            fresh = self._fetch(key, fetch, entry)
            return fresh, "cache" if fresh is entry else "sts"

    def _fetch(self, key: str, fetch: Callable[[], Credentials], entry: Credentials | None) -> Credentials:
        action = "GetSessionToken" if key.startswith("session:") else "AssumeRole"
        try:
            fresh = self._call(action, fetch)
        except ApiError as exc:
            if entry is not None and entry.seconds_left() > 0:
                log.warning("%s failed (%s); serving cached credentials with %d s left",
                            action, exc.message, entry.seconds_left())
                return entry
            raise
        self._cache[key] = fresh
        return fresh

    def _refresh_ahead(self, key: str, fetch: Callable[[], Credentials]) -> None:
        release = self._locks.try_hold(key)
        if release is None:
            return   # a refresh is already under way

        def refresh() -> None:
            try:
                self._fetch(key, fetch, self._cache.get(key))
            except ApiError:
                pass   # _fetch logged it; the entry is still fresh
            finally:
                release()
        threading.Thread(target=job("refresh-ahead", "sts:GetSessionToken", "sts:AssumeRole").target(refresh),
                         name="refresh-" + key[:40], daemon=True).start()


# ---------------------------------------------------------------------------
# Access and audit: who may call, and the record of every credentials answer
# ---------------------------------------------------------------------------

# Who may ask for credentials: an allowlist of networks and an optional token.

ALWAYS_ALLOWED = tuple(ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10"))


@functools.lru_cache(maxsize=1024)
def plain_ip(address: str) -> IPAddress:
    """The caller's address, with IPv4-mapped IPv6 (::ffff:a.b.c.d) compared as IPv4.

    Remembered per address text: parsing one costs microseconds, and callers repeat.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


class TokenFile:
    """ECS_LOCAL_AUTHORIZATION_TOKEN_FILE, re-read when it changes, so a rotated token needs no restart.

    One stat() per check.  A file that becomes unreadable or empty keeps the previous
    token (with a warning): a failed rotation must not open the credentials routes.
    """

    def __init__(self, path: str):
        self.path = path
        self._stamp = self._stat()
        self.token = read_token_file(path)
        self._lock = threading.Lock()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def current(self) -> str:
        stamp = self._stat()
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    try:
                        self.token = read_token_file(self.path)
                        log.info("re-read the authorization token from %s", self.path)
                    except ValueError as exc:
                        log.warning("keeping the previous authorization token: %s", exc)
                    self._stamp = stamp
        return self.token


class CallerPolicy:
    """The allowlist of caller networks and the optional authorization token."""

    MAX_VERDICTS = 1024   # callers remembered; the memo starts again when full

    def __init__(self, config: Config, view: ContainerView):
        self._explicit = config.allowed_callers
        self._token = config.authorization_token
        self._token_file = TokenFile(config.authorization_token_file) if config.authorization_token_file else None
        self._view = view
        # (bridge subnets it holds for, caller -> allowed): replaced when the subnets change.
        self._verdicts: tuple[tuple[IPNetwork, ...] | None, dict[IPAddress, bool]] = (None, {})

    def token(self) -> str | None:
        return self._token_file.current() if self._token_file else self._token

    def allowed_networks(self) -> tuple[IPNetwork, ...]:
        if self._explicit is not None:
            return self._explicit
        return ALWAYS_ALLOWED + self._view.current().bridge_subnets

    @property
    def token_required(self) -> bool:
        return self._token is not None or self._token_file is not None

    def check(self, caller: IPAddress, authorization: str | None) -> None:
        self.check_caller(caller)
        token = self.token()
        if token is not None and not hmac.compare_digest(
                (authorization or "").encode("utf-8", "surrogateescape"), token.encode("utf-8")):
            raise ApiError(401, "Unauthorized",
                           "missing or wrong Authorization header: set AWS_CONTAINER_AUTHORIZATION_TOKEN in "
                           "the container to the server's ECS_LOCAL_AUTHORIZATION_TOKEN")

    def allows(self, caller: IPAddress) -> bool:
        """caller is in an allowed network: worked out once per caller while the networks stay
        the same (each ipaddress containment test costs about a microsecond)."""
        subnets = self._view.current().bridge_subnets if self._explicit is None else None
        held_for, verdicts = self._verdicts
        if held_for is not subnets or len(verdicts) >= self.MAX_VERDICTS:
            verdicts = {}
            self._verdicts = (subnets, verdicts)
        verdict = verdicts.get(caller)
        if verdict is None:
            verdict = verdicts[caller] = any(caller in network for network in self.allowed_networks())
        return verdict

    def _allowed_after_first_sync(self, caller: IPAddress) -> bool:
        """A caller refused before the Docker view's first sync has ended, judged again after it:
        the bridge subnets come from that view."""
        if self._explicit is not None or self._view.reachable:
            return False
        self._view.await_first_sync()
        return self.allows(caller)

    def check_caller(self, caller: IPAddress) -> None:
        """The allowlist alone: IMDS callers send no Authorization header."""
        if not (self.allows(caller) or self._allowed_after_first_sync(caller)):
            raise ApiError(403, "CallerNotAllowed",
                           f"{caller} may not fetch credentials: allowed are loopback, link-local and the "
                           "Docker bridge networks; set ECS_LOCAL_ALLOWED_CALLERS (comma-separated CIDRs) "
                           "to change that")


# The EC2 instance metadata service's credentials, as SDKs fetch them at the end of their chain.

IMDS_TOKEN_HEADER = "X-aws-ec2-metadata-token"
IMDS_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
IMDS_MAX_TTL = 21600


class ImdsError(ApiError):
    """An IMDS answer other than 200: a line of text, as EC2's IMDS answers. SDKs look only
    at the status (botocore and the JS SDK fall back to IMDSv1 on a token PUT's 403, 404
    or 405, give up on its 400, and treat any other status of a GET as a failed attempt)."""

    @classmethod
    def of(cls, error: ApiError) -> ImdsError:
        return cls(error.status, error.code, error.message, error.headers)

    def response(self) -> Response:
        return Response(f"{self.status} {HTTPStatus(self.status).phrase}: {self.message}\n".encode(),
                        self.status, "text/plain", self.headers)


class ImdsTokens:
    """IMDSv2 session tokens and when each expires.

    As on EC2, any allowed caller may PUT for one. At most CAPACITY are kept (botocore
    asks for a new token at every credentials refresh): when full, expired ones go,
    then the oldest; its client gets a 401 and, as SDKs do, asks for another.
    """

    CAPACITY = 4096

    def __init__(self):
        self._expiry: dict[str, float] = {}   # token -> its time.monotonic() end, oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._expiry)

    def issue(self, ttl: int) -> str:
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            if len(self._expiry) >= self.CAPACITY:
                self._expiry = {t: end for t, end in self._expiry.items() if end > now}
                while len(self._expiry) >= self.CAPACITY:
                    del self._expiry[next(iter(self._expiry))]
            self._expiry[token] = now + ttl
        return token

    def valid(self, token: str) -> bool:
        end = self._expiry.get(token)
        return end is not None and time.monotonic() < end


def imds_document(credentials: dict) -> dict:
    """EC2's credentials document, from the ECS agent's (/creds) one."""
    return {"Code": "Success", "LastUpdated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "Type": "AWS-HMAC", "AccessKeyId": credentials["AccessKeyId"],
            "SecretAccessKey": credentials["SecretAccessKey"], "Token": credentials["Token"],
            "Expiration": credentials["Expiration"]}


class Guard(enum.Enum):
    """Who may call a route: the guard column of ROUTES, applied by Access.admit() from
    RequestHandler.answer(), the one dispatch path; no handler checks a caller itself."""
    OPEN = "anyone"
    TOKEN = "an allowed network (CallerPolicy) and the authorization token when one is set"
    IMDS_SESSION = ("IMDS on, an allowed network, and a live IMDSv2 session token (none where "
                    "ECS_LOCAL_IMDS_V1 allows IMDSv1); SDKs send IMDS no Authorization header")
    IMDS = "IMDS on and an allowed network: the session token request itself"
    TASK_ID = "the credentials id `run` gave the task's containers (unguessable, as the ECS agent's); no network check"


class Access:
    """The guard column of ROUTES (Guard), applied by RequestHandler.answer(), the one dispatch
    path, to every request before its handler runs; no handler checks a caller itself."""

    def __init__(self, config: Config, policy: CallerPolicy, imds_tokens: ImdsTokens,
                 task_credentials_id: str | None):
        self.config = config
        self.policy = policy
        self.imds_tokens = imds_tokens
        self.task_credentials_id = task_credentials_id   # the id `run` gave its task, else None
        # IMDS is off by default where a token is required: SDKs send IMDS no Authorization header.
        self.imds_on = config.imds == "ON" or (config.imds == "AUTO" and not policy.token_required)

    def admit(self, guard: Guard, request: Request) -> None:
        """Nothing when the guard lets the request through, else the refusal."""
        if guard is Guard.OPEN:
            return
        if guard is Guard.TOKEN:
            self.policy.check(request.caller, request.authorization)
            return
        if guard is Guard.TASK_ID:   # answered as the agent answers other ids
            if not request.params.get("id"):
                raise ApiError(400, "NoIdInRequest", "CredentialsV2Request: No Credential ID in the request")
            if not (self.task_credentials_id and
                    hmac.compare_digest(request.params["id"], self.task_credentials_id)):
                raise ApiError(400, "InvalidIdInRequest", "CredentialsV2Request: Credentials not found")
            return
        # IMDS answers only when on, to allowed callers, and but for the token request itself
        # only with a live session token (or none at all where IMDSv1 is allowed).
        if not self.imds_on:
            raise ImdsError(404, "NotFound", "the IMDS routes are off: the server has an authorization token, "
                                             "which SDKs do not send to IMDS; ECS_LOCAL_IMDS=ON turns them on")
        try:
            self.policy.check_caller(request.caller)
        except ApiError as exc:
            raise ImdsError.of(exc) from None
        token = request.headers.get(IMDS_TOKEN_HEADER)
        if guard is Guard.IMDS or (token is None and self.config.imds_v1):
            return
        if not (token and self.imds_tokens.valid(token)):
            raise ImdsError(401, "Unauthorized", f"missing, unknown or expired {IMDS_TOKEN_HEADER}: "
                                                 "PUT /latest/api/token for a new one")


AUDIT_TEXT_LIMIT = 700


class AuditTrail:
    """One record per credentials response: who got what, or why not.

    An INFO log line (WARNING for a refusal or an error), and with ECS_LOCAL_AUDIT_LOG a JSON
    line appended to that file, for collection.  A record names the access key ID, never
    the secret key or the token.
    """

    def __init__(self, path: str | None, view: ContainerView, own_candidates: list[str], task: str | None = None):
        self._view = view
        self._task = task   # `run`'s task ARN: every record is of a request from that task
        self._own_candidates = own_candidates
        # With logging as main() configures it (set up before this), the lines go to its
        # LineHandler directly, as the same text; any other configuration gets log records.
        self._lines = sole_line_handler(audit_log)
        self._lock = threading.Lock()
        self._file = None
        if path:
            try:
                self._file = open(path, "a", encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"ECS_LOCAL_AUDIT_LOG: {path}: {exc.strerror}") from None

    def container(self, caller: IPAddress) -> str | None:
        """The name of the running container with the caller's address, from what the view knows
        now (no Docker call); looked up once per snapshot."""
        if not self._view.reachable:
            return None
        snapshot = self._view.current()
        key = ("audit-container", caller)
        try:
            return snapshot.memo[key]
        except KeyError:
            own = find_own_container(snapshot, self._own_candidates)
            found = match_ip(snapshot, caller, own)
            name = snapshot.memo[key] = container_name(found[0]) if len(found) == 1 else None
            return name

    def record(self, request: Request, route: str, issued: Issued | None = None, error: ApiError | None = None,
               role: str | None = None) -> None:
        """What a credentials route answered: the credentials issued, or the error.

        role is the role asked for (the route family's role_asked), named when the credentials issued
        do not say whose they are.

        On the hot path of every credentials request: one log call, and one write when
        ECS_LOCAL_AUDIT_LOG is set; nothing is worked out that neither needs.
        """
        level = logging.INFO if error is None else logging.WARNING
        logged = audit_log.isEnabledFor(level)
        if self._file is None and not logged:
            return
        # Cut to what a real role ARN can be (a path of up to 512 characters): a refused
        # request may send 64 KiB.
        route = route[:AUDIT_TEXT_LIMIT]
        role = ((issued and issued.identity) or role or "")[:AUDIT_TEXT_LIMIT] or None
        container = self.container(request.caller)
        credentials = issued.credentials if issued else None
        outcome = "served" if error is None else error.code
        if logged:   # the access line's facts too: for these routes this line stands for it
            line = f"credentials route={safe(route)} caller={request.caller!s}"   # !s: str(), not ipaddress's slower __format__
            if container:
                line += f" container={container}"
            if self._task:
                line += f" task={self._task}"
            if role:
                line += f" role={safe(role)}"
            if credentials:
                line += (f" accessKeyId={credentials.access_key_id} expiration={credentials.expiry_text}"
                         f" source={issued.source}")
            line += (f" outcome={outcome} status={error.status if error else 200}"
                     f" elapsed={(time.monotonic() - request.received) * 1000:.1f}ms")
            if error:
                line += f" reason={safe(error.message)}"
            if self._lines is not None:   # the same line, written whole, without a LogRecord
                self._lines.write_line(level, audit_log.name, line)
            else:
                audit_log.log(level, "%s", line)
        if self._file is not None:
            entry = {
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "route": route, "caller": str(request.caller), "container": container, "role": role,
                "accessKeyId": credentials.access_key_id if credentials else None,
                "expiration": credentials.expiry_text if credentials else None,
                "source": issued.source if issued else None, "outcome": outcome,
            }
            if error:
                entry["reason"] = error.message
            if self._task:
                entry["task"] = self._task
            with self._lock:
                try:
                    self._file.write(json.dumps(entry) + "\n")
                    self._file.flush()
                except OSError as exc:
                    log.error("cannot append to the audit log: %s", exc.strerror)


def safe(text: str) -> str:
    """Text from a request, fit for one log line (printable() only when it needs it)."""
    return text if text.isprintable() else printable(text, AUDIT_TEXT_LIMIT)


# ---------------------------------------------------------------------------
# ECS documents: pure functions from Docker's JSON to ECS's JSON
# ---------------------------------------------------------------------------

TASK_ID_NAMESPACE = uuid.UUID("4d7c1b0e-7a7e-4f41-9d38-0d4a7e2f3c10")
MINIMUM_CPU_UNITS = 2                  # the agent's floor for a container's Limits.CPU
FARGATE_EPHEMERAL_STORAGE_MIB = 20496  # Fargate's default 20 GiB, as its task metadata reports it
TIME_ERROR = 5                         # adjtimex(2): the clock is not synchronized
DEFAULT_BRIDGES = ("bridge", "podman")  # the default network of Docker, of podman


@dataclass(frozen=True)
class TaskIdentity:
    """The mocked values of one task, consistent with each other (region, account, IDs)."""
    cluster: str
    arn: str
    family: str
    revision: str
    region: str
    account: str
    task_id: str
    launch_type: str
    availability_zone: str
    service_name: str | None
    network_mode: str | None = None   # a task `run` started: its task definition's; else read off each network


def task_identity(config: Config, project: str | None, service: str | None) -> TaskIdentity:
    """The task's values: each setting's, else its default worked out for this task (the
    Setting rows' task_default), so that cluster, task and container ARNs agree."""
    arn = config.task_arn or setting("TASK_ARN").task_default(config.cluster_arn, project)
    parts = arn.split(":")
    region, account = (parts[3], parts[4]) if len(parts) > 5 else ("us-west-2", "111111111111")
    return TaskIdentity(
        cluster=config.cluster_arn,
        arn=arn,
        family=config.task_family or setting("TASK_DEFINITION_FAMILY").task_default(project),
        revision=config.task_revision,
        region=region,
        account=account,
        task_id=arn.rsplit("/", 1)[-1],
        launch_type=config.launch_type,
        availability_zone=config.availability_zone or setting("AVAILABILITY_ZONE").task_default(region),
        service_name=service,
    )


def cluster_name(cluster: str) -> str:
    return cluster.rsplit("/", 1)[-1] if cluster.startswith("arn:") else cluster


def utc(timestamp: str | None) -> str | None:
    """Docker's RFC 3339 time in UTC with a Z, or None for Docker's zero time."""
    moment = parse_docker_time(timestamp)
    if moment is None:
        return None
    if timestamp.endswith("Z"):
        return timestamp   # Docker's own text keeps its nanoseconds
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def known_status(state: dict) -> str:
    status = state.get("Status", "")
    if status == "created":
        return "CREATED"
    if status in ("running", "paused", "restarting"):
        return "RUNNING"
    return "STOPPED"


def container_limits(host_config: dict) -> dict:
    """CPU in CPU units (1024 per vCPU) and memory in MiB, as ECS reports them."""
    nano = host_config.get("NanoCpus") or 0
    cpu = round(nano * 1024 / 1e9) if nano else host_config.get("CpuShares") or 0
    return {"CPU": cpu, "Memory": (host_config.get("Memory") or 0) // (1024 * 1024)}


def ports_of(container: dict, version: int) -> list[dict]:
    ports = []
    for spec, bindings in sorted(((container.get("NetworkSettings") or {}).get("Ports") or {}).items()):
        number, _, protocol = spec.partition("/")
        for binding in bindings or []:
            port = {"ContainerPort": int(number), "Protocol": protocol or "tcp",
                    "HostPort": int(binding.get("HostPort") or 0)}
            if version >= 4 and binding.get("HostIp"):
                port["HostIp"] = binding["HostIp"]
            ports.append(port)
    return ports


def network_mode(network: str, launch_type: str) -> str:
    """ECS's name for the mode of a Docker network, which the agent reports by the network's name.

    Docker's host and none networks are ECS's host and none modes, and the engine's default
    bridge is ECS's bridge mode; a network of one's own (compose makes one per project) stands
    for the task's ENI, ECS's awsvpc mode.  Fargate runs nothing but awsvpc.
    """
    if network in ("host", "none") or (network in DEFAULT_BRIDGES and launch_type != "FARGATE"):
        return network
    return "awsvpc"


def interface_properties(container: dict, network: str, endpoint: dict, index: int) -> dict:
    """The ENI fields the agent adds to an awsvpc network entry (v4)."""
    config = container.get("Config") or {}
    host_config = container.get("HostConfig") or {}
    entry: dict[str, Any] = {"AttachmentIndex": index}
    ipv4, ipv6 = endpoint.get("IPAddress"), endpoint.get("GlobalIPv6Address")
    if ipv4 and endpoint.get("IPPrefixLen"):
        entry["IPv4SubnetCIDRBlock"] = str(ipaddress.ip_interface(f"{ipv4}/{endpoint['IPPrefixLen']}").network)
    if ipv6 and endpoint.get("GlobalIPv6PrefixLen"):
        entry["IPv6SubnetCIDRBlock"] = str(ipaddress.ip_interface(
            f"{ipv6}/{endpoint['GlobalIPv6PrefixLen']}").network)
    if endpoint.get("MacAddress"):
        entry["MACAddress"] = endpoint["MacAddress"]
    # User-defined networks resolve through Docker's embedded DNS server.
    dns = host_config.get("Dns") or ([] if network in DEFAULT_BRIDGES else ["127.0.0.11"])
    if dns:
        entry["DomainNameServers"] = list(dns)
    if host_config.get("DnsSearch"):
        entry["DomainNameSearchList"] = list(host_config["DnsSearch"])
    if config.get("Hostname"):
        entry["PrivateDNSName"] = config["Hostname"] + (f".{config['Domainname']}" if config.get("Domainname")
                                                        else "")
    if ipv4 and endpoint.get("Gateway") and endpoint.get("IPPrefixLen"):
        entry["SubnetGatewayIpv4Address"] = f"{endpoint['Gateway']}/{endpoint['IPPrefixLen']}"
    elif not ipv4 and endpoint.get("IPv6Gateway") and endpoint.get("GlobalIPv6PrefixLen"):
        # The agent gives the IPv6 gateway for IPv6-only ENIs only.
        entry["SubnetGatewayIpv6Address"] = f"{endpoint['IPv6Gateway']}/{endpoint['GlobalIPv6PrefixLen']}"
    return entry


def networks_of(container: dict, version: int, launch_type: str, task_mode: str | None = None) -> list[dict]:
    """One entry per Docker network; v4 adds the ENI fields to awsvpc entries only, as the agent."""
    result = []
    endpoints = ((container.get("NetworkSettings") or {}).get("Networks") or {})
    for index, (name, endpoint) in enumerate(sorted(endpoints.items())):
        mode = task_mode or network_mode(name, launch_type)
        entry: dict[str, Any] = {"NetworkMode": mode}
        if endpoint.get("IPAddress"):
            entry["IPv4Addresses"] = [endpoint["IPAddress"]]
        if endpoint.get("GlobalIPv6Address"):
            entry["IPv6Addresses"] = [endpoint["GlobalIPv6Address"]]
        if version >= 4 and mode == "awsvpc":
            entry.update(interface_properties(container, name, endpoint, index))
        result.append(entry)
    return result


def health_of(state: dict, since: str | None) -> dict | None:
    """The agent's Health: status left out while unknown (Docker's "starting"), exitCode and
    output left out when 0 or empty (its JSON omits them)."""
    health = state.get("Health")
    if not health:
        return None
    result: dict[str, Any] = {}
    status = {"healthy": "HEALTHY", "unhealthy": "UNHEALTHY"}.get(health.get("Status", ""))
    if status:
        result["status"] = status
    if since:
        result["statusSince"] = since
    checks = health.get("Log") or []
    if checks and checks[-1].get("ExitCode"):
        result["exitCode"] = checks[-1]["ExitCode"]
    if checks and checks[-1].get("Output"):
        result["output"] = checks[-1]["Output"]
    return result


def health_status_began(health: dict) -> str | None:
    """When the current health status began, as far as Docker's last few checks tell."""
    passing = health.get("Status") == "healthy"
    began = None
    for check in reversed(health.get("Log") or []):
        if (check.get("ExitCode") == 0) != passing:
            break
        began = check.get("End") or check.get("Start")
    return utc(began)


def health_transitions(previous: dict[str, tuple[str, str | None]], containers: dict[str, dict]
                       ) -> dict[str, tuple[str, str | None]]:
    """Container ID -> (health status, when it began).  Docker keeps only the last five
    checks, so the start of a long run of one status is remembered from view to view."""
    result = {}
    for container_id, container in containers.items():
        health = (container.get("State") or {}).get("Health")
        if health:
            status = health.get("Status", "")
            known = previous.get(container_id)
            result[container_id] = known if known and known[0] == status else (status,
                                                                               health_status_began(health))
    return result


def container_arn(task: TaskIdentity, container_id: str) -> str:
    return (f"arn:aws:ecs:{task.region}:{task.account}:container/{cluster_name(task.cluster)}/"
            f"{task.task_id}/{uuid.uuid5(TASK_ID_NAMESPACE, container_id)}")


def cluster_arn(task: TaskIdentity) -> str:
    """The cluster as an ARN, in the task's region and account when CLUSTER_ARN is a bare name."""
    if task.cluster.startswith("arn:"):
        return task.cluster
    return f"arn:aws:ecs:{task.region}:{task.account}:cluster/{task.cluster}"


def ecs_labels(task: TaskIdentity, name: str) -> dict[str, str]:
    """The Docker labels the ECS agent puts on every container of a task."""
    return {
        "com.amazonaws.ecs.cluster": cluster_arn(task),
        ECS_CONTAINER_NAME: name,
        "com.amazonaws.ecs.task-arn": task.arn,
        "com.amazonaws.ecs.task-definition-family": task.family,
        "com.amazonaws.ecs.task-definition-version": task.revision,
    }


def has_restart_policy(host_config: dict) -> bool:
    return ((host_config.get("RestartPolicy") or {}).get("Name") or "no") != "no"


def container_metadata(container: dict, version: int, task: TaskIdentity, health_since: str | None = None
                       ) -> dict:
    """One container the way the ECS agent describes it (v2/v3 shape, v4 additions), with the
    agent's rules for what is left out."""
    state = container.get("State") or {}
    config = container.get("Config") or {}
    host_config = container.get("HostConfig") or {}
    labels = config.get("Labels") or {}
    status = known_status(state)
    name = labels.get(ECS_CONTAINER_NAME) or labels.get(COMPOSE_SERVICE) or container_name(container)
    doc: dict[str, Any] = {
        "DockerId": container["Id"],
        "Name": name,
        "DockerName": container_name(container),
        "Image": config.get("Image", ""),
        "ImageID": container.get("Image", ""),
    }
    ports = ports_of(container, version)
    if ports:
        doc["Ports"] = ports
    doc["Labels"] = {**ecs_labels(task, name), **labels}   # a label the container really has wins
    doc["DesiredStatus"] = "STOPPED" if status == "STOPPED" else "RUNNING"
    doc["KnownStatus"] = status
    if status == "STOPPED":
        doc["ExitCode"] = state.get("ExitCode", 0)
    limits = container_limits(host_config)
    # The agent reports at least 2 CPU units (its minimum), whatever the task definition says.
    doc["Limits"] = dict(limits, CPU=max(limits["CPU"], MINIMUM_CPU_UNITS))
    for key, value in (("CreatedAt", utc(container.get("Created"))), ("StartedAt", utc(state.get("StartedAt"))),
                       ("FinishedAt", utc(state.get("FinishedAt")) if status == "STOPPED" else None)):
        if value:
            doc[key] = value
    doc["Type"] = "NORMAL"
    health = health_of(state, health_since)
    if health is not None:
        doc["Health"] = health
    volumes = [{k: v for k, v in (("DockerName", m.get("Name")), ("Source", m.get("Source")),
                                  ("Destination", m.get("Destination"))) if v}
               for m in container.get("Mounts") or []]
    if volumes:
        doc["Volumes"] = volumes
    if version >= 4:
        doc["ContainerARN"] = container_arn(task, container["Id"])
        log_config = host_config.get("LogConfig") or {}
        if log_config.get("Type"):
            doc["LogDriver"] = log_config["Type"]
        if log_config.get("Config"):
            doc["LogOptions"] = log_config["Config"]
        if has_restart_policy(host_config):
            doc["RestartCount"] = container.get("RestartCount", 0)
        snapshotter = (container.get("GraphDriver") or {}).get("Name")
        if task.launch_type == "FARGATE" and snapshotter:
            doc["Snapshotter"] = snapshotter
    networks = networks_of(container, version, task.launch_type, task.network_mode)
    if networks:
        doc["Networks"] = networks
    return doc


class Timex(ctypes.Structure):
    """The head of Linux's struct timex (adjtimex(2)); the tail is room the kernel may write."""
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("rest", ctypes.c_byte * 256)]


def clock_drift(now: datetime) -> dict:
    """Fargate's ClockDrift from the host kernel's clock discipline, read-only adjtimex(2):
    the maximum error in milliseconds and whether NTP keeps the clock synchronized."""
    drift: dict[str, Any] = {"ReferenceTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
    try:
        timex = Timex()
        state = ctypes.CDLL(None, use_errno=True).adjtimex(ctypes.byref(timex))
    except (OSError, AttributeError):
        return drift
    if state < 0:
        return drift
    drift["ClockErrorBound"] = timex.maxerror / 1000
    drift["ClockSynchronizationStatus"] = "NOT_SYNCHRONIZED" if state == TIME_ERROR else "SYNCHRONIZED"
    return drift


def task_metadata(members: list[dict], version: int, task: TaskIdentity, config: Config,
                  with_tags: bool, containers: list[dict], now: datetime | None = None) -> dict:
    """The task object; containers are the already-built container documents of members."""
    running = any(c["State"].get("Running") for c in members)
    doc: dict[str, Any] = {
        "Cluster": task.cluster,
        "TaskARN": task.arn,
        "Family": task.family,
        "Revision": task.revision,
        "DesiredStatus": "RUNNING",
        "KnownStatus": "RUNNING" if running else "STOPPED",
    }
    if containers:
        doc["Containers"] = containers
    limits = [container_limits(c.get("HostConfig") or {}) for c in members]
    cpu = sum(limit["CPU"] for limit in limits)
    memory = sum(limit["Memory"] for limit in limits)
    task_limits = {k: v for k, v in (("CPU", cpu / 1024), ("Memory", memory)) if v}
    if task_limits:
        doc["Limits"] = task_limits
    finished = [utc(c["State"].get("FinishedAt")) for c in members]
    if not running and any(finished):
        doc["ExecutionStoppedAt"] = max(f for f in finished if f)
    doc["AvailabilityZone"] = task.availability_zone
    if with_tags and config.task_tags:
        doc["TaskTags"] = dict(config.task_tags)
    if with_tags and config.container_instance_tags:
        doc["ContainerInstanceTags"] = dict(config.container_instance_tags)
    if version >= 4:
        doc["LaunchType"] = task.launch_type
        if config.vpc_id and task.launch_type != "FARGATE":
            doc["VPCID"] = config.vpc_id
        if task.service_name:
            doc["ServiceName"] = task.service_name
        if task.launch_type == "FARGATE":
            doc["ClockDrift"] = clock_drift(now or datetime.now(timezone.utc))
            doc["EphemeralStorageMetrics"] = {"Utilized": 0, "Reserved": FARGATE_EPHEMERAL_STORAGE_MIB}
        doc["FaultInjectionEnabled"] = False
        if config.availability_zone_id:
            doc["AvailabilityZoneID"] = config.availability_zone_id
    return doc


class JsonOverride:
    """A JSON file merged over generated responses, re-read when it changes on disk."""

    def __init__(self, path: str | None):
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self.value: dict = {}
        self.generation = 0   # counts reloads, so cached responses know when to rebuild
        self._lock = threading.Lock()
        if path:
            self.value = self._read()
            self._stamp = self._stat()

    def _stat(self) -> tuple[float, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def _read(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:
                value = json.load(f)
        except OSError as exc:
            raise ConfigError(f"{self.path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{self.path}: invalid JSON at line {exc.lineno} column {exc.colno}: "
                              f"{exc.msg}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{self.path}: expected a JSON object")
        return value

    def refresh(self) -> int:
        """Re-read the file if it changed (a broken edit keeps the last good version and warns);
        returns the generation in use."""
        if not self.path:
            return 0
        stamp = self._stat()
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    try:
                        self.value = self._read()
                        self.generation += 1
                        log.info("reloaded %s", self.path)
                    except ConfigError as exc:
                        log.warning("keeping the previous metadata override: %s", exc)
                    self._stamp = stamp
        return self.generation


def deep_merge(base: Any, override: Any) -> Any:
    """override wins; objects are merged key by key, everything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base.get(key), value)
        return merged
    return copy.deepcopy(override)


# ---------------------------------------------------------------------------
# Task definitions: pure functions from a task definition's JSON to Docker's
# create bodies (the `run` command's plan; no Docker, no AWS)
# ---------------------------------------------------------------------------

ENDPOINTS_ADDRESS = "169.254.170.2"     # where the agent serves a task's endpoints, in every network mode
NETWORK_MODES = ("awsvpc", "bridge", "host", "none")
DEPENDENCY_CONDITIONS = ("START", "COMPLETE", "SUCCESS", "HEALTHY")
DEFAULT_STOP_TIMEOUT = 30               # the agent's ECS_CONTAINER_STOP_TIMEOUT
MAX_CPU_SHARES = 262144
MIN_MEMORY_MIB = 4                      # Docker's floor, which the agent applies too
HEALTH_CHECK_DEFAULTS = {"interval": 30, "timeout": 5, "retries": 3, "startPeriod": 0}
PAUSE_NAME = "~internal~ecs~pause"
DEFAULT_PAUSE_IMAGE = "registry.k8s.io/pause:3.10"   # the agent's own pause image is not published
LOCAL_LOG_DRIVERS = ("json-file", "local", "none")
NETNS_LABEL = "local-endpoints.netns-for"   # on a network-namespace holder: the container it holds it for
REGION_VARIABLES = frozenset({"AWS_REGION", "AWS_DEFAULT_REGION"})
AGENT_URI_VARIABLES = ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "ECS_CONTAINER_METADATA_URI",
                       "ECS_CONTAINER_METADATA_URI_V4", "ECS_AGENT_URI")   # always the agent's values


class TaskDefinitionError(ValueError):
    """A task definition ECS would refuse, or one `run` cannot read: the message names the field."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")


def read_task_definition(document: Any) -> tuple[dict, dict[str, str]]:
    """The task definition and its tags, from any of the shapes people keep: the input of
    register-task-definition --cli-input-json, or the output of describe-task-definition
    with or without its taskDefinition wrapper (tags as ECS lists them: key/value)."""
    if not isinstance(document, dict):
        raise TaskDefinitionError("task definition", "must be a JSON object")
    tags = document.get("tags") or []
    definition = document.get("taskDefinition", document)
    if not isinstance(definition, dict):
        raise TaskDefinitionError("taskDefinition", "must be a JSON object")
    if not isinstance(tags, list) or not all(isinstance(t, dict) and "key" in t for t in tags):
        raise TaskDefinitionError("tags", 'must be a list of {"key": ..., "value": ...}')
    return definition, {str(t["key"]): str(t.get("value", "")) for t in tags}


def parse_env_file(text: str) -> dict[str, str]:
    """An environment file as the agent reads it (envfile.go readEnvVarsFromFile): a line that
    starts with # is a comment; a line without = is skipped (blank lines too); the name is what
    stands before the first =, the value everything after it, as written; a line whose name or
    value is empty is skipped; a later line wins."""
    variables = {}
    for line in text.splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        if name and value:
            variables[name] = value
    return variables


def task_cpu_vcpu(value: Any) -> float | None:
    """A task's cpu ("256", "1 vCPU", 1024) in vCPU, as Limits.CPU reports it."""
    if value in (None, ""):
        return None
    text = str(value).strip().lower()
    if text.endswith("vcpu"):
        return float(text[:-4])
    return int(text) / 1024


def task_memory_mib(value: Any) -> int | None:
    """A task's memory ("512", "1 GB", 2048) in MiB."""
    if value in (None, ""):
        return None
    text = str(value).strip().lower()
    if text.endswith("gb"):
        return int(float(text[:-2]) * 1024)
    return int(text)


def agent_name(name: str) -> str:
    """A name as the agent puts it in Docker names: what is not a letter, digit or - removed."""
    return re.sub(r"[^A-Za-z0-9-]+", "", name)


def docker_name(family: str, revision: str, name: str, suffix: str) -> str:
    """The agent's Docker name: ecs-{family}-{revision}-{name}-{20 hex digits}; only the
    container's name is stripped (a family's letters, digits, _ and - are valid in Docker names)."""
    return f"ecs-{family}-{revision}-{agent_name(name)}-{suffix}"


def dependency_order(containers: list[dict]) -> list[str]:
    """Container names so that each comes after what it depends on (dependsOn, links,
    volumesFrom), in the task definition's order otherwise; a cycle is a TaskDefinitionError."""
    needs = {c["name"]: dependencies_of(c) for c in containers}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in visiting:
            cycle = " -> ".join(path[path.index(name):] + (name,))
            raise TaskDefinitionError("containerDefinitions.dependsOn", f"dependencies form a cycle: {cycle}")
        visiting.add(name)
        for needed in needs[name]:
            visit(needed, path + (name,))
        visiting.discard(name)
        order.append(name)
    for c in containers:
        visit(c["name"], ())
    return order


def dependencies_of(container: dict) -> dict[str, str]:
    """What a container waits for: dependsOn's conditions, and the agent's implicit ones
    (links: START; volumesFrom: the source must exist, so START here too)."""
    needs = {link.split(":")[0]: "START" for link in container.get("links") or []}
    needs.update({v["sourceContainer"]: "START" for v in container.get("volumesFrom") or []})
    needs.update({d["containerName"]: d["condition"] for d in container.get("dependsOn") or []})
    return needs


def validate_task_definition(definition: dict) -> None:
    """What ECS (its API or the agent) would refuse, before anything is created."""
    mode = definition.get("networkMode") or "bridge"
    if mode not in NETWORK_MODES:
        raise TaskDefinitionError("networkMode", f"{mode!r} is not one of {', '.join(NETWORK_MODES)}")
    containers = definition.get("containerDefinitions")
    if not isinstance(containers, list) or not containers:
        raise TaskDefinitionError("containerDefinitions", "a task definition needs at least one container")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", str(definition.get("family") or "")):
        raise TaskDefinitionError("family", "a task definition needs a family of up to 255 letters, digits, "
                                            "_ and -")
    by_name: dict[str, dict] = {}
    for index, container in enumerate(containers):
        where = f"containerDefinitions[{index}]"
        if not isinstance(container, dict) or not container.get("name"):
            raise TaskDefinitionError(f"{where}.name", "every container needs a name")
        if container["name"] in by_name:
            raise TaskDefinitionError(f"{where}.name", f"{container['name']!r} is used twice")
        if not container.get("image"):
            raise TaskDefinitionError(f"{where}.image", f"container {container['name']!r} needs an image")
        by_name[container["name"]] = container
    if not any(c.get("essential", True) for c in containers):
        raise TaskDefinitionError("containerDefinitions", "at least one container must be essential")
    volumes = {v.get("name") for v in definition.get("volumes") or []}
    for key, parse, form in (("cpu", task_cpu_vcpu, 'CPU units or vCPU, like "256" or "1 vCPU"'),
                             ("memory", task_memory_mib, 'MiB or GB, like "512" or "1 GB"')):
        try:
            parse(definition.get(key))
        except ValueError:
            raise TaskDefinitionError(key, f"{definition[key]!r} is not {form}") from None
    task_memory = task_memory_mib(definition.get("memory"))
    fargate = "FARGATE" in (definition.get("requiresCompatibilities") or ())
    for index, container in enumerate(containers):
        where = f"containerDefinitions[{index}]"
        validate_container(container, where, mode, by_name, volumes, task_memory)
        if not (task_memory or fargate or container.get("memory") or container.get("memoryReservation")):
            raise TaskDefinitionError(f"{where}.memory", f"container {container['name']!r} needs memory or "
                                                         "memoryReservation when the task has no memory")
    dependency_order(containers)


def validate_container(container: dict, where: str, mode: str, by_name: dict[str, dict], volumes: set,
                       task_memory: int | None) -> None:
    name = container["name"]
    if mode == "none" and container.get("portMappings"):
        raise TaskDefinitionError(f"{where}.portMappings", "port mappings cannot be specified in none network mode")
    for index, mapping in enumerate(container.get("portMappings") or []):
        host_port = mapping.get("hostPort")
        if mode in ("awsvpc", "host") and host_port not in (None, 0, mapping.get("containerPort")):
            raise TaskDefinitionError(f"{where}.portMappings[{index}].hostPort",
                                      f"in {mode} network mode hostPort must equal containerPort "
                                      f"({mapping.get('containerPort')}), not {host_port}")
    if container.get("links") and mode != "bridge":
        raise TaskDefinitionError(f"{where}.links", f"links are for bridge network mode only, not {mode}")
    if mode == "awsvpc":
        for key in ("hostname", "extraHosts"):
            if container.get(key):
                raise TaskDefinitionError(f"{where}.{key}", "not supported in awsvpc network mode")
    memory, reservation = container.get("memory"), container.get("memoryReservation")
    if memory and reservation and reservation > memory:
        raise TaskDefinitionError(f"{where}.memoryReservation",
                                  f"{reservation} MiB is more than the container's memory ({memory} MiB)")
    if memory and task_memory and memory > task_memory:
        raise TaskDefinitionError(f"{where}.memory",
                                  f"{memory} MiB is more than the task's memory ({task_memory} MiB)")
    for key, targets in (("links", [link.split(":")[0] for link in container.get("links") or []]),
                         ("volumesFrom", [v.get("sourceContainer") for v in container.get("volumesFrom") or []])):
        for target in targets:
            if target not in by_name:
                raise TaskDefinitionError(f"{where}.{key}", f"no container named {target!r}")
    for index, mount in enumerate(container.get("mountPoints") or []):
        if mount.get("sourceVolume") not in volumes:
            raise TaskDefinitionError(f"{where}.mountPoints[{index}].sourceVolume",
                                      f"no volume named {mount.get('sourceVolume')!r} in volumes")
    for key, entries in (("secrets", container.get("secrets") or []),
                         ("logConfiguration.secretOptions",
                          (container.get("logConfiguration") or {}).get("secretOptions") or [])):
        for index, secret in enumerate(entries):
            if not secret.get("name"):
                raise TaskDefinitionError(f"{where}.{key}[{index}].name", "every secret needs a name")
            try:
                secret_reference(secret.get("valueFrom") or "", "")
            except ValueError as exc:
                raise TaskDefinitionError(f"{where}.{key}[{index}].valueFrom", str(exc)) from None
    for index, file in enumerate(container.get("environmentFiles") or []):
        try:
            environment_file_source(file)
        except ValueError as exc:
            raise TaskDefinitionError(f"{where}.environmentFiles[{index}]", str(exc)) from None
    credentials = (container.get("repositoryCredentials") or {}).get("credentialsParameter")
    if credentials is not None and not SECRET_ARN.fullmatch(credentials):
        raise TaskDefinitionError(f"{where}.repositoryCredentials.credentialsParameter",
                                  f"{credentials!r} is not a Secrets Manager secret ARN")
    for index, dependency in enumerate(container.get("dependsOn") or []):
        field_name = f"{where}.dependsOn[{index}]"
        target, condition = dependency.get("containerName"), dependency.get("condition")
        if target not in by_name:
            raise TaskDefinitionError(f"{field_name}.containerName", f"no container named {target!r}")
        if target == name:
            raise TaskDefinitionError(f"{field_name}.containerName", f"{name!r} cannot depend on itself")
        if condition not in DEPENDENCY_CONDITIONS:
            raise TaskDefinitionError(f"{field_name}.condition",
                                      f"{condition!r} is not one of {', '.join(DEPENDENCY_CONDITIONS)}")
        if condition in ("COMPLETE", "SUCCESS") and by_name[target].get("essential", True):
            raise TaskDefinitionError(f"{field_name}.condition",
                                      f"{condition} cannot be used on essential container {target!r}")
        if condition == "HEALTHY" and not by_name[target].get("healthCheck"):
            raise TaskDefinitionError(f"{field_name}.condition",
                                      f"HEALTHY needs a healthCheck on container {target!r}")


@dataclass(frozen=True)
class RunOptions:
    """What the user chose on the command line."""
    cluster: str                       # the cluster ARN
    region: str
    publish_address: str = "127.0.0.1"
    pause_image: str = DEFAULT_PAUSE_IMAGE
    env_file: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PlannedContainer:
    """One Docker container of the plan: a task-definition container, or a network-namespace
    holder (the awsvpc pause container, or one per container in the other modes)."""
    name: str                     # the task definition's name, or PAUSE_NAME, or "{name} netns"
    docker_name: str
    body: dict                    # POST /containers/create's body
    essential: bool = False
    endpoint_id: str = ""         # the agent's V3EndpointID: in the container's metadata URIs
    holder: str | None = None     # the docker name of the holder whose namespace it joins
    depends_on: dict[str, str] = field(default_factory=dict)
    stop_timeout: int = DEFAULT_STOP_TIMEOUT
    start_timeout: int | None = None
    links: dict[str, str] = field(default_factory=dict)   # a bridge holder's: alias -> container name
    agent_region: bool = False    # the plan set AWS_REGION/AWS_DEFAULT_REGION (unless the image sets one)
    definition: dict = field(default_factory=dict, repr=False)

    @property
    def is_holder(self) -> bool:
        return not self.definition


@dataclass(frozen=True)
class TaskPlan:
    """Everything `run` will create for one task, worked out before anything is."""
    identity: TaskIdentity
    definition: dict
    tags: dict[str, str]
    credentials_id: str | None    # the path id of /v2/credentials/{id}, when the task has a role
    holders: tuple[PlannedContainer, ...]
    containers: tuple[PlannedContainer, ...]   # in dependency order
    volumes: tuple[tuple[str, dict], ...]      # task-scoped Docker volumes: (name, POST /volumes/create body)
    warnings: tuple[str, ...]

    @property
    def network_mode(self) -> str:
        return self.identity.network_mode or "bridge"

    def container(self, name: str) -> PlannedContainer:
        return next(c for c in self.containers if c.name == name)

    def images(self) -> list[str]:
        return list(dict.fromkeys(c.body["Image"] for c in (*self.holders, *self.containers)))


def plan_task(definition: dict, tags: dict[str, str], options: RunOptions,
              random_hex: Callable[[], str] = lambda: secrets.token_hex(10),
              new_id: Callable[[], str] = lambda: str(uuid.uuid4())) -> TaskPlan:
    """The task `run` starts for a valid task definition: its identity, Docker bodies and order."""
    validate_task_definition(definition)
    family = definition["family"]
    revision = str(definition.get("revision") or 1)
    mode = definition.get("networkMode") or "bridge"
    account = next((account_of(arn) for arn in (definition.get("taskDefinitionArn"),
                                                definition.get("taskRoleArn"), definition.get("executionRoleArn"),
                                                options.cluster) if arn and account_of(arn)), "111111111111")
    task_id = new_id().replace("-", "")
    cluster = options.cluster if options.cluster.startswith("arn:") else \
        f"arn:aws:ecs:{options.region}:{account}:cluster/{options.cluster}"
    compatibilities = definition.get("requiresCompatibilities") or definition.get("compatibilities") or ["EC2"]
    identity = TaskIdentity(
        cluster=cluster, arn=f"arn:aws:ecs:{options.region}:{account}:task/{cluster_name(cluster)}/{task_id}",
        family=family, revision=revision, region=options.region, account=account, task_id=task_id,
        launch_type="FARGATE" if "FARGATE" in compatibilities else "EC2",
        availability_zone=f"{options.region}a", service_name=None, network_mode=mode)
    warnings = []
    volumes, sources = task_volumes(definition, identity, random_hex, warnings)
    credentials_id = new_id() if definition.get("taskRoleArn") else None
    by_name = {c["name"]: c for c in definition["containerDefinitions"]}
    order = dependency_order(definition["containerDefinitions"])
    names = {name: docker_name(family, revision, name, random_hex()) for name in order}
    holders: list[PlannedContainer] = []
    containers: list[PlannedContainer] = []
    if mode == "awsvpc":
        holders.append(holder_plan(PAUSE_NAME, docker_name(family, revision, "internalecspause", random_hex()),
                                   list(by_name.values()), mode, identity, options, {}))
    for name in order:
        container = by_name[name]
        holder = holders[0].docker_name if mode == "awsvpc" else None
        if mode in ("bridge", "none"):
            holders.append(holder_plan(f"{name} netns", names[name] + "-netns", [container], mode, identity,
                                       options, links_of(container)))
            holder = holders[-1].docker_name
        endpoint_id = new_id()
        body = container_body(container, identity, options, sources, names, holder, credentials_id, endpoint_id,
                              warnings)
        containers.append(PlannedContainer(
            name=name, docker_name=names[name], body=body, essential=container.get("essential", True),
            endpoint_id=endpoint_id, holder=holder, depends_on=dependencies_of(container),
            stop_timeout=container.get("stopTimeout") or DEFAULT_STOP_TIMEOUT,
            start_timeout=container.get("startTimeout"), definition=container,
            agent_region=not REGION_VARIABLES & set(given_environment(container, options))))
    return TaskPlan(identity, definition, {**tags, **options.tags}, credentials_id, tuple(holders),
                    tuple(containers), tuple(volumes), tuple(warnings))


def task_volumes(definition: dict, identity: TaskIdentity, random_hex: Callable[[], str], warnings: list[str]
                 ) -> tuple[list[tuple[str, dict]], dict[str, str]]:
    """The Docker volumes the task creates, and each task volume's source for a bind
    (a host path, or a Docker volume's name)."""
    created, sources = [], {}
    for volume in definition.get("volumes") or []:
        name = volume["name"]
        host = volume.get("host") or {}
        docker = volume.get("dockerVolumeConfiguration")
        if host.get("sourcePath"):
            sources[name] = host["sourcePath"]
            continue
        if docker and docker.get("scope") == "shared":
            sources[name] = name   # created if missing when autoprovision says so (the runner checks)
            continue
        for remote in ("efsVolumeConfiguration", "fsxWindowsFileServerVolumeConfiguration"):
            if volume.get(remote):
                warnings.append(f"volume {name}: {remote} cannot be mounted here; a local volume stands in for it")
        docker = docker or {}
        docker_volume = docker_name(identity.family, identity.revision, name, random_hex())
        created.append((docker_volume, {"Name": docker_volume, "Driver": docker.get("driver") or "local",
                                        "DriverOpts": docker.get("driverOpts") or {},
                                        "Labels": {**(docker.get("labels") or {}),
                                                   "com.amazonaws.ecs.task-arn": identity.arn}}))
        sources[name] = docker_volume
    return created, sources


def links_of(container: dict) -> dict[str, str]:
    """links ("name" or "name:alias") as alias -> the container's name."""
    return {(link.split(":") + [link])[1]: link.split(":")[0] for link in container.get("links") or []}


def holder_plan(name: str, holder_name: str, served: list[dict], mode: str, identity: TaskIdentity,
                options: RunOptions, links: dict[str, str]) -> PlannedContainer:
    """A container that only holds a network namespace, started before the containers that join
    it, so that the endpoints' address is in the namespace before their first instruction runs.
    What Docker allows only on a namespace's owner (ports, hostname, DNS, hosts, network sysctls)
    is set here."""
    ports: dict[str, list[dict]] = {}
    for container in served:
        for mapping in container.get("portMappings") or []:
            port = f"{mapping['containerPort']}/{mapping.get('protocol') or 'tcp'}"
            host_port = mapping.get("hostPort") or (mapping["containerPort"] if mode == "awsvpc" else "")
            ports.setdefault(port, []).append({"HostIp": options.publish_address, "HostPort": str(host_port)})
    only = served[0] if len(served) == 1 else {}
    host_config: dict[str, Any] = {
        "NetworkMode": "none" if mode == "none" else "bridge",
        "PortBindings": ports,
        "Dns": only.get("dnsServers") or [],
        "DnsSearch": only.get("dnsSearchDomains") or [],
        "ExtraHosts": [f"{h['hostname']}:{h['ipAddress']}" for h in only.get("extraHosts") or []],
        "Sysctls": {s["namespace"]: s["value"] for c in served for s in c.get("systemControls") or []
                    if s["namespace"].startswith("net.")},
        "LogConfig": {"Type": "none"},
    }
    labels = {**ecs_labels(identity, name), NETNS_LABEL: name}
    return PlannedContainer(
        name=name, docker_name=holder_name, essential=True, links=links,
        body={"Image": options.pause_image, "Hostname": only.get("hostname") or "", "Labels": labels,
              "ExposedPorts": {port: {} for port in ports}, "HostConfig": host_config})


def agent_environment(identity: TaskIdentity, endpoint_id: str, credentials_id: str | None) -> dict[str, str]:
    """The variables the agent (and ECS's backend) put in every container of a task."""
    env = {}
    if credentials_id:
        env["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"] = f"/v2/credentials/{credentials_id}"
    env["ECS_CONTAINER_METADATA_URI"] = f"http://{ENDPOINTS_ADDRESS}/v3/{endpoint_id}"
    env["ECS_CONTAINER_METADATA_URI_V4"] = f"http://{ENDPOINTS_ADDRESS}/v4/{endpoint_id}"
    env["ECS_AGENT_URI"] = f"http://{ENDPOINTS_ADDRESS}/api/{endpoint_id}"
    env["AWS_EXECUTION_ENV"] = "AWS_ECS_FARGATE" if identity.launch_type == "FARGATE" else "AWS_ECS_EC2"
    return env


def given_environment(container: dict, options: RunOptions) -> dict[str, str]:
    """--env-file's variables, then the task definition's environment, which wins."""
    return {**options.env_file, **{e["name"]: str(e.get("value", "")) for e in container.get("environment") or []}}


def container_environment(container: dict, identity: TaskIdentity, options: RunOptions, endpoint_id: str,
                          credentials_id: str | None) -> list[str]:
    """The agent's variables, then the given ones; the region variables unless the given ones set
    either (complete_environment also leaves them out for an image that sets either).
    The credentials and endpoint URIs replace given values, as the agent sets them over the task
    definition's environment (task.go initializeCredentialsEndpoint, container.go Inject*)."""
    given = given_environment(container, options)
    agent = agent_environment(identity, endpoint_id, credentials_id)
    env = dict(agent)
    if not REGION_VARIABLES & set(given):
        env.update(dict.fromkeys(sorted(REGION_VARIABLES), identity.region))
    env.update(given)
    env.update({name: value for name, value in agent.items() if name != "AWS_EXECUTION_ENV"})
    return [f"{name}={value}" for name, value in env.items()]


def seconds_ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def health_check_body(check: dict) -> dict:
    """healthCheck with the API's defaults, as Docker's Healthcheck (durations in nanoseconds)."""
    check = {**HEALTH_CHECK_DEFAULTS, **check}
    return {"Test": list(check["command"]), "Interval": seconds_ns(check["interval"]),
            "Timeout": seconds_ns(check["timeout"]), "Retries": check["retries"],
            "StartPeriod": seconds_ns(check["startPeriod"])}


def container_body(container: dict, identity: TaskIdentity, options: RunOptions, sources: dict[str, str],
                   names: dict[str, str], holder: str | None, credentials_id: str | None, endpoint_id: str,
                   warnings: list[str]) -> dict:
    """POST /containers/create's body for one container definition, as the agent and ECS's
    backend form it; a container in a holder's namespace leaves the network settings to it."""
    name = container["name"]
    linux = container.get("linuxParameters") or {}
    memory, swap = container.get("memory"), linux.get("maxSwap")
    host_config: dict[str, Any] = {
        "NetworkMode": f"container:{holder}" if holder else "host",
        "CpuShares": min(max(container.get("cpu") or 0, MINIMUM_CPU_UNITS), MAX_CPU_SHARES),
        "Binds": [f"{sources[m['sourceVolume']]}:{m['containerPath']}" + (":ro" if m.get("readOnly") else "")
                  for m in container.get("mountPoints") or []],
        "VolumesFrom": [names[v["sourceContainer"]] + (":ro" if v.get("readOnly") else "")
                        for v in container.get("volumesFrom") or []],
        "Privileged": bool(container.get("privileged")),
        "ReadonlyRootfs": bool(container.get("readonlyRootFilesystem")),
        "Ulimits": [{"Name": u["name"], "Soft": u["softLimit"], "Hard": u["hardLimit"]}
                    for u in container.get("ulimits") or []],
        "Sysctls": {s["namespace"]: s["value"] for s in container.get("systemControls") or []
                    if holder is None or not s["namespace"].startswith("net.")},
        "CapAdd": list((linux.get("capabilities") or {}).get("add") or []),
        "CapDrop": list((linux.get("capabilities") or {}).get("drop") or []),
        "Devices": [{"PathOnHost": d["hostPath"], "PathInContainer": d.get("containerPath") or d["hostPath"],
                     "CgroupPermissions": "".join(p[0] for p in d.get("permissions") or ["read", "write", "mknod"])}
                    for d in linux.get("devices") or []],
        "Tmpfs": {t["containerPath"]: ",".join([f"size={t['size']}m", *(t.get("mountOptions") or [])])
                  for t in linux.get("tmpfs") or []},
        "LogConfig": local_log_config(container, warnings),
    }
    if memory:
        host_config["Memory"] = max(memory, MIN_MEMORY_MIB) * 1024 * 1024
        if swap is not None:
            host_config["MemorySwap"] = host_config["Memory"] + swap * 1024 * 1024
            host_config["MemorySwappiness"] = linux.get("swappiness", 60)
    if container.get("memoryReservation"):
        host_config["MemoryReservation"] = container["memoryReservation"] * 1024 * 1024
    if linux.get("initProcessEnabled"):
        host_config["Init"] = True
    if linux.get("sharedMemorySize"):
        host_config["ShmSize"] = linux["sharedMemorySize"] * 1024 * 1024
    if holder is None:   # host mode: the container owns its (the host's) network settings
        host_config.update({"Dns": container.get("dnsServers") or [],
                            "DnsSearch": container.get("dnsSearchDomains") or [],
                            "ExtraHosts": [f"{h['hostname']}:{h['ipAddress']}"
                                           for h in container.get("extraHosts") or []]})
    body: dict[str, Any] = {
        "Image": container["image"],
        "Env": container_environment(container, identity, options, endpoint_id, credentials_id),
        "Labels": {**(container.get("dockerLabels") or {}), **ecs_labels(identity, name)},
        "HostConfig": host_config,
        "StopTimeout": container.get("stopTimeout") or DEFAULT_STOP_TIMEOUT,
    }
    for key, docker_key in (("entryPoint", "Entrypoint"), ("command", "Cmd"), ("workingDirectory", "WorkingDir"),
                            ("user", "User")):
        if container.get(key):
            body[docker_key] = container[key]
    if holder is None and container.get("hostname"):
        body["Hostname"] = container["hostname"]
    if container.get("healthCheck"):
        body["Healthcheck"] = health_check_body(container["healthCheck"])
    if container.get("interactive"):
        body["OpenStdin"] = True
    if container.get("pseudoTerminal"):
        body["Tty"] = True
    return body


def local_log_config(container: dict, warnings: list[str]) -> dict:
    """Logs stay on this machine, where `run` streams them: a driver that sends them
    elsewhere (awslogs, firelens, splunk, ...) is replaced by json-file, with a warning."""
    log_configuration = container.get("logConfiguration") or {}
    driver = log_configuration.get("logDriver")
    if driver in LOCAL_LOG_DRIVERS:
        return {"Type": driver, "Config": log_configuration.get("options") or {}}
    if driver:
        warnings.append(f"container {container['name']}: log driver {driver} sends logs off this machine; "
                        "they are kept locally (json-file) and shown here instead")
    return {"Type": "json-file", "Config": {}}


# What the task definition references outside itself, fetched with the execution role: secrets,
# environment files, registry credentials (the references here; the fetching in TaskRunner).

SSM_PARAMETER_ARN = re.compile(r"arn:aws[a-z-]*:ssm:([a-z0-9-]+):\d{12}:parameter(/.+)")
SECRET_ARN = re.compile(r"(arn:aws[a-z-]*:secretsmanager:([a-z0-9-]+):\d{12}:secret:[^:]+)"
                        r"(?::([^:]*)(?::([^:]*)(?::([^:]*))?)?)?")
S3_OBJECT_ARN = re.compile(r"arn:aws[a-z-]*:s3:::([^/]+)/(.+)")
ECR_REGISTRY = re.compile(r"\d{12}\.dkr\.ecr(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?")
SECRET_MASK = "<secret from {}>"


@dataclass(frozen=True)
class SecretReference:
    """A secret's valueFrom as ECS reads it: an SSM parameter (a name, a path, or an ARN of any
    region), or a Secrets Manager secret ARN with :json-key:version-stage:version-id, any empty."""
    value_from: str
    service: str                  # "ssm" or "secretsmanager"
    region: str
    identifier: str               # the parameter's name, or the secret's ARN
    json_key: str = ""
    version_stage: str = ""
    version_id: str = ""

    @property
    def action(self) -> str:
        return "ssm:GetParameters" if self.service == "ssm" else "secretsmanager:GetSecretValue"

    @property
    def resource(self) -> str:
        """What an IAM policy names: the parameter's or the secret's ARN (or the name as given)."""
        return self.identifier if self.service == "secretsmanager" else self.value_from


def secret_reference(value_from: str, region: str) -> SecretReference:
    """valueFrom read; ValueError for an ARN of neither service."""
    secret = SECRET_ARN.fullmatch(value_from)
    if secret:
        return SecretReference(value_from, "secretsmanager", secret[2], secret[1], secret[3] or "",
                               secret[4] or "", secret[5] or "")
    parameter = SSM_PARAMETER_ARN.fullmatch(value_from)
    if parameter:
        path = parameter[2]   # parameter/name is "name"; parameter/a/b is the path "/a/b"
        return SecretReference(value_from, "ssm", parameter[1], path if path.count("/") > 1 else path[1:])
    if value_from.startswith("arn:") or not value_from:
        raise ValueError(f"{value_from!r} is neither an SSM parameter (a name or ARN) nor a Secrets Manager "
                         "secret ARN")
    return SecretReference(value_from, "ssm", region, value_from)


def environment_file_source(file: dict) -> tuple[str, str, str]:
    """An environmentFiles entry: ("s3", bucket, key) for ECS's S3 object ARN, or ("file", path, "")
    for a local path (for development); ValueError otherwise."""
    value = file.get("value") or ""
    if (file.get("type") or "s3") != "s3":
        raise ValueError(f"type {file.get('type')!r} is not s3")
    s3 = S3_OBJECT_ARN.fullmatch(value)
    if s3:
        return "s3", s3[1], s3[2]
    if value.startswith("arn:") or not value:
        raise ValueError(f"{value!r} is not an S3 object ARN (arn:aws:s3:::bucket/key) or a local path")
    return "file", value, ""


def container_secrets(container: dict, region: str) -> dict[str, SecretReference]:
    """The container's secrets: variable -> reference (secrets), and "log option NAME" -> reference
    (logConfiguration.secretOptions, fetched so that a missing permission shows, and not used:
    the logs stay local)."""
    references = {s["name"]: secret_reference(s["valueFrom"], region) for s in container.get("secrets") or []}
    for option in (container.get("logConfiguration") or {}).get("secretOptions") or []:
        references[f"log option {option['name']}"] = secret_reference(option["valueFrom"], region)
    return references


def registry_of(image: str) -> str:
    """The registry host of an image reference (Docker Hub's for a bare name)."""
    first = image.split("/", 1)[0]
    return first if "/" in image and ("." in first or ":" in first or first == "localhost") else "docker.io"


def registry_auth(username: str, password: str, server: str) -> str:
    """Docker's X-Registry-Auth header: the credentials as URL-safe base64 JSON."""
    document = json.dumps({"username": username, "password": password, "serveraddress": server})
    return base64.urlsafe_b64encode(document.encode()).decode()


def ecr_registry_auth(authorization: dict, registry: str) -> str:
    """X-Registry-Auth from ecr:GetAuthorizationToken's authorizationData: its token is
    base64 of "AWS:password"."""
    username, _, password = base64.b64decode(authorization["authorizationToken"]).decode().partition(":")
    return registry_auth(username, password, registry)


def secret_value(secret: dict, reference: SecretReference, where: str) -> str:
    """The value a Secrets Manager reply gives a reference: the string, or one key of it as JSON."""
    text = secret.get("SecretString")
    if text is None:
        raise ValueError(f"{where}: secret {reference.identifier} is binary; ECS injects only SecretString")
    if not reference.json_key:
        return text
    try:
        document = json.loads(text)
    except ValueError:
        raise ValueError(f"{where}: secret {reference.identifier} is not JSON, so it has no key "
                         f"{reference.json_key!r}") from None
    if not isinstance(document, dict) or reference.json_key not in document:
        raise ValueError(f"{where}: secret {reference.identifier} has no JSON key {reference.json_key!r}")
    value = document[reference.json_key]
    return value if isinstance(value, str) else json.dumps(value)


def complete_environment(body: dict, agent_region: bool, files: list[dict[str, str]], secrets: dict[str, str],
                         image_env: list[str]) -> dict:
    """A create body with what was fetched: secrets over every variable but the agent's endpoint
    URIs, environment files only where nothing else set a variable (the first file first), as the
    agent merges them (MergeEnvironmentVariables, MergeEnvironmentVariablesFromEnvfiles).

    agent_region: the plan added AWS_REGION and AWS_DEFAULT_REGION (the task definition sets
    neither); they are taken out again when a file, a secret or the image's ENV sets either, as
    the agent leaves those in place.  The one place that decides it after the plan."""
    env = dict(entry.split("=", 1) for entry in body["Env"])
    set_elsewhere = {name for variables in (*files, secrets) for name in variables}
    set_elsewhere.update(entry.split("=", 1)[0] for entry in image_env)
    if agent_region and REGION_VARIABLES & set_elsewhere:
        for name in REGION_VARIABLES:
            env.pop(name, None)
    agent = {name: env[name] for name in AGENT_URI_VARIABLES if name in env}
    env.update(secrets)
    for variables in files:
        for name, value in variables.items():
            env.setdefault(name, value)
    env.update(agent)
    return {**body, "Env": [f"{name}={value}" for name, value in env.items()]}


def masked_body(body: dict, secrets: dict[str, SecretReference]) -> dict:
    """A create body as --dry-run shows it: each secret as where it comes from, never a value."""
    if "Env" not in body:
        return body   # a namespace holder
    env = [e for e in body["Env"] if e.split("=", 1)[0] not in secrets]
    env += [f"{name}={SECRET_MASK.format(reference.value_from)}" for name, reference in secrets.items()
            if not name.startswith("log option ")]
    return {**body, "Env": env}


def planned_aws_calls(plan: TaskPlan, own_identity: bool) -> list[str]:
    """The AWS calls `run` makes for a task before its containers start, in order (--dry-run)."""
    calls = []
    if plan.definition.get("taskRoleArn"):
        calls.append(f"sts:AssumeRole {plan.definition['taskRoleArn']} (the task role)")
    execution_role = plan.definition.get("executionRoleArn")
    if execution_role and not own_identity:
        calls.append(f"sts:AssumeRole {execution_role} (the execution role: the calls below use it)")
    for planned in plan.containers:
        for source in planned.definition.get("environmentFiles") or []:
            kind, bucket, key = environment_file_source(source)
            if kind == "s3":
                calls.append(f"s3:GetObject {bucket}/{key} (container {planned.name})")
        for name, reference in container_secrets(planned.definition, plan.identity.region).items():
            calls.append(f"{reference.action} {reference.resource} in {reference.region} "
                         f"(container {planned.name}, {name})")
        credentials = (planned.definition.get("repositoryCredentials") or {}).get("credentialsParameter")
        if credentials:
            reference = secret_reference(credentials, plan.identity.region)
            calls.append(f"{reference.action} {reference.resource} (container {planned.name}, registry credentials)")
    for image in plan.images():
        ecr = ECR_REGISTRY.fullmatch(registry_of(image))
        if ecr:
            calls.append(f"ecr:GetAuthorizationToken in {ecr[1]} (image {image})")
    return calls


# ---------------------------------------------------------------------------
# Background services: stats, one streaming collector per container, as the ECS agent keeps
# ---------------------------------------------------------------------------

STATS_WAIT_SECONDS = 2.5


def network_rates(latest: dict, previous: dict | None) -> dict:
    """Bytes per second received and sent between two consecutive samples."""
    rates = {"rx_bytes_per_sec": 0.0, "tx_bytes_per_sec": 0.0}
    now, before = parse_docker_time(latest.get("read")), parse_docker_time((previous or {}).get("read"))
    if not previous or not now or not before or now <= before:
        return rates
    seconds = (now - before).total_seconds()
    for key, rate in (("rx_bytes", "rx_bytes_per_sec"), ("tx_bytes", "tx_bytes_per_sec")):
        delta = (sum(n.get(key, 0) for n in (latest.get("networks") or {}).values())
                 - sum(n.get(key, 0) for n in (previous.get("networks") or {}).values()))
        rates[rate] = max(delta, 0) / seconds
    return rates


def network_counters(sample: dict) -> dict:
    """What network_rates() needs of a sample: kept of the one before the latest, instead of
    all of it (about 10 KB as Python objects; 200 containers, 2 MB)."""
    return {"read": sample.get("read"), "networks": sample.get("networks")}


class StatsCollector:
    """Reads one container's streaming stats; keeps the latest sample, and the network counters
    of the one before."""

    def __init__(self, docker: DockerApi, container_id: str, on_end: Callable[[StatsCollector], None]):
        self.container_id = container_id
        self._docker = docker
        self._on_end = on_end
        self._samples: tuple[dict, ...] = ()
        self._done = False
        self._stopping = False
        self._changed = threading.Condition()
        threading.Thread(target=job("stats collector", "docker:stats").target(self._run),
                         name=f"stats-{container_id[:12]}", daemon=True).start()

    def _run(self) -> None:
        try:
            for frame in self._docker.stats(self.container_id):
                with self._changed:
                    self._samples = (*map(network_counters, self._samples[-1:]), frame)
                    self._changed.notify_all()
                if self._stopping or not parse_docker_time(frame.get("read")):
                    break   # Docker streams zero samples for a stopped container
        except (ApiError, LookupError) as exc:
            log.debug("stats stream of %s ended: %s", self.container_id[:12], exc)
        except Exception:
            log.exception("stats stream of %s failed", self.container_id[:12])
        finally:
            with self._changed:
                self._done = True
                self._changed.notify_all()
            self._on_end(self)

    def stop(self) -> None:
        """End the stream at its next frame (Docker sends one a second, and ends it itself
        when the container stops)."""
        self._stopping = True

    def sample(self, deadline: float) -> tuple[dict, dict | None] | None:
        """(latest, network counters of the one before) once the latest carries a real
        precpu_stats; None by the deadline."""
        with self._changed:
            while not self._done and not self.ready:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            if not self.ready:
                return None
            latest = self._samples[-1]
            return latest, (self._samples[-2] if len(self._samples) > 1 else None)

    @property
    def ready(self) -> bool:
        """The latest sample has a real precpu_stats (Docker's first streamed frame has not)."""
        return bool(self._samples) and bool(parse_docker_time(self._samples[-1].get("preread")))


class StatsHub:
    """The collectors of running containers, gone when they stop.

    Eager (the default, as the ECS agent does): a collector starts when the
    container view first sees a container running, at start-up or when Docker
    reports it started, so the first stats request finds two samples in memory.
    On demand: a collector starts with the first stats request for its container,
    which then waits for Docker's first complete sample (about a second).
    Either way a request for a container without a collector starts one.
    """

    def __init__(self, docker: DockerApi, eager: bool):
        self._docker = docker
        self.eager = eager
        self._collectors: dict[str, StatsCollector] = {}
        self._lock = threading.Lock()

    def follow(self, snapshot: Snapshot) -> None:
        """Eager mode: collectors for exactly the running containers of a new snapshot."""
        if not self.eager:
            return
        running = {c["Id"] for c in snapshot.running()}
        with self._lock:
            for container_id in running - self._collectors.keys():
                self._collectors[container_id] = StatsCollector(self._docker, container_id, self._forget)
            for container_id in self._collectors.keys() - running:
                self._collectors.pop(container_id).stop()

    def _collector(self, container_id: str) -> StatsCollector:
        with self._lock:
            collector = self._collectors.get(container_id)
            if collector is None:
                collector = self._collectors[container_id] = StatsCollector(
                    self._docker, container_id, self._forget)
            return collector

    def _forget(self, collector: StatsCollector) -> None:
        with self._lock:
            if self._collectors.get(collector.container_id) is collector:
                del self._collectors[collector.container_id]

    def active(self) -> int:
        return len(self._collectors)

    def ready(self) -> int:
        """Collectors holding two real samples: what a stats request would answer at once."""
        return sum(collector.ready for collector in list(self._collectors.values()))

    def samples(self, container_ids: list[str]) -> dict[str, tuple[dict, dict | None] | None]:
        """Latest samples of several containers, waiting for all of them together."""
        deadline = time.monotonic() + STATS_WAIT_SECONDS
        collectors = {cid: self._collector(cid) for cid in container_ids}
        return {cid: collector.sample(deadline) for cid, collector in collectors.items()}


def stats_document(sample: tuple[dict, dict | None], version: int) -> dict:
    latest, previous = sample
    doc = dict(latest)
    if version >= 4:
        doc["network_rate_stats"] = network_rates(latest, previous)
    return doc


# ---------------------------------------------------------------------------
# Background services: task scale-in protection, what ECS keeps for UpdateTaskProtection,
# kept here in memory
# ---------------------------------------------------------------------------

PROTECTION_DEFAULT_MINUTES = 120
PROTECTION_MAX_MINUTES = 2880
PROTECTION_FIELDS = ("ProtectionEnabled", "ExpiresInMinutes")
TASK_NOT_FOUND = "Failed to find a task for the request"


class TaskProtectionError(ApiError):
    """The agent's task-protection error: {"requestID"?, "error": {"Arn"?, "Code", "Message"}}.

    The agent adds Arn once it knows the task, and requestID when the error came from ECS.
    """

    def __init__(self, status: int, code: str, message: str, arn: str = "", request_id: str = ""):
        super().__init__(status, code, message)
        self.arn = arn
        self.request_id = request_id

    def body(self) -> dict:
        error = {"Arn": self.arn} if self.arn else {}
        error.update(Code=self.code, Message=self.message)
        return {"requestID": self.request_id, "error": error} if self.request_id else {"error": error}

    def response(self) -> Response:
        return Response(go_marshal(self.body()), self.status)


def go_marshal(document: Any) -> bytes:
    """JSON as Go's json.Marshal writes it: compact, UTF-8, with <, >, & and U+2028/9 escaped."""
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text.encode("utf-8", "replace")


def parse_protection_request(body: bytes) -> tuple[bool | None, int | None]:
    """(ProtectionEnabled, ExpiresInMinutes) from a PUT body, decoded as the agent's Go decoder does.

    Its first JSON value must be an object (or null) whose keys match the two fields
    case-insensitively; a bool and an integer, or null.  Anything else is the agent's 400.
    """
    def fail(*_: Any) -> Any:
        raise ValueError("not the agent's JSON")

    try:
        text = body.decode("utf-8").lstrip(" \t\r\n")
        decoded, _ = json.JSONDecoder(parse_float=fail, parse_constant=fail).raw_decode(text)
        if decoded is None:
            decoded = {}
        if not isinstance(decoded, dict):
            raise ValueError("not an object")
        values: dict[str, Any] = {}
        for key, value in decoded.items():
            [name] = [f for f in PROTECTION_FIELDS if f.lower() == key.lower()] or fail()
            values[name] = value
        enabled, minutes = values.get("ProtectionEnabled"), values.get("ExpiresInMinutes")
        if enabled is not None and not isinstance(enabled, bool):
            fail()
        if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, int)
                                    or not -2**63 <= minutes < 2**63):
            fail()
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise TaskProtectionError(400, "InvalidParameterException",
                                  "UpdateTaskProtection: failed to decode request") from None
    return enabled, minutes


def expiration_date(expires: float | None) -> str | None:
    """ECS's expirationDate (milliseconds) as the agent's Go encoder writes a time: RFC 3339 in
    UTC, trailing zeros of the fraction dropped."""
    if expires is None:
        return None
    milliseconds = round(expires * 1000)
    moment = datetime.fromtimestamp(milliseconds // 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{milliseconds % 1000:03d}".rstrip("0")
    return f"{moment}.{fraction}Z" if fraction else f"{moment}Z"


class TaskProtection:
    """Scale-in protection per task ARN, in memory: until when each protected task is protected.

    Protection ends by itself at its expiration date, and a task whose containers are all
    gone is forgotten.  Every answer looks at the clock first; while any task is protected a
    watcher thread does the same every CHECK_SECONDS, so the log says when protection ends
    even if nobody asks.  live_tasks gives the ARNs of the tasks that still have containers,
    or None while that is unknown (Docker unreachable): then nothing is forgotten.
    """

    CHECK_SECONDS = 5.0

    def __init__(self, live_tasks: Callable[[], set[str] | None], clock: Callable[[], float] = time.time):
        self._live_tasks = live_tasks
        self._clock = clock
        self._expires: dict[str, float] = {}
        self._lock = threading.Lock()
        self._watching = False

    def state(self, task_arn: str) -> dict:
        """The agent's GET answer for the task."""
        self.sweep()
        with self._lock:
            expires = self._expires.get(task_arn)
        return self._document(task_arn, expires)

    def update(self, task_arn: str, enabled: bool, minutes: int | None) -> dict:
        """Turn protection on (for minutes, default 120) or off; the agent's PUT answer."""
        self.sweep()
        if not enabled:
            with self._lock:
                ended = self._expires.pop(task_arn, None) is not None
            if ended:
                log.info("task protection of %s ended: turned off", task_arn)
            return self._document(task_arn, None)
        expires = self._clock() + (minutes or PROTECTION_DEFAULT_MINUTES) * 60
        with self._lock:
            extended = task_arn in self._expires
            self._expires[task_arn] = expires
            watch, self._watching = not self._watching, True
        log.info("task protection of %s %s until %s", task_arn, "extended" if extended else "started",
                 expiration_date(expires))
        if watch:
            threading.Thread(target=self._watch, name="task-protection", daemon=True).start()
        return self._document(task_arn, expires)

    def sweep(self) -> None:
        """End expired protection and forget tasks whose containers are all gone, logging each."""
        now, live = self._clock(), self._live_tasks()
        with self._lock:
            ended = [(arn, "expired") for arn, expires in self._expires.items() if expires <= now]
            if live is not None:
                ended += [(arn, "its containers are gone") for arn, expires in self._expires.items()
                          if expires > now and arn not in live]
            for arn, _ in ended:
                del self._expires[arn]
        for arn, reason in ended:
            log.info("task protection of %s ended: %s", arn, reason)

    def _watch(self) -> None:
        while True:
            time.sleep(self.CHECK_SECONDS)
            try:
                self.sweep()
            except Exception:   # never let the watcher die with protection left to end
                log.exception("task protection check failed")
            with self._lock:
                if not self._expires:
                    self._watching = False
                    return

    @staticmethod
    def _document(task_arn: str, expires: float | None) -> dict:
        return {"protection": {"ExpirationDate": expiration_date(expires), "ProtectionEnabled": expires is not None,
                               "TaskArn": task_arn}}


# ---------------------------------------------------------------------------
# Background services: fault injection, the agent's network faults at $ECS_AGENT_URI/fault/v1/,
# made with the agent's own iptables and tc command lines in the task's network namespace (nsenter)
# ---------------------------------------------------------------------------

FAULT_TYPES = ("network-blackhole-port", "network-latency", "network-packet-loss")
FAULT_LABEL = "com.amazonaws.ecs.local.enable-fault-injection"   # a compose container's opt-in: "true"
FAULT_SECONDS = 5                 # the agent's requestTimeoutSeconds: all the commands of one request
FAULT_RATE = 0.2                  # the agent's limiter: requests a second per caller and path, burst 1
FAULT_RATE_MESSAGE = "You have reached maximum request limit"
FAULT_OPERATIONS = {"start": "start", "stop": "stop", "status": "check status"}   # the agent's request types
FAULT_TOOLS = ("nsenter", "iptables", "ip6tables", "tc")
FAULT_PATH = re.compile(rf"/api(?:/[^/]+)?/fault/v1/(?:{'|'.join(FAULT_TYPES)})/(?:start|stop|status)")
FAULT_REQUESTS = {   # each fault's request as the agent's Go struct: its name, and each field's Go type
    "network-blackhole-port": ("NetworkBlackholePortRequest", {
        "Port": "uint16", "Protocol": "string", "TrafficType": "string", "SourcesToFilter": "[]*string"}),
    "network-latency": ("NetworkLatencyRequest", {
        "DelayMilliseconds": "uint64", "JitterMilliseconds": "uint64", "Sources": "[]*string",
        "SourcesToFilter": "[]*string", "FlowsPercent": "int"}),
    "network-packet-loss": ("NetworkPacketLossRequest", {
        "LossPercent": "uint64", "Sources": "[]*string", "SourcesToFilter": "[]*string", "FlowsPercent": "int"}),
}
GO_INTEGERS = {"uint16": (0, 2**16 - 1), "uint64": (0, 2**64 - 1), "int": (-2**63, 2**63 - 1)}
TC_PRIOMAP = " ".join("2" * 16)
TC_MODULES = {"prio": ("sch_prio", "NET_SCH_PRIO"), "netem": ("sch_netem", "NET_SCH_NETEM"),
              "u32": ("cls_u32", "NET_CLS_U32"), "flow": ("cls_flow", "NET_CLS_FLOW")}
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
FAULT_GRANT = ("root on Linux; in the image --cap-add SYS_ADMIN --cap-add NET_ADMIN --pid host "
               "(and --network host for host-mode tasks)")


class FaultError(ApiError):
    """The agent's fault answer other than 200: {"Error": message}; its limiter's 429 in text;
    its router's 405 with no body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, task: str = ""):
        super().__init__(status, "FaultInjection", message, headers)
        self.task = task   # the task's ARN once known: for the audit line

    def body(self) -> dict:
        return {"Error": self.message}

    def response(self) -> Response:
        if self.status == 405:
            return Response(b"", 405, "text/plain; charset=utf-8")
        if self.status == 429:
            return Response(self.message.encode(), 429, "text/plain; charset=utf-8", self.headers)
        return Response(go_marshal(self.body()), self.status, headers=self.headers)


# The request body, decoded as the agent's json.Decoder decodes it into the fault's struct.

class GoNumber(str):
    """A JSON number as written: Go takes only an integer literal in the field's range."""


class GoObject(list):
    """A JSON object as its (key, value) pairs, in order, duplicates kept."""


class GoTypeError(Exception):
    def __init__(self, value: str, go_type: str):
        super().__init__(value)
        self.value, self.go_type = value, go_type


def go_kind(value: Any) -> str:
    """The word Go's decoder uses for a JSON value in its type errors."""
    if isinstance(value, GoObject):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, GoNumber):
        return "number"
    if isinstance(value, bool):
        return "bool"
    return "string" if isinstance(value, str) else "null"


def go_quote_char(char: str) -> str:
    """A character as Go's JSON syntax errors quote it ('x', '\\n', '\\x00', '\\'')."""
    if char == "'":
        return "'\\''"
    if char == '"':
        return "'\"'"
    escapes = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v",
               "\\": "\\\\"}
    if char in escapes:
        return f"'{escapes[char]}'"
    if char.isprintable():
        return f"'{char}'"
    code = ord(char)
    return f"'\\x{code:02x}'" if code < 0x80 else f"'\\u{code:04x}'" if code < 0x10000 else f"'\\U{code:08x}'"


def go_syntax_error(text: str, exc: json.JSONDecodeError) -> str:
    """Go's scanner error for the first syntax error Python's decoder found."""
    if exc.pos >= len(text) or exc.msg.startswith("Unterminated string"):
        return "unexpected EOF"
    if exc.msg.startswith("Expecting property name"):
        context = "looking for beginning of object key string"
    elif exc.msg.startswith("Expecting ':'"):
        context = "after object key"
    elif exc.msg.startswith("Expecting ','"):
        context = "after object key:value pair" if innermost_container(text[:exc.pos]) == "{" else \
            "after array element"
    elif exc.msg.startswith("Invalid control character"):
        context = "in string literal"
    elif exc.msg.startswith("Invalid \\u"):
        context = "in \\u hexadecimal character escape"
    elif exc.msg.startswith("Invalid \\escape"):
        return f"invalid character {go_quote_char(text[exc.pos + 1:exc.pos + 2] or ' ')} in string escape code"
    else:
        context = "looking for beginning of value"
    return f"invalid character {go_quote_char(text[exc.pos])} {context}"


def innermost_container(prefix: str) -> str:
    """'{' or '[': the container open at the end of a JSON text's prefix."""
    stack, in_string, escaped = [], False, False
    for char in prefix:
        if in_string:
            in_string, escaped = (not (char == '"' and not escaped)), (char == "\\" and not escaped)
        elif char == '"':
            in_string = True
        elif char in "{[":
            stack.append(char)
        elif char in "}]" and stack:
            stack.pop()
    return stack[-1] if stack else ""


def go_field(value: Any, go_type: str) -> Any:
    """A JSON value as Go stores it in a field of go_type (None for null), else GoTypeError."""
    if value is None:
        return None
    if go_type == "[]*string":
        if type(value) is not list:
            raise GoTypeError(go_kind(value), go_type)
        return [go_field(item, "string") for item in value]
    if go_type == "string":
        if go_kind(value) != "string":
            raise GoTypeError(go_kind(value), "string")
        return str(value)
    if not isinstance(value, GoNumber):
        raise GoTypeError(go_kind(value), go_type)
    low, high = GO_INTEGERS[go_type]
    if not re.fullmatch(r"-?[0-9]+" if low else r"[0-9]+", value) or not low <= int(value) <= high:
        raise GoTypeError(f"number {value}", go_type)
    return int(value)


def decode_fault_request(fault: str, body: bytes) -> dict[str, Any]:
    """The fields of the fault's request, read from the body as Go's json.Decoder reads it into
    the agent's struct: the first JSON value only, keys matched case-insensitively, unknown keys
    ignored, the last of duplicate keys winning; else the agent's 400 with Go's error text."""
    struct, fields = FAULT_REQUESTS[fault]
    text = body.decode("utf-8", "replace").lstrip(" \t\r\n")
    if not text:
        raise FaultError(400, "required request body is missing")

    def constant(name: str) -> Any:
        raise FaultError(400, "invalid character 'I' in numeric literal" if name.startswith("-") else
                         f"invalid character '{name[0]}' looking for beginning of value")
    decoder = json.JSONDecoder(object_pairs_hook=GoObject, parse_int=GoNumber, parse_float=GoNumber,
                               parse_constant=constant)
    try:
        value, _ = decoder.raw_decode(text)
    except json.JSONDecodeError as exc:
        raise FaultError(400, go_syntax_error(text, exc)) from None
    except RecursionError:
        raise FaultError(400, "exceeded max depth") from None
    if value is None:
        return {}
    if not isinstance(value, GoObject):
        raise FaultError(400, f"json: cannot unmarshal {go_kind(value)} into Go value of type types.{struct}")
    decoded: dict[str, Any] = {}
    error = None
    for key, item in value:
        name = key if key in fields else next((f for f in fields if f.lower() == key.lower()), None)
        if name is None:
            continue
        try:
            decoded[name] = go_field(item, fields[name])
        except GoTypeError as exc:   # Go goes on decoding, and answers the first one
            error = error or f"json: cannot unmarshal {exc.value} into Go struct field {struct}.{name} of type " \
                             f"{exc.go_type}"
    if error:
        raise FaultError(400, error)
    return {name: value for name, value in decoded.items() if value is not None}


def ip_family(source: str) -> int | None:
    """4 or 6 for an address or CIDR block as Go's net.ParseIP/ParseCIDR read it (an IPv4-mapped
    IPv6 address counts as IPv4, as To4() does); None for anything else."""
    if "%" in source or not re.fullmatch(r"[^/]+(/[0-9]+)?", source):   # no zone, no netmask form
        return None
    try:
        address = ipaddress.ip_interface(source).ip if "/" in source else ipaddress.ip_address(source)
    except ValueError:
        return None
    return 4 if address.version == 4 or address.ipv4_mapped else 6


def validate_fault_request(fault: str, fields: dict[str, Any]) -> None:
    """The agent's ValidateRequest, check by check in its order: the 400 of the first that fails."""
    def missing(name: str) -> FaultError:
        return FaultError(400, f"required parameter {name} is missing")

    def invalid(value: Any, name: str) -> FaultError:
        return FaultError(400, f"invalid value {value} for parameter {name}")

    def sources(name: str) -> None:
        for source in fields.get(name) or []:
            if ip_family(source or "") is None:
                raise invalid(source or "", name)

    if fault == "network-blackhole-port":
        for name in ("Port", "Protocol", "TrafficType"):
            if fields.get(name) in (None, ""):
                raise missing(name)
        if fields["Protocol"] not in ("tcp", "udp"):
            raise invalid(fields["Protocol"], "Protocol")
        if fields["TrafficType"] not in ("ingress", "egress"):
            raise invalid(fields["TrafficType"], "TrafficType")
        sources("SourcesToFilter")
        return
    if fault == "network-latency":
        for name in ("DelayMilliseconds", "JitterMilliseconds"):
            if name not in fields:
                raise missing(name)
        if fields["DelayMilliseconds"] == 0 and fields["JitterMilliseconds"] == 0:
            raise FaultError(400, "required either DelayMilliseconds or JitterMilliseconds to be non-zero")
    else:
        if "LossPercent" not in fields:
            raise missing("LossPercent")
        loss = fields["LossPercent"]
        if not 1 <= loss <= 100:
            raise invalid(loss if loss < 2**63 else loss - 2**64, "LossPercent")   # Go's int(uint64)
    if not fields.get("Sources"):
        raise missing("Sources")
    sources("Sources")
    sources("SourcesToFilter")
    if "FlowsPercent" in fields and not 0 < fields["FlowsPercent"] <= 100:
        raise invalid(fields["FlowsPercent"], "flowsPercent")


# The agent's command lines (pure: each is split at spaces and run as it is).

def nsenter_prefix(netns: str | None) -> str:
    """The agent's prefix for a command in an awsvpc task's namespace; none in host mode."""
    return f"nsenter --net={netns} " if netns else ""


def blackhole_chain(fields: dict[str, Any]) -> tuple[str, str]:
    """The chain (<TrafficType>-<Protocol>-<Port>) and the built-in chain it hooks into."""
    chain = f"{fields['TrafficType']}-{fields['Protocol']}-{fields['Port']}"
    return chain, "OUTPUT" if fields["TrafficType"] == "egress" else "INPUT"


def blackhole_check_command(netns: str | None, protocol: str, port: int, chain: str) -> str:
    return nsenter_prefix(netns) + f"iptables -w {FAULT_SECONDS} -C {chain} -p {protocol} --dport {port} -j DROP"


def blackhole_start_commands(netns: str | None, protocol: str, port: int, sources: list[str], chain: str,
                             table: str) -> list[tuple[str, bool]]:
    """(command, is it ip6tables') in the agent's order: for IPv4 then IPv6, a new chain, an ACCEPT
    per source of that family (-d, whatever the direction), DROP for everything else, the chain
    inserted into INPUT or OUTPUT."""
    commands = []
    for tool, everything, family in (("iptables", "0.0.0.0/0", 4), ("ip6tables", "::/0", 6)):
        lines = [f"{tool} -w {FAULT_SECONDS} -N {chain}"]
        lines += [f"{tool} -w {FAULT_SECONDS} -A {chain} -p {protocol} -d {source} --dport {port} -j ACCEPT"
                  for source in sources if ip_family(source) == family]
        lines += [f"{tool} -w {FAULT_SECONDS} -A {chain} -p {protocol} -d {everything} --dport {port} -j DROP",
                  f"{tool} -w {FAULT_SECONDS} -I {table} -j {chain}"]
        commands += [(nsenter_prefix(netns) + line, family == 6) for line in lines]
    return commands


def blackhole_stop_commands(netns: str | None, chain: str, table: str) -> list[tuple[str, bool]]:
    return [(nsenter_prefix(netns) + f"{tool} -w {FAULT_SECONDS} {line}", tool == "ip6tables")
            for tool in ("iptables", "ip6tables")
            for line in (f"-F {chain}", f"-D {table} -j {chain}", f"-X {chain}")]


def netem_arguments(fault: str, fields: dict[str, Any]) -> str:
    if fault == "network-latency":
        return f"delay {fields['DelayMilliseconds']}ms {fields['JitterMilliseconds']}ms"
    return f"loss {fields['LossPercent']}%"


def tc_start_commands(netns: str | None, device: str, netem: str, flows: int, sources: list[str],
                      sources_to_filter: list[str]) -> list[str]:
    """The agent's tc tree on one device: a prio root whose band 1:1 holds 10 x 10 prio bands,
    netem on the first `flows` of them, SourcesToFilter to the untouched band 1:3, Sources to 1:1,
    and flow-hash filters spreading the flows over the 100 bands."""
    lines = [f"tc qdisc add dev {device} root handle 1: prio priomap {TC_PRIOMAP}",
             f"tc qdisc add dev {device} parent 1:1 handle 10: prio bands 10 priomap {TC_PRIOMAP}"]
    lines += [f"tc qdisc add dev {device} parent 10:{i + 1:x} handle {100 + i}: prio bands 10 priomap {TC_PRIOMAP}"
              for i in range(10)]
    lines += [f"tc qdisc add dev {device} parent {100 + i // 10}:{i % 10 + 1:x} handle {200 + i}: netem {netem}"
              for i in range(flows)]
    for prio, flowid, addresses in ((1, "1:3", sources_to_filter), (2, "1:1", sources)):
        lines += [f"tc filter add dev {device} protocol all parent 1:0 prio {prio} u32 match "
                  f"{'ip6' if ip_family(address) == 6 else 'ip'} dst {address} flowid {flowid}"
                  for address in addresses]
    lines.append(f"tc filter add dev {device} protocol all parent 10: handle 1 prio 2 flow hash keys "
                 "src,dst,proto,proto-src,proto-dst divisor 10 baseclass 10:1")
    lines += [f"tc filter add dev {device} protocol all parent {100 + i}: handle {i + 1} prio 2 flow hash keys "
              f"src,dst,proto,proto-src,proto-dst divisor 10 baseclass {100 + i}:1" for i in range(10)]
    return [nsenter_prefix(netns) + line for line in lines]


def tc_check_command(netns: str | None, device: str) -> str:
    return nsenter_prefix(netns) + f"tc -j q show dev {device} parent 100:1"


def tc_stop_commands(netns: str | None, device: str) -> list[str]:
    return [nsenter_prefix(netns) + f"tc qdisc del dev {device} parent 1:1 handle 10:",
            nsenter_prefix(netns) + f"tc qdisc del dev {device} root handle 1: prio"]


def tc_faults(output: str) -> tuple[bool, bool]:
    """(latency, packet loss) from `tc -j q show`'s JSON, as the agent reads it: loss is a netem
    qdisc with loss-random; latency one with options, when there is no loss."""
    qdiscs = json.loads(output)
    netem = [q.get("options") for q in qdiscs if isinstance(q, dict) and q.get("kind") == "netem"]
    loss = any(isinstance(options, dict) and options.get("loss-random") is not None for options in netem)
    return (not loss and any(options is not None for options in netem)), loss


def default_route_devices(route: str, ipv6_route: str) -> tuple[str, ...]:
    """The devices of a namespace's default routes, from /proc/PID/net/route and ipv6_route:
    the task's interfaces, as the agent takes the host's for host mode."""
    devices = [f[0] for f in (line.split() for line in route.splitlines()[1:])
               if len(f) >= 8 and f[1] == "00000000" and f[7] == "00000000" and f[0] != "lo"]
    devices += [f[9] for f in (line.split() for line in ipv6_route.splitlines())
                if len(f) >= 10 and f[0] == "0" * 32 and f[1] == "00" and f[9] != "lo"]
    return tuple(dict.fromkeys(devices))


def kernel_lacks(config_text: str | None, kinds: tuple[str, ...] = tuple(TC_MODULES)) -> list[str]:
    """The modules of TC_MODULES a kernel configuration (/proc/config.gz) has neither built in
    nor as a module; none when the configuration cannot be read."""
    if not config_text:
        return []
    return [TC_MODULES[kind][0] for kind in kinds
            if not re.search(rf"^CONFIG_{TC_MODULES[kind][1]}=[ym]$", config_text, re.M)]


def read_kernel_config() -> str | None:
    try:
        with gzip.open("/proc/config.gz", "rt") as config:
            return config.read()
    except OSError:
        return None


def effective_capabilities() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return int(next(line for line in status if line.startswith("CapEff:")).split()[1], 16)
    except (OSError, StopIteration, ValueError):
        return 0


def fault_means(which: Callable[[str], str | None], capabilities: int) -> str | None:
    """What this process lacks to inject faults (None: nothing): the tools, and the capabilities
    to enter a namespace (SYS_ADMIN) and change its firewall and queues (NET_ADMIN)."""
    tools = [tool for tool in FAULT_TOOLS if not which(tool)]
    capabilities_missing = [name for name, bit in (("SYS_ADMIN", CAP_SYS_ADMIN), ("NET_ADMIN", CAP_NET_ADMIN))
                            if not capabilities >> bit & 1]
    if not tools and not capabilities_missing:
        return None
    lacks = []
    if tools:
        lacks.append(f"{', '.join(tools)} not on PATH (Debian: apt-get install util-linux iptables iproute2; the "
                     "image has them)")
    if capabilities_missing:
        lacks.append(f"no {' or '.join('CAP_' + c for c in capabilities_missing)}")
    return f"this server cannot inject faults: {'; '.join(lacks)}: it needs {FAULT_GRANT}"


class RateLimiter:
    """A token bucket per key (the agent's tollbooth limiter: per caller address and path)."""

    MAX_KEYS = 4096

    def __init__(self, rate: float, burst: int = 1, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[Any, tuple[float, float]] = {}   # key -> (tokens, when)
        self._lock = threading.Lock()

    def allow(self, key: Any) -> bool:
        now = self.clock()
        with self._lock:
            if len(self._buckets) >= self.MAX_KEYS:   # forget the buckets that have filled up again
                full = self.burst / self.rate
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full}
            tokens, when = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - when) * self.rate)
            allowed = tokens >= 1
            self._buckets[key] = (tokens - 1 if allowed else tokens, now)
        return allowed


@dataclass(frozen=True)
class FaultTarget:
    """Where a request's fault goes, as the agent's TaskNetworkConfig gives it."""
    arn: str
    mode: str                       # the task's network mode
    netns: str | None               # /proc/PID/ns/net (awsvpc); None: this process's namespace (host)
    devices: tuple[str, ...]
    inode: tuple[int, int]          # the namespace's (st_dev, st_ino): the same namespace at cleanup


class FaultTimedOut(Exception):
    pass


class FaultCommandFailed(Exception):
    def __init__(self, command: str, output: str):
        super().__init__(f"{command}: {output.strip()}")
        self.command, self.output = command, output


def run_fault_command(argv: list[str], timeout: float) -> tuple[int, str]:
    """One command line, its exit status and its output (stdout and stderr together)."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FaultTimedOut() from None
    return done.returncode, done.stdout.decode(errors="replace")


class FaultCommands:
    """The commands of one request, sharing the agent's 5-second deadline."""

    def __init__(self, execute: Callable[[list[str], float], tuple[int, str]]):
        self.execute = execute
        self.deadline = time.monotonic() + FAULT_SECONDS

    def run(self, command: str) -> tuple[int, str]:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise FaultTimedOut()
        try:
            return self.execute(command.split(" "), remaining)
        except OSError as exc:   # the tool could not be run at all
            raise FaultCommandFailed(command, str(exc)) from None

    def must(self, command: str) -> str:
        code, output = self.run(command)
        if code != 0:
            raise FaultCommandFailed(command, output)
        return output


class FaultInjector:
    """The nine fault routes: the agent's checks in its order, then its commands in the task's
    namespace, one request per namespace at a time.  What a namespace has is read from it (iptables
    -C, tc -j q show), never remembered; what this server started is remembered only so that a
    stopping task or server takes it away again (remove_all)."""

    def __init__(self, execute: Callable[[list[str], float], tuple[int, str]] = run_fault_command,
                 clock: Callable[[], float] = time.monotonic, means: str | None | bool = False,
                 kernel_config: str | None | bool = False):
        self.execute = execute
        self.limiter = RateLimiter(FAULT_RATE, 1, clock)
        self.lacking = fault_means(shutil.which, effective_capabilities()) if means is False else means
        self.kernel_config = read_kernel_config() if kernel_config is False else kernel_config
        self._locks = KeyedLocks()   # one request per namespace at a time
        self._applied: dict[tuple, tuple[FaultTarget, str, dict]] = {}   # (netns, fault, chain) -> what to stop

    def means_status(self) -> str:
        """The start-up log's line."""
        if self.lacking:
            return f"fault injection off: {self.lacking}"
        lacks = kernel_lacks(self.kernel_config)
        tc = f"network-latency and network-packet-loss need kernel modules it lacks ({', '.join(lacks)})" \
            if lacks else "all three faults"
        return f"fault injection ready (for tasks that enable it): {tc}"

    # -- the routes ------------------------------------------------------------

    def answer(self, metadata: MetadataRoutes, request: Request, operation: str) -> bytes:
        fault, ident = request.params["fault"], request.params.get("ident", "")
        request_type = f"{FAULT_OPERATIONS[operation]} {fault}"
        path = f"/api{'/' + ident if ident else ''}/fault/v1/{fault}/{operation}"
        target = fields = None
        try:
            if not self.limiter.allow((request.caller, path)):
                raise FaultError(429, FAULT_RATE_MESSAGE, {"X-Rate-Limit-Limit": f"{FAULT_RATE:.2f}",
                                                           "X-Rate-Limit-Duration": "1"})
            fields = {}
            if fault == "network-blackhole-port" or operation == "start":
                fields = decode_fault_request(fault, request.body)
                validate_fault_request(fault, fields)
            if fault == "network-blackhole-port" and operation == "start" and fields["TrafficType"] == "egress" \
                    and fields["Port"] == 80:
                fields["SourcesToFilter"] = list(dict.fromkeys([*fields.get("SourcesToFilter", []),
                                                                ENDPOINTS_ADDRESS]))   # the task keeps its endpoints
            target = self.target(metadata, request, ident)
            status = self._apply(fault, operation, fields, target, request_type)
        except FaultError as exc:
            if operation != "status":
                self._audit(request, fault, operation, target.arn if target else exc.task, fields,
                            f"{exc.status} {exc.message}")
            raise
        if operation != "status":
            self._audit(request, fault, operation, target.arn, fields, status)
        return go_marshal({"Status": status})

    def target(self, metadata: MetadataRoutes, request: Request, ident: str) -> FaultTarget:
        """The task the request names (or comes from), checked as the agent checks it: known (404),
        fault injection enabled (400), a network namespace with devices (500), awsvpc or host (400)."""
        try:
            _, caller, _ = metadata.locate(request)
        except ApiError as exc:
            if exc.status == 404:
                raise FaultError(404, "unable to get task arn from request: unable to get task Arn from v3 "
                                      f"endpoint ID: {ident}") from None
            raise FaultError(500, f"failed to get task metadata due to internal server error for container: "
                                  f"{ident}") from None
        arn = metadata.identity_of(caller).arn
        run = metadata.task_run
        if run is not None:
            enabled, mode = bool(run.plan.definition.get("enableFaultInjection")), run.plan.network_mode
            if mode == "awsvpc":   # the pause container holds the task's namespace
                members = [c for c in run.containers.values() if c.planned.name == PAUSE_NAME]
            elif mode == "host":
                members = list(run.containers.values())
            else:                  # bridge and none: the agent has no task namespace for them either
                members = []
            pids = [((c.inspect or {}).get("State") or {}).get("Pid") for c in members if c.known == "RUNNING"]
            pid = next((p for p in pids if p), None)
        else:
            enabled = labels_of(caller).get(FAULT_LABEL, "").lower() == "true"
            docker_mode = (caller.get("HostConfig") or {}).get("NetworkMode") or ""
            mode = docker_mode if docker_mode in ("host", "none") else "awsvpc"
            pid = (caller.get("State") or {}).get("Pid") if (caller.get("State") or {}).get("Running") else None
        if not enabled:
            raise FaultError(400, f"enableFaultInjection is not enabled for task: {arn}", task=arn)
        no_namespace = FaultError(500, f"failed to get task metadata due to internal server error for container: "
                                       f"{ident}")
        if not pid:
            raise no_namespace
        namespace = f"/proc/{pid}/ns/net"
        try:
            with open(f"/proc/{pid}/net/route", encoding="ascii") as route:
                routes = route.read()
            try:
                with open(f"/proc/{pid}/net/ipv6_route", encoding="ascii") as route:
                    ipv6_routes = route.read()
            except OSError:
                ipv6_routes = ""
            stat = os.stat(namespace)
        except OSError as exc:
            if exc.errno == errno.ENOENT:   # in a container without --pid host, say
                raise FaultError(500, "internal error: " + (self.lacking or f"this server does not see the task's "
                                                            f"processes (pid {pid}): it needs {FAULT_GRANT}")) from None
            raise no_namespace from None
        devices = default_route_devices(routes, ipv6_routes)
        if not devices:
            raise no_namespace
        if mode not in ("awsvpc", "host"):
            raise FaultError(400, f"{mode} mode is not supported. Please use either host or awsvpc mode.")
        inode = (stat.st_dev, stat.st_ino)
        if mode == "host":   # the agent's host mode: commands in its own namespace, which must be the task's
            own = os.stat("/proc/self/ns/net")
            if (own.st_dev, own.st_ino) != inode:
                raise FaultError(500, "internal error: this server is not in the host's network namespace, where "
                                      f"the task runs: it needs {FAULT_GRANT}")
        return FaultTarget(arn, mode, namespace if mode == "awsvpc" else None, devices, inode)

    # -- applying, stopping, reading -------------------------------------------

    def _apply(self, fault: str, operation: str, fields: dict, target: FaultTarget, request_type: str) -> str:
        if self.lacking:
            raise FaultError(500, f"internal error: {self.lacking}")
        with self._locks(target.netns or "host"):
            commands = FaultCommands(self.execute)
            try:
                if fault == "network-blackhole-port":
                    return self._blackhole(operation, fields, target, commands)
                return self._tc(fault, operation, fields, target, commands)
            except FaultTimedOut:
                raise FaultError(500, f"{request_type}: request timed out") from None
            except FaultCommandFailed as exc:
                log.error("fault injection: %s failed: %s", request_type, exc)
                raise FaultError(500, tc_failure(exc) or "internal error") from None

    def _blackhole_running(self, fields: dict, target: FaultTarget, commands: FaultCommands) -> bool:
        chain, _ = blackhole_chain(fields)
        code, _ = commands.run(blackhole_check_command(target.netns, fields["Protocol"], fields["Port"], chain))
        return code == 0

    def _blackhole(self, operation: str, fields: dict, target: FaultTarget, commands: FaultCommands) -> str:
        running = self._blackhole_running(fields, target, commands)
        chain, table = blackhole_chain(fields)
        key = (target.netns or "host", "network-blackhole-port", chain)
        if operation == "status":
            return "running" if running else "not-running"
        if operation == "start":
            if not running:
                self._applied[key] = (target, "network-blackhole-port", dict(fields))
                for command, ipv6 in blackhole_start_commands(target.netns, fields["Protocol"], fields["Port"],
                                                              fields.get("SourcesToFilter", []), chain, table):
                    code, output = commands.run(command)
                    if code != 0 and not ipv6:   # the agent ignores ip6tables' failures (but in IPv6-only tasks)
                        raise FaultCommandFailed(command, output)
            return "running"
        if running:
            for command, ipv6 in blackhole_stop_commands(target.netns, chain, table):
                code, output = commands.run(command)
                if code != 0 and not ipv6:
                    raise FaultCommandFailed(command, output)
        self._applied.pop(key, None)
        return "stopped"

    def _tc_running(self, target: FaultTarget, commands: FaultCommands) -> tuple[bool, bool]:
        latency = loss = False
        for device in target.devices:
            try:
                found = tc_faults(commands.must(tc_check_command(target.netns, device)))
            except ValueError as exc:
                raise FaultCommandFailed(tc_check_command(target.netns, device), f"not tc's JSON: {exc}") from None
            latency, loss = latency or found[0], loss or found[1]
        return latency, loss

    def _tc(self, fault: str, operation: str, fields: dict, target: FaultTarget, commands: FaultCommands) -> str:
        latency, loss = self._tc_running(target, commands)
        running = latency if fault == "network-latency" else loss
        key = (target.netns or "host", "tc", "")
        if operation == "status":
            return "running" if running else "not-running"
        if operation == "stop":
            if running:
                for device in target.devices:
                    for command in tc_stop_commands(target.netns, device):
                        commands.must(command)
            self._applied.pop(key, None)
            return "stopped"
        if latency:
            raise FaultError(409, "There is already one network latency fault running")
        if loss:
            raise FaultError(409, "There is already one network packet loss fault running")
        lacks = kernel_lacks(self.kernel_config)
        if lacks:
            raise FaultError(500, tc_modules_message(lacks))
        self._applied[key] = (target, fault, dict(fields))
        try:
            for device in target.devices:
                for command in tc_start_commands(target.netns, device, netem_arguments(fault, fields),
                                                 fields.get("FlowsPercent", 100), fields["Sources"],
                                                 fields.get("SourcesToFilter", [])):
                    commands.must(command)
        except (FaultCommandFailed, FaultTimedOut):
            for device in target.devices:   # nothing half made is left: the whole tree hangs from the root
                with contextlib.suppress(FaultCommandFailed, FaultTimedOut, OSError):
                    self.execute(tc_stop_commands(target.netns, device)[1].split(" "), FAULT_SECONDS)
            self._applied.pop(key, None)
            raise
        return "running"

    def remove_all(self, why: str) -> None:
        """Every fault this server started that is still in a namespace that still exists, removed
        (a task or the server stopping)."""
        for key, (target, fault, fields) in list(self._applied.items()):
            try:
                stat = os.stat(target.netns or "/proc/self/ns/net")
                if (stat.st_dev, stat.st_ino) != target.inode:
                    continue   # the namespace is gone, and its faults with it
                status = self._apply(fault, "stop", fields, target, f"stop {fault}")
            except (OSError, FaultError) as exc:
                log.warning("fault injection: could not remove %s from %s: %s", fault, target.arn, exc)
                continue
            finally:
                self._applied.pop(key, None)
            audit_log.info("fault stop %s task=%s parameters=%s outcome=%s (%s)", fault, target.arn,
                           go_marshal(fields).decode(), status, why)

    def _audit(self, request: Request, fault: str, operation: str, task: str, fields: dict | None,
               outcome: str) -> None:
        task = task or "-"
        parameters = go_marshal(fields).decode() if fields else "{}"
        audit_log.info("fault %s %s task=%s caller=%s parameters=%s outcome=%s", operation, fault, task,
                       request.caller, safe(parameters[:AUDIT_TEXT_LIMIT]), safe(outcome[:AUDIT_TEXT_LIMIT]))


def tc_modules_message(lacks: list[str]) -> str:
    return (f"internal error: this kernel lacks {', '.join(lacks)}: network-latency and network-packet-loss "
            "need the kernel modules sch_prio, sch_netem, cls_u32 and cls_flow; load them on the Docker host "
            "(modprobe), or use a kernel built with them")


def tc_failure(failure: FaultCommandFailed) -> str | None:
    """A clear message for a tc command that failed for want of a kernel module; else None."""
    words = failure.command.split(" ")
    if "tc" not in words or not re.search(r"kind is unknown|Unknown filter|Unknown qdisc", failure.output):
        return None
    kind = next((w for w in ("netem", "u32", "flow", "prio") if w in words), None)
    return tc_modules_message([TC_MODULES[kind][0]]) if kind else None


# ---------------------------------------------------------------------------
# run: one task's containers, started, watched and stopped as the ECS agent does
# ---------------------------------------------------------------------------

STATUS_ORDER = ("NONE", "PULLED", "CREATED", "RUNNING", "STOPPED")
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFADDR, SIOCSIFNETMASK = 0x8913, 0x8914, 0x8916, 0x891C
ENDPOINTS_ALIAS = b"lo:ecs"              # the loopback alias that carries the endpoints' address
DEPENDENCY_EXIT_CODE = 143               # the agent's exit code for a container whose dependency failed
LOG_DRAIN_SECONDS = 30                   # how long a stopped container's last output may take to arrive


def interface_request(name: bytes, address: str | None = None, flags: int = 0) -> bytes:
    """struct ifreq: the interface's name, then an IPv4 sockaddr or the flags (40 bytes on Linux)."""
    if address is not None:
        return struct.pack("16sHH4s16x", name, socket.AF_INET, 0, socket.inet_aton(address))
    return struct.pack("16sH22x", name, flags)


def add_endpoints_address() -> bool:
    """169.254.170.2/32 on this thread's network namespace's loopback, as an alias (what
    `ip address add 169.254.170.2/32 dev lo label lo:ecs` does); False when it was there."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((ENDPOINTS_ADDRESS, 0))
            return False
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
        fcntl.ioctl(probe, SIOCSIFADDR, interface_request(ENDPOINTS_ALIAS, ENDPOINTS_ADDRESS))
        fcntl.ioctl(probe, SIOCSIFNETMASK, interface_request(ENDPOINTS_ALIAS, "255.255.255.255"))
        return True


def remove_endpoints_address() -> None:
    """Take the alias down, which removes its address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        fcntl.ioctl(probe, SIOCSIFFLAGS, interface_request(ENDPOINTS_ALIAS, flags=0))


def in_network_namespace(pid: int | None, work: Callable[[], Any]) -> Any:
    """work() run in the network namespace of process pid (None: this process's), on a thread
    of its own: setns(2) moves only the calling thread, and that thread then ends."""
    outcome: dict[str, Any] = {}

    def enter() -> None:
        try:
            if pid is not None:
                with open(f"/proc/{pid}/ns/net", "rb") as namespace:
                    if ctypes.CDLL(None, use_errno=True).setns(namespace.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into the network namespace of pid {pid}: "
                                                          f"{os.strerror(ctypes.get_errno())}")
            outcome["value"] = work()
        except OSError as exc:
            outcome["error"] = exc
    thread = threading.Thread(target=enter, name="netns")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def endpoints_socket(port: int) -> tuple[socket.socket, bool]:
    """A listening socket at 169.254.170.2:port in this thread's namespace, and whether the
    address was added for it."""
    added = add_endpoints_address()
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((ENDPOINTS_ADDRESS, port))
        listening.listen(128)
    except OSError:
        listening.close()
        if added:
            remove_endpoints_address()
        raise
    return listening, added


class TaskStopping(Exception):
    """The task is to stop: reason is ECS's stopped reason, exit_code what `run` exits with."""

    def __init__(self, reason: str, exit_code: int):
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code


@dataclass
class ContainerRun:
    """One container of the task as it goes: the plan, its Docker ID and latest inspect."""
    planned: PlannedContainer
    docker_id: str | None = None
    inspect: dict | None = None
    known: str = "NONE"
    reason: str = ""          # why it stopped without running (a dependency), as the agent says

    @property
    def exit_code(self) -> int | None:
        if self.known != "STOPPED":
            return None
        return (self.inspect or {}).get("State", {}).get("ExitCode", DEPENDENCY_EXIT_CODE)

    def health(self) -> str:
        return (((self.inspect or {}).get("State") or {}).get("Health") or {}).get("Status", "")


class TaskRun:
    """The runner's state, in one place: what the runner changes and the endpoints read.

    Every change makes a new Snapshot of the task's containers as they see themselves (a
    container in a holder's namespace with the holder's addresses and ports), so responses
    built from one are memoized as for the server's own view.
    """

    def __init__(self, plan: TaskPlan):
        self.plan = plan
        self.containers = {c.docker_name: ContainerRun(c) for c in (*plan.holders, *plan.containers)}
        self.by_endpoint = {c.endpoint_id: c.docker_name for c in plan.containers}
        self.desired = "RUNNING"
        self.stopped_reason = ""
        self.pull_started: str | None = None
        self.pull_stopped: str | None = None
        self.changed = threading.Condition()
        self.snapshot = Snapshot({}, {})

    def by_name(self, name: str) -> ContainerRun:
        return next(c for c in self.containers.values() if c.planned.name == name)

    def update(self, docker_name: str, inspect: dict | None = None, known: str | None = None,
               reason: str = "") -> None:
        with self.changed:
            run = self.containers[docker_name]
            if inspect is not None:
                run.inspect, run.docker_id = inspect, inspect["Id"]
                run.known = known_status(inspect.get("State") or {})
            if known is not None:
                run.known = known
            run.reason = reason or run.reason
            self._snapshot()
            self.changed.notify_all()

    def stop(self, reason: str) -> None:
        with self.changed:
            if self.desired != "STOPPED":
                self.desired, self.stopped_reason = "STOPPED", reason
            self._snapshot()
            self.changed.notify_all()

    def known_status(self) -> str:
        """The task's: the least advanced of its containers', as the agent works it out."""
        return min((c.known for c in self.containers.values()), key=STATUS_ORDER.index)

    def _snapshot(self) -> None:
        seen = {}
        for run in self.containers.values():
            if run.inspect is not None:
                seen[run.docker_id] = self._as_seen(run)
        self.snapshot = Snapshot(seen, {}, health_transitions(self.snapshot.health, seen))

    def _as_seen(self, run: ContainerRun) -> dict:
        holder = next((c for c in self.containers.values() if c.planned.docker_name == run.planned.holder), None)
        if holder is None or holder.inspect is None:
            return run.inspect
        return {**run.inspect, "NetworkSettings": holder.inspect.get("NetworkSettings") or {}}

    def visible(self) -> list[ContainerRun]:
        """The task's containers as its metadata lists them: the awsvpc pause container too for EC2
        task definitions (the agent lists it), not for Fargate ones (Fargate shows none)."""
        return [c for c in self.containers.values() if c.inspect is not None and (
            not c.planned.is_holder or (c.planned.name == PAUSE_NAME and self.plan.identity.launch_type != "FARGATE"))]

    def locate(self, identifier: str | None, namespace: frozenset[str], whole_task: bool = False
               ) -> tuple[Snapshot, dict]:
        """The container a request names (its V3EndpointID, or as the server matches names) or,
        without one, the one container of the namespace the request came from (any of them when
        the request is about the whole task)."""
        snapshot = self.snapshot
        if identifier in self.by_endpoint:
            found = [self.containers[self.by_endpoint[identifier]]]
        elif identifier:
            ids = {c["Id"] for c in match_identifier(snapshot, identifier, None)}
            found = [c for c in self.visible() if c.docker_id in ids]
        else:
            found = [c for c in self.visible() if c.planned.name in namespace]
        found = [c for c in found if c.docker_id in snapshot.containers][:1 if whole_task else None]
        if len(found) != 1:
            raise ApiError(404, "ContainerNotFound" if not found else "AmbiguousContainer",
                           f"no container of task {self.plan.identity.task_id} matches {identifier!r}" if identifier
                           else "several containers share this network namespace: name one, as "
                                "ECS_CONTAINER_METADATA_URI_V4 does")
        return snapshot, snapshot.containers[found[0].docker_id]

    def planned_for(self, container: dict) -> PlannedContainer:
        return next(c.planned for c in self.containers.values() if c.docker_id == container["Id"])


def run_container_metadata(container: dict, planned: PlannedContainer, desired: str, version: int,
                           identity: TaskIdentity, health_since: str | None) -> dict:
    """A container of a task `run` started, as the agent describes it: its task-definition name,
    the task's desired status, the pause container's type, the log driver the task definition asks for."""
    doc = container_metadata(container, version, identity, health_since)
    doc["Name"] = planned.name
    doc["DesiredStatus"] = desired
    if planned.is_holder:   # the agent's pause container: steady state RESOURCES_PROVISIONED, no limits
        doc["Type"] = "CNI_PAUSE"
        doc["Limits"] = {"CPU": 0, "Memory": 0}
        if desired == "RUNNING":
            doc["DesiredStatus"] = "RESOURCES_PROVISIONED"
        if doc["KnownStatus"] == "RUNNING":
            doc["KnownStatus"] = "RESOURCES_PROVISIONED"
    log_configuration = planned.definition.get("logConfiguration") or {}
    if version >= 4 and log_configuration.get("logDriver"):
        doc["LogDriver"] = log_configuration["logDriver"]
        doc.pop("LogOptions", None)
        if log_configuration.get("options"):
            doc["LogOptions"] = dict(log_configuration["options"])
    return doc


def run_task_metadata(base: dict, task: TaskRun, version: int, with_tags: bool) -> dict:
    """The task object of a `run` task: task_metadata's, with what the task definition and the
    runner know (statuses, limits, pull times, tags, fault injection)."""
    plan = task.plan
    doc = {**base, "DesiredStatus": task.desired, "KnownStatus": task.known_status()}
    limits = {k: v for k, v in (("CPU", task_cpu_vcpu(plan.definition.get("cpu"))),
                                ("Memory", task_memory_mib(plan.definition.get("memory")))) if v}
    if limits:
        doc["Limits"] = limits
    for key, value in (("PullStartedAt", task.pull_started), ("PullStoppedAt", task.pull_stopped)):
        if value:
            doc[key] = value
    doc.pop("TaskTags", None)
    doc.pop("ContainerInstanceTags", None)
    if with_tags and plan.tags:
        doc["TaskTags"] = dict(plan.tags)
    if version >= 4:
        doc["FaultInjectionEnabled"] = bool(plan.definition.get("enableFaultInjection"))
    return doc


def trust_policy_advice(role_arn: str, caller_arn: str | None) -> str:
    """What to add to a role's trust policy so that the developer's identity may assume it."""
    statement = {"Effect": "Allow", "Principal": {"AWS": caller_arn or "arn:aws:iam::ACCOUNT:user/YOU"},
                 "Action": "sts:AssumeRole"}
    return (f"to run this task locally, let your identity assume {role_arn}: add this statement to the "
            f"role's trust policy (IAM console, Roles, Trust relationships):\n{json.dumps(statement, indent=2)}")


def now_text() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------------------
# Handlers, by family: one small method per route
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Vended:
    """What an audited route's handler returns: the answer, and the credentials in it for the
    audit record that RequestHandler.answer() writes."""
    issued: Issued
    body: bytes | Response


@functools.lru_cache(maxsize=256)
def credentials_body(credentials: Credentials) -> bytes:
    """A credentials response, encoded once: the vendor hands out the same credentials until
    they are refreshed, so a warm request need not format the expiry and encode JSON again."""
    return json.dumps(credentials.response()).encode()


class CredentialRoutes:
    """/creds, /role/{name}, /role-arn/{arn} and /v2/credentials/{id}: credentials from the vendor,
    encoded once per set (credentials_body)."""

    def __init__(self, vendor: CredentialVendor, task: TaskRun | None):
        self.vendor = vendor
        self.task_run = task   # `run`'s task: its role is /v2/credentials/{id}'s

    def creds(self, request: Request) -> bytes:
        return self._vend(self.vendor.own)

    def role(self, request: Request) -> bytes:
        name = request.params["name"]
        return self._vend(functools.partial(self.vendor.role, name))

    def role_arn(self, request: Request) -> bytes:
        arn = request.params["arn"]
        return self._vend(functools.partial(self.vendor.role_arn, arn))

    def task_credentials(self, request: Request) -> Vended:
        """/v2/credentials/{id}: the task role of the task `run` started, for its containers,
        which alone are given the id (Guard.TASK_ID)."""
        role = self.task_run.plan.definition["taskRoleArn"]
        return self._vend(functools.partial(self.vendor.role_arn, role))

    def _vend(self, issue: Callable[[], Issued]) -> Vended:
        issued = issue()
        return Vended(issued, credentials_body(issued.credentials))

    def role_asked(self, request: Request) -> str | None:
        """The role an audited request asks for, which its audit record names when no credentials
        were issued: the route's {name} or {arn}; None for the server's own identity."""
        return request.params.get("arn") or request.params.get("name")


class ImdsRoutes:
    """IMDSv2 under /latest/, SDKs' last resort at AWS_EC2_METADATA_SERVICE_ENDPOINT: the session
    token, the credentials of ECS_LOCAL_IMDS_ROLE (else those of /creds) under the one role name
    IMDS lists, the region and the instance identity document."""

    def __init__(self, config: Config, identity: AwsApi, vendor: CredentialVendor, tokens: ImdsTokens):
        self.config = config
        self.identity = identity
        self.vendor = vendor
        self.tokens = tokens
        self.role_name = (config.imds_role or IMDS_DEFAULT_ROLE).rsplit("/", 1)[-1]
        self._document: tuple[tuple[str, str], bytes] | None = None   # (key, expiry) -> its document

    def status(self, on: bool) -> str:
        """What the start-up log says of the IMDS routes."""
        if not on:
            return ("IMDS off: an authorization token is set and SDKs send IMDS none; ECS_LOCAL_IMDS=ON "
                    "serves IMDS to the allowed callers without it" if self.config.imds == "AUTO"
                    else "IMDS off (ECS_LOCAL_IMDS=OFF)")
        source = f"role {self.config.imds_role}" if self.config.imds_role else "the credentials of /creds"
        tokens = "IMDSv1 allowed" if self.config.imds_v1 else "IMDSv2 session tokens required"
        return f"IMDS on at /latest/: {source}, listed as role {self.role_name}; {tokens}"

    def token(self, request: Request) -> Response:
        if "X-Forwarded-For" in request.headers:
            raise ImdsError(403, "Forbidden", "a token request that went through a proxy (X-Forwarded-For) "
                                              "is refused, as on EC2")
        ttl = (request.headers.get(IMDS_TTL_HEADER) or "").strip()
        if not re.fullmatch(r"[0-9]{1,5}", ttl) or not 1 <= int(ttl) <= IMDS_MAX_TTL:
            raise ImdsError(400, "BadRequest", f"{IMDS_TTL_HEADER} must be a whole number of seconds "
                                               f"from 1 to {IMDS_MAX_TTL}")
        return text_response(self.tokens.issue(int(ttl)), {IMDS_TTL_HEADER: str(int(ttl))})

    def roles(self, request: Request) -> Response:
        return text_response(self.role_name)

    def credentials(self, request: Request) -> Vended:
        if request.params["listed"] != self.role_name:
            raise ImdsError(404, "NotFound", f"no role {printable(request.params['listed'], 100)!r} here; "
                                             f"the role is {self.role_name}")
        vended = self._vend()
        credentials = vended.credentials.response()
        issued = (credentials["AccessKeyId"], credentials["Expiration"])
        known = self._document
        if known is None or known[0] != issued:
            # Encoded once per set of credentials: LastUpdated is when IMDS first had them, as on EC2.
            known = self._document = (issued, json.dumps(imds_document(credentials)).encode())
        return Vended(vended, Response(known[1], content_type="text/plain"))

    def role_asked(self, request: Request) -> str | None:
        """The role an IMDS credentials request asks for: ECS_LOCAL_IMDS_ROLE ({listed} is only the
        name IMDS lists); None for the credentials of /creds."""
        return self.config.imds_role

    def placement(self, request: Request) -> Response:
        region = self.identity.region
        return text_response(region if request.params["item"] == "region" else f"{region}a")

    def identity_document(self, request: Request) -> Response:
        region = self.identity.region
        document = {"accountId": self._account_id(), "availabilityZone": f"{region}a", "region": region,
                    "version": "2017-09-30"}
        return text_response(json.dumps(document, indent=2))

    def not_found(self, request: Request) -> Response:
        """Other IMDS paths (such as security-credentials-extended, which newer SDKs try first
        and leave for security-credentials on a 404): EC2's kind of 404, in text."""
        raise ImdsError(404, "NotFound", "this server answers security-credentials, placement/region and "
                                         "placement/availability-zone under /latest/meta-data/")

    def _vend(self) -> Issued:
        """The credentials IMDS hands out: ECS_LOCAL_IMDS_ROLE's, else those of /creds."""
        role = self.config.imds_role
        try:
            if role is None:
                return self.vendor.own()
            if role.startswith("arn:"):
                return self.vendor.role_arn(role)
            return self.vendor.role(role)
        except ApiError as exc:
            raise ImdsError.of(exc) from None

    def _account_id(self) -> str:
        """The account of those credentials, as they carry it (Credentials.account_id: the role's,
        or what sts:GetCallerIdentity said of the base identity)."""
        account = self._vend().credentials.account_id
        if not account:
            raise ImdsError(503, "AccountUnknown", "the account of these credentials is unknown: "
                                                   "sts:GetCallerIdentity failed (see the server's log)")
        return account


class MetadataRoutes:
    """Task metadata and stats, v2 to v4, and /health: documents built from the Docker view (or
    `run`'s task), memoized per snapshot."""

    def __init__(self, config: Config, docker: DockerApi, view: ContainerView, stats: StatsHub,
                 identity: AwsApi, vendor: CredentialVendor, task: TaskRun | None):
        self.config = config
        self.docker = docker
        self.view = view
        self.stats = stats
        self.identity = identity
        self.vendor = vendor
        self.task_run = task   # `run`'s task: the only task these endpoints then serve
        self.container_override = JsonOverride(config.container_metadata_path)
        self.task_override = JsonOverride(config.task_metadata_path)
        self.own_candidates = own_container_candidates(config)

    def health(self, request: Request) -> dict:
        """Always 200 while serving; says whether Docker and credentials work (no secrets)."""
        docker = {"reachable": self.view.reachable, "socket": self.docker.host,
                  "apiVersion": self.docker.api_version}
        try:
            credentials = {"resolved": True, "source": self.identity.source()}
        except Exception as exc:
            credentials = {"resolved": False, "error": aws_error(exc, "health", self.identity.profile).code}
        if self.identity.mfa is not None:
            ends = self.identity.mfa_session_ends()
            credentials["mfaSessionEnds"] = ends and ends.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        allowed = self.vendor.allowed_roles
        credentials["allowedRoles"] = list(allowed.entries) if allowed else None
        return {"status": "ok", "version": VERSION, "docker": docker, "credentials": credentials,
                "statsCollectors": self.stats.active(), "statsReady": self.stats.ready()}

    def _match(self, snapshot: Snapshot, request: Request) -> tuple[list[dict], str | None]:
        """Containers the request names (or whose address it comes from); memoized when found."""
        identifier = request.params.get("ident")
        key = ("match", "ident", identifier) if identifier else ("match", "caller", str(request.caller))
        if key not in snapshot.memo:
            own = find_own_container(snapshot, self.own_candidates)
            own_id = own["Id"] if own else None
            found = (match_identifier(snapshot, identifier, own_id) if identifier
                     else match_ip(snapshot, request.caller, own))
            if not found:
                return found, own_id
            snapshot.memo[key] = (found, own_id)
        return snapshot.memo[key]

    def locate(self, request: Request, whole_task: bool = False) -> tuple[Snapshot, dict, str | None]:
        """The snapshot, the container a request is about, and the server's own container ID.

        A lookup that finds nothing looks again at a fresh snapshot: a container that
        has just started may ask before Docker's start event has reached the view.
        whole_task: the request is about the caller's task, so any of its containers will do.
        """
        if self.task_run is not None:
            return (*self.task_run.locate(request.params.get("ident"), request.namespace, whole_task), None)
        snapshot = self.view.snapshot()
        found, own_id = self._match(snapshot, request)
        if not found:
            snapshot = self.view.sync(after=request.received)
            found, own_id = self._match(snapshot, request)
        identifier = request.params.get("ident")
        if not found:
            raise ApiError(404, "ContainerNotFound",
                           f"no container matches {identifier!r}" if identifier else
                           f"no running container has the caller's address {request.caller}: name the "
                           "container in the URI, e.g. /v4/{container name}")
        if len(found) > 1:
            names = ", ".join(sorted(container_name(c) for c in found)[:10])
            raise ApiError(404, "AmbiguousContainer",
                           f"{len(found)} containers match {identifier or request.caller} ({names}): "
                           "name one exactly, e.g. /v4/{container name}")
        return snapshot, found[0], own_id

    def identity_of(self, caller: dict) -> TaskIdentity:
        if self.task_run is not None:
            return self.task_run.plan.identity
        labels = labels_of(caller)
        return task_identity(self.config, labels.get(COMPOSE_PROJECT), labels.get(COMPOSE_SERVICE))

    def _container_doc(self, snapshot: Snapshot, container: dict, version: int, task: TaskIdentity) -> dict:
        since = snapshot.health.get(container["Id"], ("", None))[1]
        if self.task_run is not None:
            doc = run_container_metadata(container, self.task_run.planned_for(container), self.task_run.desired,
                                         version, task, since)
        else:
            doc = container_metadata(container, version, task, since)
        return deep_merge(doc, self.container_override.value)

    def _memoized(self, snapshot: Snapshot, key: tuple, build: Callable[[], dict]) -> bytes:
        """A metadata response encoded once per snapshot and override-file generation:
        a warm request neither calls Docker nor builds anything."""
        key += (self.container_override.refresh(), self.task_override.refresh())
        payload = snapshot.memo.get(key)
        if payload is None:
            payload = snapshot.memo[key] = json.dumps(build()).encode()
        return payload

    def container(self, request: Request) -> bytes:
        version = request.params["version"]
        snapshot, caller, _ = self.locate(request)
        return self._memoized(snapshot, ("container", version, caller["Id"]), lambda: self._container_doc(
            snapshot, caller, version, self.identity_of(caller)))

    def task(self, request: Request) -> bytes:
        return self._task(request, with_tags=False)

    def task_with_tags(self, request: Request) -> bytes:
        return self._task(request, with_tags=True)

    def _task(self, request: Request, with_tags: bool) -> bytes:
        version = request.params["version"]
        snapshot, caller, own_id = self.locate(request, whole_task=True)

        def build() -> dict:
            task = self.identity_of(caller)
            members = self.members(snapshot, caller, own_id)
            containers = [self._container_doc(snapshot, c, version, task) for c in members]
            doc = task_metadata(members, version, task, self.config, with_tags, containers)
            if self.task_run is not None:
                doc = run_task_metadata(doc, self.task_run, version, with_tags)
            elif version >= 4:   # a compose container opts in with a label
                doc["FaultInjectionEnabled"] = labels_of(caller).get(FAULT_LABEL, "").lower() == "true"
            return deep_merge(doc, self.task_override.value)
        # Fargate's ClockDrift is a reading of the clock: taken again each minute.
        minute = int(time.time() // 60) if self.config.launch_type == "FARGATE" and version >= 4 else 0
        return self._memoized(snapshot, ("task", version, caller["Id"], with_tags, minute), build)

    def members(self, snapshot: Snapshot, caller: dict, own_id: str | None) -> list[dict]:
        if self.task_run is not None:
            return [snapshot.containers[c.docker_id] for c in self.task_run.visible()
                    if c.docker_id in snapshot.containers]
        return task_members(snapshot, caller, own_id)

    def container_stats(self, request: Request) -> dict:
        _, caller, _ = self.locate(request)
        if not caller["State"].get("Running"):
            raise ApiError(503, "StatsUnavailable", f"container {container_name(caller)} is not running")
        sample = self.stats.samples([caller["Id"]])[caller["Id"]]
        if sample is None:
            raise ApiError(503, "StatsUnavailable",
                           f"Docker sent no stats for {container_name(caller)} within {STATS_WAIT_SECONDS} s")
        return stats_document(sample, request.params["version"])

    def task_stats(self, request: Request) -> dict:
        """Full Docker ID -> stats for the task's containers; null (v2/v3) or {} (v4) when unavailable."""
        version = request.params["version"]
        snapshot, caller, own_id = self.locate(request, whole_task=True)
        members = self.members(snapshot, caller, own_id)
        samples = self.stats.samples([c["Id"] for c in members if c["State"].get("Running")])
        empty = {} if version >= 4 else None
        return {c["Id"]: stats_document(samples[c["Id"]], version) if samples.get(c["Id"]) else empty
                for c in members}

    def live_tasks(self) -> set[str] | None:
        """ARNs of the tasks that still have containers, stopped or not; None while Docker is unreachable."""
        if self.task_run is not None:
            return {self.task_run.plan.identity.arn}
        if not self.view.reachable:
            return None
        return {self.identity_of(c).arn for c in self.view.current().containers.values()}


class AgentApiRoutes:
    """The agent's API at $ECS_AGENT_URI (ECS's /api/{id}): task scale-in protection and fault
    injection, for the task a request names or comes from (MetadataRoutes.locate)."""

    def __init__(self, metadata: MetadataRoutes, protection: TaskProtection, faults: FaultInjector):
        self.metadata = metadata
        self.protection = protection
        self.faults = faults

    def _protected_task(self, request: Request) -> str:
        """The ARN of the task the request names (or comes from), else the agent's error."""
        try:
            _, caller, _ = self.metadata.locate(request, whole_task=True)
        except ApiError as exc:
            status, code = (404, "ResourceNotFoundException") if exc.status == 404 else (500, "ServerException")
            raise TaskProtectionError(status, code, f"{TASK_NOT_FOUND}: {exc.message}") from None
        return self.metadata.identity_of(caller).arn

    def protection_state(self, request: Request) -> bytes:
        return go_marshal(self.protection.state(self._protected_task(request)))

    def update_protection(self, request: Request) -> bytes:
        """The agent's checks in its order: the body, the task, ProtectionEnabled; then ECS's range."""
        enabled, minutes = parse_protection_request(request.body)
        arn = self._protected_task(request)
        if enabled is None:
            raise TaskProtectionError(400, "InvalidParameterException",
                                      "Invalid request: does not contain 'ProtectionEnabled' field", arn)
        if minutes is not None and not 1 <= minutes <= PROTECTION_MAX_MINUTES:
            # ECS's own validation, which the agent passes on with ECS's request ID.
            raise TaskProtectionError(400, "InvalidParameterException",
                                      f"ExpiresInMinutes must be between 1 and {PROTECTION_MAX_MINUTES} minutes "
                                      f"(48 hours); got {minutes}", arn, str(uuid.uuid4()))
        return go_marshal(self.protection.update(arn, enabled, minutes))

    def start_fault(self, request: Request) -> bytes:
        return self.faults.answer(self.metadata, request, "start")

    def stop_fault(self, request: Request) -> bytes:
        return self.faults.answer(self.metadata, request, "stop")

    def fault_status(self, request: Request) -> bytes:
        return self.faults.answer(self.metadata, request, "status")


@dataclass
class Endpoints:
    """Everything the routes use, built once by build_endpoints(): the route families whose methods
    ROUTES names, what the one dispatch path applies (access, audit), and the services that main()
    and `run` start and stop."""
    config: Config
    docker: DockerApi
    identity: AwsApi
    task_run: TaskRun | None
    view: ContainerView
    stats: StatsHub
    vendor: CredentialVendor
    access: Access
    audit: AuditTrail
    faults: FaultInjector
    families: dict[str, Any]   # a family's class name (Route.family) -> the instance serving its routes

    def family(self, kind: type) -> Any:
        return self.families[kind.__name__]


def build_endpoints(config: Config, docker: DockerApi, identity: AwsApi, task: TaskRun | None = None) -> Endpoints:
    """The route families and the services behind them, from the settings and the two outside
    edges, which a test may replace (DockerApi, AwsApi); task: `run`'s, the only one then served."""
    vendor = CredentialVendor(identity, config)
    stats = StatsHub(docker, eager=config.stats == "EAGER")
    view = ContainerView(docker, stats.follow)
    imds_tokens = ImdsTokens()
    access = Access(config, CallerPolicy(config, view), imds_tokens, task.plan.credentials_id if task else None)
    audit = AuditTrail(config.audit_log, view, own_container_candidates(config),
                       task.plan.identity.arn if task else None)
    faults = FaultInjector()
    metadata = MetadataRoutes(config, docker, view, stats, identity, vendor, task)
    families = (CredentialRoutes(vendor, task), ImdsRoutes(config, identity, vendor, imds_tokens), metadata,
                AgentApiRoutes(metadata, TaskProtection(metadata.live_tasks), faults))
    return Endpoints(config, docker, identity, task, view, stats, vendor, access, audit, faults,
                     {type(family).__name__: family for family in families})


# ---------------------------------------------------------------------------
# ROUTES: every route, who may call it, whether it is audited, and what it may call out
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    method: str
    rule: str
    handler: Callable[[Any, Request], Any]   # a method of a route family: CredentialRoutes.creds
    family: str                   # its class's name: Endpoints.families has the instance it runs on
    guard: Guard                  # who may call it, checked before the handler runs
    body: bool                    # takes a request body
    audited: bool                 # hands out credentials: AuditTrail records every answer
    calls: frozenset[str]         # the outbound calls its answer may make (guard and audit included)
    pattern: re.Pattern
    converters: dict[str, Callable[[str], Any]]

    def loggable(self, path: str, params: dict[str, Any]) -> str:
        """The path as logs and the audit trail show it: {name:secret} parameters masked."""
        for name in re.findall(r"\{(\w+):secret\}", self.rule):
            if params.get(name):
                path = path.replace(params[name], "{" + name + "}")
        return path

    @property
    def declaration(self) -> str:
        return declaration(f"the route {self.method} {self.rule}", self.calls)


# Words that name a route under /v3 and /v4, so never a container identifier.
RESERVED_WORDS = ("task", "taskWithTags", "stats", "containers")

SEGMENT_PATTERNS = {
    "": r"[^/]+",                 # {name}: one path segment
    "secret": r"[^/]+",           # {name:secret}: one segment that is a capability: never logged
    "path": r".+",                # {name:path}: the rest of the path, slashes included
    "container": rf"(?!(?:{'|'.join(RESERVED_WORDS)})(?:/|$))[^/]+",   # {name:container}
}


def compile_rule(rule: str) -> tuple[re.Pattern, dict[str, Callable[[str], Any]]]:
    """A route rule as a regex and a converter per parameter.

    '{name}', '{name:path}' and '{name:container}' are as in SEGMENT_PATTERNS; '{name:3|4}'
    is one of the words (an int when they are all digits); '[...]' is an optional part.
    """
    converters: dict[str, Callable[[str], Any]] = {}
    pattern = []
    for piece in re.split(r"(\{[^}]*\}|\[|\])", rule):
        if piece == "[":
            pattern.append("(?:")
        elif piece == "]":
            pattern.append(")?")
        elif piece.startswith("{"):
            name, _, kind = piece[1:-1].partition(":")
            if kind in SEGMENT_PATTERNS:
                pattern.append(f"(?P<{name}>{SEGMENT_PATTERNS[kind]})")
                converters[name] = str
            else:
                words = kind.split("|")
                pattern.append(f"(?P<{name}>{'|'.join(map(re.escape, words))})")
                converters[name] = int if all(w.isdigit() for w in words) else str
        else:
            pattern.append(re.escape(piece))
    return re.compile("".join(pattern), re.DOTALL), converters


def route(method: str, rule: str, handler: Callable[[Any, Request], Any], guard: Guard = Guard.OPEN,
          body: bool = False, audited: bool = False, *, calls: tuple[str, ...]) -> Route:
    family = handler.__qualname__.partition(".")[0]
    return Route(method, rule, handler, family, guard, body, audited, frozenset(calls), *compile_rule(rule))


# What finding a container in the Docker view may call: ContainerView.sync lists the containers, inspects
# each and lists the networks, while the view is cold or misses the container asked for.
DOCKER_VIEW_CALLS = ("docker:containers", "docker:inspect", "docker:networks")


ROUTES: tuple[Route, ...] = (
    # calls: the outbound calls the answer may make (RequestHandler.answer puts them in force; DockerClient and
    # AwsIdentity refuse any other). boto3:credential-chain comes with the first AWS call of each service.
    route("GET", "/creds", CredentialRoutes.creds, guard=Guard.TOKEN, audited=True,
          calls=("boto3:credential-chain", "sts:GetSessionToken", "sts:GetCallerIdentity", "sts:AssumeRole")),
    route("GET", "/role/{name}", CredentialRoutes.role, guard=Guard.TOKEN, audited=True,
          calls=("boto3:credential-chain", "iam:GetRole", "sts:AssumeRole")),
    route("GET", "/role-arn/{arn:path}", CredentialRoutes.role_arn, guard=Guard.TOKEN, audited=True,
          calls=("boto3:credential-chain", "sts:AssumeRole")),
    # The agent's task role route, for tasks `run` started: the unguessable id is the guard, as on ECS.
    route("GET", "/v2/credentials[/{id:secret}]", CredentialRoutes.task_credentials, guard=Guard.TASK_ID,
          audited=True, calls=("boto3:credential-chain", "sts:AssumeRole")),
    route("GET", "/health", MetadataRoutes.health, calls=("boto3:credential-chain",)),
    # Metadata: Docker is called only when the view of it is cold or misses the container asked for. The
    # stats come from collectors, background jobs of their own (docker:stats).
    route("GET", "/v{version:2}/metadata", MetadataRoutes.task, calls=DOCKER_VIEW_CALLS),
    route("GET", "/v{version:2}/metadataWithTags", MetadataRoutes.task_with_tags, calls=DOCKER_VIEW_CALLS),
    route("GET", "/v{version:2}/metadata/{ident}", MetadataRoutes.container, calls=DOCKER_VIEW_CALLS),
    route("GET", "/v{version:2}/stats", MetadataRoutes.task_stats, calls=DOCKER_VIEW_CALLS),
    route("GET", "/v{version:2}/stats/{ident}", MetadataRoutes.container_stats, calls=DOCKER_VIEW_CALLS),
    # v3 and v4: /vN (the caller), /vN/{ident} (ECS's form), /vN/containers/{ident} (the original's).
    route("GET", "/v{version:3|4}[[/containers]/{ident:container}]", MetadataRoutes.container,
          calls=DOCKER_VIEW_CALLS),
    route("GET", "/v{version:3|4}[[/containers]/{ident:container}]/task", MetadataRoutes.task,
          calls=DOCKER_VIEW_CALLS),
    route("GET", "/v{version:3|4}[[/containers]/{ident:container}]/taskWithTags", MetadataRoutes.task_with_tags,
          calls=DOCKER_VIEW_CALLS),
    route("GET", "/v{version:3|4}[[/containers]/{ident:container}]/stats", MetadataRoutes.container_stats,
          calls=DOCKER_VIEW_CALLS),
    route("GET", "/v{version:3|4}[[/containers]/{ident:container}]/task/stats", MetadataRoutes.task_stats,
          calls=DOCKER_VIEW_CALLS),
    # IMDSv2, for SDKs' default chain (they send IMDS no Authorization header, hence its own guards).
    route("PUT", "/latest/api/token", ImdsRoutes.token, guard=Guard.IMDS, calls=()),
    route("GET", "/latest/meta-data/iam/security-credentials", ImdsRoutes.roles, guard=Guard.IMDS_SESSION,
          calls=()),
    route("GET", "/latest/meta-data/iam/security-credentials/{listed}", ImdsRoutes.credentials,
          guard=Guard.IMDS_SESSION, audited=True,
          calls=("boto3:credential-chain", "sts:GetSessionToken", "sts:GetCallerIdentity", "sts:AssumeRole",
                 "iam:GetRole")),
    route("GET", "/latest/meta-data/placement/{item:region|availability-zone}", ImdsRoutes.placement,
          guard=Guard.IMDS_SESSION, calls=()),
    route("GET", "/latest/dynamic/instance-identity/document", ImdsRoutes.identity_document,
          guard=Guard.IMDS_SESSION,
          calls=("boto3:credential-chain", "sts:GetSessionToken", "sts:GetCallerIdentity", "sts:AssumeRole",
                 "iam:GetRole")),
    route("GET", "/latest/meta-data/{rest:path}", ImdsRoutes.not_found, guard=Guard.IMDS_SESSION, calls=()),
    # Task scale-in protection at $ECS_AGENT_URI, ECS's /api/{id}; without {ident}, the caller's task.
    route("GET", "/api[/{ident}]/task-protection/v1/state", AgentApiRoutes.protection_state,
          calls=DOCKER_VIEW_CALLS),
    route("PUT", "/api[/{ident}]/task-protection/v1/state", AgentApiRoutes.update_protection, guard=Guard.TOKEN,
          body=True, calls=DOCKER_VIEW_CALLS),
    # Fault injection at $ECS_AGENT_URI, the agent's nine routes, three faults in each rule (FaultInjector);
    # without {ident}, the caller's task.
    route("POST", "/api[/{ident}]/fault/v1/{fault:network-blackhole-port|network-latency|network-packet-loss}/start",
          AgentApiRoutes.start_fault, guard=Guard.TOKEN, body=True, calls=DOCKER_VIEW_CALLS),
    route("POST", "/api[/{ident}]/fault/v1/{fault:network-blackhole-port|network-latency|network-packet-loss}/stop",
          AgentApiRoutes.stop_fault, guard=Guard.TOKEN, body=True, calls=DOCKER_VIEW_CALLS),
    route("POST", "/api[/{ident}]/fault/v1/{fault:network-blackhole-port|network-latency|network-packet-loss}/status",
          AgentApiRoutes.fault_status, guard=Guard.TOKEN, body=True, calls=DOCKER_VIEW_CALLS),
)


def first_segments(rule: str) -> tuple[str, ...] | None:
    """The first path segments a rule can match ('/v{version:3|4}/...' -> v3, v4), or None
    when it can match any ({name} or an optional part in its first segment)."""
    head = re.match(r"/[^/\[]*", rule).group()[1:]
    if rule[len(head) + 1:].startswith("[") and not rule[len(head) + 2:].startswith(("/", "[/")):
        return None
    words = [""]
    for piece in re.split(r"(\{[^}]*\})", head):
        if piece.startswith("{"):
            kind = piece[1:-1].partition(":")[2]
            if kind in SEGMENT_PATTERNS:
                return None
            words = [word + choice for word in words for choice in kind.split("|")]
        else:
            words = [word + piece for word in words]
    return tuple(words)


def index_routes(routes: tuple[Route, ...]) -> dict[str | None, tuple[Route, ...]]:
    """First path segment -> the routes that may match it, in table order (None: any other
    segment), so that resolve() tries a few patterns instead of the whole table."""
    firsts = [(r, first_segments(r.rule)) for r in routes]
    segments = sorted({word for _, words in firsts for word in words or ()})
    return {segment: tuple(r for r, words in firsts if words is None or segment in words)
            for segment in (*segments, None)}


ROUTE_INDEX = index_routes(ROUTES)


def normalize_path(target: str) -> str:
    """The request path percent-decoded once, without query, duplicate or trailing slashes."""
    path = unquote(target.partition("?")[0].partition("#")[0], errors="replace")
    if "//" in path:
        path = re.sub(r"/{2,}", "/", path)
    return path.rstrip("/") or "/"


def resolve(method: str, path: str) -> tuple[Route, dict[str, Any]]:
    """The route for a request, or 404 / 405 (with Allow) as ApiError."""
    allowed = set()
    segment = path[1:].partition("/")[0]
    for candidate in ROUTE_INDEX.get(segment) or ROUTE_INDEX[None]:
        match = candidate.pattern.fullmatch(path)
        if match:
            if method in (candidate.method, "HEAD" if candidate.method == "GET" else None):
                return candidate, {name: candidate.converters[name](value)
                                   for name, value in match.groupdict().items() if value is not None}
            allowed.add(candidate.method)
    if allowed:
        if FAULT_PATH.fullmatch(path):   # the agent's router: 405 with no body
            raise FaultError(405, "")
        allow = ", ".join(sorted(allowed | ({"HEAD"} if "GET" in allowed else set())))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed here; use {allow}", {"Allow": allow})
    raise ApiError(404, "NotFound", f"no such route: {printable(path, 200)}")


def route_of(method: str, target: str) -> tuple[Route, Mapping[str, Any], str, str]:
    """The route for a request target: (route, its parameters (read-only), the path, the path as
    logs show it (Route.loggable)), or ApiError as resolve() raises it."""
    path = normalize_path(target)
    chosen, params = resolve(method, path)
    return chosen, MappingProxyType(params), path, chosen.loggable(path, params)


# route_of() remembered for targets of up to ROUTE_MEMO_TARGET characters: callers ask for the
# same few again and again, and working one out (decoding, patterns, masking) costs microseconds
# a request.  Longer targets are worked out each time, so the memo stays small; errors (404, 405)
# are not remembered.
ROUTE_MEMO_TARGET = 256
remembered_route = functools.lru_cache(maxsize=512)(route_of)


# ---------------------------------------------------------------------------
# HTTP: the one dispatch path
# ---------------------------------------------------------------------------

CLIENT_TIMEOUT = 5.0   # the ECS agent's read and write timeouts
MAX_BODY = 64 * 1024
SERVER_NAME = f"local-endpoints/{VERSION}"
def printable(text: str, limit: int) -> str:
    """Text safe for a log line or message: control characters escaped, length cut."""
    text = text[:limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def error_phrase(status: int) -> str:
    return HTTPStatus(status).phrase.replace(" ", "").replace("-", "")


def as_response(result: Any) -> Response:
    """A handler's result as a Response: JSON-able objects and encoded JSON answer 200."""
    if isinstance(result, Response):
        return result
    return Response(result if isinstance(result, bytes) else json.dumps(result).encode())


STATUS_LINES = {status.value: f"HTTP/1.1 {status.value} {status.phrase}" for status in HTTPStatus}


def encode_response(response: Response, close: bool, date: str, head_only: bool = False) -> bytes:
    """The whole HTTP/1.1 response as one piece of bytes: every answer is written by this.
    One f-string for the head: a list joined costs a third more, on every answer."""
    head = (f"{STATUS_LINES[response.status]}\r\nServer: {SERVER_NAME}\r\nDate: {date}\r\n"
            f"Content-Type: {response.content_type}\r\nContent-Length: {len(response.body)}\r\n")
    for name, value in response.headers.items():
        head += f"{name}: {value}\r\n"
    if close:
        head += "Connection: close\r\n"
    head = (head + "\r\n").encode("latin-1")
    return head if head_only else head + response.body


class RequestHandler(BaseHTTPRequestHandler):
    """One connection: HTTP/1.1 keep-alive, JSON everywhere, one access-log line per request."""

    protocol_version = "HTTP/1.1"
    server_version = SERVER_NAME
    sys_version = ""
    disable_nagle_algorithm = True    # no 40 ms Nagle + delayed-ACK stall on keep-alive
    server: EndpointsServer

    def handle_one_request(self) -> None:
        """BaseHTTPRequestHandler's loop step, routing every method through one table.

        The whole request (line and headers) must arrive within CLIENT_TIMEOUT of the
        connection being ready for it, as the agent's read timeout: idle keep-alive
        clients and clients that send a byte a second are cut off by the server's reaper.
        """
        self.server.deadlines[self] = time.monotonic() + CLIENT_TIMEOUT
        try:
            self.raw_requestline = self.rfile.readline(65537)
            started = time.monotonic()
            if len(self.raw_requestline) > 65536:
                self.requestline, self.request_version, self.command = "", "HTTP/1.1", None
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline.endswith(b"\n"):
                self.close_connection = True   # closed by the client, or by the reaper mid-line
                return
            parsed = self.parse_request()
            if self.server.deadlines.pop(self, None) is None:
                self.close_connection = True   # the reaper cut the headers short
                return
            if parsed:
                self.dispatch(started)
        except (TimeoutError, ConnectionError) as exc:
            log.debug("connection from %s closed: %s", self.client_address[0], exc.__class__.__name__)
            self.close_connection = True
        finally:
            self.server.deadlines.pop(self, None)

    def dispatch(self, started: float) -> None:
        """started: time.monotonic() when the request line arrived."""
        response, audited = self.answer(started)
        self.write_response(response, started, access_line=not audited)   # an audit line stands for it

    def answer(self, started: float) -> tuple[Response, bool]:
        """The route's answer to this request, errors included, and whether the audit trail
        recorded it.  This is where the guard, audit and calls columns of ROUTES are applied, for
        every route and method: the guard before the handler runs, the calls in force while the
        route is answered, the audit record (of every answer of an audited route, whatever its
        status) before the answer is written."""
        endpoints = self.server.endpoints
        body_sent = self.headers.get("Content-Length", "0").strip() not in ("", "0") or \
            self.headers.get("Transfer-Encoding") is not None   # `in` would make a list of every name
        keep_alive = not self.close_connection
        if body_sent:
            self.close_connection = True   # unless the route reads the body
        try:
            chosen, params, path, loggable = (remembered_route if len(self.path) <= ROUTE_MEMO_TARGET
                                              else route_of)(self.command, self.path)
        except ApiError as exc:
            return exc.response(), False   # no route: nothing to guard or audit
        request = Request(params, plain_ip(self.client_address[0]), self.headers, started,
                          namespace=self.server.namespace)
        family = endpoints.families[chosen.family]
        in_force = DECLARED_CALLS.set(chosen)   # the route's calls column, until its answer is recorded
        try:
            issued = error = None
            try:
                if body_sent:
                    if not chosen.body:
                        raise ApiError(413, "RequestBodyNotAccepted", "this route takes no request body")
                    request.body = self.read_body()
                    self.close_connection = not keep_alive
                endpoints.access.admit(chosen.guard, request)
                result = chosen.handler(family, request)
                if isinstance(result, Vended):
                    issued, result = result.issued, result.body
                response = as_response(result)
            except ApiError as exc:
                error, response = exc, exc.response()
            except (ConnectionError, TimeoutError):
                raise   # the client went away (a body cut short): no answer leaves, so none is recorded
            except UndeclaredCall:   # the refusal logged its one line: no traceback
                error = ApiError(500, "UndeclaredCall", "an outbound call this route does not declare was refused; "
                                                        "see the server's log")
                response = error.response()
            except Exception:
                log.exception("error in %s %s", self.command, printable(path, 200))
                error = ApiError(500, "InternalError", "internal error in local-endpoints; see its log")
                response = error.response()
            if chosen.audited:
                endpoints.audit.record(request, loggable, issued, error, family.role_asked(request))
            return response, chosen.audited
        finally:
            DECLARED_CALLS.reset(in_force)

    def read_body(self) -> bytes:
        """A request body of at most MAX_BODY bytes, which must arrive within CLIENT_TIMEOUT."""
        if "Transfer-Encoding" in self.headers:
            raise ApiError(411, "LengthRequired", "send the body with a Content-Length")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            raise ApiError(400, "BadRequest", "Content-Length is not a number") from None
        if not 0 <= length <= MAX_BODY:
            raise ApiError(413, "RequestBodyTooLarge", f"the body may have at most {MAX_BODY} bytes")
        self.server.deadlines[self] = time.monotonic() + CLIENT_TIMEOUT
        body = self.rfile.read(length)
        if self.server.deadlines.pop(self, None) is None or len(body) < length:
            raise ConnectionAbortedError("request body cut short")
        return body

    def write_response(self, response: Response, started: float | None, access_line: bool = True) -> None:
        """Status line, headers and body in one write: no Nagle + delayed-ACK stall, one syscall.
        started: when the request line arrived, for the access line (None: a request that
        http.server refused while reading it)."""
        self.server.deadlines[self] = time.monotonic() + CLIENT_TIMEOUT   # a client that never reads
        self.wfile.write(encode_response(response, self.close_connection, self.server.date(),
                                         head_only=self.command == "HEAD"))
        self.server.deadlines.pop(self, None)
        if access_line and log.isEnabledFor(logging.INFO):   # formatting the line costs microseconds
            self.log_access(response.status, started)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (400, 414, 431, 501, 505) as our JSON body, not HTML."""
        self.close_connection = True
        status = int(code)
        self.write_response(ApiError(status, error_phrase(status), message or HTTPStatus(status).phrase).response(),
                            None)

    def log_access(self, status: int, started: float | None) -> None:
        # Only method, path (no query), status, time and address: never headers.
        path = printable((getattr(self, "path", "") or "").split("?", 1)[0], 300)
        elapsed = f"{(time.monotonic() - started) * 1000:.1f}ms" if started is not None else "-"
        log.info("%s %s %d %s %s", self.command or "-", path or "-", status, elapsed,
                 plain_ip(self.client_address[0]))

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http.server: " + format, *args)


class EndpointsServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with dual-stack '::', a bound on connections, and quiet disconnects."""

    daemon_threads = True
    block_on_close = False   # stopping must not wait for idle keep-alive clients
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], endpoints: Endpoints, max_connections: int,
                 listening: socket.socket | None = None, namespace: frozenset[str] = frozenset()):
        """listening: a socket already bound and listening (`run` makes one inside a task's network
        namespace), which then serves the containers named in namespace."""
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.endpoints = endpoints
        self.namespace = namespace
        self._slots = threading.BoundedSemaphore(max_connections)
        # Handler -> when its current read or write must be done; see reap().
        self.deadlines: dict[RequestHandler, float] = {}
        self._date: tuple[int, str] = (0, "")   # (second, Date header value of that second)
        super().__init__(address, RequestHandler, bind_and_activate=listening is None)
        if listening is not None:
            self.socket.close()
            self.socket = listening
            self.server_name, self.server_port = listening.getsockname()[:2]
        threading.Thread(target=self.reap, name="reaper", daemon=True).start()

    def date(self) -> str:
        """The Date header's value, formatted once a second rather than for every response."""
        second = int(time.time())
        if self._date[0] != second:
            self._date = (second, email.utils.formatdate(second, usegmt=True))
        return self._date[1]

    def reap(self) -> None:
        """Close the connections of handlers past their deadline.

        One thread watches them all, instead of a socket timeout on every
        connection, which would add a poll() to every read and write.
        """
        while True:
            time.sleep(0.25)
            now = time.monotonic()
            for handler, deadline in list(self.deadlines.items()):
                if deadline < now:
                    self.deadlines.pop(handler, None)
                    try:
                        handler.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # Not HTTPServer.server_bind: its getfqdn() can wait on DNS for seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """Too many connections: a quick 503 from the accepting thread, no new thread."""
        refusal = ApiError(503, "TooManyConnections", "too many open connections; retry").response()
        try:
            request.settimeout(0.2)
            request.sendall(encode_response(refusal, close=True, date=self.date()))
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("connection from %s: %s", client_address[0], exc.__class__.__name__)
        else:
            log.exception("unexpected error serving %s", client_address[0])


# ---------------------------------------------------------------------------
# run: the command
# ---------------------------------------------------------------------------

def dependency_verdict(condition: str, dependency: ContainerRun, now: datetime) -> tuple[str, str]:
    """Whether a dependency's condition is "met", to "wait" for, or "failed" (with the agent's reason)."""
    name, known = dependency.planned.name, dependency.known
    if dependency.reason:
        return "failed", f"dependency graph: container {name} did not start: {dependency.reason}"
    if condition == "START" and known in ("RUNNING", "STOPPED"):
        return "met", ""
    if condition == "COMPLETE" and known == "STOPPED":
        return "met", ""
    if condition == "SUCCESS" and known == "STOPPED":
        if dependency.exit_code == 0:
            return "met", ""
        return "failed", f"dependency graph: container {name} exited with code {dependency.exit_code}, not 0"
    if condition == "HEALTHY":
        if dependency.health() == "healthy":
            return "met", ""
        if known == "STOPPED":
            return "failed", f"dependency graph: container {name} stopped before it was healthy"
    started = parse_docker_time(((dependency.inspect or {}).get("State") or {}).get("StartedAt"))
    timeout = dependency.planned.start_timeout
    if condition != "START" and timeout and started and (now - started).total_seconds() > timeout:
        return "failed", f"dependency graph: container {name} did not reach {condition} within its " \
                         f"startTimeout of {timeout} s"
    return "wait", ""


def in_parallel(work: Callable[[Any], Any], items: list) -> None:
    """work(item) for every item, each on a thread of its own; back when all are done.

    Each thread does part of its caller's job: it runs in a copy of the caller's context, so
    under the caller's declaration of outbound calls."""
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(work, item)) for item in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class TaskRunner:
    """`run TASKDEF`: the task's containers created, started in dependency order, watched, and
    stopped and removed as the ECS agent does; the endpoints served in each network namespace
    at 169.254.170.2:80.  Docker is called only through DockerClient; the state is the TaskRun."""

    def __init__(self, endpoints: Endpoints, task: TaskRun, pull: str = "missing", own_identity: bool = False,
                 out: Any = None, err: Any = None):
        self.endpoints = endpoints
        self.pull = pull                        # --pull: always, missing or never
        self.own_identity = own_identity        # fetch with the developer's identity, not the execution role
        self.fetch_credentials: Credentials | None = None   # the execution role's, once assumed
        # What was fetched for each container: its environment files' variables and its secrets.
        # Held here only, on the way to the container's environment: never in the TaskRun.
        self.fetched: dict[str, tuple[list[dict[str, str]], dict[str, str]]] = {}
        self.registry_auth: dict[str, str] = {}   # image -> X-Registry-Auth
        self.docker = endpoints.docker
        self.task = task
        self.plan = task.plan
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.stopping = threading.Event()       # Ctrl-C or SIGTERM: stop as ECS does
        self.hurry = threading.Event()          # a second one: no stop timeouts
        self.signal_exit = 130
        self.servers: list[EndpointsServer] = []
        self.host_address_added = False
        self.log_threads: list[threading.Thread] = []
        self._print = threading.Lock()
        self._refreshing = threading.Lock()
        self._said_running = False

    # -- output ----------------------------------------------------------------

    def say(self, message: str) -> None:
        """The task's progress, on stderr."""
        with self._print:
            print(f"[{self.plan.identity.family}] {message}", file=self.err, flush=True)

    def relay(self, name: str, run: ContainerRun, tty: bool) -> None:
        """A container's output, line by line on stdout, each prefixed with its name.

        Followed while the container runs; once it has stopped, read again whole, and what the
        follow missed is printed: Docker's follow may end before the last lines of a container
        that exits at once.
        """
        pending = {1: b"", 2: b""}
        shown = {1: 0, 2: 0}
        try:
            for stream, chunk in self.docker.logs(run.docker_id, tty):
                shown[stream] = shown.get(stream, 0) + len(chunk)
                self.show(name, pending, stream, chunk)
            seen = {1: 0, 2: 0}
            for stream, chunk in self.docker.logs(run.docker_id, tty, follow=False):
                start, seen[stream] = seen.get(stream, 0), seen.get(stream, 0) + len(chunk)
                missed = chunk[max(0, shown.get(stream, 0) - start):]
                if missed:
                    self.show(name, pending, stream, missed)
        except (ApiError, LookupError) as exc:
            self.say(f"{name}: its output cannot be read: {exc}")
        with self._print:
            for rest in pending.values():
                if rest:
                    self.out.write(f"{name} | {rest.decode(errors='replace')}\n")
            self.out.flush()

    def show(self, name: str, pending: dict[int, bytes], stream: int, chunk: bytes) -> None:
        lines = (pending.get(stream, b"") + chunk).split(b"\n")
        pending[stream] = lines.pop()
        with self._print:
            for line in lines:
                self.out.write(f"{name} | {line.decode(errors='replace').rstrip(chr(13))}\n")
            self.out.flush()

    # -- the task's life -------------------------------------------------------

    def request_stop(self, signum: int, _frame: Any = None) -> None:
        if self.stopping.is_set():
            self.hurry.set()
            self.say("stopping without waiting for stop timeouts")
        self.signal_exit = 128 + signum
        self.stopping.set()
        with self.task.changed:
            self.task.changed.notify_all()

    def run(self) -> int:
        """The task from start to stop; what `run` exits with."""
        exit_code = 1
        try:
            for warning in self.plan.warnings:
                self.say(f"warning: {warning}")
            if self.plan.definition.get("enableFaultInjection"):
                self.say(self.endpoints.faults.means_status())
            self.check_role()
            self.check_execution_role()
            self.fetch_references()
            threading.Thread(target=job("task events", "docker:inspect").target(self.follow_events),
                             args=(self.docker.task_events(self.plan.identity.arn),), name="task-events",
                             daemon=True).start()
            self.pull_images()
            self.create_volumes()
            self.start_holders()
            exit_code = self.start_containers()
        except TaskStopping as stop:
            self.task.stop(stop.reason)
            exit_code = stop.exit_code
        except ApiError as exc:
            self.task.stop(f"{exc.code}: {exc.message}")
        finally:
            self.stop_containers()
            self.remove_everything()
        self.say(f"task STOPPED: {self.task.stopped_reason}")
        return exit_code

    def check_stop(self) -> None:
        if self.stopping.is_set():
            raise TaskStopping("Task stopped by user", self.signal_exit)

    def check_role(self) -> None:
        """The task role, assumed once before anything starts."""
        role = self.plan.definition.get("taskRoleArn")
        if role:
            self.assume(role, "task role", "CannotAssumeTaskRole")
            self.say(f"task role {role}: credentials at /v2/credentials/<id>")

    def check_execution_role(self) -> None:
        """The execution role, assumed before anything is fetched with it, as the agent has it."""
        role = self.plan.definition.get("executionRoleArn")
        if role and not self.own_identity:
            self.fetch_credentials = self.assume(role, "execution role", "CannotAssumeExecutionRole",
                                                 "\n(--own-identity fetches with your identity instead)")
            self.say(f"execution role {role}: secrets, environment files and registry credentials fetched with it")

    def assume(self, role: str, what: str, reason: str, hint: str = "") -> Credentials:
        """A role the developer's identity assumes for the task; one it cannot stops the task
        before anything starts, with the trust policy statement that would let it."""
        try:
            return self.endpoints.vendor.role_arn(role).credentials
        except ApiError as exc:
            caller = None
            with contextlib.suppress(Exception):
                caller = self.endpoints.identity.get_caller_identity()["Arn"]
            advice = f"\n{trust_policy_advice(role, caller)}" if exc.code == "AccessDenied" else ""
            self.say(f"cannot assume the {what}: {exc.message}{advice}{hint}")
            raise TaskStopping(f"{reason}: {exc.message}", 1) from None

    def fetcher(self) -> str:
        role = self.plan.definition.get("executionRoleArn")
        return f"the execution role {role}" if self.fetch_credentials is not None else "your identity"

    def aws(self, action: str, resource: str, where: str, call: Callable[[], Any]) -> Any:
        """One fetch; a refusal stops the task before anything starts, naming who asked for what."""
        try:
            return call()
        except Exception as exc:
            error = aws_error(exc, action.split(":")[1], self.endpoints.identity.profile)
            raise TaskStopping(f"{where}: {self.fetcher()} could not {action} on {resource}: {error.message}",
                               1) from None

    def fetch_references(self) -> None:
        """Every container's environment files and secrets (and its registry's credentials),
        fetched before any container is created, as the agent's task resources are."""
        region = self.plan.identity.region
        for planned in self.plan.containers:
            definition = planned.definition
            files = [self.read_environment_file(file, planned.name) for file in
                     definition.get("environmentFiles") or []]
            secrets = {name: self.read_secret(reference, f"container {planned.name}, secret {name}")
                       for name, reference in container_secrets(definition, region).items()}
            secrets = {name: value for name, value in secrets.items() if not name.startswith("log option ")}
            self.fetched[planned.name] = (files, secrets)
            parameter = (definition.get("repositoryCredentials") or {}).get("credentialsParameter")
            if parameter:
                where = f"container {planned.name}, repositoryCredentials"
                document = self.read_secret(secret_reference(parameter, region), where)
                try:
                    login = json.loads(document)
                    self.registry_auth[definition["image"]] = registry_auth(login["username"], login["password"],
                                                                            registry_of(definition["image"]))
                except (ValueError, KeyError, TypeError):
                    raise TaskStopping(f"{where}: secret {parameter} must be JSON with username and password", 1
                                       ) from None
            if files or secrets:
                self.say(f"{planned.name}: {len(files)} environment files and {len(secrets)} secrets fetched")

    def read_environment_file(self, file: dict, container: str) -> dict[str, str]:
        kind, location, key = environment_file_source(file)
        where = f"container {container}, environment file {file['value']}"
        if kind == "file":
            try:
                with open(location, encoding="utf-8") as local:
                    return parse_env_file(local.read())
            except OSError as exc:
                raise TaskStopping(f"{where}: {exc.strerror}", 1) from None
        content = self.aws("s3:GetObject", f"arn:aws:s3:::{location}/{key}", where,
                           lambda: self.endpoints.identity.get_object(location, key, self.fetch_credentials))
        return parse_env_file(content.decode("utf-8", errors="replace"))

    def read_secret(self, reference: SecretReference, where: str) -> str:
        identity = self.endpoints.identity
        if reference.service == "ssm":
            reply = self.aws(reference.action, reference.resource, where, lambda: identity.get_parameters(
                [reference.identifier], reference.region, self.fetch_credentials))
            if not reply.get("Parameters"):
                raise TaskStopping(f"{where}: no SSM parameter {reference.identifier} in {reference.region}", 1)
            return reply["Parameters"][0]["Value"]
        secret = self.aws(reference.action, reference.resource, where, lambda: identity.get_secret_value(
            reference.identifier, reference.version_stage, reference.version_id, reference.region,
            self.fetch_credentials))
        try:
            return secret_value(secret, reference, where)
        except ValueError as exc:
            raise TaskStopping(str(exc), 1) from None

    def follow_events(self, events: Iterator[dict]) -> None:
        """Docker's events for the task's containers: each one re-inspected into the TaskRun."""
        names = {c.planned.docker_name for c in self.task.containers.values()}
        try:
            for event in events:
                name = ((event.get("Actor") or {}).get("Attributes") or {}).get("name")
                if name in names and event.get("status") not in ("destroy", "remove"):
                    self.refresh(name)
        except ApiError as exc:
            log.debug("event stream ended: %s", exc.message)

    def refresh(self, docker_name: str) -> None:
        """The container inspected again into the TaskRun, and what changed said once (the event
        thread and the main thread both refresh)."""
        with self._refreshing:
            run = self.task.containers[docker_name]
            before = (run.known, run.health())
            try:
                self.task.update(docker_name, self.docker.inspect(docker_name))
            except (LookupError, ApiError):
                return
            self.endpoints.stats.follow(self.task.snapshot)
            self._say_changes(run, before)

    def _say_changes(self, run: ContainerRun, before: tuple[str, str]) -> None:
        after = (run.known, run.health())
        if after == before or run.planned.is_holder:
            return
        if after[1] != before[1] and after[1] in ("healthy", "unhealthy"):
            self.say(f"{run.planned.name}: {after[1]}")
        if after[0] == "STOPPED" and before[0] != "STOPPED":
            self.say(f"{run.planned.name}: exited with code {run.exit_code}")
        if not self._said_running and self.task.known_status() in ("RUNNING", "STOPPED"):
            self._said_running = True
            self.say(f"task RUNNING: {self.plan.identity.arn}")

    def pull_images(self) -> None:
        """Images the engine lacks, pulled before any container is created, as the agent does."""
        self.task.pull_started = now_text()
        for image in self.plan.images():
            self.check_stop()
            if self.pull != "always":
                try:
                    self.docker.image(image)
                    continue
                except LookupError:
                    if self.pull == "never":
                        raise TaskStopping(f"CannotPullContainerError: {image}: not on this engine, and "
                                           "--pull never", 1) from None
            started = time.monotonic()
            try:
                self.docker.pull(image, self.pull_auth(image))
            except (ApiError, LookupError) as exc:
                message = exc.message if isinstance(exc, ApiError) else "no such image"
                if image in {holder.body["Image"] for holder in self.plan.holders}:
                    message += " (the network namespace holder's image: --pause-image names another)"
                raise TaskStopping(f"CannotPullContainerError: {image}: {message}", 1) from None
            self.say(f"pulled {image} in {time.monotonic() - started:.1f} s")
        self.task.pull_stopped = now_text()
        for run in self.task.containers.values():
            self.task.update(run.planned.docker_name, known="PULLED")

    def pull_auth(self, image: str) -> str | None:
        """The registry's credentials: repositoryCredentials' secret, or for ECR a token from
        ecr:GetAuthorizationToken; none for a public image."""
        if image in self.registry_auth:
            return self.registry_auth[image]
        ecr = ECR_REGISTRY.fullmatch(registry_of(image))
        if not ecr:
            return None
        data = self.aws("ecr:GetAuthorizationToken", f"the registry {registry_of(image)}", f"image {image}",
                        lambda: self.endpoints.identity.get_authorization_token(ecr[1], self.fetch_credentials))
        return ecr_registry_auth(data, registry_of(image))

    def create_volumes(self) -> None:
        for name, body in self.plan.volumes:
            self.docker.create_volume(body)
        for volume in self.plan.definition.get("volumes") or []:
            config = volume.get("dockerVolumeConfiguration") or {}
            if config.get("scope") != "shared":
                continue
            try:
                self.docker.volume(volume["name"])
            except LookupError:
                if not config.get("autoprovision"):
                    raise TaskStopping(f"volume '{volume['name']}' does not exist and autoprovision is set "
                                       "to false", 1) from None
                self.docker.create_volume({"Name": volume["name"], "Driver": config.get("driver") or "local",
                                           "DriverOpts": config.get("driverOpts") or {},
                                           "Labels": config.get("labels") or {}})

    def start_holders(self) -> None:
        """The network namespaces, each held by a pause container with the endpoints in it;
        host mode serves them in this process's namespace (the host's, or the image's with
        --network host)."""
        if self.plan.network_mode == "host":
            self.serve_in(None, frozenset(c.name for c in self.plan.containers))
        for holder in self.plan.holders:
            self.check_stop()
            body = copy.deepcopy(holder.body)
            for alias, target in holder.links.items():   # bridge links, as Docker's /etc/hosts entries
                address = self.address_of(self.task.by_name(f"{target} netns"))
                body["HostConfig"]["ExtraHosts"].append(f"{alias}:{address}")
            self.docker.create(holder.docker_name, body)
            self.docker.start(holder.docker_name)
            self.refresh(holder.docker_name)
            run = self.task.containers[holder.docker_name]
            served = frozenset(c.name for c in self.plan.containers if c.holder == holder.docker_name)
            self.serve_in(run.inspect["State"]["Pid"], served)

    @staticmethod
    def address_of(run: ContainerRun) -> str:
        networks = ((run.inspect or {}).get("NetworkSettings") or {}).get("Networks") or {}
        return next((n["IPAddress"] for n in networks.values() if n.get("IPAddress")), "127.0.0.1")

    def serve_in(self, pid: int | None, served: frozenset[str]) -> None:
        """The endpoints at 169.254.170.2:80 in the network namespace of process pid."""
        try:
            listening, added = in_network_namespace(pid, lambda: endpoints_socket(80))
        except OSError as exc:
            raise TaskStopping(f"cannot serve the endpoints at {ENDPOINTS_ADDRESS} in the task's network "
                               f"namespace ({exc.strerror or exc}): run needs root on Linux, and in the image "
                               "--cap-add SYS_ADMIN --cap-add NET_ADMIN --pid host (and --network host for "
                               "host-mode tasks)", 1) from None
        self.host_address_added |= pid is None and added
        server = EndpointsServer((ENDPOINTS_ADDRESS, 80), self.endpoints, self.endpoints.config.max_connections,
                                 listening=listening, namespace=served)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="http-task",
                         daemon=True).start()
        self.servers.append(server)

    def start_containers(self) -> int:
        """Each container created and started once what it depends on is met; until the task stops.
        Returns the exit code of the essential container whose exit stopped the task."""
        pending = [c.name for c in self.plan.containers]
        while True:
            self.check_stop()
            with self.task.changed:
                ended = [c for c in self.plan.containers
                         if c.essential and self.task.containers[c.docker_name].known == "STOPPED"]
                if ended:
                    code = self.task.containers[ended[0].docker_name].exit_code or 0
                    self.task.stop("Essential container in task exited")
                    return code
            for name in list(pending):
                planned = self.plan.container(name)
                verdicts = [dependency_verdict(condition, self.task.by_name(dependency), datetime.now(timezone.utc))
                            for dependency, condition in planned.depends_on.items()]
                failed = [reason for verdict, reason in verdicts if verdict == "failed"]
                if failed:
                    pending.remove(name)
                    self.task.update(planned.docker_name, known="STOPPED", reason=failed[0])
                    self.say(f"{name}: not started: {failed[0]}")
                    if planned.essential:
                        raise TaskStopping(f"CannotStartContainerError: {failed[0]}", DEPENDENCY_EXIT_CODE)
                elif all(verdict == "met" for verdict, _ in verdicts):
                    pending.remove(name)
                    self.start(planned)
            with self.task.changed:
                self.task.changed.wait(0.5)

    def start(self, planned: PlannedContainer) -> None:
        self.check_stop()
        try:
            files, secrets = self.fetched.get(planned.name, ([], {}))
            image_env = (self.docker.image(planned.body["Image"])["Config"].get("Env") or []) \
                if planned.agent_region else []
            body = complete_environment(planned.body, planned.agent_region, files, secrets, image_env)
            self.docker.create(planned.docker_name, body)
            self.refresh(planned.docker_name)
            self.say(f"{planned.name}: created ({planned.docker_name})")
            self.docker.start(planned.docker_name)
        except (ApiError, LookupError) as exc:
            reason = f"CannotStartContainerError: {exc.message if isinstance(exc, ApiError) else exc}"
            self.task.update(planned.docker_name, known="STOPPED", reason=reason)
            self.say(f"{planned.name}: {reason}")
            if planned.essential:
                raise TaskStopping(reason, 1) from None
            return
        self.refresh(planned.docker_name)
        self.say(f"{planned.name}: started")
        run = self.task.containers[planned.docker_name]
        relay = threading.Thread(target=job("container output", "docker:logs").target(self.relay),
                                 args=(planned.name, run, bool(planned.body.get("Tty"))), name=f"logs-{planned.name}",
                                 daemon=True)
        relay.start()
        self.log_threads.append(relay)

    def stop_containers(self) -> None:
        """Running containers stopped as the agent stops them: each after every container that
        depends on it has stopped, the others in parallel, each with its stopTimeout; holders last."""
        dependents = {c.name: {d.name for d in self.plan.containers if c.name in d.depends_on}
                      for c in self.plan.containers}
        running = {c.name for c in self.plan.containers
                   if self.task.containers[c.docker_name].known in ("RUNNING", "CREATED")}
        while running:
            wave = [name for name in running if not dependents[name] & running]
            in_parallel(self.stop_one, [self.plan.container(name) for name in wave])
            running -= set(wave)

    def stop_one(self, planned: PlannedContainer) -> None:
        if self.task.containers[planned.docker_name].known == "STOPPED":
            return
        with contextlib.suppress(ApiError, LookupError):
            self.docker.stop(planned.docker_name, 0 if self.hurry.is_set() else planned.stop_timeout)
        self.refresh(planned.docker_name)

    def remove_everything(self) -> None:
        """Every container, holder and task-scoped volume the task created, and the endpoints'
        listeners: nothing is left behind, whatever stopped the task."""
        self.endpoints.faults.remove_all("the task stopped")   # while its namespaces are there
        for thread in self.log_threads:   # every container has stopped: its output ends
            thread.join(timeout=LOG_DRAIN_SECONDS)
        in_parallel(lambda server: (server.shutdown(), server.server_close()), self.servers)
        if self.host_address_added:
            with contextlib.suppress(OSError):
                remove_endpoints_address()
        in_parallel(self.remove_one, [c.docker_name for c in self.plan.containers])
        in_parallel(self.remove_one, [h.docker_name for h in self.plan.holders])   # killed as they go
        for name, _ in self.plan.volumes:
            with contextlib.suppress(ApiError, LookupError):
                self.docker.remove_volume(name)

    def remove_one(self, docker_name: str) -> None:
        with contextlib.suppress(ApiError, LookupError):
            self.docker.remove(docker_name)


# ---------------------------------------------------------------------------
# main()
# ---------------------------------------------------------------------------

class LineHandler(logging.Handler):
    """Each log line written whole, with one write(2) to a file descriptor and no lock.

    logging.StreamHandler formats, writes and flushes under one lock: with an audit line
    for every credentials answer from many handler threads, waiting for that lock cost
    more than the rest of a cached request (bench/creds.py at INFO).  One write(2) of a
    whole line needs none: the kernel does not mix concurrent writes to one open file,
    nor a pipe's of up to PIPE_BUF (4096) bytes, more than any audit line takes
    (AUDIT_TEXT_LIMIT); a longer line, such as a traceback, may be split on a pipe.
    A line is written, in the kernel's hands, when write(2) returns: before the answer
    it records is sent.

    The audit trail hands its lines to write_line() (see AuditTrail): the same text as a
    record would give, from the same FORMAT, without the LogRecord, its dispatch and its
    Formatter, which cost more than the rest of a cached credentials request.
    """

    FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"   # the message last: see write_line()

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd
        self.setFormatter(logging.Formatter(self.FORMAT))
        self._second: tuple[int, str] = (-1, "")   # a second and its time text, replaced whole
        # (level, logger name, second, millisecond) and the line's text up to its message, replaced whole
        self._head: tuple[tuple[int, str, int, int], str] = ((0, "", -1, 0), "")

    def createLock(self) -> None:
        self.lock = None   # Handler.acquire() and release() do nothing without one

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._write(self.format(record))
        except Exception:
            self.handleError(record)

    def write_line(self, levelno: int, name: str, message: str) -> None:
        """message as a record of logger name at levelno would be written, with Formatter's own
        time format; the time text of a second is made once."""
        if levelno < self.level:
            return
        now = time.time()
        key = (levelno, name, int(now), int((now - int(now)) * 1000))
        stamp, head = self._head
        if stamp != key:   # lines of the same millisecond share their head
            second, text = self._second
            if second != key[2]:
                second, text = self._second = (key[2], time.strftime(logging.Formatter.default_time_format,
                                                                     time.localtime(now)))
            asctime = logging.Formatter.default_msec_format % (text, key[3])
            head = self.FORMAT % {"asctime": asctime, "levelname": logging.getLevelName(levelno), "name": name,
                                  "message": ""}
            self._head = (key, head)
        self._write(head + message)

    def _write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "backslashreplace")
        while data:
            data = data[os.write(self.fd, data):]


def sole_line_handler(logger: logging.Logger) -> LineHandler | None:
    """The LineHandler that alone writes logger's records, with no filter on the way (how
    main() configures logging), else None."""
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        handlers += current.handlers
        current = current.parent if current.propagate else None
    if len(handlers) == 1 and isinstance(handlers[0], LineHandler) and not handlers[0].filters:
        return handlers[0]
    return None


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, handlers=[LineHandler(sys.stderr.fileno())], format=LineHandler.FORMAT)
    # botocore's DEBUG log prints STS replies, secret keys included: never below WARNING.
    for noisy in ("botocore", "boto3", "urllib3", "requests", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def health_check(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """GET /health of the server these settings describe: 0 if it answers 200, else 1."""
    config = load_config(args, environ)
    host, port = ("127.0.0.1" if config.bind in ("0.0.0.0", "::") else config.bind), config.port
    try:
        connection = http.client.HTTPConnection(host, port, timeout=3)
        connection.request("GET", "/health")
        status = connection.getresponse().status
    except OSError as exc:
        print(f"local-endpoints: no answer on {host} port {port}: {exc}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


TASK_DEFINITION_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}(:[0-9]+)?|arn:aws[a-z-]*:ecs:[^:]*:[0-9]{12}:"
                                  r"task-definition/[A-Za-z0-9_-]{1,255}(:[0-9]+)?")


def parse_run_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="local_endpoints.py run",
        description="Run an ECS task definition on this Docker Engine as the ECS agent runs it: its containers "
                    "in dependency order, its task role, and the endpoints at 169.254.170.2 in each network "
                    "namespace. Needs root on Linux (in the image: --cap-add SYS_ADMIN --cap-add NET_ADMIN "
                    "--pid host). Stops the task on Ctrl-C or SIGTERM and removes everything it created.",
        epilog="exit status: that of the essential container whose exit stopped the task; 2 for invalid "
               "input; 1 when the task could not start; 130/143 when stopped by Ctrl-C/SIGTERM")
    parser.add_argument("taskdef", help="a JSON file (register-task-definition input or describe-task-definition "
                                        "output), or family[:revision] or a task definition ARN to read with "
                                        "ecs:DescribeTaskDefinition")
    parser.add_argument("--cluster", help="the cluster name or ARN in the task's metadata (default: CLUSTER_ARN)")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="a task tag, beside the registered ones (repeatable)")
    parser.add_argument("--env-file", action="append", default=[], metavar="PATH",
                        help="VARIABLE=VALUE lines for every container; the task definition's environment "
                             "and secrets win over it, it wins over its environmentFiles (repeatable: as ECS "
                             "merges environment files, the first file that sets a variable wins)")
    parser.add_argument("--publish-address", default="127.0.0.1", metavar="ADDRESS",
                        help="host address port mappings are published on (default 127.0.0.1)")
    parser.add_argument("--pull", choices=("always", "missing", "never"), default="missing",
                        help="pull images always, only when the engine lacks them (the default, as docker run), "
                             "or never")
    parser.add_argument("--own-identity", action="store_true",
                        help="fetch secrets, environment files and registry credentials with your identity, "
                             "not the task definition's execution role")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the Docker create bodies (secrets masked) and the AWS calls the task would "
                             "make, and make none of them")
    parser.add_argument("--pause-image", default=DEFAULT_PAUSE_IMAGE, metavar="IMAGE",
                        help=f"the image of the containers that hold network namespaces (default "
                             f"{DEFAULT_PAUSE_IMAGE}; any image whose default command waits forever)")
    return parser.parse_args(argv)


def load_run(args: argparse.Namespace, config: Config, identity: AwsApi) -> TaskPlan:
    """The plan for `run`'s arguments; TaskDefinitionError (or OSError, ValueError) for bad input."""
    if os.path.exists(args.taskdef):
        with open(args.taskdef, encoding="utf-8") as file:
            try:
                document = json.load(file)
            except ValueError as exc:
                raise TaskDefinitionError(args.taskdef, f"not JSON: {exc}") from None
    elif TASK_DEFINITION_NAME.fullmatch(args.taskdef):
        try:
            document = identity.describe_task_definition(args.taskdef)
        except Exception as exc:
            raise TaskDefinitionError(args.taskdef, aws_error(exc, "DescribeTaskDefinition", identity.profile).message
                                      ) from None
    else:
        raise TaskDefinitionError(args.taskdef, "no such file, and not a family[:revision] or task definition ARN")
    definition, tags = read_task_definition(document)
    env_file: dict[str, str] = {}
    for path in args.env_file:
        with open(path, encoding="utf-8") as file:
            for name, value in parse_env_file(file.read()).items():
                env_file.setdefault(name, value)
    try:
        extra_tags = parse_tags(",".join(args.tag)) if args.tag else {}
    except ValueError as exc:
        raise TaskDefinitionError("--tag", str(exc)) from None
    options = RunOptions(cluster=args.cluster or config.cluster_arn, region=identity.region,
                         publish_address=args.publish_address, pause_image=args.pause_image,
                         env_file=env_file, tags=extra_tags)
    return plan_task(definition, tags, options)


def dry_run(plan: TaskPlan, own_identity: bool) -> dict:
    """What `run --dry-run` prints: the task, the AWS calls it would make, what it would create."""
    region = plan.identity.region
    return {
        "taskArn": plan.identity.arn,
        "awsCalls": planned_aws_calls(plan, own_identity),
        "volumes": [body for _, body in plan.volumes],
        "containers": [{"name": c.name, "dockerName": c.docker_name,
                        "environmentFiles": [f["value"] for f in c.definition.get("environmentFiles") or []],
                        "body": masked_body(c.body, container_secrets(c.definition, region))}
                       for c in (*plan.holders, *plan.containers)],
    }


def run_main(argv: list[str]) -> int:
    """`run TASKDEF`: the task in the foreground; its exit status as TaskRunner.run gives it."""
    args = parse_run_args(argv)
    try:
        configure_logging(log_level(parse_args([]), os.environ))
        config = load_config(parse_args([]), os.environ)
        identity = AwsIdentity(config)
        plan = load_run(args, config, identity)
        endpoints = build_endpoints(config, DockerClient(config.docker_host), identity, TaskRun(plan))
    except (ConfigError, TaskDefinitionError) as exc:
        print(f"local-endpoints run: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"local-endpoints run: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(dry_run(plan, args.own_identity), indent=2))
        return 0
    runner = TaskRunner(endpoints, endpoints.task_run, args.pull, args.own_identity)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, runner.request_stop)
    return runner.run()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        with job("run", "ecs:DescribeTaskDefinition", "boto3:credential-chain", "sts:AssumeRole",
                 "sts:GetCallerIdentity", "s3:GetObject", "ssm:GetParameters", "secretsmanager:GetSecretValue",
                 "ecr:GetAuthorizationToken", "docker:task_events", "docker:image", "docker:pull",
                 "docker:create_volume", "docker:volume", "docker:create", "docker:start", "docker:inspect",
                 "docker:stop", "docker:remove", "docker:remove_volume").declared():
            return run_main(argv[1:])
    args = parse_args(argv)
    if args.generate_token:
        print(secrets.token_urlsafe(32))
        return 0
    try:
        configure_logging(log_level(args, os.environ))   # before load_config: it may warn
        if args.health_check:
            return health_check(args, os.environ)
        config = load_config(args, os.environ)
        endpoints = build_endpoints(config, DockerClient(config.docker_host), AwsIdentity(config))
    except ConfigError as exc:
        print(f"local-endpoints: {exc}", file=sys.stderr)
        return 2
    try:
        server = EndpointsServer((config.bind, config.port), endpoints, config.max_connections)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EACCES and config.port < 1024:
            hint = " (ports below 1024 need root; try --port 8080)"
        elif exc.errno == errno.EADDRINUSE:
            hint = " (another process listens there; try another --port)"
        print(f"local-endpoints: cannot listen on {config.bind} port {config.port}: {exc.strerror}{hint}",
              file=sys.stderr)
        return 1

    # sts:GetSessionToken: an MFA profile's session, opened with the code typed at the terminal.
    with job("start-up", "boto3:credential-chain", "sts:GetSessionToken").declared():
        source = endpoints.identity.resolve_at_startup()
    ends = endpoints.identity.mfa_session_ends()
    if ends is not None:
        source += f" until {ends.astimezone(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}"
    log.info("local-endpoints %s on %s port %d; credentials: %s, region %s, STS %s, IAM %s; roles: %s; "
             "Docker %s", VERSION, config.bind, server.server_port, source, endpoints.identity.region,
             config.sts_endpoint or "default", config.iam_endpoint or "default", config.allowed_roles or "any",
             endpoints.docker.host)
    log.info("%s", endpoints.family(ImdsRoutes).status(endpoints.access.imds_on))
    log.info("%s", endpoints.faults.means_status())
    endpoints.view.start()

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http",
                     daemon=True).start()
    while not stop.wait(0.5):
        pass
    log.info("stopping")
    server.shutdown()
    server.server_close()
    endpoints.faults.remove_all("the server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
