"""The host status store (masq.hoststat) and the hoststat / purgestat commands."""
import os

import pytest
from conftest import clean_env, run

from masq import hoststat


def test_record_get_list_purge(tmp_path):
    store = hoststat.HostStat(str(tmp_path))
    assert store.get("isp", "smtp.isp.example:587") is None
    store.record("isp", "smtp.isp.example:587", "down", "connect: refused", now=100.0)
    second = store.record("isp", "smtp.isp.example:587", "down", "timeout\r\nafter 30 s",
                          now=200.0)
    assert second.failures == 2 and second.text == "timeout after 30 s"
    store.record("direct", "b.example", "up", "250 ok", now=150.0)
    got = store.get("isp", "smtp.isp.example:587")
    assert (got.status, got.failures, got.updated) == ("down", 2, 200.0)
    assert [(h.route, h.host) for h in store.list()] == [
        ("direct", "b.example"), ("isp", "smtp.isp.example:587")]
    # one success ends the run of failures
    assert store.record("isp", "smtp.isp.example:587", "up", "250 ok").failures == 0
    assert store.purge() == 2
    assert store.list() == []
    store.close()
    assert os.path.exists(tmp_path / "hoststat.db")


def test_a_refused_host_does_not_count_as_down(tmp_path):
    store = hoststat.HostStat(str(tmp_path))
    assert store.record("direct", "x.example", "refused", "554 go away").failures == 0
    with pytest.raises(ValueError):
        store.record("direct", "x.example", "maybe", "")


def test_the_store_is_shared_between_openers(tmp_path):
    a, b = hoststat.HostStat(str(tmp_path)), hoststat.HostStat(str(tmp_path))
    a.record("isp", "h:25", "down", "421 busy")
    assert b.get("isp", "h:25").text == "421 busy"
    a.close()
    b.close()


def test_a_damaged_store_is_an_error_with_a_way_out(tmp_path):
    (tmp_path / "hoststat.db").write_bytes(b"this is not sqlite" * 100)
    store = hoststat.HostStat(str(tmp_path))
    with pytest.raises(hoststat.HostStatError) as e:
        store.get("isp", "h:25")
    assert "purgestat" in str(e.value) and e.value.code == 75
    assert store.purge() == 0 and not os.path.exists(tmp_path / "hoststat.db")
    assert store.get("isp", "h:25") is None


def test_listing_without_a_store_creates_nothing(tmp_path):
    assert hoststat.HostStat(str(tmp_path)).list() == []
    assert not os.path.exists(tmp_path / "hoststat.db")


def test_describe_has_one_line_per_host():
    lines = hoststat.describe([hoststat.Host("isp", "h:25", "down", 3, 0.0, "421 busy")])
    assert lines[0].split()[:3] == ["ROUTE", "HOST", "STATUS"]
    assert lines[1].split()[:3] == ["isp", "h:25", "down*3"] and "421 busy" in lines[1]


def fill(masq):
    store = hoststat.HostStat(masq.spool)
    store.record("isp", "smtp.isp.example:587", "down", "421 4.3.2 busy")
    store.close()


def test_hoststat_and_purgestat_commands(masq):
    env = clean_env()           # DIR/bin/* find DIR/masq.toml by themselves
    out = run([masq.bin("hoststat")], env=env).ok().out.decode()
    assert out.startswith("ROUTE") and out.count("\n") == 1
    fill(masq)
    out = run([masq.bin("hoststat")], env=env).ok().out.decode()
    assert "smtp.isp.example:587" in out and "421 4.3.2 busy" in out
    r = run([masq.bin("purgestat")], env=env).ok()
    assert r.out == b""
    assert "smtp.isp.example" not in run([masq.bin("hoststat")], env=env).ok().out.decode()


def test_sendmail_bh_and_bH(masq):
    fill(masq)
    assert b"smtp.isp.example:587" in masq.run(["masq-inject", "-bh"]).ok().out
    masq.run(["masq-inject", "-bH"]).ok()
    assert b"smtp.isp.example" not in masq.run(["masq-inject", "-bh"]).ok().out


@pytest.mark.parametrize("name", ["hoststat", "purgestat"])
def test_hoststat_and_purgestat_take_no_addresses(masq, name):
    r = run([masq.bin(name), "someone@example.org"], env=clean_env())
    assert r.rc == 64 and b"takes no addresses" in r.err


def test_issue9_forget_drops_one_route_only(tmp_path):
    store = hoststat.HostStat(str(tmp_path))
    store.record("isp", "h:25", "down", "421 busy")
    store.record("isp", "b.example", "refused", "554 no")
    store.record("lan", "h:25", "down", "421 busy")
    assert store.forget("isp") == 2 and store.forget("nosuch") == 0
    assert [(h.route, h.host) for h in store.list()] == [("lan", "h:25")]
    store.close()
    assert hoststat.HostStat(str(tmp_path / "none")).forget("isp") == 0
