"""The state and workflow simulation: jobs, tasks, auto_advance and their effects (C.4)."""

import pytest

from conftest import V1, call, get

WF = V1 + "/workflows/main"
RETAILPOS = "d8d3b26a-0000-4000-8000-000000000001"


def datasource(emu, name):
    return [d["dataSourceMetadata"] for d in get(emu, V1 + "/manage/datasources").json
            if d["dataSourceMetadata"]["name"] == name][0]


def entity(emu, name):
    return get(emu, V1 + "/manage/entities/" + name).json


def segment(emu, name):
    return [s for s in get(emu, V1 + "/manage/segments").json if s["name"] == name][0]


def step(emu, job_id, body=None):
    return emu.control("POST", "jobs/%s/advance" % job_id, body or {})


def test_ingestion_job_lifecycle_and_effects(emu):
    emu.settings(clock="manual")
    job = call(emu, "POST", WF + "/jobs?operationType=ingestion&identifiers=" + RETAILPOS).json
    assert job["jobStatus"] == "queued" and job["endTimestamp"] is None
    assert [(t["operationType"], t["identifier"], t["taskStatus"]) for t in job["tasks"]] == \
        [("ingestion", "RetailPos", "queued")]
    job = step(emu, job["jobId"], {"to": "running"})
    assert job["jobStatus"] == "running" and job["tasks"][0]["taskStatus"] == "running"
    assert datasource(emu, "RetailPos")["refreshState"] == "updating"
    emu.advance_clock(90)
    now = emu.control("GET", "clock")["now"]
    job = step(emu, job["jobId"])
    assert job["jobStatus"] == "successful" and job["endTimestamp"] == now
    assert job["tasks"][0]["endTimestamp"] == now
    ds = datasource(emu, "RetailPos")
    assert ds["refreshState"] == "updated" and ds["lastRefresh"] == now
    assert entity(emu, "RetailPos_Transactions")["refreshTime"] == now
    assert entity(emu, "Customer")["refreshTime"] == "2025-03-01T02:19:40.0000000Z"   # no merge ran
    listed = get(emu, WF + "/jobs?includeTasks=true").json
    assert listed[0]["jobId"] == job["jobId"] and listed[0]["tasks"][0]["taskStatus"] == "successful"
    node = [n for n in get(emu, WF + "/status").json if n["identifier"] == "RetailPos"][0]
    assert node["taskStatus"] == "successful" and node["endTimestamp"] == now == node["lastSuccessfulTimestamp"]


def test_failed_ingestion_still_advances_last_refresh(emu):
    emu.settings(clock="manual")
    before = datasource(emu, "WebEvents")["lastRefresh"]
    job = emu.control("POST", "jobs", {"operationType": "ingestion", "identifiers": ["WebEvents"],
                                       "plan": {"WebEvents": "failed"}})
    assert job["jobSubmissionKind"] == "onDemand"
    job = emu.control("POST", "jobs/%s/finish" % job["jobId"], {})
    assert job["jobStatus"] == "failed" and job["tasks"][0]["ciErrors"][0]["errorCode"] == "TaskFailed"
    ds = datasource(emu, "WebEvents")
    assert ds["refreshState"] == "updateFailed" and ds["lastRefresh"] != before
    assert ds["lastRefresh"] == job["endTimestamp"]
    assert entity(emu, "WebEvents_PageViews")["refreshTime"] == "2025-03-01T02:06:02.5000000Z"


def test_full_refresh_success_effects(emu):
    emu.settings(clock="manual")
    emu.control("POST", "segments/HighValue", {"plannedCount": 1234})
    emu.control("POST", "measures/TotalRevenue", {"plannedValues": {"TotalRevenue": "99.5"}})
    churners = segment(emu, "Churners")["evaluationStatus"]["entityCount"]
    job = emu.control("POST", "jobs", {"operationType": "all", "submissionKind": "scheduled"})
    assert [t["operationType"] for t in job["tasks"]] == ["ingestion", "ingestion", "map", "match", "merge",
                                                          "segmentation", "segmentation", "measures", "measures"]
    ends = []
    while job["jobStatus"] != "successful":
        emu.advance_clock(60)
        job = step(emu, job["jobId"])
        ends.append(emu.control("GET", "clock")["now"])
    assert len(ends) == 10                         # queued -> running, then one step per task
    assert [t["endTimestamp"] for t in job["tasks"]] == ends[1:]
    assert job["jobSubmissionKind"] == "scheduled" and job["jobType"] == "full"
    merge_end = job["tasks"][4]["endTimestamp"]
    assert entity(emu, "Customer")["refreshTime"] == merge_end
    assert entity(emu, "UnifiedActivity")["refreshTime"] == merge_end
    hv = segment(emu, "HighValue")["evaluationStatus"]
    assert hv == {"jobStatus": "CompletedSuccess", "evaluationDate": job["tasks"][5]["endTimestamp"],
                  "entityCount": 1234, "error": None}
    ch = segment(emu, "Churners")["evaluationStatus"]
    assert ch["entityCount"] == churners and ch["evaluationDate"] == job["tasks"][6]["endTimestamp"]
    tr = get(emu, V1 + "/manage/measures/TotalRevenue").json
    assert tr["output"] == {"values": {"TotalRevenue": "99.5"}, "evaluationTime": job["tasks"][7]["endTimestamp"]}
    assert tr["latestEvaluation"] == {"state": "completed", "endTime": job["tasks"][7]["endTimestamp"]}
    merge = [n for n in get(emu, WF + "/status").json if n["operationType"] == "merge"][0]
    assert merge["endTimestamp"] == merge_end


def test_failed_merge_skips_downstream_and_fails_the_job(emu):
    before_seg = segment(emu, "HighValue")
    job = emu.control("POST", "jobs", {"operationType": "all", "plan": {"merge": "failed"}})
    job = emu.control("POST", "jobs/%s/finish" % job["jobId"], {})
    assert job["jobStatus"] == "failed"
    assert [t["taskStatus"] for t in job["tasks"]] == ["successful", "successful", "successful", "successful",
                                                       "failed", "skipped", "skipped", "skipped", "skipped"]
    assert entity(emu, "Customer")["refreshTime"] == "2025-03-01T02:19:40.0000000Z"
    assert segment(emu, "HighValue") == before_seg
    assert datasource(emu, "WebEvents")["refreshState"] == "updated"


def test_timed_out_task(emu):
    job = emu.control("POST", "jobs", {"operationType": "segmentation", "identifiers": ["Churners"],
                                       "plan": {"segmentation:Churners": "timedOut"}})
    job = emu.control("POST", "jobs/%s/finish" % job["jobId"], {})
    assert job["jobStatus"] == "timedOut"
    ev = segment(emu, "Churners")["evaluationStatus"]
    assert ev["jobStatus"] == "CompletedFailure" and ev["evaluationDate"] == job["endTimestamp"]


def test_finish_with_a_status(emu):
    job = emu.control("POST", "jobs", {"operationType": "all"})
    step(emu, job["jobId"], {"steps": 3})
    job = emu.control("POST", "jobs/%s/finish" % job["jobId"], {"status": "failed"})
    assert job["jobStatus"] == "failed"
    assert [t["taskStatus"] for t in job["tasks"]][:4] == ["successful", "successful", "failed", "skipped"]
    job2 = emu.control("POST", "jobs", {"operationType": "measures"})
    job2 = step(emu, job2["jobId"], {"to": "successful"})
    assert job2["jobStatus"] == "successful" and len(job2["tasks"]) == 2


def test_cancel_running_ingestion(emu):
    job = call(emu, "POST", WF + "/jobs?operationType=ingestion").json
    assert len(job["tasks"]) == 2                  # every data source without identifiers
    step(emu, job["jobId"])
    job = call(emu, "POST", WF + "/jobs/%s/cancel" % job["jobId"]).json
    assert job["jobStatus"] == "aborted"
    assert [t["taskStatus"] for t in job["tasks"]] == ["aborted", "skipped"]
    ds = datasource(emu, "RetailPos")
    assert ds["refreshState"] == "updateCancelled" and ds["lastRefresh"] == job["endTimestamp"]
    assert datasource(emu, "WebEvents")["refreshState"] == "updateFailed"       # never started
    r = call(emu, "POST", WF + "/jobs/%s/cancel" % job["jobId"])
    assert r.status == 400 and r.json["errorCode"] == "JobNotCancellable"


def test_cancel_queued_job(emu):
    job = emu.control("POST", "jobs", {"operationType": "all"})
    job = emu.control("POST", "jobs/%s/cancel" % job["jobId"], {})
    assert job["jobStatus"] == "aborted" and {t["taskStatus"] for t in job["tasks"]} == {"skipped"}


def test_auto_advance_with_manual_clock(emu):
    emu.settings(clock="manual", auto_advance=10)
    job = call(emu, "POST", WF + "/jobs?operationType=ingestion&identifiers=RetailPos").json
    submitted = job["submittedTimestamp"]
    assert get(emu, WF + "/jobs/" + job["jobId"]).json["jobStatus"] == "queued"
    emu.advance_clock(10)
    assert get(emu, WF + "/jobs/" + job["jobId"]).json["jobStatus"] == "running"
    emu.advance_clock(25)                          # one more step fell due at +20, none at +30 yet
    job = get(emu, WF + "/jobs/" + job["jobId"]).json
    assert job["jobStatus"] == "successful"
    sub_s = int(submitted[17:19])
    assert int(job["endTimestamp"][17:19]) == (sub_s + 20) % 60      # the step's due time, not now
    assert job["endTimestamp"][19:] == submitted[19:]


def test_auto_advance_real_clock(emu):
    emu.settings(auto_advance=0.2)
    job = emu.control("POST", "jobs", {"operationType": "merge"})
    assert [t["identifier"] for t in job["tasks"]] == ["Merge"]
    import time
    time.sleep(0.7)
    assert get(emu, WF + "/jobs/" + job["jobId"]).json["jobStatus"] == "successful"


def test_unification_operations_and_downstream(emu):
    job = emu.control("POST", "jobs", {"operationType": "match"})
    assert [t["operationType"] for t in job["tasks"]] == ["match", "merge"]
    job = emu.control("POST", "jobs", {"operationType": "ingestion", "identifiers": ["RetailPos"],
                                       "downstream": True})
    assert [t["operationType"] for t in job["tasks"]] == ["ingestion", "map", "match", "merge", "segmentation",
                                                          "segmentation", "measures", "measures"]
    job = emu.control("POST", "jobs", {"operationType": "export"})
    assert [t["operationType"] for t in job["tasks"]] == ["export"]
    with pytest.raises(Exception) as e:
        emu.control("POST", "jobs", {"operationType": "ingestion", "identifiers": ["Nope"]})
    assert e.value.status == 400


def test_jobs_list_newest_first_and_top(emu):
    emu.settings(clock="manual")
    made = []
    for k in range(12):
        emu.advance_clock(1)
        made.append(emu.control("POST", "jobs", {"operationType": "export"})["jobId"])
    listed = get(emu, WF + "/jobs").json
    assert [j["jobId"] for j in listed] == made[::-1][:10]
    assert len(get(emu, WF + "/jobs?top=25").json) == 14
    assert [j["jobId"] for j in get(emu, WF + "/jobs?top=2").json] == made[::-1][:2]


def test_control_datasource_segment_measure_updates(emu):
    emu.settings(clock="manual")
    now = emu.control("GET", "clock")["now"]
    ds = emu.control("POST", "datasources/RetailPos", {"refreshState": "UPDATEFAILED", "lastRefresh": "now"})
    assert ds["refreshState"] == "updateFailed" and ds["lastRefresh"] == now
    assert datasource(emu, "RetailPos")["lastRefresh"] == now
    seg = emu.control("POST", "segments/HighValue", {"entityCount": 1234, "jobStatus": "completedsuccess",
                                                     "evaluationDate": "2025-04-01T00:00:00Z"})
    assert seg["evaluationStatus"] == {"jobStatus": "CompletedSuccess", "entityCount": 1234, "error": None,
                                       "evaluationDate": "2025-04-01T00:00:00.0000000Z"}
    assert segment(emu, "HighValue")["evaluationStatus"]["entityCount"] == 1234
    m = emu.control("POST", "measures/TotalRevenue", {"values": {"TotalRevenue": "42.5"}, "state": "completed"})
    assert m["output"] == {"values": {"TotalRevenue": "42.5"}, "evaluationTime": now}
    new = emu.control("POST", "datasources/Crm", {"kind": "dataverse"})
    assert new["name"] == "Crm" and new["refreshState"] == "notUpdated"
    assert [d["dataSourceMetadata"]["name"] for d in get(emu, V1 + "/manage/datasources").json][-1] == "Crm"
    seg = emu.control("POST", "segments/NewSeg", {"filter": "LoyaltyPoints gt 99000"})
    rows = get(emu, V1 + "/data/NewSeg").json["value"]
    assert len(rows) == sum(1 for r in emu.rows("Customer") if r["LoyaltyPoints"] > 99000)


@pytest.mark.parametrize("case,expected", [("spec", ("updateFailed", "CompletedSuccess", "failed")),
                                           ("pascal", ("UpdateFailed", "CompletedSuccess", "Failed")),
                                           ("camel", ("updateFailed", "completedSuccess", "failed"))])
def test_enum_case(emu, case, expected):
    emu.settings(enum_case=case)
    ds = datasource(emu, "WebEvents")["refreshState"]
    seg = segment(emu, "HighValue")["evaluationStatus"]["jobStatus"]
    job = get(emu, WF + "/jobs").json[0]["jobStatus"]
    assert (ds, seg, job) == expected
