"""Mail deliveries (issue 13): SMTP through libcurl, plain, STARTTLS (offered
or required), implicit TLS (smtps://) and AUTH, against an aiosmtpd server
started by the tests."""

from email import message_from_bytes, policy

import pytest

from extension.cihelpers import dict_rows
from extension.eventhelpers import RETAIL_POS, poll, set_datasource
from extension.eventhelpers import clean  # noqa: F401 - fixture
from extension.receivers import SmtpReceiver, deliver
from extension.receivers import tls_dir  # noqa: F401 - fixture
from extension.test_delivery import event_json


@pytest.fixture
def mailbox(ciflow_db, clean):
    poll(ciflow_db)
    servers = []

    def start(**kw):
        s = SmtpReceiver(**kw)
        servers.append(s)
        return s
    yield start
    ciflow_db.sql("SELECT ciflow.drop_sink(name) FROM ciflow.sink_settings")
    for s in servers:
        s.stop()


def failed_refresh(db, emu):
    set_datasource(emu, "RetailPos", refreshState="updateFailed", lastRefresh="now")
    new = poll(db)
    assert len(new) == 1
    return new[0]


def add_mail_sink(db, url, **kw):
    args = dict(mail_from="ciflow@example.com", mail_to=["owner@example.com", "ops@example.org"])
    args.update(kw)
    names = ", ".join(f"{k} => %({k})s" for k in args)
    db.sql(f"SELECT ciflow.add_sink('mail', %(url)s, format => 'mail', {names})",
           dict(args, url=url))


def only_delivery(db):
    rows = dict_rows(db, "SELECT * FROM ciflow.deliveries")
    assert len(rows) == 1
    return rows[0]


def test_plain_mail_lists_the_event(ciflow_db, mailbox, emulator):
    smtp = mailbox()
    add_mail_sink(ciflow_db, smtp.url())
    ev = failed_refresh(ciflow_db, emulator)
    assert deliver(ciflow_db) == 1
    assert len(smtp.mails) == 1
    mail = smtp.mails[0]
    assert mail["from"] == "ciflow@example.com"
    assert mail["to"] == ["owner@example.com", "ops@example.org"]
    msg = message_from_bytes(mail["data"], policy=policy.default)
    assert msg["Subject"] == f"[ciflow] datasource_refresh_failed: {RETAIL_POS}"
    assert msg["Message-ID"] == f"<ciflow-event-{ev['id']}@example.com>"
    assert msg["From"] == "ciflow@example.com"
    assert msg["To"] == "owner@example.com, ops@example.org"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    created = event_json(ev)["created_at"]
    want = [f"id: {ev['id']}", "kind: datasource_refresh_failed", "connection: emu",
            f"subject: {RETAIL_POS}", f"created_at: {created}"]
    want += [f"{k}: {v}" for k, v in ev["payload"].items()]
    assert msg.get_content().splitlines() == want
    row = only_delivery(ciflow_db)
    assert (row["status"], row["attempts"], row["last_status"]) == ("delivered", 1, 250)


def send_with_auth(db, mailbox, emulator, tls_dir, password):
    """One mail over STARTTLS to a server that wants ciflow/pa55word."""
    smtp = mailbox(tls_dir=tls_dir, auth=("ciflow", "pa55word"))
    add_mail_sink(db, smtp.url(), username="ciflow", password=password,
                  ca_file=tls_dir + "/ca.pem")
    failed_refresh(db, emulator)
    assert deliver(db) == 1
    return smtp


def test_starttls_and_auth(ciflow_db, mailbox, emulator, tls_dir):
    smtp = send_with_auth(ciflow_db, mailbox, emulator, tls_dir, "pa55word")
    assert only_delivery(ciflow_db)["status"] == "delivered"
    assert [m["tls"] for m in smtp.mails] == [True]
    assert [(login, tls) for _, login, _, tls in smtp.logins] == [(b"ciflow", True)]
    sink = dict_rows(ciflow_db, "SELECT has_secret, has_password FROM ciflow.sinks")[0]
    assert sink == {"has_secret": False, "has_password": True}


def test_wrong_password_fails_at_once(ciflow_db, mailbox, emulator, tls_dir):
    smtp = send_with_auth(ciflow_db, mailbox, emulator, tls_dir, "wrong")
    row = only_delivery(ciflow_db)
    assert (row["status"], row["attempts"], row["last_status"]) == ("failed", 1, None)
    assert row["last_error"].startswith("SMTP authentication failed")
    assert "wrong" not in row["last_error"]
    assert smtp.mails == []


def test_require_tls_refuses_a_server_without_starttls(ciflow_db, mailbox, emulator):
    smtp = mailbox()
    add_mail_sink(ciflow_db, smtp.url(), require_tls=True)
    failed_refresh(ciflow_db, emulator)
    assert deliver(ciflow_db) == 1
    row = only_delivery(ciflow_db)
    assert row["status"] == "pending"               # a transport failure: retried
    assert "ssl" in row["last_error"].lower() or "tls" in row["last_error"].lower()
    assert smtp.mails == []


def test_smtps_is_tls_from_the_start(ciflow_db, mailbox, emulator, tls_dir):
    smtp = mailbox(tls_dir=tls_dir, implicit_tls=True)
    add_mail_sink(ciflow_db, smtp.url("smtps"), ca_file=tls_dir + "/ca.pem")
    failed_refresh(ciflow_db, emulator)
    assert deliver(ciflow_db) == 1
    assert only_delivery(ciflow_db)["status"] == "delivered"
    assert len(smtp.mails) == 1
