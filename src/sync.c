/*-------------------------------------------------------------------------
 *
 * sync.c
 *	  The sync executor: one run of one entity into one table.
 *
 *	  record the run -> lock the target's name, sweep what dead runs left,
 *	  check the target's rules and the caller's privileges -> read the
 *	  entity's metadata (its key remembered for get_item) -> plan (full,
 *	  incremental, or nothing to fetch) -> prepare the target and the
 *	  staging heap (for a new target, the table that becomes it) -> page
 *	  after page: fetch (no transaction open), parse, start the next
 *	  page's request, insert (short transactions, progress included) ->
 *	  publish the difference, or the new target, and record the end (one
 *	  transaction) -> ANALYZE, if ciflow.analyze_after_sync asks for it.
 *
 *	  It manages its own transactions, so it runs where no transaction is
 *	  open: in a background worker (syncworker.c).  Whatever fails, the
 *	  staging heap (for a first sync, the table that would have become the
 *	  target) is dropped, the target is untouched, and the run is
 *	  recorded as failed before the error goes on with the run and phase
 *	  in its DETAIL.  Every check that can fail before a page is fetched
 *	  is made before one is.
 *
 *	  A watermark is JSON stored with the run: {"attribute", "type",
 *	  "value", "refresh_time"} for Customer Insights, {"delta_link"} for
 *	  Dataverse change tracking, and "full_pull" (why) when an incremental
 *	  run pulled everything.  Only a successful run stores one, so only a
 *	  successful run advances it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/table.h"
#include "access/xact.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "portability/instr_time.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "apply.h"
#include "ciflow.h"
#include "connection.h"
#include "entitykeys.h"
#include "load.h"
#include "odata.h"
#include "paging.h"
#include "request.h"
#include "runs.h"
#include "servicemeta.h"
#include "sync.h"
#include "target.h"

typedef enum SyncPhase
{
	PHASE_SETUP,
	PHASE_METADATA,
	PHASE_PREPARE,
	PHASE_PAGES,
	PHASE_PUBLISH
} SyncPhase;

/* Where an incremental run resumes; any member may be NULL. */
typedef struct Watermark
{
	char	   *attribute;		/* incrementalAttribute of the pull */
	char	   *type;			/* its Edm type */
	char	   *value;			/* the largest value pulled */
	char	   *refresh_time;	/* E2's refreshTime at the pull */
	char	   *delta_link;		/* Dataverse: the last page's @odata.deltaLink */
	char	   *full_pull;		/* why an incremental run pulled everything */
} Watermark;

/* What a run fetches and how it publishes. */
typedef struct SyncPlan
{
	bool		skip;			/* nothing changed upstream: no page */
	CiflowPublishMethod method;
	const char *filter;			/* the $filter sent, or NULL */
	bool		incremental;	/* mode => 'incremental': keeps a watermark */
	bool		track_changes;	/* Dataverse: ask for a delta link */
	const char *delta_link;		/* Dataverse: pull only these changes */
	const char *full_pull;		/* why an incremental run pulls everything */
	Watermark	previous;		/* the last successful run's */
	const char *previous_json;
} SyncPlan;

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

/*
 * The entity's shape per flavour (sql-api.md section 3): E2 for Customer
 * Insights, the entity set's CSDL in $metadata (A.7) for the others.
 */
static CiflowShape *
FetchShape(const CiflowConnection *conn, const char *entity, const char *failmsg,
		   CiflowCallStats *stats)
{
	if (conn->flavor == CIFLOW_FLAVOR_CUSTOMER_INSIGHTS)
		return CiflowFetchE2Shape(conn, entity, failmsg, stats);
	return CiflowShapeFromCsdl(CiflowFetchCsdlEntity(conn, entity, failmsg, stats),
							   failmsg);
}

static char *
WatermarkMember(json_t *obj, const char *key)
{
	const char *s = CiflowJsonString(obj, key);

	return s ? pstrdup(s) : NULL;
}

/* false when there is no watermark (or one ciflow cannot read). */
static bool
ParseWatermark(const char *text, Watermark *wm)
{
	json_t	   *root;

	memset(wm, 0, sizeof(*wm));
	if (text == NULL || (root = json_loads(text, 0, NULL)) == NULL)
		return false;
	wm->attribute = WatermarkMember(root, "attribute");
	wm->type = WatermarkMember(root, "type");
	wm->value = WatermarkMember(root, "value");
	wm->refresh_time = WatermarkMember(root, "refresh_time");
	wm->delta_link = WatermarkMember(root, "delta_link");
	json_decref(root);
	return true;
}

static void
SetMember(json_t *obj, const char *key, const char *value)
{
	if (value != NULL)
		json_object_set_new(obj, key, json_string(value));
}

static char *
WatermarkJson(const Watermark *wm)
{
	json_t	   *obj = json_pack("{}");
	char	   *text;

	SetMember(obj, "attribute", wm->attribute);
	SetMember(obj, "type", wm->type);
	SetMember(obj, "value", wm->value);
	SetMember(obj, "refresh_time", wm->refresh_time);
	SetMember(obj, "delta_link", wm->delta_link);
	SetMember(obj, "full_pull", wm->full_pull);
	text = json_dumps(obj, JSON_COMPACT | JSON_SORT_KEYS);
	json_decref(obj);
	return text;
}

static void
FullPullNotice(SyncPlan *plan, const CiflowShape *shape, const char *why)
{
	plan->full_pull = why;
	ereport(NOTICE,
			(errmsg("incremental sync of entity \"%s\" pulls every row: %s",
					shape->entity, why),
			 errdetail("A full pull applies the whole difference, deletions included, and stores a fresh watermark.")));
}

/*
 * mode => 'incremental' per section 3: source entities are pulled whole,
 * or not at all while refreshTime is unchanged; system entities with an
 * incrementalAttribute (and a key to upsert on) ask only for rows at or
 * after the watermark; Dataverse entity sets ask only for the changes of
 * the stored delta link (a full pull asks for change tracking, to get
 * one); anything else is a full pull, with a NOTICE.
 */
static void
PlanRun(const CiflowSyncArgs *args, const CiflowConnection *conn, const CiflowShape *shape,
		const CiflowTarget *target, SyncPlan *plan)
{
	const CiflowColumn *attr;

	memset(plan, 0, sizeof(*plan));
	plan->method = strcmp(args->publish, "swap") == 0 ? CIFLOW_PUBLISH_SWAP : CIFLOW_PUBLISH_DIFF;
	plan->filter = args->filter;
	plan->incremental = strcmp(args->mode, "incremental") == 0;
	if (!plan->incremental)
		return;

	/* Change tracking refuses $filter (A.7): no delta link to keep then. */
	plan->track_changes = conn->flavor == CIFLOW_FLAVOR_DATAVERSE && args->filter == NULL;
	if (conn->flavor == CIFLOW_FLAVOR_DATAVERSE && args->filter != NULL)
	{
		FullPullNotice(plan, shape, "Dataverse change tracking refuses a filter");
		return;
	}

	/* A watermark describes rows of a table that must still exist. */
	if (!OidIsValid(target->relid))
	{
		FullPullNotice(plan, shape, "the target does not exist yet");
		return;
	}
	plan->previous_json = CiflowRunLastWatermark(target->qualified);
	if (!ParseWatermark(plan->previous_json, &plan->previous))
	{
		FullPullNotice(plan, shape, "no earlier successful sync of this target stored a watermark");
		return;
	}
	if (conn->flavor == CIFLOW_FLAVOR_DATAVERSE)
	{
		if (plan->previous.delta_link == NULL)
			FullPullNotice(plan, shape, "no delta link is stored yet");
		else if (shape->nkeys != 1)
			FullPullNotice(plan, shape, "change tracking needs a single-column key to delete by");
		else
		{
			plan->delta_link = plan->previous.delta_link;
			plan->method = CIFLOW_PUBLISH_UPSERT;
		}
		return;
	}
	if (conn->flavor == CIFLOW_FLAVOR_ODATA)
	{
		FullPullNotice(plan, shape, "a generic OData service offers no change tracking ciflow uses");
		return;
	}
	if (!shape->is_system)
	{
		if (plan->previous.refresh_time && shape->refresh_time &&
			strcmp(plan->previous.refresh_time, shape->refresh_time) == 0)
			plan->skip = true;
		else
			FullPullNotice(plan, shape, "it is a source entity (no $filter), and its refreshTime changed since the last successful sync");
		return;
	}
	if (shape->incremental < 0)
	{
		FullPullNotice(plan, shape, "the service names no incrementalAttribute for it");
		return;
	}
	attr = &shape->columns[shape->incremental];
	if (shape->nkeys == 0)
		FullPullNotice(plan, shape, "it has no key to upsert on");
	else if (plan->previous.value == NULL || plan->previous.attribute == NULL ||
			 strcmp(plan->previous.attribute, attr->remote_name) != 0)
		FullPullNotice(plan, shape, psprintf("no watermark of attribute \"%s\" is stored yet",
											 attr->remote_name));
	else
	{
		plan->filter = CiflowIncrementalFilter(args->filter, attr->remote_name,
											   attr->edm_type, plan->previous.value);
		plan->method = CIFLOW_PUBLISH_UPSERT;
	}
}

/* The watermark a successful pull leaves for the next incremental run. */
static char *
NextWatermark(const CiflowTarget *target, const CiflowShape *shape, const SyncPlan *plan,
			  const char *delta_link)
{
	Watermark	next;

	memset(&next, 0, sizeof(next));
	next.refresh_time = shape->refresh_time;
	next.delta_link = (char *) delta_link;
	next.full_pull = (char *) plan->full_pull;
	if (shape->incremental >= 0)
	{
		next.attribute = shape->columns[shape->incremental].remote_name;
		next.type = shape->columns[shape->incremental].edm_type;
		next.value = CiflowStagedMaximum(target, shape);
		/* An incremental pull that found nothing new keeps its place. */
		if (next.value == NULL && plan->method == CIFLOW_PUBLISH_UPSERT)
			next.value = plan->previous.value;
	}
	return WatermarkJson(&next);
}

/*
 * The options a pull sends besides paging.  A $select always includes the
 * key, and system entities are read in key order so that offset paging is
 * stable.
 */
static char *
PageQuery(const CiflowSyncArgs *args, const CiflowConnection *conn, const CiflowShape *shape,
		  const char *filter)
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
	if (filter != NULL)
		CiflowAppendQuery(&query, "$filter", filter);
	/*
	 * Dataverse pages by its own links, which are stable, and its change
	 * tracking refuses $orderby.
	 */
	if (shape->is_system && shape->nkeys > 0 && conn->flavor != CIFLOW_FLAVOR_DATAVERSE)
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
			appendStringInfoString(&s, ", checking the target");
			break;
		case PHASE_METADATA:
			appendStringInfoString(&s, ", reading the entity's metadata");
			break;
		case PHASE_PREPARE:
			appendStringInfoString(&s, ", preparing the target");
			break;
		case PHASE_PAGES:
			appendStringInfo(&s, ", page %d", run->page_at);
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
 * The outermost context line of an error raised inside one of ciflow's
 * own SPI statements quotes that statement ("SQL statement ..."): it is
 * ciflow's internals, not the user's business, and goes.  Inner lines (a
 * user's trigger, say) stay.
 */
static void
StripStatementContext(ErrorData *edata)
{
	char	   *last;

	if (edata->context == NULL)
		return;
	last = strrchr(edata->context, '\n');
	if (strncmp(last ? last + 1 : edata->context, "SQL statement", 13) != 0)
		return;
	if (last)
		*last = '\0';
	else
		edata->context = NULL;
}

/* A lock wait that timed out says what to do about it. */
static void
HintLockTimeout(ErrorData *edata, const char *target_name)
{
	if (edata->sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE && edata->hint == NULL)
		edata->hint = psprintf("Another session holds a lock on %s that the sync must wait for"
							   " (see pg_locks); a sync waits at most lock_timeout, one minute"
							   " unless the role or database sets one.  Sync again once it is released.",
							   target_name);
}

/*
 * Fresh statistics for the planner.  The run has already succeeded, so a
 * failure here is only a WARNING.
 */
static void
AnalyzeAfterPublish(const CiflowTarget *target, MemoryContext back_to)
{
	pgstat_report_activity(STATE_RUNNING, "ciflow sync: analyzing");

	/*
	 * The publish's row counts first: ANALYZE sets n_live_tup outright, and
	 * counts still pending in this process would be added on top of it
	 * (doubling it after a first sync).
	 */
	pgstat_report_stat(true);
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
						target->qualified, edata->message)));
	}
	PG_END_TRY();
}

/* The steps of a page, timed. */
enum
{
	STEP_WAIT,					/* for the page's bytes */
	STEP_PARSE,					/* parse and convert */
	STEP_REQUEST,				/* put the next request under way */
	STEP_INSERT,				/* insert and commit */
	STEP_COUNT
};

/* Adds the time since *mark to *total; *mark becomes now. */
static void
Spent(instr_time *total, instr_time *mark)
{
	instr_time	now;

	INSTR_TIME_SET_CURRENT(now);
	INSTR_TIME_ACCUM_DIFF(*total, now, *mark);
	*mark = now;
}

/*
 * Every page of the plan's pull into the staging heap, one transaction
 * per page, the run's progress with it.  Returns the last page's delta
 * link (in run_cxt), or NULL.  A stored delta link that the service
 * refuses ends the pull before anything is staged, with *refusal saying
 * why (in run_cxt); it is NULL otherwise.
 */
static char *
PullPages(const CiflowSyncArgs *args, const CiflowConnection *conn, const CiflowShape *shape,
		  CiflowTarget *target, const SyncPlan *plan, CiflowLoader *loader,
		  CiflowRunState *run, const char *failmsg, MemoryContext run_cxt, char **refusal)
{
	CiflowPager *pager;
	Relation	staging;
	char	   *body;
	size_t		len;
	const char *link;
	char	   *delta_link;
	instr_time	spent[STEP_COUNT];
	instr_time	mark;

	pager = CiflowPagerBegin(conn, shape->entity, PageQuery(args, conn, shape, plan->filter),
							 failmsg, &run->stats);
	if (plan->delta_link != NULL)
		CiflowPagerStartAt(pager, plan->delta_link);
	else if (plan->incremental && plan->track_changes)
		CiflowPagerTrackChanges(pager);
	CiflowLoaderAcceptDeletions(loader, plan->delta_link != NULL);
	memset(spent, 0, sizeof(spent));
	for (;;)
	{
		CiflowPageInfo info;
		int			page_no = run->pages + 1;
		int			n;

		run->page_at = page_no;
		INSTR_TIME_SET_CURRENT(mark);
		if (!CiflowPagerFetch(pager, &body, &len))
			break;
		Spent(&spent[STEP_WAIT], &mark);
		/* Parsed in a transaction of its own: input functions may read the catalog. */
		BeginXact();
		CiflowLoaderParse(loader, body, len, page_no, failmsg, &info);
		CommitXact(run_cxt);
		Spent(&spent[STEP_PARSE], &mark);
		/* The next page's transfer begins, to overlap this page's insert. */
		run->page_at = page_no + 1;
		CiflowPagerAccept(pager, &info);
		Spent(&spent[STEP_REQUEST], &mark);

		run->page_at = page_no;
		BeginXact();
		staging = table_open(target->staging_relid, RowExclusiveLock);
		n = CiflowLoaderInsert(loader, staging);
		table_close(staging, NoLock);
		run->pages = CiflowPagerPages(pager);
		run->rows += n;
		run->rows_expected = CiflowPagerCount(pager);
		CiflowRunProgress(run);
		CommitXact(run_cxt);
		Spent(&spent[STEP_INSERT], &mark);
	}
	/* Where a pull's time goes, for whoever tunes it (the benchmark reads it). */
	ereport(DEBUG1,
			(errmsg_internal("ciflow: run " INT64_FORMAT ", %d pages: waiting for pages %.3f s, parsing %.3f s, requesting %.3f s, inserting %.3f s",
							 run->run_id, run->pages,
							 INSTR_TIME_GET_DOUBLE(spent[STEP_WAIT]),
							 INSTR_TIME_GET_DOUBLE(spent[STEP_PARSE]),
							 INSTR_TIME_GET_DOUBLE(spent[STEP_REQUEST]),
							 INSTR_TIME_GET_DOUBLE(spent[STEP_INSERT]))));
	link = CiflowPagerDeltaLink(pager);
	delta_link = link ? MemoryContextStrdup(run_cxt, link) : NULL;
	*refusal = CiflowPagerRefusal(pager) ?
		MemoryContextStrdup(run_cxt, CiflowPagerRefusal(pager)) : NULL;
	CiflowPagerEnd(pager);
	return delta_link;
}

/* Publish, and record the end, in one transaction. */
static void
Publish(CiflowTarget *target, const CiflowShape *shape, const SyncPlan *plan,
		const char *delta_link, CiflowRunState *run, MemoryContext run_cxt)
{
	CiflowApplyCounts counts;

	BeginXact();
	CiflowApplyStaged(target, shape, plan->method, run->rows, &counts);
	run->inserted = counts.inserted;
	run->updated = counts.updated;
	run->deleted = counts.deleted;
	/* Only incremental runs keep a watermark: a full one resumes nothing. */
	if (plan->incremental)
		run->watermark = MemoryContextStrdup(run_cxt, NextWatermark(target, shape, plan, delta_link));
	/*
	 * A target filled in place is the staging heap, renamed: kept.  Should
	 * this transaction fail, the rename is undone and the error path drops
	 * the heap as any staging heap.
	 */
	if (!target->in_place)
		CiflowDropStaging(target);
	CiflowRunSetStaging(run->run_id, InvalidOid);
	CiflowRunFinish(run, true, NULL);
	CommitXact(run_cxt);
	/* Committed: nothing may drop the new target now. */
	target->staging_relid = InvalidOid;
	if (counts.duplicates > 0)
		ereport(WARNING,
				(errmsg("entity \"%s\" delivered " INT64_FORMAT " duplicate rows; the last version of each key was kept",
						shape->entity, counts.duplicates),
				 errhint("The data changed while it was paged through with $skip.")));
}

char *
CiflowSyncFailMessage(const char *connection, const char *entity)
{
	return psprintf("could not sync entity \"%s\" from connection \"%s\"",
					entity ? entity : "(null)", connection ? connection : "(null)");
}

void
CiflowSyncExecute(const CiflowSyncArgs *args, CiflowRunState *run)
{
	MemoryContext caller_cxt = CurrentMemoryContext;
	MemoryContext run_cxt = AllocSetContextCreate(TopMemoryContext, "ciflow sync run",
												  ALLOCSET_DEFAULT_SIZES);
	char	   *failmsg;
	CiflowTarget *target;
	volatile SyncPhase phase = PHASE_SETUP;
	volatile bool changed = false;

	MemoryContextSwitchTo(run_cxt);
	failmsg = CiflowSyncFailMessage(args->connection, args->entity);
	memset(run, 0, sizeof(*run));
	run->rows_expected = -1;
	/* Not a local: the error path reads what the run filled in. */
	target = palloc0(sizeof(CiflowTarget));
	target->schema = pstrdup(args->schema);
	target->table = pstrdup(args->table);
	target->qualified = CiflowTargetName(args->schema, args->table);

	BeginXact();
	CiflowRunInsert(run, args->connection, args->entity, target->qualified, args->mode);
	CommitXact(run_cxt);

	PG_TRY();
	{
		CiflowConnection *conn;
		CiflowShape *shape;
		CiflowEntityKeys *keys;
		CiflowLoader *loader;
		Relation	staging;
		SyncPlan	plan;
		char	   *delta_link;
		char	   *refusal;

		if (strcmp(args->mode, "incremental") == 0 && strcmp(args->publish, "swap") == 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("%s", failmsg),
					 errdetail("publish => 'swap' replaces every row, so it needs a complete pull."),
					 errhint("Use mode => 'full' with publish => 'swap', or the default publish => 'diff'.")));

		BeginXact();
		conn = CiflowCopyConnection(CiflowGetConnection(args->connection), run_cxt);
		if (!CiflowLockTargetName(target))
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_IN_USE),
					 errmsg("%s", failmsg),
					 errdetail("Another sync into %s is running.", target->qualified),
					 errhint("Wait for it to finish; see ciflow.sync_progress.")));
		/* The name is ours: any other run of this target that is 'running' is dead. */
		CiflowSweepStaging(CiflowRunAbandonedStaging(target->qualified, run->run_id));
		CiflowRunFailAbandoned(target->qualified, run->run_id);
		CiflowCheckTarget(target, args->adopt, CiflowRunTargetFilled(target->qualified));
		CommitXact(run_cxt);

		phase = PHASE_METADATA;
		pgstat_report_activity(STATE_RUNNING, "ciflow sync: reading metadata");
		shape = FetchShape(conn, args->entity, failmsg, &run->stats);
		CiflowShapeSelect(shape, args->fields);

		BeginXact();
		/* What the metadata said spares get_item a call of its own. */
		keys = CiflowEntityKeysFromShape(args->entity, shape);
		CiflowEntityKeysRemember(conn->name, &keys, 1);
		/* The plan (its $filter) outlives this transaction. */
		MemoryContextSwitchTo(run_cxt);
		PlanRun(args, conn, shape, target, &plan);
		if (plan.skip)
		{
			/* Nothing changed upstream: a run of 0 pages, its place kept. */
			run->watermark = MemoryContextStrdup(run_cxt, plan.previous_json);
			CiflowRunFinish(run, true, NULL);
			CommitXact(run_cxt);
		}
		else
		{
			phase = PHASE_PREPARE;
			CiflowBoundLockWaits();
			CiflowPrepareTarget(target, shape);
			if (plan.method == CIFLOW_PUBLISH_SWAP && !target->is_new)
				CiflowCheckSwap(target);
			CiflowRunSetStaging(run->run_id, target->staging_relid);

			/*
			 * Durable before any page, even where page transactions commit
			 * asynchronously: after a crash the run is still 'running' with
			 * its staging heap recorded, and the next run sweeps it.
			 */
			(void) set_config_option("synchronous_commit", "on", PGC_USERSET, PGC_S_SESSION,
									 GUC_ACTION_LOCAL, true, 0, false);
			staging = table_open(target->staging_relid, AccessShareLock);
			loader = CiflowLoaderCreate(shape, staging, target->in_place, run_cxt);
			table_close(staging, AccessShareLock);
			CommitXact(run_cxt);

			phase = PHASE_PAGES;
			pgstat_report_activity(STATE_RUNNING, "ciflow sync: reading pages");
			delta_link = PullPages(args, conn, shape, target, &plan, loader, run, failmsg,
								   run_cxt, &refusal);
			if (refusal != NULL)
			{
				/* Nothing was staged: the same run pulls everything instead. */
				plan.delta_link = NULL;
				plan.method = CIFLOW_PUBLISH_DIFF;
				FullPullNotice(&plan, shape,
							   psprintf("the service refused the stored delta link (%s)", refusal));
				delta_link = PullPages(args, conn, shape, target, &plan, loader, run, failmsg,
									   run_cxt, &refusal);
			}

			phase = PHASE_PUBLISH;
			pgstat_report_activity(STATE_RUNNING, "ciflow sync: publishing");
			Publish(target, shape, &plan, delta_link, run, run_cxt);
			changed = run->inserted + run->updated + run->deleted > 0;
		}
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

		StripStatementContext(edata);
		HintLockTimeout(edata, target->qualified);
		CiflowReframeError(edata, failmsg);

		/* Recording the failure must not itself be cancelled. */
		HOLD_CANCEL_INTERRUPTS();
		BeginXact();
		CiflowDropStaging(target);
		CiflowRunSetStaging(run->run_id, InvalidOid);
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
	/*
	 * Statistics are autovacuum's, as after COPY, unless the session asks:
	 * then a run that changed nothing still leaves them (and WAL) alone.
	 */
	if (changed && ciflow_settings.analyze_after_sync)
		AnalyzeAfterPublish(target, caller_cxt);
	/* The run's memory goes; what the caller reads of it must not. */
	if (run->watermark != NULL)
		run->watermark = MemoryContextStrdup(caller_cxt, run->watermark);
	MemoryContextDelete(run_cxt);
}
