/*-------------------------------------------------------------------------
 *
 * load.c
 *	  Rows of one page into the staging heap: each JSON row becomes one
 *	  tuple of the heap's own descriptor, values converted straight to
 *	  Datums, inserted in batches with table_multi_insert the way COPY does.
 *
 *	  The loader lives for a whole run (across its transactions); the work
 *	  of a page happens in a context reset for every page, so memory stays
 *	  bounded by one page.  Every row is numbered in the order it arrived
 *	  (the staging heap's CIFLOW_STAGE_SEQ column), so that of a key
 *	  delivered twice the version received last wins.  It writes only the
 *	  heap it is given and knows nothing of how that heap is published.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "executor/tuptable.h"
#include "utils/memutils.h"

#include "convert.h"
#include "load.h"
#include "odata.h"

#define LOAD_BATCH 1000

struct CiflowLoader
{
	const CiflowShape *shape;
	TupleDesc	desc;			/* the staging heap's, with dropped columns */
	int		   *source;			/* per attribute: shape column, or -1 */
	CiflowConverter *conv;		/* per attribute with a source */
	int			seq_attno;		/* CIFLOW_STAGE_SEQ's index, or -1 */
	int			deleted_attno;	/* CIFLOW_STAGE_DELETED's index, or -1 */
	bool		deletions;		/* a delta pull: $deletedEntity entries */
	int64		seq;			/* rows numbered so far in the run */
	TupleTableSlot *slots[LOAD_BATCH];
	int			nslots;
	MemoryContext cxt;
	MemoryContext page_cxt;

	/* where we are, for the error context */
	int			page_no;
	int			row_no;
	int			attno;
};

CiflowLoader *
CiflowLoaderCreate(const CiflowShape *shape, Relation staging, MemoryContext cxt)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	CiflowLoader *ld = palloc0(sizeof(CiflowLoader));
	int			i;

	ld->shape = shape;
	ld->cxt = cxt;
	ld->desc = CreateTupleDescCopy(RelationGetDescr(staging));
	ld->source = palloc(sizeof(int) * ld->desc->natts);
	ld->conv = palloc0(sizeof(CiflowConverter) * ld->desc->natts);
	ld->page_cxt = AllocSetContextCreate(cxt, "ciflow load page",
										 ALLOCSET_DEFAULT_SIZES);

	/*
	 * Columns are matched by name; others (dropped or the user's own) stay
	 * NULL.
	 */
	ld->seq_attno = -1;
	ld->deleted_attno = -1;
	for (i = 0; i < ld->desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(ld->desc, i);
		int			c;

		ld->source[i] = -1;
		if (att->attisdropped)
			continue;
		if (strcmp(NameStr(att->attname), CIFLOW_STAGE_SEQ) == 0)
			ld->seq_attno = i;
		if (strcmp(NameStr(att->attname), CIFLOW_STAGE_DELETED) == 0)
			ld->deleted_attno = i;
		for (c = 0; c < shape->ncolumns; c++)
		{
			if (strcmp(NameStr(att->attname), shape->columns[c].name) == 0)
			{
				ld->source[i] = c;
				CiflowConverterInit(&ld->conv[i], att->atttypid, att->atttypmod, cxt);
				break;
			}
		}
	}
	MemoryContextSwitchTo(old);
	return ld;
}

void
CiflowLoaderAcceptDeletions(CiflowLoader *ld, bool accept)
{
	if (accept && ld->shape->nkeys != 1)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("entity \"%s\" has %d key columns; a delta link names a deleted row by one",
						ld->shape->entity, ld->shape->nkeys)));
	ld->deletions = accept;
}

/* A delta link's deletion: {"@odata.context": ".../$deletedEntity", "id": ...}. */
static bool
IsDeletion(json_t *row)
{
	const char *context = CiflowJsonString(row, "@odata.context");
	size_t		len = context ? strlen(context) : 0;
	static const char suffix[] = "$deletedEntity";

	return len >= sizeof(suffix) - 1 &&
		strcmp(context + len - (sizeof(suffix) - 1), suffix) == 0;
}

static void
LoadErrorContext(void *arg)
{
	CiflowLoader *ld = (CiflowLoader *) arg;

	if (ld->attno >= 0 && ld->source[ld->attno] >= 0)
		errcontext("attribute \"%s\" (column %s) of row %d on page %d",
				   ld->shape->columns[ld->source[ld->attno]].remote_name,
				   ld->shape->columns[ld->source[ld->attno]].name,
				   ld->row_no, ld->page_no);
	else
		errcontext("row %d on page %d", ld->row_no, ld->page_no);
}

static void
FillSlot(CiflowLoader *ld, TupleTableSlot *slot, json_t *row)
{
	bool		deletion;
	int			i;

	ExecClearTuple(slot);
	if (!json_is_object(row))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_JSON_TEXT),
				 errmsg("a row of entity \"%s\" is not a JSON object", ld->shape->entity)));

	deletion = ld->deletions && IsDeletion(row);
	for (i = 0; i < ld->desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(ld->desc, i);
		int			c = ld->source[i];

		ld->attno = i;
		if (i == ld->seq_attno)
		{
			slot->tts_values[i] = Int64GetDatum(++ld->seq);
			slot->tts_isnull[i] = false;
		}
		else if (i == ld->deleted_attno && deletion)
		{
			slot->tts_values[i] = BoolGetDatum(true);
			slot->tts_isnull[i] = false;
		}
		else if (c < 0 || (deletion && !ld->shape->columns[c].is_key))
		{
			slot->tts_values[i] = (Datum) 0;
			slot->tts_isnull[i] = true;
		}
		else
			slot->tts_values[i] = CiflowConvert(&ld->conv[i],
												json_object_get(row, deletion ? "id" :
																ld->shape->columns[c].remote_name),
												&slot->tts_isnull[i]);
		/* A deletion fills its key alone. */
		if (slot->tts_isnull[i] &&
			((att->attnotnull && !deletion) || (c >= 0 && ld->shape->columns[c].is_key)))
			ereport(ERROR,
					(errcode(ERRCODE_NOT_NULL_VIOLATION),
					 errmsg("null value in column \"%s\" of entity \"%s\"",
							NameStr(att->attname), ld->shape->entity),
					 errdetail("Key columns and NOT NULL columns need a value in every row.")));
	}
	ld->attno = -1;
	ExecStoreVirtualTuple(slot);
}

int
CiflowLoadPage(CiflowLoader *ld, Relation staging, json_t *rows, int page_no)
{
	ErrorContextCallback errcb;
	BulkInsertState bistate;
	MemoryContext old;
	CommandId	cid = GetCurrentCommandId(true);
	size_t		nrows = json_array_size(rows);
	size_t		i;
	int			batch = 0;

	MemoryContextReset(ld->page_cxt);
	old = MemoryContextSwitchTo(ld->cxt);
	while ((size_t) ld->nslots < Min(nrows, (size_t) LOAD_BATCH))
		ld->slots[ld->nslots++] = MakeSingleTupleTableSlot(ld->desc, &TTSOpsHeapTuple);
	MemoryContextSwitchTo(ld->page_cxt);

	ld->page_no = page_no;
	ld->attno = -1;
	errcb.callback = LoadErrorContext;
	errcb.arg = ld;
	errcb.previous = error_context_stack;
	error_context_stack = &errcb;

	bistate = GetBulkInsertState();
	for (i = 0; i < nrows; i++)
	{
		ld->row_no = (int) i + 1;
		FillSlot(ld, ld->slots[batch++], json_array_get(rows, i));
		if (batch == LOAD_BATCH || i + 1 == nrows)
		{
			table_multi_insert(staging, ld->slots, batch, cid, 0, bistate);
			batch = 0;
		}
	}
	FreeBulkInsertState(bistate);

	error_context_stack = errcb.previous;
	for (i = 0; i < (size_t) ld->nslots; i++)
		ExecClearTuple(ld->slots[i]);
	MemoryContextSwitchTo(old);
	return (int) nrows;
}
