/*-------------------------------------------------------------------------
 *
 * sync.c
 *	  The sync executor: one run of one entity into one table.
 *
 *	  record the run -> read the entity's metadata -> prepare the target
 *	  -> page after page: fetch (no transaction open), load (one short
 *	  transaction per page, progress included) -> publish and record the
 *	  end (one transaction) -> ANALYZE.
 *
 *	  It manages its own transactions, so it runs where no transaction is
 *	  open: in a background worker (syncworker.c).  Whatever fails, the
 *	  staging heap is dropped, the target is untouched, and the run is
 *	  recorded as failed before the error goes on with the run and page in
 *	  its DETAIL.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/table.h"
#include "access/xact.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "connection.h"
#include "load.h"
#include "odata.h"
#include "paging.h"
#include "request.h"
#include "runs.h"
#include "sync.h"
#include "target.h"

typedef enum SyncPhase
{
	PHASE_SETUP,
	PHASE_METADATA,
	PHASE_PAGES,
	PHASE_PUBLISH
} SyncPhase;

static void
BeginXact(void)
{
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
}

static void
CommitXact(MemoryContext back_to)
{
	PopActiveSnapshot();
	CommitTransactionCommand();
	/* Let the statistics collector see what the run wrote. */
	pgstat_report_stat(false);
	MemoryContextSwitchTo(back_to);
}

/* The entity's metadata (E2, one entity); the answer may also be a list. */
static CiflowShape *
FetchShape(const CiflowConnection *conn, const char *entity, const char *failmsg,
		   CiflowCallStats *stats)
{
	CiflowRequest req;
	json_t	   *meta;
	json_t	   *list;

	memset(&req, 0, sizeof(req));
	req.conn = conn;
	req.url = CiflowEntitiesUrl(conn, entity);
	req.api_call = true;
	req.failmsg = failmsg;
	req.not_found_hint = "Check the entity's name with ciflow.get_entities().";
	req.stats = stats;
	meta = CiflowRequestJson(&req);

	list = json_object_get(meta, "entities");
	if (json_is_array(list))
	{
		json_t	   *e;
		size_t		i;

		json_array_foreach(list, i, e)
		{
			const char *name = CiflowJsonString(e, "qualifiedEntityName");

			if (name && strcmp(name, entity) == 0)
				return CiflowShapeFromMetadata(e, failmsg);
		}
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("%s", failmsg),
				 errdetail("The service's metadata does not list entity \"%s\".", entity)));
	}
	return CiflowShapeFromMetadata(meta, failmsg);
}

/*
 * The options a pull sends besides paging.  A $select always includes the
 * key, and system entities are read in key order so that offset paging is
 * stable.
 */
static char *
PageQuery(const CiflowSyncArgs *args, const CiflowShape *shape)
{
	StringInfoData query;
	StringInfoData keys;
	int			k;

	initStringInfo(&query);
	initStringInfo(&keys);
	for (k = 0; k < shape->nkeys; k++)
		appendStringInfo(&keys, "%s%s", k ? "," : "",
						 shape->columns[shape->keys[k]].remote_name);

	if (args->fields != NULL)
	{
		StringInfoData select;

		initStringInfo(&select);
		appendStringInfoString(&select, args->fields);
		for (k = 0; k < shape->nkeys; k++)
		{
			const char *key = shape->columns[shape->keys[k]].remote_name;
			char	   *padded = psprintf(",%s,", args->fields);

			if (strstr(padded, psprintf(",%s,", key)) == NULL)
				appendStringInfo(&select, ",%s", key);
		}
		CiflowAppendQuery(&query, "$select", select.data);
	}
	if (args->filter != NULL)
		CiflowAppendQuery(&query, "$filter", args->filter);
	if (shape->is_system && shape->nkeys > 0)
		CiflowAppendQuery(&query, "$orderby", keys.data);
	return query.data;
}

static char *
FailureDetail(const CiflowRunState *run, SyncPhase phase, const char *detail)
{
	StringInfoData s;

	initStringInfo(&s);
	appendStringInfo(&s, "Run " INT64_FORMAT, run->run_id);
	switch (phase)
	{
		case PHASE_SETUP:
			break;
		case PHASE_METADATA:
			appendStringInfoString(&s, ", reading the entity's metadata");
			break;
		case PHASE_PAGES:
			appendStringInfo(&s, ", page %d", run->pages + 1);
			break;
		case PHASE_PUBLISH:
			appendStringInfo(&s, ", publishing after %d pages", run->pages);
			break;
	}
	if (detail)
		appendStringInfo(&s, ": %s", detail);
	else
		appendStringInfoChar(&s, '.');
	return s.data;
}

/*
 * Fresh statistics for the planner.  The run has already succeeded, so a
 * failure here is only a WARNING.
 */
static void
AnalyzeAfterPublish(const CiflowTarget *target, MemoryContext back_to)
{
	pgstat_report_activity(STATE_RUNNING, "ciflow sync: analyzing");
	PG_TRY();
	{
		BeginXact();
		CiflowAnalyzeTarget(target);
		CommitXact(back_to);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(back_to);
		edata = CopyErrorData();
		FlushErrorState();
		AbortOutOfAnyTransaction();
		MemoryContextSwitchTo(back_to);
		ereport(WARNING,
				(errmsg("could not analyze %s after the sync: %s",
						CiflowTargetName(target->schema, target->table), edata->message)));
	}
	PG_END_TRY();
}

void
CiflowSyncExecute(const CiflowSyncArgs *args, CiflowRunState *run)
{
	MemoryContext caller_cxt = CurrentMemoryContext;
	MemoryContext run_cxt = AllocSetContextCreate(TopMemoryContext, "ciflow sync run",
												  ALLOCSET_DEFAULT_SIZES);
	char	   *target_name;
	char	   *failmsg;
	CiflowTarget *target;
	volatile SyncPhase phase = PHASE_SETUP;

	MemoryContextSwitchTo(run_cxt);
	target_name = CiflowTargetName(args->schema, args->table);
	failmsg = SyncFailMessage(args->connection, args->entity);
	memset(run, 0, sizeof(*run));
	run->rows_expected = -1;
	/* Not a local: the error path reads what the run filled in. */
	target = palloc0(sizeof(CiflowTarget));
	target->schema = pstrdup(args->schema);
	target->table = pstrdup(args->table);

	BeginXact();
	CiflowRunInsert(run, args->connection, args->entity, target_name, args->mode);
	CommitXact(run_cxt);

	PG_TRY();
	{
		CiflowConnection *conn;
		CiflowShape *shape;
		CiflowLoader *loader;
		CiflowPager *pager;
		Relation	staging;
		json_t	   *rows;

		if (strcmp(args->mode, "full") != 0)
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("%s", failmsg),
					 errdetail("Incremental syncs are not available yet."),
					 errhint("Use mode => 'full'.")));

		BeginXact();
		conn = CiflowCopyConnection(CiflowGetConnection(args->connection), run_cxt);
		if (!CiflowLockTargetName(target))
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_IN_USE),
					 errmsg("%s", failmsg),
					 errdetail("Another sync into %s is running.", target_name),
					 errhint("Wait for it to finish; see ciflow.sync_progress.")));
		CiflowRunFailAbandoned(target_name, run->run_id);
		CommitXact(run_cxt);

		phase = PHASE_METADATA;
		pgstat_report_activity(STATE_RUNNING, "ciflow sync: reading metadata");
		shape = FetchShape(conn, args->entity, failmsg, &run->stats);

		BeginXact();
		CiflowPrepareTarget(target, shape);
		staging = table_open(target->staging_relid, AccessShareLock);
		loader = CiflowLoaderCreate(shape, staging, run_cxt);
		table_close(staging, AccessShareLock);
		CommitXact(run_cxt);

		phase = PHASE_PAGES;
		pgstat_report_activity(STATE_RUNNING, "ciflow sync: reading pages");
		pager = CiflowPagerBegin(conn, shape->entity, PageQuery(args, shape),
								 failmsg, &run->stats);
		while (CiflowPagerNext(pager, &rows) != NULL)
		{
			int			n;

			BeginXact();
			staging = table_open(target->staging_relid, RowExclusiveLock);
			n = CiflowLoadPage(loader, staging, rows, run->pages + 1);
			table_close(staging, NoLock);
			run->pages = CiflowPagerPages(pager);
			run->rows += n;
			run->rows_expected = CiflowPagerCount(pager);
			CiflowRunProgress(run);
			CommitXact(run_cxt);
		}
		CiflowPagerEnd(pager);

		phase = PHASE_PUBLISH;
		pgstat_report_activity(STATE_RUNNING, "ciflow sync: publishing");
		BeginXact();
		CiflowPublishTarget(target, shape);
		CiflowRunFinish(run, true, NULL);
		CommitXact(run_cxt);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		/* The error outlives this run's memory: copy it to the caller's. */
		MemoryContextSwitchTo(caller_cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortOutOfAnyTransaction();
		MemoryContextSwitchTo(caller_cxt);

		CiflowReframeError(edata, failmsg);

		/* Recording the failure must not itself be cancelled. */
		HOLD_CANCEL_INTERRUPTS();
		BeginXact();
		CiflowDropStaging(target);
		MemoryContextSwitchTo(caller_cxt);
		CiflowRunFinish(run, false,
						edata->detail ? psprintf("%s: %s", edata->message, edata->detail)
						: edata->message);
		CommitXact(caller_cxt);
		CiflowUnlockTarget(target);
		RESUME_CANCEL_INTERRUPTS();

		edata->detail = FailureDetail(run, phase, edata->detail);
		MemoryContextDelete(run_cxt);
		ReThrowError(edata);
	}
	PG_END_TRY();

	CiflowUnlockTarget(target);
	AnalyzeAfterPublish(target, caller_cxt);
	MemoryContextDelete(run_cxt);
}
