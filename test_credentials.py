"""Credentials: the vendor's memory of what AWS said (per-key locks, roles that do not exist, the
account of IMDS's credentials).

STS and IAM are moto_server behind the counting proxy, so the tests count the AWS calls
that really happened.
"""

from __future__ import annotations

import json
import threading

import local_endpoints as le
from testlib import aws_env, http_request


def test_keyed_locks_drop_a_key_when_nobody_holds_or_waits_for_it():
    locks = le.KeyedLocks()
    with locks("role-name:a"):
        assert len(locks) == 1
        assert locks.try_hold("role-name:a") is None   # held: a refresh would not start
        assert len(locks) == 1
    assert len(locks) == 0
    release = locks.try_hold("role-name:b")
    assert release is not None and len(locks) == 1
    release()
    assert len(locks) == 0

    entered, order = threading.Event(), []

    def holder():
        with locks("k"):
            entered.set()
            order.append("first")
            waiter_started.wait(5)

    waiter_started = threading.Event()

    def waiter():
        waiter_started.set()
        with locks("k"):
            order.append("second")

    first = threading.Thread(target=holder)
    first.start()
    entered.wait(5)
    second = threading.Thread(target=waiter)
    second.start()
    first.join(5)
    second.join(5)
    assert order == ["first", "second"] and len(locks) == 0


def test_a_role_that_does_not_exist_is_remembered_for_a_while(start_server, moto):
    server = start_server(env=aws_env(moto))
    moto.reset_counts()
    answers = [http_request(server.url, path="/role/le-no-such-role") for _ in range(3)]
    assert [status for status, _, _ in answers] == [404, 404, 404]
    first, later = json.loads(answers[0][2]), json.loads(answers[2][2])
    assert first["code"] == later["code"] == "NoSuchRole"
    assert "IAM said so" not in first["message"]
    assert "IAM said so" in later["message"] and f"{le.MISSING_ROLE_SECONDS} s" in later["message"]
    assert moto.count("GetRole") == 1   # once, not once per request


def test_imds_account_id_is_the_one_the_credentials_carry(start_server, moto, secrets):
    server = start_server(env=aws_env(moto, ECS_LOCAL_IMDS="ON"))
    moto.reset_counts()
    status, _, session = http_request(server.url, "PUT", "/latest/api/token",
                                      {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    assert status == 200
    secrets.add(session.decode(), "IMDS session token")
    for _ in range(3):
        status, _, body = http_request(server.url, path="/latest/dynamic/instance-identity/document",
                                       headers={"X-aws-ec2-metadata-token": session.decode()})
        assert status == 200 and json.loads(body)["accountId"] == "123456789012"
    status, _, body = http_request(server.url, path="/creds")
    document = json.loads(body)
    secrets.add(document["SecretAccessKey"], "secret access key")
    secrets.add(document["Token"], "session token")
    assert document["AccountId"] == "123456789012"
    assert moto.count("GetCallerIdentity") == 1   # one for the identity, shared by IMDS and /creds
