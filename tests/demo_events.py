"""The events part of the demo (README "Events"), run by tests/demo.py after
demo.sql: a subscriber session LISTENs on ciflow_events and prints each
notification as it arrives, while the emulator fails a data source refresh,
completes a full refresh (with its unification), and pushes a segment and a
measure over their thresholds; ciflow.poll('contoso') runs after each step,
as a ciflow.watch job will.  Finally the subscriber catches up from
ciflow.events, as an application does after being away."""

import json
import select
import threading
import time


class Subscriber(threading.Thread):
    """LISTEN ciflow_events on a session of its own; prints what arrives."""

    def __init__(self, pg):
        super().__init__(daemon=True)
        self.conn = pg.connect()
        with self.conn.cursor() as cur:
            cur.execute("LISTEN ciflow_events")
        self.stopping = threading.Event()
        self.seen = 0
        self.start()

    def run(self):
        while not self.stopping.is_set():
            if select.select([self.conn], [], [], 0.2)[0]:
                self.conn.poll()
                for n in self.conn.notifies:
                    note = json.loads(n.payload)
                    self.seen += 1
                    print(f"   [subscriber] {note['kind']:<30} {note['subject']:<38} "
                          + json.dumps({k: v for k, v in note.items()
                                        if k not in ("kind", "subject", "connection")}),
                          flush=True)
                del self.conn.notifies[:]

    def stop(self):
        time.sleep(0.5)
        self.stopping.set()
        self.join()
        self.conn.close()


def step(pg, what, action):
    print(f"-- {what}", flush=True)
    action()
    rows = pg.sql("SELECT id, kind FROM ciflow.poll('contoso')")
    print(f"   ciflow.poll('contoso') returned {len(rows)} new event(s)", flush=True)
    time.sleep(0.3)


def run(pg, emu):
    print("== Events: a subscriber LISTENs on ciflow_events")
    pg.sql("SELECT ciflow.add_threshold('contoso', 'segment', 'HighValue', above => 50)")
    pg.sql("SELECT ciflow.add_threshold('contoso', 'measure', 'TotalRevenue', above => 10000)")
    sub = Subscriber(pg)
    step(pg, "first pass: a baseline, no events", lambda: None)
    step(pg, "the emulator fails the RetailPos refresh",
         lambda: emu.control("POST", "datasources/RetailPos",
                             {"refreshState": "updateFailed", "lastRefresh": "now"}))

    def full_refresh():
        job = emu.control("POST", "jobs", {"operationType": "all", "submissionKind": "scheduled"})
        emu.control("POST", f"jobs/{job['jobId']}/finish", {"status": "successful"})
    step(pg, "a scheduled full refresh (ingestion, map, match, merge, ...) completes",
         full_refresh)
    step(pg, "segment HighValue grows from 43 to 57 members (threshold 50)",
         lambda: emu.control("POST", "segments/HighValue",
                             {"entityCount": 57, "jobStatus": "CompletedSuccess",
                              "evaluationDate": "now"}))
    step(pg, "measure TotalRevenue rises to 12500.00 (threshold 10000)",
         lambda: emu.control("POST", "measures/TotalRevenue",
                             {"values": {"TotalRevenue": "12500.00"}, "state": "completed"}))
    step(pg, "nothing changed: a repeated pass fires nothing", lambda: None)
    sub.stop()
    print(f"   the subscriber printed {sub.seen} notification(s)")
    print("-- catching up after being away: SELECT ... FROM ciflow.events WHERE id > 0")
    for row in pg.sql("SELECT id, kind, subject, payload::text FROM ciflow.events"
                      " WHERE id > 0 ORDER BY id"):
        print(f"   {row[0]:>3} {row[1]:<30} {row[2]:<38} {row[3][:90]}")
