"""The deliveries part of the demo (README "Delivering events: webhooks and
mail"), run by tests/demo.py after the events part: a Teams-format sink
pointing at a local receiver that stands in for a Teams incoming webhook;
the emulator fails a data source refresh, ciflow.poll records the event
and its delivery in one transaction, and one delivery pass
(CALL ciflow.deliver(), what the worker will run on its own) posts the card,
which the receiver prints."""

import json

from extension.receivers import HttpReceiver


def run(pg, emu):
    print("== Deliveries: a Teams channel hears of a failed refresh")
    teams = HttpReceiver()
    try:
        url = teams.url("/webhookb2/demo")
        print(f"-- a stand-in for a Teams incoming webhook listens at {url}")
        pg.sql("SELECT ciflow.add_sink('ops-teams', %s, format => 'teams',"
               " kinds => ARRAY['datasource_refresh_failed'], connection => 'contoso')", (url,))
        for row in pg.sql("SELECT name, format, kinds::text, connection FROM ciflow.sinks"):
            print(f"   ciflow.sinks: {row}")
        print("-- the emulator recovers, then fails the RetailPos refresh again")
        emu.control("POST", "datasources/RetailPos", {"refreshState": "updated",
                                                      "lastRefresh": "now"})
        pg.sql("SELECT ciflow.poll('contoso')")
        emu.control("POST", "datasources/RetailPos", {"refreshState": "updateFailed",
                                                      "lastRefresh": "now"})
        pg.sql("SELECT ciflow.poll('contoso')")
        for row in pg.sql("SELECT d.id, e.kind, d.status FROM ciflow.deliveries d"
                          " JOIN ciflow.events e ON e.id = d.event_id ORDER BY d.id"):
            print(f"   outbox: delivery {row[0]} of {row[1]}: {row[2]}")
        print("-- CALL ciflow.deliver(): one delivery pass")
        print(f"   attempted: {pg.sql('CALL ciflow.deliver()')[0][0]}")
        for req in teams.received():
            print(f"   [teams] POST {req['path']}  Idempotency-Key: "
                  f"{req['headers']['Idempotency-Key']}")
            for line in json.dumps(json.loads(req["body"]), indent=2).splitlines():
                print(f"   [teams] {line}")
        for row in pg.sql("SELECT id, sink, status, attempts, last_status FROM ciflow.deliveries"):
            print(f"   ciflow.deliveries: {row}")
    finally:
        teams.stop()
